"""The transport contract (``cachesync/transports/base.py``), run over every transport.

One suite, parametrized over ``memory://``, ``redis://``, ``redis+stream://``, ``amqp://`` and
``nats://``.
The broker-backed ones run against the real servers on 127.0.0.1 (skipped, or failed under CI,
when a server is down; see ``conftest.py``). Each test uses its own channel and its own
connection names, so a broker-side cut only hits the connections of the test that asked for it.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from cachesync.errors import ConnectionLost, StateError, TransportError
from cachesync.transports.base import ConnectionState, Transport, from_url

from .helpers import SilentServer, eventually
from .tcpproxy import TcpProxy, proxied_url

pytestmark = pytest.mark.timeout(20)

KINDS = [
    "memory",
    "redis",
    "redis+stream",
    "amqp",
    "amqp+stream",
    "nats",
    "redis+sentinel",
    "redis+cluster",
]

# Transports that keep a log and replay what a subscriber missed.
REPLAYING = {"redis+stream", "nats", "amqp+stream"}

# Where the broker of each kind listens (for the network-drop test's proxy).
ADDRESSES = {
    "amqp": ("127.0.0.1", 5672),
    "amqp+stream": ("127.0.0.1", 5672),
    "redis": ("127.0.0.1", 6379),
    "redis+stream": ("127.0.0.1", 6379),
    "nats": ("127.0.0.1", 4222),
}

# Short enough for tests to see a dead subscription quickly, long enough not to misfire.
REDIS_OPTIONS: dict[str, Any] = {"connect_timeout": 5.0, "health_check_interval": 2.0}


class Harness:
    """How to build, and how to cut, the transports of one kind for one test."""

    def __init__(
        self, kind: str, url: str, tag: str, admin_url: str = "", proxy: TcpProxy | None = None
    ) -> None:
        self.kind = kind
        self.proxy = proxy  # for nats: every connection of the test goes through it
        self.url = url
        self.admin_url = admin_url  # for redis: where to send CLIENT KILL
        self.tag = tag  # names every connection of this test, for the broker-side cut
        self.channels: list[str] = []

    def channel(self, suffix: str = "") -> str:
        name = f"{self.tag}{suffix}"
        self.channels.append(name)
        return name

    def make(self, url: str | None = None, **options: Any) -> Transport:
        """A transport on this test's URL (or ``url``), not yet connected."""
        if self.kind in ("redis", "redis+stream", "redis+sentinel", "redis+cluster"):
            options = {**REDIS_OPTIONS, **options}
        elif self.kind in ("amqp", "amqp+stream"):
            options = {"connect_timeout": 5.0, "connection_name": self.tag, **options}
        elif self.kind == "nats":
            options = {"connect_timeout": 5.0, "health_check_interval": 2.0, **options}
        return from_url(url or self.url, **options)

    async def cut(self) -> None:
        """Break every connection of this test's transports from the broker's side."""
        if self.kind == "memory":
            from cachesync.transports.memory import bus_for

            bus_for(self.url).disconnect_all()
        elif self.kind in ("amqp", "amqp+stream"):
            from .amqp_tools import close_amqp_connections, rabbitmqctl_available

            if not rabbitmqctl_available():
                pytest.skip("rabbitmqctl is not on the PATH (it must run on the broker's host)")
            assert await close_amqp_connections(self.tag) > 0
        elif self.proxy is not None:
            # NATS has no "kill this client" for a plain account: cut at the proxy instead.
            await self.proxy.cut()
        else:
            assert await kill_redis_clients(self.admin_url, self.tag) > 0


class SentinelHarness(Harness):
    """Cuts with CLIENT KILL on whichever node is the master now."""

    def __init__(self, *args: Any, deployment: Any) -> None:
        super().__init__(*args)
        self.deployment = deployment

    async def cut(self) -> None:
        admin = f"redis://127.0.0.1:{self.deployment.master_port()}/0"
        assert await kill_redis_clients(admin, self.tag) > 0


