"""nats:// beyond the contract suite: replay, retention gaps, and a 3-node JetStream cluster that
loses the node a subscriber reads from, and the stream's leader, while events flow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from cachesync.errors import ConfigError, ConnectionLost, TransportError
from cachesync.transports.base import from_url

from .clusters import ProcessGroup, free_ports, nats_cluster, wait_until
from .engine_tools import Feeder, Reader, in_order_without_gaps, require_binary
from .tcpproxy import TcpProxy, proxied_url
from .test_transport_contract import Subscriber, delete_nats_streams, subscribed

pytest.importorskip("nats")

from cachesync.transports.nats import NatsTransport  # noqa: E402

pytestmark = pytest.mark.timeout(40)


@pytest.fixture
async def channel(nats_url: str, unique: str) -> AsyncIterator[str]:
    name = f"cachesync-nats-{unique}"
    yield name
    await delete_nats_streams(nats_url, [name])


def test_url_options_are_parsed_and_checked() -> None:
    transport = from_url("nats://u:pw@h1:4222,h2/?max_age=1h&max_msgs=10&replicas=3")
    assert isinstance(transport, NatsTransport)
    assert (transport.max_age, transport.max_msgs, transport.replicas) == (3600.0, 10, 3)
    assert "pw" not in repr(transport)
    with pytest.raises(ConfigError, match="max_age"):
        from_url("nats://h1/?max_age=soon")
    with pytest.raises(ConfigError, match="unknown option"):
        from_url("nats://h1/?maxage=1h")


@asynccontextmanager
async def _after_a_cut(
    nats_url: str, channel: str, count: int, **options: object
) -> AsyncIterator[Subscriber]:
    """A subscriber reads one message, its connection is cut, ``count`` more are published;
    yields the next subscription of the same transport object (not yet live)."""
    host, _, port = nats_url.removeprefix("nats://").partition(":")
    pub = NatsTransport(nats_url, connect_timeout=5.0, **options)  # type: ignore[arg-type]
    async with TcpProxy(host, int(port)) as proxy:
        transport = NatsTransport(
            proxied_url(nats_url, proxy),
            connect_timeout=5.0,
            health_check_interval=2.0,
            **options,  # type: ignore[arg-type]
        )
        try:
            await pub.connect()
            await transport.connect()
            first = Subscriber(transport, channel)
            await first.live()
            await pub.publish(channel, b"0")
            await first.wait_for(1)
            await proxy.cut()
            await first.ended()
            await first.stop()
            for i in range(1, count + 1):
                await pub.publish(channel, b"%d" % i)
            await transport.connect()
            again = Subscriber(transport, channel)
            try:
                yield again
            finally:
                await again.stop()
        finally:
            await pub.close()
            await transport.close()


async def test_a_new_subscription_replays_what_was_missed_then_reports_resumed(
    nats_url: str, channel: str
) -> None:
    async with _after_a_cut(nats_url, channel, 20) as again:
        received = await again.wait_for(20)
        assert received == [b"%d" % i for i in range(1, 21)]
        await again.live()
        # The backlog comes first, then on_ready(True): the consumer has caught up.
        assert again.log[-1] == ("ready", True)


async def test_retention_that_dropped_missed_messages_reports_not_resumed(
    nats_url: str, channel: str
) -> None:
    async with _after_a_cut(nats_url, channel, 20, max_msgs=5) as again:
        await again.live()
        assert again.log[0] == ("ready", False)
        async with NatsTransport(nats_url) as pub:
            await pub.publish(channel, b"new")
        assert await again.wait_for(1) == [b"new"]


@asynccontextmanager
async def _reading(
    transport: NatsTransport, pub: NatsTransport, channel: str
) -> AsyncIterator[AsyncIterator[bytes]]:
    """A live subscription of ``transport`` to ``channel`` that has yielded ``b"0"`` (published
    by ``pub``): its iterator, closed on the way out."""
    ready = asyncio.Event()
    messages = transport.subscribe(channel, lambda resumed: ready.set())
    try:
        first = asyncio.ensure_future(anext(messages))
        await ready.wait()
        await pub.publish(channel, b"0")
        assert await first == b"0"
        yield messages
    finally:
        await messages.aclose()


async def test_a_subscriber_that_stops_reading_gets_every_message_in_order_later(
    nats_url: str, channel: str
) -> None:
    # More messages than the subscription's inbox holds arrive while its consumer takes none:
    # the inbox makes nats-py wait, nats-py's own queue holds the rest, nothing is dropped.
    from cachesync.transports.nats import INBOX_SIZE

    count = 3 * INBOX_SIZE
    transport = NatsTransport(nats_url, connect_timeout=5.0)
    pub = NatsTransport(nats_url, connect_timeout=5.0)
    await transport.connect()
    await pub.connect()
    try:
        async with _reading(transport, pub, channel) as messages:
            for i in range(1, count + 1):  # the consumer takes none of these meanwhile
                await pub.publish(channel, b"%d" % i)
            received = []
            async with asyncio.timeout(20):
                async for payload in messages:
                    received.append(payload)
                    if len(received) == count:
                        break
        assert received == [b"%d" % i for i in range(1, count + 1)]
    finally:
        await pub.close()
        await transport.close()


def _received(transport: NatsTransport) -> int:
    """How many messages the transport's client has received (replies to requests too)."""
    assert transport._nc is not None
    return int(transport._nc.stats["in_msgs"])


