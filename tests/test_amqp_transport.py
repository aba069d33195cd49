"""AmqpTransport against the real RabbitMQ on 127.0.0.1:5672 (see tests/conftest.py).

Faults are injected from the broker side with ``rabbitmqctl close_connection``, aimed only at
this test's own connections (each transport gets a unique ``connection_name``), so tests running
beside these are not disturbed. The TCP-proxy tests run once ``tests/tcpproxy.py`` exists.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from cachesync import CacheSync
from cachesync.errors import ConfigError, ConnectionLost, StateError, TransportError
from cachesync.transports.amqp import AmqpTransport
from cachesync.transports.base import ConnectionState, from_url

from .amqp_tools import (
    amqp_connection_names,
    close_amqp_connections,
    exchange_bindings,
    rabbitmqctl_available,
    unacknowledged,
)
from .helpers import eventually

pytestmark = [pytest.mark.timeout(30), pytest.mark.rabbitmq]

Make = Callable[..., Awaitable[AmqpTransport]]


class Consumer:
    """Iterates one subscription in a task, logging ``("ready", resumed)`` and payloads in order.

    ``async with`` starts it and returns once ``on_ready`` ran; leaving cancels and awaits it.
    """

    def __init__(self, transport: AmqpTransport, channel: str) -> None:
        self.transport = transport
        self.channel = channel
        self.log: list[Any] = []
        self.ready = asyncio.Event()
        self.payloads: asyncio.Queue[bytes] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def _on_ready(self, resumed: bool) -> None:
        self.log.append(("ready", resumed))
        self.ready.set()

    async def _run(self) -> None:
        async for payload in self.transport.subscribe(self.channel, self._on_ready):
            self.log.append(payload)
            self.payloads.put_nowait(payload)

    async def __aenter__(self) -> Consumer:
        self.task = asyncio.create_task(self._run())
        ready = asyncio.create_task(self.ready.wait())
        try:
            await asyncio.wait({self.task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            await asyncio.gather(ready, return_exceptions=True)
        if self.task.done():
            self.task.result()  # raises what the subscription raised
            raise AssertionError("the subscription ended before it was ready")
        assert self.ready.is_set(), "on_ready was not called within 10s"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def take(self, n: int, timeout: float = 10.0) -> list[bytes]:
        """The next ``n`` payloads; fail if they do not all arrive within ``timeout``."""
        async with asyncio.timeout(timeout):
            return [await self.payloads.get() for _ in range(n)]

    async def ended(self, timeout: float = 10.0) -> BaseException | None:
        """Wait for the iteration to end; return what it raised."""
        assert self.task is not None
        done, _ = await asyncio.wait({self.task}, timeout=timeout)
        assert done, f"the subscription did not end within {timeout}s"
        return self.task.exception()


@pytest.fixture
async def make(amqp_url: str, unique: str) -> AsyncIterator[Make]:
    """Build connected transports, each with its own connection name; close them all after."""
    opened: list[AmqpTransport] = []

    async def factory(**options: Any) -> AmqpTransport:
        options.setdefault("connection_name", f"cachesync-test-{unique}-{len(opened)}")
        transport = AmqpTransport(amqp_url, **options)
        opened.append(transport)
        await transport.connect()
        return transport

    yield factory
    for transport in opened:
        await transport.close()


@pytest.fixture
def rabbitmqctl() -> None:
    if not rabbitmqctl_available():
        pytest.skip("rabbitmqctl is not on the PATH (it must run on the broker's host)")


async def poll(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Await ``check()`` until it holds (for broker state only rabbitmqctl can see)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the timeout")
        await asyncio.sleep(0.05)


def generator(iterator: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """A subscription as what it is, an async generator, for ``aclose()``."""
    assert isinstance(iterator, AsyncGenerator)
    return iterator


async def next_payload(iterator: AsyncIterator[bytes]) -> bytes:
    return await anext(iterator)


def refused_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- delivery --------------------------------------------------------------------------------


async def test_publish_then_receive_in_order(make: Make, unique: str) -> None:
    pub, sub = await make(), await make()
    async with Consumer(sub, unique) as consumer:
        sent = [b"m%d" % i for i in range(300)]
        for payload in sent:
            await pub.publish(unique, payload)
        assert await consumer.take(len(sent)) == sent


async def test_two_subscribers_each_get_every_message(make: Make, unique: str) -> None:
    pub, sub_a, sub_b = await make(), await make(), await make()
    # Two transports, and two subscriptions on one transport's connection.
    async with (
        Consumer(sub_a, unique) as first,
        Consumer(sub_b, unique) as second,
        Consumer(sub_b, unique) as third,
    ):
        sent = [b"e%d" % i for i in range(20)]
        for payload in sent:
            await pub.publish(unique, payload)
        for consumer in (first, second, third):
            assert await consumer.take(len(sent)) == sent


async def test_channels_are_separate(make: Make, unique: str) -> None:
    transport = await make()
    async with (
        Consumer(transport, f"{unique}-a") as on_a,
        Consumer(transport, f"{unique}-b") as on_b,
    ):
        await transport.publish(f"{unique}-b", b"for b")
        await transport.publish(f"{unique}-a", b"for a")
        assert await on_a.take(1) == [b"for a"]
        assert await on_b.take(1) == [b"for b"]
        assert on_a.payloads.empty() and on_b.payloads.empty()


async def test_on_ready_comes_once_before_the_first_payload_and_means_live(
    make: Make, unique: str
) -> None:
    pub, sub = await make(), await make()
    async with Consumer(sub, unique) as consumer:
        # Published the moment on_ready ran: the queue must already be bound and consuming.
        await pub.publish(unique, b"first")
        assert await consumer.take(1) == [b"first"]
        assert consumer.log == [("ready", False), b"first"]


async def test_publishing_to_a_channel_nobody_subscribes_is_fine(make: Make, unique: str) -> None:
    pub = await make()
    for _ in range(3):
        await pub.publish(unique, b"into the void")


async def test_publish_without_confirms_also_delivers(make: Make, unique: str) -> None:
    pub, sub = await make(publisher_confirms=False), await make()
    assert not pub.publisher_confirms
    async with Consumer(sub, unique) as consumer:
        for i in range(50):
            await pub.publish(unique, b"%d" % i)
        assert await consumer.take(50) == [b"%d" % i for i in range(50)]


async def test_publish_rejects_what_is_not_bytes(make: Make, unique: str) -> None:
    pub = await make()
    with pytest.raises(TypeError):
        await pub.publish(unique, "text")  # type: ignore[arg-type]


# -- connection loss -------------------------------------------------------------------------


@pytest.mark.usefixtures("rabbitmqctl")
async def test_broker_closing_the_connection_raises_connection_lost_and_resubscribe_works(
    make: Make, unique: str
) -> None:
    pub, sub = await make(), await make()
    async with Consumer(sub, unique) as consumer:
        await pub.publish(unique, b"before")
        assert await consumer.take(1) == [b"before"]
        started = time.monotonic()
        assert await close_amqp_connections(sub.connection_name) == 1
        error = await consumer.ended(timeout=5)
        assert isinstance(error, ConnectionLost), error
        # rabbitmqctl itself takes about half a second; the loss must follow promptly.
        assert time.monotonic() - started < 5
    await sub.connect()
    async with Consumer(sub, unique) as again:
        assert again.log == [("ready", False)]
        await pub.publish(unique, b"after")
        assert await again.take(1) == [b"after"]
    # The publisher's connection was not touched.
    assert pub.reconnects == 0


@pytest.mark.usefixtures("rabbitmqctl")
async def test_robust_reconnect_leaves_no_zombie_queue(make: Make, unique: str) -> None:
    pub, sub = await make(), await make()
    async with Consumer(sub, unique) as consumer:
        assert len(await exchange_bindings(unique)) == 1
        await close_amqp_connections(sub.connection_name)
        assert isinstance(await consumer.ended(), ConnectionLost)
    # aio-pika reconnects by itself and restores what it manages; our subscription channel is
    # not among it, so no queue comes back bound to the exchange.
    await eventually(lambda: sub.reconnects == 1, timeout=10)
    assert sub.connected
    assert await exchange_bindings(unique) == []
    await pub.publish(unique, b"nobody listens")
    assert await exchange_bindings(unique) == []
    # And subscribing again over the restored connection works without a new connect().
    async with Consumer(sub, unique) as again:
        await pub.publish(unique, b"fresh")
        assert await again.take(1) == [b"fresh"]


@pytest.mark.usefixtures("rabbitmqctl")
async def test_publish_works_again_after_aio_pika_reconnects(make: Make, unique: str) -> None:
    pub, sub = await make(), await make()
    async with Consumer(sub, unique) as consumer:
        await close_amqp_connections(pub.connection_name)
        confirmed: list[bytes] = []
        deadline = time.monotonic() + 15
        # No connect() call: the robust connection comes back by itself. Until it does,
        # publish raises TransportError and nothing else.
        while pub.reconnects == 0 or not confirmed:
            assert time.monotonic() < deadline, "publishing did not resume"
            payload = b"%d" % len(confirmed)
            try:
                await pub.publish(unique, payload)
            except TransportError:
                await asyncio.sleep(0.05)
                continue
            confirmed.append(payload)
        # With publisher confirms, every publish that returned reached the queue.
        received = await consumer.take(len(confirmed))
        assert received == confirmed


async def test_close_ends_subscriptions_promptly_and_is_idempotent(make: Make, unique: str) -> None:
    sub = await make()
    async with Consumer(sub, unique) as consumer:
        await sub.close()
        assert isinstance(await consumer.ended(timeout=2), ConnectionLost)
    await sub.close()
    with pytest.raises(StateError):
        await sub.publish(unique, b"closed")
    # Closed is not final: connect() opens it again.
    await sub.connect()
    async with Consumer(sub, unique) as again:
        await sub.publish(unique, b"reopened")
        assert await again.take(1) == [b"reopened"]


@pytest.mark.usefixtures("rabbitmqctl")
async def test_a_subscription_that_stops_leaves_no_queue(make: Make, unique: str) -> None:
    sub = await make()
    ready = asyncio.Event()
    iterator = generator(sub.subscribe(unique, lambda _resumed: ready.set()))
    first = asyncio.create_task(next_payload(iterator))
    try:
        await ready.wait()
        assert len(await exchange_bindings(unique)) == 1
        await sub.publish(unique, b"one")
        assert await first == b"one"
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await iterator.aclose()  # what `break` out of `async for` does
    await poll(lambda: _no_bindings(unique))
    assert sub.connected


async def test_a_stalled_consumer_is_bounded_at_the_broker_and_in_the_client(
    make: Make, unique: str
) -> None:
    max_backlog, prefetch, burst = 200, 50, 3000
    pub, sub = await make(), await make(max_backlog=max_backlog, prefetch=prefetch)
    ready = asyncio.Event()
    iterator = generator(sub.subscribe(unique, lambda _resumed: ready.set()))
    first = asyncio.create_task(next_payload(iterator))
    try:
        await ready.wait()
        tasks_before = len(asyncio.all_tasks())
        await pub.publish(unique, b"0")
        assert await first == b"0"
        # The consumer now holds its iterator: nothing is read while the burst arrives.
        for start in range(1, burst, 500):
            await asyncio.gather(
                *(pub.publish(unique, b"%d" % i) for i in range(start, min(start + 500, burst)))
            )
        # aiormq starts a task per delivery: the prefetch bounds how many are ever in flight.
        assert len(asyncio.all_tasks()) <= tasks_before + prefetch + 10
        received: list[bytes] = []
        last = b"%d" % (burst - 1)
        async with asyncio.timeout(10):
            while not received or received[-1] != last:
                received.append(await anext(iterator))
        # The broker kept at most max_backlog of the burst (dropping the oldest), the client at
        # most a prefetch more; the newest message is always there, and the loss is a gap in
        # the sequence that the consumer detects.
        assert len(received) <= max_backlog + prefetch + 1
        numbers = sorted(int(p) for p in received)
        assert any(
            later - earlier > 1 for earlier, later in zip(numbers, numbers[1:], strict=False)
        )
        assert sub.connected
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await iterator.aclose()


def test_the_backlog_bounds_are_read_from_the_url() -> None:
    transport = AmqpTransport("amqp://h/?max_backlog=100&prefetch=500")
    assert (transport.max_backlog, transport.prefetch) == (100, 100)  # prefetch <= backlog
    with pytest.raises(ConfigError, match="prefetch='none'.*integer >= 1"):
        AmqpTransport("amqp://h/?prefetch=none")


@pytest.mark.usefixtures("rabbitmqctl")
async def test_what_a_subscription_took_is_acknowledged_once_deliveries_pause(
    make: Make, unique: str
) -> None:
    """Acks go out in batches of a quarter of the prefetch; a trickle smaller than that is
    acknowledged once nothing more comes (a broker closes a channel whose deliveries stay
    unacknowledged past its consumer_timeout)."""
    pub, sub = await make(), await make(prefetch=40)  # a batch: 10 messages
    ready = asyncio.Event()
    iterator = generator(sub.subscribe(unique, lambda _resumed: ready.set()))
    first = asyncio.create_task(next_payload(iterator))
    waiting: asyncio.Task[bytes] | None = None
    try:
        await ready.wait()
        (queue,) = await exchange_bindings(unique)
        for i in range(3):
            await pub.publish(unique, b"%d" % i)
        assert [await first, await anext(iterator), await anext(iterator)] == [b"0", b"1", b"2"]
        waiting = asyncio.create_task(next_payload(iterator))  # the consumer asks for more

        async def all_acknowledged() -> bool:
            return await unacknowledged(queue) == 0

        await poll(all_acknowledged)
        assert not waiting.done()
    finally:
        for task in (first, waiting):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await iterator.aclose()


@pytest.mark.usefixtures("rabbitmqctl")
async def test_a_message_is_acknowledged_only_once_the_consumer_has_handled_it(
    make: Make, unique: str
) -> None:
    """The iterator acknowledges a message when it is resumed after yielding it (the consumer
    has handled it), never while the consumer still holds it, even with batches of one."""
    pub, sub = await make(), await make(prefetch=2)  # a batch: 1 message
    ready = asyncio.Event()
    iterator = generator(sub.subscribe(unique, lambda _resumed: ready.set()))
    first = asyncio.create_task(next_payload(iterator))
    waiting: asyncio.Task[bytes] | None = None
    try:
        await ready.wait()
        (queue,) = await exchange_bindings(unique)
        await pub.publish(unique, b"0")
        assert await first == b"0"
        # The consumer is handling b"0": a rabbitmqctl round trip takes far longer than the
        # iterator would need to acknowledge it, were it allowed to.
        assert await unacknowledged(queue) == 1
        waiting = asyncio.create_task(next_payload(iterator))  # handled: the consumer asks on

        async def all_acknowledged() -> bool:
            return await unacknowledged(queue) == 0

        await poll(all_acknowledged)
        assert not waiting.done()
    finally:
        for task in (first, waiting):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await iterator.aclose()


async def _no_bindings(exchange: str) -> bool:
    return await exchange_bindings(exchange) == []


# -- connecting ------------------------------------------------------------------------------


async def test_refused_port_fails_fast_with_a_redacted_url_and_a_hint() -> None:
    port = refused_port()
    transport = AmqpTransport(f"amqp://guest:hunter2@127.0.0.1:{port}/", connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        await transport.connect()
    assert time.monotonic() - started < 2
    message = str(info.value)
    assert "hunter2" not in message
    assert f"amqp://guest:***@127.0.0.1:{port}/" in message
    assert "docker compose up -d rabbitmq" in message
    assert not isinstance(info.value, ConnectionLost)
    # After a failed connect, publishing is a broker problem, not a lifecycle mistake.
    with pytest.raises(TransportError):
        await transport.publish("x", b"x")
    with pytest.raises(ConnectionLost):
        await anext(transport.subscribe("x"))
    await transport.close()


async def test_connect_tries_the_hosts_of_a_list_in_turn(amqp_url: str, unique: str) -> None:
    # A cluster's URL names its nodes; one that is down is passed over (the cluster fault
    # tests, tests/test_rabbitmq_cluster.py, kill a node under a live subscription).
    parts = urlsplit(amqp_url)
    userinfo, _, live = parts.netloc.rpartition("@")
    url = urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{refused_port()},{live}"))
    transport = AmqpTransport(url, connect_timeout=5.0)
    try:
        await transport.connect()
        async with Consumer(transport, unique) as consumer:
            await transport.publish(unique, b"via the second host")
            assert await consumer.take(1) == [b"via the second host"]
    finally:
        await transport.close()


def _with_hosts(amqp_url: str, *hosts: str | None) -> str:
    """``amqp_url`` (its credentials, vhost and options) naming ``hosts``; ``None`` is its own."""
    parts = urlsplit(amqp_url)
    userinfo, _, own = parts.netloc.rpartition("@")
    listed = ",".join(own if host is None else host for host in hosts)
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{listed}"))


async def test_a_live_host_after_many_dead_ones_is_reached_within_connect_timeout(
    amqp_url: str,
) -> None:
    # Dead nodes refuse at once: the backoff between retries belongs between rounds over the
    # list, not between its hosts (12 sleeps of up to 1 s would use up the deadline).
    dead = [f"127.0.0.1:{refused_port()}" for _ in range(12)]
    transport = AmqpTransport(_with_hosts(amqp_url, *dead, None), connect_timeout=3.0)
    try:
        started = time.monotonic()
        await transport.connect()
        assert time.monotonic() - started < 2
    finally:
        await transport.close()


async def test_a_slow_host_gets_the_time_the_hosts_before_it_did_not_use(unique: str) -> None:
    # Four nodes refuse at once; the fifth answers its handshake only after 1.5 s (a node
    # under load): it gets what is left of connect_timeout, not a fixed fifth of it.
    proxy_module = _tcpproxy()
    async with proxy_module.TcpProxy("127.0.0.1", 5672) as proxy:
        dead = [f"127.0.0.1:{refused_port()}" for _ in range(4)]
        url = _with_hosts("amqp://guest:guest@/", *dead, f"127.0.0.1:{proxy.port}")
        transport = AmqpTransport(url, connect_timeout=3.0)
        proxy.stall()
        slow = asyncio.get_running_loop().call_later(1.5, proxy.resume)
        try:
            await transport.connect()
            async with Consumer(transport, unique) as consumer:
                await transport.publish(unique, b"via the slow host")
                assert await consumer.take(1) == [b"via the slow host"]
        finally:
            slow.cancel()
            proxy.resume()
            await transport.close()


async def test_hosts_that_never_answer_get_their_share_and_no_more(unique: str) -> None:
    # Two nodes take TCP connections but never speak AMQP (hung, or a stalled network).
    proxy_module = _tcpproxy()
    async with (
        proxy_module.TcpProxy("127.0.0.1", 5672) as hung,
        proxy_module.TcpProxy("127.0.0.1", 5672) as also_hung,
    ):
        hung.stall()
        also_hung.stall()
        listed = [f"127.0.0.1:{hung.port}", f"127.0.0.1:{also_hung.port}", "127.0.0.1:5672"]
        transport = AmqpTransport(_with_hosts("amqp://guest:guest@/", *listed), connect_timeout=3)
        try:
            await transport.connect()  # a third of 3 s each, then the live node
            await transport.publish(unique, b"via the third host")
        finally:
            await transport.close()
        # With none answering, connect() gives up at connect_timeout, not later.
        transport = AmqpTransport(
            _with_hosts("amqp://guest:guest@/", *listed[:2]), connect_timeout=1
        )
        started = time.monotonic()
        with pytest.raises(TransportError, match="within 1s"):
            await transport.connect()
        assert time.monotonic() - started < 1.5
        # close() during the round: the hosts after the one being tried are not tried.
        transport = AmqpTransport(_with_hosts("amqp://guest:guest@/", *listed), connect_timeout=3)
        before = (hung.accepted, also_hung.accepted)
        connecting = asyncio.create_task(transport.connect())
        await eventually(lambda: hung.accepted > before[0], timeout=5)
        await transport.close()
        with pytest.raises(TransportError, match="closed while connecting"):
            await connecting
        assert also_hung.accepted == before[1]
        assert transport.state is ConnectionState.CLOSED and not transport.connected


def test_a_host_list_gives_each_host_the_credentials_and_options() -> None:
    transport = AmqpTransport("amqp://u:p%40ss@h1:5673,h2/vh?heartbeat=5&max_backlog=9")
    assert transport._broker_urls == [
        f"amqp://u:p%40ss@{host}/vh?heartbeat=5&reconnect_interval=1"
        for host in ("h1:5673", "h2:5672")
    ]
    assert "p%40ss" not in repr(transport) and transport.max_backlog == 9
    assert AmqpTransport("amqps://h1,h2:5000/")._broker_urls == [
        "amqps://h1:5671/?reconnect_interval=1",
        "amqps://h2:5000/?reconnect_interval=1",
    ]
    with pytest.raises(ConfigError, match="not a number"):
        AmqpTransport("amqp://h1:x,h2/")
    # An @ in an option is not a password cut short.
    assert AmqpTransport("amqp://u:p@h1:5672,h2/?name=me@web-1").connection_name == "me@web-1"


def test_a_host_named_twice_is_tried_once_per_round() -> None:
    # Named twice, a node that never answers would get two shares of connect_timeout.
    assert AmqpTransport("amqp://h1,h2,h1:5672/")._broker_urls == [
        "amqp://h1:5672/?reconnect_interval=1",
        "amqp://h2:5672/?reconnect_interval=1",
    ]


@pytest.mark.parametrize("url", ["amqp://u:s3cret@h1:x/", "amqp://u:s3cret@h1:99999/"])
def test_a_bad_port_of_a_single_host_is_a_config_error_at_once(url: str) -> None:
    # As in a host list; it was a bare ValueError from yarl at connect(), naming no URL.
    with pytest.raises(ConfigError, match=r"port .* in 'amqp://u:\*\*\*@h1:"):
        AmqpTransport(url)


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan")])
def test_connect_timeout_must_be_a_positive_number(timeout: float) -> None:
    # NaN compared as "not <= 0" and left every connect attempt unbounded.
    with pytest.raises(ValueError, match="connect_timeout must be positive"):
        AmqpTransport("amqp://h1,h2/", connect_timeout=timeout)
    with pytest.raises(ValueError, match="connect_timeout must be positive"):
        CacheSync("amqp://h1,h2/", connect_timeout=timeout)


def test_ipv6_hosts_of_a_list_are_written_in_brackets() -> None:
    assert AmqpTransport("amqp://u:p@[::1],[fe80::1]:5673,h3/")._broker_urls == [
        f"amqp://u:p@{host}/?reconnect_interval=1"
        for host in ("[::1]:5672", "[fe80::1]:5673", "h3:5672")
    ]
    with pytest.raises(ConfigError, match=r"in brackets.*u:\*\*\*@"):
        AmqpTransport("amqp://u:p@::1,h2/")


async def test_wrong_password_fails_at_once(amqp_url: str) -> None:
    url = amqp_url.replace("guest:guest@", "guest:not-the-password@")
    transport = AmqpTransport(url, connect_timeout=5)
    started = time.monotonic()
    with pytest.raises(TransportError, match="refused") as info:
        await transport.connect()
    assert time.monotonic() - started < 2, "credentials errors must not be retried"
    assert "not-the-password" not in str(info.value)
    await transport.close()


async def test_use_before_connect_is_a_lifecycle_error(amqp_url: str, unique: str) -> None:
    transport = AmqpTransport(amqp_url)
    with pytest.raises(StateError):
        await transport.publish(unique, b"x")
    with pytest.raises(ConnectionLost):
        await anext(transport.subscribe(unique))
    await transport.close()
    await transport.close()


async def test_connect_twice_keeps_one_connection(make: Make) -> None:
    transport = await make()
    first = transport._connection
    await transport.connect()
    assert transport._connection is first


async def test_close_during_connect_leaves_no_connection(unique: str) -> None:
    transport = AmqpTransport(f"amqp://guest:guest@127.0.0.1:{refused_port()}/", connect_timeout=5)
    connecting = asyncio.create_task(transport.connect())
    await asyncio.sleep(0.1)  # let it fail once and wait for its retry
    await transport.close()
    with pytest.raises(TransportError):
        await connecting
    assert transport._connection is None


# -- configuration ---------------------------------------------------------------------------


def test_url_options_are_read_and_not_passed_to_aio_pika() -> None:
    transport = from_url(
        "amqp://guest:guest@127.0.0.1/?confirm=0&max_backlog=7&name=orders&heartbeat=5"
    )
    assert isinstance(transport, AmqpTransport)
    assert transport.publisher_confirms is False
    assert transport.max_backlog == 7
    assert transport.connection_name == "orders"
    (broker_url,) = transport._broker_urls
    assert "confirm" not in broker_url and "max_backlog" not in broker_url
    assert "heartbeat=5" in broker_url and "name=orders" in broker_url
    assert "reconnect_interval=1" in broker_url


def test_keyword_options_win_over_the_url() -> None:
    transport = AmqpTransport(
        "amqp://guest:guest@127.0.0.1/?confirm=0&name=url-name",
        publisher_confirms=True,
        connection_name="kw-name",
    )
    assert transport.publisher_confirms is True
    assert transport.connection_name == "kw-name"


@pytest.mark.parametrize(
    "url",
    [
        "amqp://127.0.0.1/?confirm=maybe",
        "amqp://127.0.0.1/?max_backlog=lots",
        "redis://127.0.0.1/",
    ],
)
def test_bad_options_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        AmqpTransport(url)


def test_repr_hides_the_password() -> None:
    assert "secret" not in repr(AmqpTransport("amqps://user:secret@broker.example/"))


@pytest.mark.usefixtures("rabbitmqctl")
async def test_the_connection_name_is_visible_on_the_broker(make: Make, unique: str) -> None:
    transport = await make(connection_name=f"cachesync-test-{unique}-named")
    names = await amqp_connection_names(f"cachesync-test-{unique}-named")
    assert list(names.values()) == [transport.connection_name]


# -- through a TCP proxy ---------------------------------------------------------------------


def _tcpproxy() -> Any:
    try:
        return importlib.import_module(".tcpproxy", __package__)
    except ModuleNotFoundError:
        pytest.skip("tests/tcpproxy.py is not there yet")


async def test_a_cut_socket_raises_connection_lost(unique: str, amqp_url: str) -> None:
    proxy_module = _tcpproxy()
    async with proxy_module.TcpProxy("127.0.0.1", 5672) as proxy:
        transport = AmqpTransport(f"amqp://guest:guest@127.0.0.1:{proxy.port}/", connect_timeout=2)
        await transport.connect()
        try:
            async with Consumer(transport, unique) as consumer:
                await transport.publish(unique, b"through the proxy")
                assert await consumer.take(1) == [b"through the proxy"]
                await proxy.cut()
                assert isinstance(await consumer.ended(timeout=5), ConnectionLost)
        finally:
            await transport.close()


async def test_while_the_broker_is_unreachable_publish_and_connect_raise_transport_error(
    unique: str, amqp_url: str
) -> None:
    proxy_module = _tcpproxy()
    async with proxy_module.TcpProxy("127.0.0.1", 5672) as proxy:
        transport = AmqpTransport(f"amqp://guest:guest@127.0.0.1:{proxy.port}/", connect_timeout=1)
        await transport.connect()
        try:
            await transport.publish(unique, b"up")
            proxy.refuse(True)
            await proxy.cut()
            await eventually(lambda: not transport.connected, timeout=5)
            with pytest.raises(TransportError):
                await transport.publish(unique, b"down")
            with pytest.raises(TransportError, match="docker compose up -d rabbitmq"):
                await transport.connect()
            proxy.refuse(False)
            await transport.connect()
            await transport.publish(unique, b"up again")
        finally:
            await transport.close()


async def test_a_stalled_broker_bounds_publish_and_close(unique: str) -> None:
    proxy_module = _tcpproxy()
    async with proxy_module.TcpProxy("127.0.0.1", 5672) as proxy:
        transport = AmqpTransport(f"amqp://guest:guest@127.0.0.1:{proxy.port}/", connect_timeout=1)
        await transport.connect()
        try:
            async with Consumer(transport, unique) as consumer:
                await transport.publish(unique, b"before the stall")
                assert await consumer.take(1) == [b"before the stall"]
                proxy.stall()
                started = time.monotonic()
                # The confirm never comes back: publish gives up after connect_timeout.
                with pytest.raises(TransportError):
                    await transport.publish(unique, b"stalled")
                assert time.monotonic() - started < 3
                started = time.monotonic()
                await transport.close()
                assert isinstance(await consumer.ended(timeout=5), ConnectionLost)
                assert time.monotonic() - started < 5
        finally:
            proxy.resume()
            await transport.close()


async def test_an_ack_cut_short_by_the_connection_closing_ends_in_connection_lost(
    unique: str,
) -> None:
    """aiormq fails what a closing channel still waits for (here the ack's write over a stalled
    socket) with CancelledError; out of the iterator that would read as the consumer's own
    cancellation, and a listener would stop without a word instead of flushing."""
    proxy_module = _tcpproxy()
    async with proxy_module.TcpProxy("127.0.0.1", 5672) as proxy:
        transport = AmqpTransport(
            f"amqp://guest:guest@127.0.0.1:{proxy.port}/", connect_timeout=1, prefetch=1
        )
        await transport.connect()
        handled, resumed = asyncio.Event(), asyncio.Event()
        ready = asyncio.Event()

        async def consume() -> None:
            async for _payload in transport.subscribe(unique, lambda _resumed: ready.set()):
                await handled.wait()
                resumed.set()  # back in the iterator, in this step: it acks, then waits

        task = asyncio.create_task(consume())
        filling: asyncio.Task[None] | None = None
        try:
            await ready.wait()
            await transport.publish(unique, b"one")
            await asyncio.sleep(0)
            proxy.stall()
            # The write buffer fills up behind a large publish: the ack's write cannot finish.
            filling = asyncio.create_task(transport.publish(unique, b"x" * 16_000_000))
            await asyncio.sleep(0.2)  # the publish has filled the socket's buffers
            handled.set()
            await resumed.wait()
            closing = asyncio.create_task(transport.close())
            await asyncio.sleep(0)  # close() has begun: the channel fails what it waits for
            proxy.resume()
            await closing
            done, _ = await asyncio.wait({task}, timeout=10)
            assert done, "the subscription did not end"
            assert not task.cancelled(), "the subscription ended in CancelledError"
            assert isinstance(task.exception(), ConnectionLost), task.exception()
        finally:
            proxy.resume()
            for pending in (task, filling):
                if pending is not None:
                    pending.cancel()
                    await asyncio.gather(pending, return_exceptions=True)
            await transport.close()