class ClusterHarness(SentinelHarness):
    """Cuts with CLIENT KILL on every primary of the cluster."""

    async def cut(self) -> None:
        killed = 0
        for port in self.deployment.primaries():
            killed += await kill_redis_clients(f"redis://127.0.0.1:{port}/0", self.tag)
        assert killed > 0


async def kill_redis_clients(url: str, name: str, commands: tuple[str, ...] = ()) -> int:
    """``CLIENT KILL ID`` every connection named ``name`` (and, if given, running one of
    ``commands``); returns how many. Other tests' connections have other names."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(url, socket_timeout=None)
    try:
        killed = 0
        for client in await admin.client_list():
            if client.get("name") != name:
                continue
            if commands and client.get("cmd") not in commands:
                continue
            killed += int(await admin.client_kill_filter(_id=client["id"]))
        return killed
    finally:
        await admin.aclose()


@pytest.fixture(params=KINDS)
async def harness(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Harness]:
    kind: str = request.param
    tag = f"cachesync-test-{unique}"
    if kind == "memory":
        yield Harness(kind, f"memory://{unique}", tag)
        return
    if kind == "amqp":
        amqp_url = str(request.getfixturevalue("amqp_url"))
        pytest.importorskip("aio_pika")
        yield Harness(kind, amqp_url, tag)
        return
    if kind == "amqp+stream":
        amqp_url = str(request.getfixturevalue("amqp_url"))
        pytest.importorskip("aio_pika")
        made = Harness(kind, amqp_url.replace("amqp://", "amqp+stream://", 1), tag)
        try:
            yield made
        finally:
            await delete_amqp_streams(amqp_url, made.channels)
        return
    if kind == "redis+sentinel":
        pytest.importorskip("redis")
        deployment = request.getfixturevalue("sentinel")
        url = f"{deployment.url}?client_name={tag}"
        yield SentinelHarness(kind, url, tag, deployment=deployment)
        return
    if kind == "redis+cluster":
        pytest.importorskip("redis")
        deployment = request.getfixturevalue("redis_cluster")
        url = f"{deployment.url}?client_name={tag}"
        yield ClusterHarness(kind, url, tag, deployment=deployment)
        return
    if kind == "nats":
        nats_url = str(request.getfixturevalue("nats_url"))
        pytest.importorskip("nats")
        host, _, port = nats_url.removeprefix("nats://").partition(":")
        async with TcpProxy(host, int(port or 4222)) as proxy:
            made = Harness(kind, proxied_url(nats_url, proxy), tag, proxy=proxy)
            try:
                yield made
            finally:
                await delete_nats_streams(nats_url, made.channels)
        return
    base = str(request.getfixturevalue("redis_url"))
    scheme = "redis+stream" if kind == "redis+stream" else "redis"
    url = base.replace("redis://", f"{scheme}://", 1) + f"?client_name={tag}"
    made = Harness(kind, url, tag, admin_url=base)
    try:
        yield made
    finally:
        if kind == "redis+stream" and made.channels:
            import redis.asyncio as aioredis

            admin = aioredis.Redis.from_url(base, socket_timeout=None)
            try:
                await admin.delete(*made.channels)
            finally:
                await admin.aclose()


async def delete_amqp_streams(url: str, channels: list[str], stream: str = "stream") -> None:
    """Delete the stream queues (and exchanges) the amqp+stream transport made for ``channels``."""
    if not channels:
        return
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        for channel in channels:
            amqp_channel = await connection.channel()
            await amqp_channel.queue_delete(f"{channel}.{stream}")
            await amqp_channel.exchange_delete(channel)
            await amqp_channel.close()
    finally:
        await connection.close()


async def delete_nats_streams(url: str, channels: list[str]) -> None:
    """Delete the JetStream streams the NATS transport made for ``channels``."""
    if not channels:
        return
    import nats
    import nats.js.errors

    from cachesync.transports.nats import stream_name

    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        for channel in channels:
            try:
                await js.delete_stream(stream_name(channel))
            except nats.js.errors.NotFoundError:
                pass
    finally:
        await nc.close()


class Subscriber:
    """Runs ``transport.subscribe(channel)`` in a task and records what it sees, in order."""

    def __init__(self, transport: Transport, channel: str) -> None:
        self.transport = transport
        self.channel = channel
        self.log: list[bytes | tuple[str, bool]] = []  # payloads and ("ready", resumed)
        self.ready = asyncio.Event()
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    @property
    def received(self) -> list[bytes]:
        return [entry for entry in self.log if isinstance(entry, bytes)]

    def _on_ready(self, resumed: bool) -> None:
        self.log.append(("ready", resumed))
        self.ready.set()

    async def _run(self) -> None:
        try:
            async for payload in self.transport.subscribe(self.channel, self._on_ready):
                self.log.append(payload)
                self._changed.set()
        finally:
            self._changed.set()

    async def live(self) -> None:
        """Wait until ``on_ready`` was called (failing at once if the subscription died)."""
        ready = asyncio.ensure_future(self.ready.wait())
        try:
            await asyncio.wait({ready, self.task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self.ready.is_set():
            self.task.result()  # raises what ended it
            raise AssertionError("the subscription ended before on_ready")

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Wait until ``count`` payloads have arrived; return them."""
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"subscription ended after {len(self.received)}")
                self._changed.clear()
                await self._changed.wait()
        return self.received

    async def ended(self, timeout: float = 5.0) -> BaseException | None:
        """Wait for the subscription to end; return the exception it ended with."""
        done, _ = await asyncio.wait({self.task}, timeout=timeout)
        if not done:
            raise AssertionError(f"the subscription did not end within {timeout}s")
        return self.task.exception()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@asynccontextmanager