async def _until_received(transport: NatsTransport, count: int, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while _received(transport) < count:
            await asyncio.sleep(0.01)


async def _read_until_lost(messages: AsyncIterator[bytes], timeout: float = 10.0) -> list[int]:
    """What ``messages`` yields until it raises ConnectionLost (which must come in time)."""
    received: list[int] = []
    async with asyncio.timeout(timeout):
        with pytest.raises(ConnectionLost):
            async for payload in messages:
                received.append(int(payload))
    return received


async def test_messages_the_client_drops_for_a_slow_subscriber_end_its_subscription(
    nats_url: str, channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past its pending limits (here 100 messages) nats-py drops what arrives for a subscriber
    # that reads nothing. Nothing is published after the dropped ones, so no later sequence
    # shows the hole: the subscription itself must end, and the next one must not claim to
    # have resumed.
    from nats.aio.client import Client

    from cachesync.transports.nats import INBOX_SIZE

    subscribe = Client.subscribe

    async def small_limits(self: Client, subject: str, **kwargs: Any) -> Any:
        kwargs["pending_msgs_limit"] = 100
        return await subscribe(self, subject, **kwargs)

    monkeypatch.setattr(Client, "subscribe", small_limits)
    count = INBOX_SIZE + 100 + 200
    async with (
        NatsTransport(nats_url, connect_timeout=5.0, health_check_interval=1.0) as transport,
        NatsTransport(nats_url, connect_timeout=5.0) as pub,
    ):
        async with _reading(transport, pub, channel) as messages:
            for i in range(1, count + 1):  # the subscriber takes none of these meanwhile
                await pub.publish(channel, b"%d" % i)
            received = await _read_until_lost(messages)
        assert received == list(range(1, len(received) + 1))
        assert len(received) < count
        again = Subscriber(transport, channel)
        try:
            await again.live()
            assert again.log == [("ready", False)]
        finally:
            await again.stop()


async def test_a_cut_while_the_subscriber_reads_nothing_replays_the_whole_backlog_in_order(
    nats_url: str, channel: str
) -> None:
    # More than the subscription's inbox holds is waiting (nats-py waits for room in it) when
    # the connection is cut: the next subscription replays all that was not yielded, in order,
    # once each, and reports resumed only after the last of them.
    from cachesync.transports.nats import INBOX_SIZE

    count = 2 * INBOX_SIZE + 10
    host, _, port = nats_url.removeprefix("nats://").partition(":")
    async with (
        TcpProxy(host, int(port)) as proxy,
        NatsTransport(nats_url, connect_timeout=5.0) as pub,
    ):
        transport = NatsTransport(
            proxied_url(nats_url, proxy), connect_timeout=5.0, health_check_interval=2.0
        )
        try:
            await transport.connect()
            async with _reading(transport, pub, channel) as messages:
                received = _received(transport)
                for i in range(1, count + 1):
                    await pub.publish(channel, b"%d" % i)
                # All of them reached the client: the inbox is full, nats-py holds the rest.
                await _until_received(transport, received + count)
                await proxy.cut()
                before = await _read_until_lost(messages)
            assert before == list(range(1, len(before) + 1))
            await transport.connect()
            again = Subscriber(transport, channel)
            try:
                rest = await again.wait_for(count - len(before))
                await again.live()
            finally:
                await again.stop()
            assert [int(payload) for payload in rest] == list(range(len(before) + 1, count + 1))
            assert again.log[-1] == ("ready", True)
            assert again.log.count(("ready", True)) == 1
        finally:
            await transport.close()


async def test_subscriptions_ended_every_way_leave_no_task_behind(
    nats_url: str, channel: str
) -> None:
    # Ended while idle, from another task while nats-py waits for room in a full inbox, and by
    # close(): nothing of theirs keeps running.
    from cachesync.transports.nats import INBOX_SIZE

    async with NatsTransport(nats_url, connect_timeout=5.0) as pub:
        await pub.publish(channel, b"0")
        outside = asyncio.all_tasks()
        transport = NatsTransport(nats_url, connect_timeout=5.0)
        try:
            await transport.connect()
            # One cycle first, so what the client starts once (its request inbox) exists.
            async with subscribed(transport, channel) as sub:
                await pub.publish(channel, b"1")
                await sub.wait_for(1)
            before = asyncio.all_tasks()
            for _ in range(20):
                async with subscribed(transport, channel):
                    pass
            for _ in range(2):
                for i in range(INBOX_SIZE + 5):
                    await pub.publish(channel, b"%d" % i)
                received = _received(transport)
                messages = transport.subscribe(channel)
                await anext(messages)  # the backlog replays
                await _until_received(transport, received + INBOX_SIZE + 5)
                await asyncio.create_task(messages.aclose())
            assert asyncio.all_tasks() == before
            live = Subscriber(transport, channel)
            await live.wait_for(INBOX_SIZE + 5 - 1)
            await live.live()
            await transport.close()
            assert isinstance(await live.ended(), ConnectionLost)
            assert asyncio.all_tasks() == outside
        finally:
            await transport.close()


async def test_an_idle_subscription_ends_when_its_consumer_is_deleted(
    nats_url: str, channel: str
) -> None:
    import nats

    from cachesync.transports.nats import stream_name

    async with NatsTransport(nats_url, connect_timeout=5.0, health_check_interval=1.0) as t:
        async with subscribed(t, channel) as sub:
            nc = await nats.connect(nats_url, allow_reconnect=False)
            try:
                js = nc.jetstream()
                consumers = await js.consumers_info(stream_name(channel))
                assert len(consumers) == 1
                await js.delete_consumer(stream_name(channel), consumers[0].name)
            finally:
                await nc.close()
            error = await sub.ended(timeout=5.0)
            assert isinstance(error, ConnectionLost)
            assert "consumer is gone" in str(error)


async def test_close_while_a_subscription_sets_up_ends_it_at_once(
    nats_url: str, channel: str
) -> None:
    # The setup waits for a JetStream reply that cannot come on a closed connection: the
    # subscription must not wait out the request's timeout (connect_timeout, here 10s).
    host, _, port = nats_url.removeprefix("nats://").partition(":")
    async with TcpProxy(host, int(port)) as proxy:
        transport = NatsTransport(proxied_url(nats_url, proxy), connect_timeout=10.0)
        try:
            await transport.connect()
            assert transport._nc is not None
            sent = transport._nc.stats["out_msgs"]
            proxy.stall()  # its first request stays unanswered
            messages = transport.subscribe(channel)
            setup = asyncio.ensure_future(anext(messages))
            async with asyncio.timeout(5):
                while transport._nc.stats["out_msgs"] == sent:
                    await asyncio.sleep(0.01)
            await transport.close()
            async with asyncio.timeout(2):
                with pytest.raises(ConnectionLost):
                    await setup
            await messages.aclose()
        finally:
            proxy.resume()
            await transport.close()


# -- a 3-node JetStream cluster ------------------------------------------------------------


@pytest.fixture(scope="session")
def nats_nodes() -> Iterator[ProcessGroup]:
    require_binary("nats-server")
    group = nats_cluster(3)
    try:
        yield group
    finally:
        group.stop()


def _cluster_url(group: ProcessGroup) -> str:
    return "nats://" + ",".join(f"127.0.0.1:{node.port}" for node in group.nodes.values())


async def _stream_ready(url: str, channel: str) -> NatsTransport:
    """A publisher whose first publish succeeded (the cluster has elected its leaders)."""
    pub = NatsTransport(url, connect_timeout=5.0, replicas=3, publish_timeout=2.0)
    deadline = time.monotonic() + 15
    while True:
        try:
            await pub.connect()
            await pub.publish(channel, b"-1")
            return pub
        except Exception:
            await pub.close()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _stream_leader(url: str, channel: str) -> str:
    import nats

    from cachesync.transports.nats import stream_name

    nc = await nats.connect(url.replace("nats://", "").split(","), allow_reconnect=False)
    try:
        info = await nc.jetstream().stream_info(stream_name(channel))
        assert info.cluster is not None and info.cluster.leader
        return info.cluster.leader
    finally:
        await nc.close()


def _restart(group: ProcessGroup, name: str, wait: bool = True) -> None:
    """Start a killed node again; ``wait`` until it caught up (see ``_wait_healthy``)."""
    if not group.alive(name):
        group.start(name)
    if wait:
        _wait_healthy(group)


def _wait_healthy(group: ProcessGroup) -> None:
    """Wait until every node reports JetStream healthy (a restarted node caught up), so a
    test can lose another one."""
    import httpx

    def healthy() -> bool:
        try:
            return all(
                httpx.get(f"http://127.0.0.1:{node.monitor_port}/healthz", timeout=1.0).json()
                == {"status": "ok"}
                for node in group.nodes.values()
            )
        except (httpx.HTTPError, ValueError):
            return False

    wait_until(healthy, 20.0, "the NATS cluster to be healthy")


def _meta_leader(group: ProcessGroup) -> str:
    """The node leading the JetStream meta group, from a monitoring endpoint."""
    import httpx

    for node in group.nodes.values():
        if group.alive(node.name):
            jsz = httpx.get(f"http://127.0.0.1:{node.monitor_port}/jsz", timeout=2.0).json()
            return str(jsz.get("meta_cluster", {}).get("leader", ""))
    return ""


# A cluster test waits, each wait bounded, for the cluster to be healthy again after the one
# before it (up to 20 s), for its stream's leaders (up to 15 s), then for its scenario:
# more than the module's 40 s when a restarted node is slow to catch up.
CLUSTER_TIMEOUT = 90


# The reader's own node: test_cached_reads_stay_coherent_when_the_consumers_node_dies.
@pytest.mark.timeout(CLUSTER_TIMEOUT)
@pytest.mark.parametrize("victim", ["stream leader"])
async def test_cluster_loses_a_node_while_events_flow(
    nats_nodes: ProcessGroup, unique: str, victim: str
) -> None:
    _wait_healthy(nats_nodes)
    url = _cluster_url(nats_nodes)
    channel = f"cachesync-cluster-{unique}"
    pub = await _stream_ready(url, channel)
    leader = await _stream_leader(url, channel)
    meta = _meta_leader(nats_nodes)
    # Not the meta leader either: losing it stalls consumer creation for an election too.
    others = sorted(
        (node for node in nats_nodes.nodes.values() if node.name != leader),
        key=lambda node: node.name == meta,
    )
    # The reader connects to a node that does not lead the stream; the victim is that node
    # (its subscription breaks, the stream goes on), or the leader (the stream pauses until
    # the other two elect a new one; the reader's consumer may go with it).
    reader_url = "nats://" + ",".join(f"127.0.0.1:{node.port}" for node in others)
    killed = others[0].name if victim == "reader's node" else leader
    reader = Reader(
        NatsTransport(
            reader_url, connect_timeout=5.0, health_check_interval=1.0, publish_timeout=1.0
        ),
        channel,
    )
    feeder = Feeder(pub, channel)
    try:
        reader.start()
        await reader.wait(lambda: reader.readies, 10)
        feeder.start()
        await reader.wait(lambda: len(reader.numbers) >= 50, 10)
        seen_before = len(reader.numbers)
        killed_at = time.monotonic()
        nats_nodes.kill(killed)
        target = feeder.sent + 200
        try:
            await reader.wait(lambda: reader.numbers and max(reader.numbers) >= target, 25)
        except TimeoutError:
            raise AssertionError(
                f"sent {feeder.sent} ({feeder.failures} failures), read up to "
                f"{max(reader.numbers)}, losses {reader.losses}, readies {reader.readies}"
            ) from None
        # Every event arrived, in order: the stream (3 replicas) kept them and the reader
        # replayed from where it was; a reconnect is never reported as "nothing missed"
        # unless it was.
        assert in_order_without_gaps(reader.numbers)
        assert all(resumed for _, resumed in reader.readies[1:])
        newest = max(reader.numbers[:seen_before])
        back = next(
            at
            for at, number in zip(reader.arrivals, reader.numbers, strict=True)
            if at > killed_at and number > newest
        )
        print(f"nats failover ({victim}): events flow again {back - killed_at:.2f}s after")
        assert back - killed_at < 20
    finally:
        await feeder.stop()
        await reader.stop()
        _restart(nats_nodes, killed, wait=False)


@pytest.mark.timeout(CLUSTER_TIMEOUT)
async def test_cached_reads_stay_coherent_when_the_consumers_node_dies(
    nats_nodes: ProcessGroup, unique: str
) -> None:
    # Guarantee 5 end to end: the owner commits every 20 ms, readers read all the time, the
    # node the consumer is connected to is killed; no read is older than the bound.
    from .test_faults import assert_coherent, run_scenario

    _wait_healthy(nats_nodes)
    url = _cluster_url(nats_nodes)
    channel = f"cachesync-e2e-{unique}"
    await (await _stream_ready(url + "?replicas=3", channel)).close()
    leader = await _stream_leader(url, channel)
    meta = _meta_leader(nats_nodes)
    nodes = sorted(
        (node for node in nats_nodes.nodes.values() if node.name != leader),
        key=lambda node: node.name == meta,
    )
    # The consumer connects to the first node of its URL first: that one dies.
    consumer_url = "nats://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes)
    consumer_url += "?health_check_interval=1&publish_timeout=1"

    async def kill() -> None:
        nats_nodes.kill(nodes[0].name)

    try:
        sync, owner, reads = await run_scenario(
            consumer_url, url + "?replicas=3", channel, kill, bound=0.5
        )
        assert_coherent(sync, owner, reads, bound=0.5)
    finally:
        _restart(nats_nodes, nodes[0].name, wait=False)


async def test_a_refused_password_fails_at_once() -> None:
    # A nats-server of its own that asks for a password (the machine's takes any): a wrong one
    # is not retried until connect_timeout.
    require_binary("nats-server")
    port = free_ports(1)[0]
    group = ProcessGroup("nats-auth")
    group.add(
        "auth",
        ["nats-server", "-a", "127.0.0.1", "-p", str(port), "--user", "u", "--pass", "right"],
        port,
    )
    try:
        await asyncio.to_thread(group.start, "auth")
        wrong = NatsTransport(f"nats://u:wrong@127.0.0.1:{port}", connect_timeout=10.0)
        started = time.monotonic()
        try:
            with pytest.raises(TransportError, match="refused") as caught:
                await wrong.connect()
        finally:
            await wrong.close()
        assert time.monotonic() - started < 3.0
        assert "wrong" not in str(caught.value)
        right = NatsTransport(f"nats://u:right@127.0.0.1:{port}", connect_timeout=5.0)
        await right.connect()
        await right.close()
    finally:
        await asyncio.to_thread(group.stop)