async def subscribed(transport: Transport, channel: str) -> AsyncIterator[Subscriber]:
    """A live subscription for the body of the ``with``; stopped (and awaited) after it."""
    sub = Subscriber(transport, channel)
    try:
        await sub.live()
        yield sub
    finally:
        await sub.stop()


@asynccontextmanager
async def connected(harness: Harness, count: int, **options: Any) -> AsyncIterator[list[Transport]]:
    transports = [harness.make(**options) for _ in range(count)]
    try:
        for transport in transports:
            await transport.connect()
        yield transports
    finally:
        for transport in transports:
            await transport.close()


# -- lifecycle -------------------------------------------------------------------------------


async def test_connect_and_close_are_idempotent_and_reopen_works(harness: Harness) -> None:
    transport = harness.make()
    await transport.close()  # closing what never opened is fine
    await transport.connect()
    await transport.connect()
    await transport.close()
    await transport.close()
    # Reopen after close, as the client does to restart a stalled connection.
    await transport.connect()
    try:
        async with (
            connected(harness, 1) as [sub_transport],
            subscribed(sub_transport, harness.channel()) as sub,
        ):
            await transport.publish(sub.channel, b"again")
            assert await sub.wait_for(1) == [b"again"]
    finally:
        await transport.close()


async def test_publish_before_connect_is_a_state_error(harness: Harness) -> None:
    transport = harness.make()
    with pytest.raises(StateError):
        await transport.publish(harness.channel(), b"x")
    await transport.connect()
    await transport.close()
    with pytest.raises(StateError):
        await transport.publish(harness.channel(), b"x")


async def test_subscribe_before_connect_raises_a_transport_error(harness: Harness) -> None:
    transport = harness.make()
    with pytest.raises(TransportError):
        async for _ in transport.subscribe(harness.channel()):
            pass
    await transport.close()


# -- delivery --------------------------------------------------------------------------------


async def test_publish_then_receive_in_order(harness: Harness) -> None:
    channel = harness.channel()
    payloads = [b"message %d" % i for i in range(1000)]
    async with connected(harness, 2) as [pub, sub_transport]:
        async with subscribed(sub_transport, channel) as sub:
            for payload in payloads:
                await pub.publish(channel, payload)
            received = await sub.wait_for(len(payloads))
            assert received == payloads
            assert all(type(payload) is bytes for payload in received)
            assert sub.log[0] == ("ready", False)


async def test_every_subscriber_gets_every_message(harness: Harness) -> None:
    channel = harness.channel()
    payloads = [b"%d" % i for i in range(200)]
    async with connected(harness, 3) as [pub, first, second]:
        async with subscribed(first, channel) as one, subscribed(second, channel) as two:
            for payload in payloads:
                await pub.publish(channel, payload)
            assert await one.wait_for(len(payloads)) == payloads
            assert await two.wait_for(len(payloads)) == payloads


async def test_a_channel_only_gets_its_own_messages(harness: Harness) -> None:
    mine, other = harness.channel("-a"), harness.channel("-b")
    async with connected(harness, 2) as [pub, sub_transport]:
        async with subscribed(sub_transport, mine) as sub:
            await pub.publish(other, b"not for you")
            await pub.publish(mine, b"for you")
            assert await sub.wait_for(1) == [b"for you"]


async def test_on_ready_comes_first_and_the_subscription_is_live_after_it(
    harness: Harness,
) -> None:
    channel = harness.channel()
    async with connected(harness, 2) as [pub, sub_transport]:
        sub = Subscriber(sub_transport, channel)
        try:
            await sub.live()
            # Published the moment on_ready has been called: it must arrive.
            await pub.publish(channel, b"first")
            assert await sub.wait_for(1) == [b"first"]
            assert sub.log == [("ready", False), b"first"]
        finally:
            await sub.stop()


async def test_on_ready_is_live_every_time(harness: Harness) -> None:
    # The race "on_ready called, SUBSCRIBE not yet effective" shows up only sometimes: repeat.
    async with connected(harness, 2) as [pub, sub_transport]:
        for i in range(5):
            channel = harness.channel(f"-{i}")
            async with subscribed(sub_transport, channel) as sub:
                await pub.publish(channel, b"now")
                assert await sub.wait_for(1) == [b"now"]


async def test_payloads_are_binary_safe(harness: Harness) -> None:
    channel = harness.channel()
    rng = random.Random(7)
    payloads = [
        b"",
        b"\x00",
        bytes(range(256)),
        b"\xff\xfe\x80 not utf-8 \xc3\x28",
        b"\r\n",
        b"*3\r\n$7\r\nmessage\r\n$1\r\nx\r\n$1\r\ny\r\n",  # looks like a RESP frame
        rng.randbytes(70_000),  # larger than one socket read
        rng.randbytes(1 << 20),  # 1 MiB
        b"after the big one",
    ]
    async with connected(harness, 2) as [pub, sub_transport]:
        async with subscribed(sub_transport, channel) as sub:
            for payload in payloads:
                await pub.publish(channel, payload)
            received = await sub.wait_for(len(payloads))
            assert [len(p) for p in received] == [len(p) for p in payloads]
            assert received == payloads


# -- ending ----------------------------------------------------------------------------------


async def test_close_ends_a_subscription_promptly_with_connection_lost(harness: Harness) -> None:
    async with connected(harness, 1) as [transport]:
        sub = Subscriber(transport, harness.channel())
        try:
            await sub.live()
            started = time.monotonic()
            await transport.close()
            assert isinstance(await sub.ended(timeout=2.0), ConnectionLost)
            assert time.monotonic() - started < 2.0
        finally:
            await sub.stop()


async def test_stopping_the_consumer_ends_the_subscription_cleanly(harness: Harness) -> None:
    # Cancelling the task that iterates must end it at once, on every transport, and leave
    # nothing behind that would warn (pytest turns warnings into errors).
    channel = harness.channel()
    async with connected(harness, 2) as [pub, sub_transport]:
        sub = Subscriber(sub_transport, channel)
        await sub.live()
        for i in range(50):
            await pub.publish(channel, b"%d" % i)
        await sub.wait_for(1)
        sub.task.cancel()
        await asyncio.wait_for(asyncio.gather(sub.task, return_exceptions=True), 2.0)
        assert sub.task.cancelled()
        # The transport still works for a new subscription.
        async with subscribed(sub_transport, harness.channel("-2")) as again:
            await pub.publish(again.channel, b"ok")
            assert await again.wait_for(1) == [b"ok"]


async def test_cut_raises_connection_lost_and_resubscribing_works(harness: Harness) -> None:
    channel = harness.channel()
    async with connected(harness, 2) as [pub, sub_transport]:
        sub = Subscriber(sub_transport, channel)
        try:
            await sub.live()
            await pub.publish(channel, b"before")
            await sub.wait_for(1)
            await harness.cut()
            assert isinstance(await sub.ended(timeout=10.0), ConnectionLost)
        finally:
            await sub.stop()
        # What a listener does next: connect() (the publisher too), subscribe again.
        await sub_transport.connect()
        await pub.connect()
        async with subscribed(sub_transport, channel) as again:
            await pub.publish(channel, b"after")
            received = await again.wait_for(1)
            # A transport with a log replays nothing here ("before" was read already), and
            # only it may say that nothing was missed.
            assert received == [b"after"]
            assert again.log[0] == ("ready", harness.kind in REPLAYING)


# -- unreachable broker ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _with_password(url: str, port: int) -> str:
    """``url`` pointed at 127.0.0.1:``port`` with the password ``secret``."""
    scheme, _, rest = url.partition("://")
    _, _, path = rest.partition("/")
    user = "guest" if scheme.startswith("amqp") else "user"
    return f"{scheme}://{user}:secret@127.0.0.1:{port}/{path}"


async def _connect_fails(harness: Harness, port: int) -> tuple[str, Transport, float]:
    transport = harness.make(_with_password(harness.url, port), connect_timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(TransportError) as caught:
            await transport.connect()
    finally:
        await transport.close()
    return str(caught.value), transport, time.monotonic() - started


@pytest.mark.parametrize("how", ["refused", "reset"])
async def test_connect_to_a_dead_broker_fails_quickly_and_hides_the_password(
    harness: Harness, how: str
) -> None:
    if harness.kind == "memory":
        pytest.skip("memory:// has no broker to be down")
    if how == "reset":
        # Accepts, then resets at once: a broker going down, or a port forward to nothing.
        async with TcpProxy("127.0.0.1", _free_port()) as proxy:
            proxy.refuse(True)
            message, transport, elapsed = await _connect_fails(harness, proxy.port)
    else:
        message, transport, elapsed = await _connect_fails(harness, _free_port())
    assert "secret" not in message
    assert "***" in transport.safe_url
    assert transport.safe_url in message
    assert elapsed < 3.0, f"connect took {elapsed:.1f}s with connect_timeout=0.5"


def _state(transport: Transport) -> ConnectionState:
    """Where ``transport`` is in its lifecycle (every transport here reports it)."""
    state: ConnectionState = transport.state  # type: ignore[attr-defined]
    return state


async def test_publish_after_a_failed_connect_is_a_transport_error(harness: Harness) -> None:
    # Not a lifecycle error: connect() was called, the broker is what is missing.
    if harness.kind == "memory":
        pytest.skip("memory:// has no broker to be down")
    transport = harness.make(_with_password(harness.url, _free_port()), connect_timeout=0.3)
    try:
        with pytest.raises(TransportError):
            await transport.connect()
        assert _state(transport) is ConnectionState.FAILED
        with pytest.raises(TransportError) as caught:
            await transport.publish(harness.channel(), b"x")
        assert not isinstance(caught.value, StateError)
    finally:
        await transport.close()
    assert _state(transport) is ConnectionState.CLOSED


@pytest.mark.parametrize("how", ["refused", "silent"])
async def test_close_during_connect_gives_up_at_once_and_leaves_nothing_open(
    harness: Harness, how: str
) -> None:
    # connect() is retrying (a port nobody listens on) or waiting for a node that took the TCP
    # connection and never answers, with a long connect_timeout; close() ends it.
    if harness.kind == "memory":
        pytest.skip("memory:// has no broker to wait for")
    async with SilentServer() as silent:
        port = silent.port if how == "silent" else _free_port()
        transport = harness.make(_with_password(harness.url, port), connect_timeout=30.0)
        connecting = asyncio.create_task(transport.connect())
        try:
            if how == "silent":
                await eventually(lambda: silent.accepted > 0, timeout=5)
            else:
                await asyncio.sleep(0.3)  # a few attempts and backoffs: nothing to await
            assert not connecting.done()
            started = time.monotonic()
            await transport.close()
            with pytest.raises(TransportError, match="closed while connecting"):
                await asyncio.wait_for(connecting, 5)
            assert time.monotonic() - started < 1.0
            assert _state(transport) is ConnectionState.CLOSED
            await eventually(lambda: silent.open == 0, timeout=5)
            with pytest.raises(StateError):
                await transport.publish(harness.channel(), b"x")
        finally:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            await transport.close()


# Transports whose URL may name several nodes, tried in turn by connect().
HOST_LISTS = {"amqp", "amqp+stream", "nats", "redis+cluster"}


def _silent_host_first(url: str, port: int) -> str:
    """``url`` with ``127.0.0.1:port`` put first in its host list."""
    scheme, _, rest = url.partition("://")
    netloc_end = len(rest)
    for mark in "/?":
        if mark in rest:
            netloc_end = min(netloc_end, rest.index(mark))
    userinfo, at, _ = rest[:netloc_end].rpartition("@")
    start = len(userinfo) + len(at)
    return f"{scheme}://{rest[:start]}127.0.0.1:{port},{rest[start:]}"


async def test_a_first_host_that_never_answers_gets_only_its_share(harness: Harness) -> None:
    # The first node takes the TCP connection and never speaks: it gets half of
    # connect_timeout (its share of a round over two), and the live node the rest.
    if harness.kind not in HOST_LISTS:
        pytest.skip("one host per URL")
    async with SilentServer() as silent:
        transport = harness.make(_silent_host_first(harness.url, silent.port), connect_timeout=4.0)
        started = time.monotonic()
        try:
            await transport.connect()
            elapsed = time.monotonic() - started
            assert silent.accepted == 1
            assert elapsed < 3.0, f"connect took {elapsed:.1f}s with connect_timeout=4"
            assert _state(transport) is ConnectionState.OPEN
            await transport.publish(harness.channel(), b"via the second host")
        finally:
            await transport.close()
        await eventually(lambda: silent.open == 0, timeout=5)


def _with_userinfo(url: str, userinfo: str) -> str:
    """``url`` with ``userinfo`` as its user-info (in place of its own, if any)."""
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{userinfo}@{netloc.rpartition('@')[2]}{slash}{path}"


async def test_refused_credentials_fail_at_once(harness: Harness) -> None:
    if harness.kind in ("memory", "nats"):
        pytest.skip("no credentials to refuse (the local nats-server takes any)")
    transport = harness.make(_with_userinfo(harness.url, "nobody:wrong"), connect_timeout=10.0)
    started = time.monotonic()
    try:
        with pytest.raises(TransportError, match="refused"):
            await transport.connect()
    finally:
        await transport.close()
    assert time.monotonic() - started < 3.0


async def test_a_network_drop_reaches_a_subscription(harness: Harness) -> None:
    # The same contract when the network (not the broker) drops the connection.
    if harness.kind == "memory":
        pytest.skip("memory:// has no network")
    if harness.kind in ("redis+sentinel", "redis+cluster"):
        pytest.skip("the nodes are found by the address they announce: no proxy in the path")
    host, port = ADDRESSES[harness.kind]
    channel = harness.channel()
    async with TcpProxy(host, port) as proxy, connected(harness, 1) as [pub]:
        sub_transport = harness.make(proxied_url(harness.url, proxy))
        await sub_transport.connect()
        try:
            sub = Subscriber(sub_transport, channel)
            try:
                await sub.live()
                await pub.publish(channel, b"x")
                await sub.wait_for(1)
                await proxy.cut()
                assert isinstance(await sub.ended(timeout=10.0), ConnectionLost)
            finally:
                await sub.stop()
            await sub_transport.connect()
            async with subscribed(sub_transport, channel) as again:
                await pub.publish(channel, b"y")
                assert await again.wait_for(1) == [b"y"]
        finally:
            await sub_transport.close()
