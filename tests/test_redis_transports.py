"""What only the Redis transports do: stream replay and loss detection, stalls, URL handling.

The contract every transport keeps is in ``test_transport_contract.py``; these run against the
real Redis on 127.0.0.1 (see ``conftest.py``) except the pure ones at the end.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

from cachesync.errors import ConfigError, ConnectionLost, TransportError
from cachesync.transports.base import Transport, from_url
from cachesync.transports.redis import RedisPubSubTransport
from cachesync.transports.redis.stream import (
    RedisStreamTransport,
    StreamId,
    _Cursor,
    _gap,
    _Info,
)

from .clusters import RedisClusterDeployment
from .helpers import eventually
from .tcpproxy import TcpProxy, proxied_url
from .test_transport_contract import Subscriber, kill_redis_clients, subscribed

pytestmark = pytest.mark.timeout(20)


class Redis:
    """Names and URLs for one test; deletes its stream keys afterwards."""

    def __init__(self, base: str, unique: str) -> None:
        self.base = base
        self.channel = f"cachesync-test-{unique}"
        self.sub_name = f"cachesync-test-{unique}-sub"
        self.pub_name = f"cachesync-test-{unique}-pub"

    def url(self, scheme: str, name: str, **query: object) -> str:
        options = "".join(f"&{key}={value}" for key, value in query.items())
        return self.base.replace("redis://", f"{scheme}://", 1) + f"?client_name={name}{options}"

    def stream(self, name: str, **options: object) -> RedisStreamTransport:
        return RedisStreamTransport(
            self.url("redis+stream", name),
            connect_timeout=5.0,
            **options,  # type: ignore[arg-type]
        )

    async def kill_subscriber(self) -> None:
        assert await kill_redis_clients(self.base, self.sub_name) > 0


@pytest.fixture
async def rd(redis_url: str, unique: str) -> AsyncIterator[Redis]:
    made = Redis(redis_url, unique)
    try:
        yield made
    finally:
        admin = aioredis.Redis.from_url(redis_url, socket_timeout=None)
        try:
            await admin.delete(made.channel)
        finally:
            await admin.aclose()


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    try:
        yield client
    finally:
        await client.aclose()


async def publish_all(transport: Transport, channel: str, payloads: list[bytes]) -> None:
    for payload in payloads:
        await transport.publish(channel, payload)


# -- stream replay ---------------------------------------------------------------------------


async def test_stream_starts_at_the_end_of_an_existing_stream(rd: Redis) -> None:
    async with rd.stream(rd.pub_name) as pub, rd.stream(rd.sub_name) as sub_transport:
        await publish_all(pub, rd.channel, [b"old 1", b"old 2"])
        async with subscribed(sub_transport, rd.channel) as sub:
            await pub.publish(rd.channel, b"new")
            assert await sub.wait_for(1) == [b"new"]
            assert sub.log == [("ready", False), b"new"]


@pytest.mark.parametrize("batch", [500, 7])  # one round trip, and several
async def test_stream_replays_what_was_missed_then_reports_resumed(rd: Redis, batch: int) -> None:
    async with rd.stream(rd.pub_name) as pub, rd.stream(rd.sub_name, batch=batch) as transport:
        first = Subscriber(transport, rd.channel)
        try:
            await first.live()
            await publish_all(pub, rd.channel, [b"seen %d" % i for i in range(3)])
            await first.wait_for(3)
            await rd.kill_subscriber()
            assert isinstance(await first.ended(), ConnectionLost)
        finally:
            await first.stop()

        missed = [b"missed %d" % i for i in range(20)]
        await publish_all(pub, rd.channel, missed)
        await transport.connect()
        second = Subscriber(transport, rd.channel)
        try:
            await second.wait_for(len(missed))
            await second.live()
            await pub.publish(rd.channel, b"live")
            await second.wait_for(len(missed) + 1)
            # The whole backlog first; on_ready(True) only once the consumer has taken its
            # last entry; then live entries.
            assert second.log == [*missed, ("ready", True), b"live"]
        finally:
            await second.stop()


async def test_stream_resumes_at_once_when_nothing_was_missed(rd: Redis) -> None:
    async with rd.stream(rd.pub_name) as pub, rd.stream(rd.sub_name) as transport:
        async with subscribed(transport, rd.channel) as first:
            await pub.publish(rd.channel, b"one")
            await first.wait_for(1)
        await transport.close()
        await transport.connect()
        async with subscribed(transport, rd.channel) as second:
            assert second.log == [("ready", True)]
            await pub.publish(rd.channel, b"two")
            assert await second.wait_for(1) == [b"two"]


async def test_stream_that_never_existed_resumes(rd: Redis) -> None:
    async with rd.stream(rd.sub_name) as transport:
        async with subscribed(transport, rd.channel):
            pass
        async with subscribed(transport, rd.channel) as again:
            assert again.log == [("ready", True)]


async def test_stream_trimmed_past_the_last_id_reports_not_resumed(rd: Redis) -> None:
    # maxlen=1 is approximate: Redis trims whole nodes (100 entries), so publish plenty.
    async with rd.stream(rd.pub_name, maxlen=1) as pub, rd.stream(rd.sub_name) as transport:
        async with subscribed(transport, rd.channel) as first:
            await pub.publish(rd.channel, b"seen")
            await first.wait_for(1)
        await publish_all(pub, rd.channel, [b"trimmed %d" % i for i in range(400)])
        async with subscribed(transport, rd.channel) as second:
            # Told at once, with no part of the broken backlog replayed...
            assert second.log == [("ready", False)]
            # ...and reading goes on from the current end.
            await pub.publish(rd.channel, b"live")
            assert await second.wait_for(1) == [b"live"]


async def test_stream_entry_deleted_while_away_reports_not_resumed(
    rd: Redis, admin: aioredis.Redis
) -> None:
    async with rd.stream(rd.pub_name) as pub, rd.stream(rd.sub_name) as transport:
        async with subscribed(transport, rd.channel) as first:
            await pub.publish(rd.channel, b"seen")
            await first.wait_for(1)
        await publish_all(pub, rd.channel, [b"a", b"b", b"c"])
        entries = await admin.xrange(rd.channel)
        await admin.xdel(rd.channel, entries[-2][0])  # "b"
        async with subscribed(transport, rd.channel) as second:
            assert second.log == [("ready", False)]


async def test_stream_key_recreated_while_away_reports_not_resumed(
    rd: Redis, admin: aioredis.Redis
) -> None:
    async with rd.stream(rd.pub_name) as pub, rd.stream(rd.sub_name) as transport:
        async with subscribed(transport, rd.channel) as first:
            await publish_all(pub, rd.channel, [b"1", b"2", b"3"])
            await first.wait_for(3)
        await admin.delete(rd.channel)
        await pub.publish(rd.channel, b"after the delete")
        async with subscribed(transport, rd.channel) as second:
            assert second.log[0] == ("ready", False)


async def test_stream_subscriber_that_falls_behind_the_trim_is_cut(rd: Redis) -> None:
    async with rd.stream(rd.pub_name, maxlen=1) as pub, rd.stream(rd.sub_name) as transport:
        ready = asyncio.Event()
        holding = asyncio.Event()
        gate = asyncio.Event()
        got: list[bytes] = []

        async def slow_consumer() -> None:
            async for payload in transport.subscribe(rd.channel, lambda _resumed: ready.set()):
                got.append(payload)
                holding.set()
                await gate.wait()  # holds the iterator: nothing is read meanwhile

        task = asyncio.create_task(slow_consumer())
        try:
            await ready.wait()
            await pub.publish(rd.channel, b"first")
            await asyncio.wait_for(holding.wait(), 5)
            await publish_all(pub, rd.channel, [b"%d" % i for i in range(400)])
            gate.set()
            with pytest.raises(ConnectionLost, match="fell behind"):
                await asyncio.wait_for(task, 5)
            assert got == [b"first"]  # nothing after the gap was passed on as if complete
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        async with subscribed(transport, rd.channel) as again:
            assert again.log == [("ready", False)]


async def test_stream_catch_up_cut_midway_resumes_from_where_it_was(rd: Redis) -> None:
    async with rd.stream(rd.pub_name) as pub, rd.stream(rd.sub_name, batch=5) as transport:
        async with subscribed(transport, rd.channel) as first:
            await pub.publish(rd.channel, b"seen")
            await first.wait_for(1)
        missed = [b"m%d" % i for i in range(30)]
        await publish_all(pub, rd.channel, missed)

        # A consumer that stops after 7 backlog entries, so the cut lands mid-backlog.
        log: list[object] = []
        holding = asyncio.Event()
        gate = asyncio.Event()

        async def consume() -> None:
            async for payload in transport.subscribe(rd.channel, lambda r: log.append(r)):
                log.append(payload)
                if len(log) == 7:
                    holding.set()
                    await gate.wait()

        task = asyncio.create_task(consume())
        try:
            await asyncio.wait_for(holding.wait(), 5)
            await rd.kill_subscriber()
            gate.set()
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(task, 5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # It got the entries of the batches already read, and no on_ready: it was still
        # catching up.
        seen = len(log)
        assert 7 <= seen < len(missed)
        assert log == missed[:seen]

        await transport.connect()
        third = Subscriber(transport, rd.channel)
        try:
            await third.wait_for(len(missed) - seen)
            await third.live()
            assert third.log == [*missed[seen:], ("ready", True)]
        finally:
            await third.stop()


Step = Callable[[], Awaitable[None]]


class _RacedStream(RedisStreamTransport):
    """A stream transport whose next read runs ``before`` first: changes made after the
    subscription took its snapshot of the stream and before its first ``XREAD`` (what a
    publisher racing a reconnect does); and ``between`` after the ``XREAD``, before the
    ``XINFO STREAM`` that comes with it (its snapshot is taken again after ``between``)."""

    before: Step | None = None
    between: Step | None = None

    async def _read(
        self, conn: AbstractConnection, key: bytes, cursor: _Cursor, block: bool
    ) -> tuple[list[tuple[bytes, bytes | None]], _Info | None]:
        before, between, self.before, self.between = self.before, self.between, None, None
        if before is not None:
            await before()
        entries, info = await super()._read(conn, key, cursor, block)
        if between is not None:
            await between()
            # Reading from "$" without blocking returns nothing: only the fresh XINFO counts.
            _, info = await super()._read(conn, key, _Cursor(b"$", None), False)
        return entries, info


async def test_stream_catch_up_that_reads_past_its_snapshot_reports_resumed(rd: Redis) -> None:
    async with (
        rd.stream(rd.pub_name) as pub,
        _RacedStream(rd.url("redis+stream", rd.sub_name)) as transport,
    ):
        async with subscribed(transport, rd.channel) as first:
            await pub.publish(rd.channel, b"seen")
            await first.wait_for(1)
        missed = [b"missed %d" % i for i in range(3)]
        await publish_all(pub, rd.channel, missed)

        async def late() -> None:
            await pub.publish(rd.channel, b"late")

        transport.before = late
        async with subscribed(transport, rd.channel) as second:
            await second.wait_for(len(missed) + 1)
            # Nothing was lost: the backlog, on_ready(True) once its last entry was taken
            # (the one read in the same batch comes after it), then the rest.
            assert second.log == [*missed, ("ready", True), b"late"]


async def test_stream_catch_up_missing_its_last_entry_reports_not_resumed(
    rd: Redis, admin: aioredis.Redis
) -> None:
    async with (
        rd.stream(rd.pub_name) as pub,
        _RacedStream(rd.url("redis+stream", rd.sub_name)) as transport,
    ):
        async with subscribed(transport, rd.channel) as first:
            await pub.publish(rd.channel, b"seen")
            await first.wait_for(1)
        await publish_all(pub, rd.channel, [b"m0", b"m1", b"m2"])

        async def delete_the_last_and_add() -> None:
            last_id = (await admin.xrevrange(rd.channel, count=1))[0][0]
            await admin.xdel(rd.channel, last_id)  # m2, never read by the subscriber
            await pub.publish(rd.channel, b"late")  # the count comes out as if m2 were there

        async def add() -> None:
            await pub.publish(rd.channel, b"later")  # the XINFO cannot tell yet

        transport.before, transport.between = delete_the_last_and_add, add
        async with subscribed(transport, rd.channel) as second:
            await pub.publish(rd.channel, b"live")
            await second.wait_for(4)
            # m2 is lost: not resumed, once the backlog's end is passed. Reading goes on from
            # the end of the stream ("later" came before the flush) and is not cut later.
            assert second.log == [b"m0", b"m1", b"late", ("ready", False), b"live"]


# -- oversized payloads ------------------------------------------------------------------------

BIG = 8 << 20


@pytest.mark.timeout(30)
@pytest.mark.parametrize("scheme", ["redis", "redis+stream"])
async def test_an_oversized_payload_is_dropped_counted_and_memory_stays_bounded(
    rd: Redis, scheme: str
) -> None:
    async with (
        from_url(rd.url(scheme, rd.pub_name)) as pub,
        from_url(rd.url(scheme, rd.sub_name)) as transport,
    ):
        transport.max_payload = 1 << 20
        async with subscribed(transport, rd.channel) as sub:
            big = b"x" * BIG
            tracemalloc.start()
            try:
                await pub.publish(rd.channel, big)
                await pub.publish(rd.channel, b"small")
                assert await sub.wait_for(1) == [b"small"]
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert transport.oversized == 1
            # The publish's own frame plus one copy on the way in; a parser that buffered by
            # concatenation needed hundreds of MB for this.
            assert peak < 4 * BIG, peak
        if scheme == "redis+stream":
            # Skipped by its id: a new subscription (a reconnect) does not read it again.
            async with subscribed(transport, rd.channel) as again:
                await pub.publish(rd.channel, b"next")
                assert await again.wait_for(1) == [b"next"]
                assert again.log[0] == ("ready", True)
            assert transport.oversized == 1


# -- stalls and cuts through a proxy ---------------------------------------------------------


@pytest.mark.parametrize("scheme", ["redis", "redis+stream"])
async def test_a_stalled_network_ends_the_subscription_then_recovery_works(
    rd: Redis, scheme: str
) -> None:
    async with TcpProxy("127.0.0.1", 6379) as proxy:
        url = proxied_url(rd.url(scheme, rd.sub_name), proxy)
        transport = from_url(url, connect_timeout=2.0, health_check_interval=0.3)
        if isinstance(transport, RedisStreamTransport):
            transport.block_ms = 200
        async with transport, from_url(rd.url(scheme, rd.pub_name)) as pub:
            sub = Subscriber(transport, rd.channel)
            try:
                await sub.live()
                await pub.publish(rd.channel, b"before")
                await sub.wait_for(1)
                proxy.stall()
                started = time.monotonic()
                lost = await sub.ended(timeout=5.0)
                assert isinstance(lost, ConnectionLost)
                assert "stalled" in str(lost)
                # PING after 0.3 s of silence, give up 0.3 s later (the stream: 0.2 + 0.3).
                assert time.monotonic() - started < 2.0
            finally:
                await sub.stop()
            # The stalled sockets are useless; dropping them is what a listener's reconnect
            # amounts to once the network is back.
            proxy.resume()
            await proxy.cut()
            await transport.connect()
            async with subscribed(transport, rd.channel) as again:
                await pub.publish(rd.channel, b"after")
                assert await again.wait_for(1) == [b"after"]


@pytest.mark.parametrize("scheme", ["redis", "redis+stream"])
async def test_a_quiet_channel_is_not_taken_for_a_stall(rd: Redis, scheme: str) -> None:
    transport = from_url(rd.url(scheme, rd.sub_name), health_check_interval=0.25)
    if isinstance(transport, RedisStreamTransport):
        transport.block_ms = 50
    async with transport, from_url(rd.url(scheme, rd.pub_name)) as pub:
        async with subscribed(transport, rd.channel) as sub:
            # Six health-check periods of silence: PINGs (or empty XREADs) go and come back.
            done, _ = await asyncio.wait({sub.task}, timeout=1.5)
            assert not done
            await pub.publish(rd.channel, b"still here")
            assert await sub.wait_for(1) == [b"still here"]  # and no PONG leaked through


async def test_connect_waits_for_a_broker_that_comes_back(rd: Redis) -> None:
    async with TcpProxy("127.0.0.1", 6379) as proxy:
        proxy.refuse(True)
        transport = RedisPubSubTransport(
            proxied_url(rd.url("redis", rd.sub_name), proxy), connect_timeout=5.0
        )
        try:
            attempt = asyncio.create_task(transport.connect())
            await eventually(lambda: proxy.accepted >= 2)  # it is retrying
            proxy.refuse(False)
            await asyncio.wait_for(attempt, 5)
            assert transport.connected
        finally:
            await transport.close()


async def test_publish_fails_with_a_transport_error_when_the_broker_goes_away(
    rd: Redis,
) -> None:
    async with TcpProxy("127.0.0.1", 6379) as proxy:
        transport = RedisPubSubTransport(
            proxied_url(rd.url("redis", rd.pub_name), proxy), connect_timeout=2.0
        )
        async with transport:
            await transport.publish(rd.channel, b"fine")
            proxy.refuse(True)
            await proxy.cut()
            with pytest.raises(TransportError, match="publishing"):
                await transport.publish(rd.channel, b"lost")
            proxy.refuse(False)
            await transport.publish(rd.channel, b"fine again")  # the pool reconnects


@pytest.mark.parametrize("scheme", ["redis", "redis+stream"])
async def test_publish_replaces_a_connection_the_server_closed_while_idle(
    rd: Redis, scheme: str
) -> None:
    async with (
        from_url(rd.url(scheme, rd.sub_name)) as transport,
        from_url(rd.url(scheme, rd.pub_name), connect_timeout=2.0) as pub,
        subscribed(transport, rd.channel) as sub,
    ):
        await pub.publish(rd.channel, b"one")
        assert await kill_redis_clients(rd.base, rd.pub_name) == 1  # a restart, CLIENT KILL
        await pub.publish(rd.channel, b"two")  # no error: one transparent reconnect
        assert await sub.wait_for(2) == [b"one", b"two"]


async def test_an_error_reply_is_a_refusal_and_the_next_publish_gets_its_own_reply(
    rd: Redis, admin: aioredis.Redis
) -> None:
    async with (
        rd.stream(rd.sub_name) as transport,
        rd.stream(rd.pub_name) as pub,
    ):
        await admin.set(rd.channel, b"not a stream")
        with pytest.raises(TransportError, match="refused.*WRONGTYPE"):
            await pub.publish_many(rd.channel, [b"a", b"b"])
        await admin.delete(rd.channel)
        async with subscribed(transport, rd.channel) as sub:
            await pub.publish(rd.channel, b"fine")
            assert await sub.wait_for(1) == [b"fine"]


async def test_a_publish_that_timed_out_leaves_no_reply_behind(rd: Redis) -> None:
    async with TcpProxy("127.0.0.1", 6379) as proxy:
        url = proxied_url(rd.url("redis+stream", rd.pub_name), proxy)
        async with (
            rd.stream(rd.sub_name) as transport,
            from_url(url, connect_timeout=2.0, socket_timeout=0.2) as pub,
            subscribed(transport, rd.channel) as sub,
        ):
            await pub.publish(rd.channel, b"first")
            proxy.stall()
            with pytest.raises(TransportError, match="publishing"):
                await pub.publish(rd.channel, b"stalled")
            assert pub._command_conn is None  # type: ignore[attr-defined]
            proxy.resume()
            # The stalled connection was dropped: this publish reads its own reply on a new
            # one (reading the stalled command's reply instead would desynchronise them all).
            await pub.publish(rd.channel, b"after")
            await eventually(lambda: b"after" in sub.received)
            assert sub.received[0] == b"first"


async def test_close_during_a_publish_ends_it_without_opening_a_new_connection(
    rd: Redis,
) -> None:
    async with TcpProxy("127.0.0.1", 6379) as proxy:
        url = proxied_url(rd.url("redis", rd.pub_name), proxy)
        pub = from_url(url, connect_timeout=2.0, socket_timeout=5.0)
        await pub.connect()
        try:
            await pub.publish(rd.channel, b"first")
            proxy.stall()
            publishing = asyncio.create_task(pub.publish(rd.channel, b"in flight"))
            await eventually(lambda: pub._command_lock.locked())  # type: ignore[attr-defined]
            await pub.close()
            proxy.resume()  # a reconnect now would succeed, and publish on a closed transport
            with pytest.raises(TransportError):
                await publishing
            assert pub._command_conn is None  # type: ignore[attr-defined]
        finally:
            proxy.resume()
            await pub.close()


async def test_close_stops_a_connect_that_is_retrying() -> None:
    transport = RedisPubSubTransport("redis://127.0.0.1:1/0", connect_timeout=10.0)
    attempt = asyncio.create_task(transport.connect())
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await transport.close()
    with pytest.raises(TransportError):
        await asyncio.wait_for(attempt, 3)
    assert time.monotonic() - started < 3.0


# -- credentials -----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["redis", "redis+stream"])
async def test_the_password_never_shows_in_errors(scheme: str) -> None:
    transport = from_url(f"{scheme}://user:secret@127.0.0.1:1/0", connect_timeout=0.3)
    assert "secret" not in repr(transport)
    try:
        with pytest.raises(TransportError) as caught:
            await transport.connect()
    finally:
        await transport.close()
    message = str(caught.value)
    assert "secret" not in message
    assert f"{scheme}://user:***@127.0.0.1:1/0" in message
    assert "redis-server" in message  # says what to start


async def test_wrong_credentials_fail_at_once_without_the_password(redis_url: str) -> None:
    url = redis_url.replace("redis://", "redis://nobody:secret@", 1)
    transport = RedisPubSubTransport(url, connect_timeout=5.0)
    started = time.monotonic()
    try:
        with pytest.raises(TransportError, match="refused") as caught:
            await transport.connect()
    finally:
        await transport.close()
    assert time.monotonic() - started < 2.0  # no retrying until connect_timeout
    assert "secret" not in str(caught.value)


# -- configuration (no server needed) --------------------------------------------------------


def test_from_url_picks_the_class_and_the_options() -> None:
    pubsub = from_url("rediss://h:6380/1?health_check_interval=2.5&client_name=x")
    assert isinstance(pubsub, RedisPubSubTransport)
    assert pubsub.health_check_interval == 2.5
    stream = from_url("redis+stream://h/0?maxlen=50&block_ms=250&batch=10")
    assert isinstance(stream, RedisStreamTransport)
    assert (stream.maxlen, stream.block_ms, stream.batch) == (50, 250, 10)
    assert isinstance(from_url("rediss+stream://h/0"), RedisStreamTransport)
    # A keyword wins over the URL; the default applies when neither says.
    assert RedisStreamTransport("redis+stream://h/0?maxlen=50", maxlen=7).maxlen == 7
    assert RedisStreamTransport("redis+stream://h/0").maxlen == 100_000


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("redis://h/0?health_check_interval=soon", ConfigError),
        ("redis://h/0?no_such_option=1", ConfigError),
        ("redis+stream://h/0?maxlen=lots", ConfigError),
        ("redis+stream://h/0?maxlen=0", ValueError),
        ("redis://h:99999/0", ConfigError),
    ],
)
def test_bad_options_are_refused_up_front(url: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        from_url(url)


def test_a_class_refuses_the_other_scheme() -> None:
    with pytest.raises(ConfigError, match="redis\\+stream://"):
        RedisStreamTransport("redis://h/0")
    with pytest.raises(ConfigError):
        RedisPubSubTransport("redis+stream://user:secret@h/0")


# -- loss detection, on synthetic XINFO snapshots ----------------------------------------------


def info(
    length: int,
    last: StreamId,
    first: StreamId,
    added: int | None,
    max_deleted: StreamId = (0, 0),
) -> _Info:
    return _Info(length, last, first, max_deleted, added)


@pytest.mark.parametrize(
    ("position", "count", "snapshot", "lost"),
    [
        # caught up: the counts must match
        ((5, 0), 5, info(5, (5, 0), (1, 0), 5), False),
        ((5, 0), 4, info(5, (5, 0), (1, 0), 5), True),
        # behind, nothing trimmed past the position yet: cannot tell, so not (yet) a loss
        ((3, 0), 3, info(5, (5, 0), (1, 0), 5), False),
        # trimmed past the position, everything after it still there
        ((3, 0), 3, info(2, (5, 0), (4, 0), 5), False),
        # trimmed past the position and into what was not read yet
        ((3, 0), 3, info(1, (5, 0), (5, 0), 5), True),
        # XDEL of an entry not read yet
        ((3, 0), 3, info(4, (5, 0), (1, 0), 5, max_deleted=(4, 0)), True),
        # XDEL of one already read
        ((3, 0), 3, info(4, (5, 0), (1, 0), 5, max_deleted=(2, 0)), False),
        # the key was deleted and created again
        ((3, 0), 3, info(1, (9, 0), (9, 0), 1), True),
        # emptied by XTRIM
        ((3, 0), 3, info(0, (5, 0), (0, 0), 5), True),
        ((5, 0), 5, info(0, (5, 0), (0, 0), 5), False),
        # the key is gone
        ((3, 0), 3, None, True),
        ((0, 0), 0, None, False),
        # Redis < 7 (no counter): only "trimmed past the position" counts
        ((3, 0), None, info(3, (5, 0), (3, 0), None), False),
        ((3, 0), None, info(3, (7, 0), (5, 0), None), True),
    ],
)
def test_gap(position: StreamId, count: int | None, snapshot: _Info | None, lost: bool) -> None:
    assert _gap(position, count, snapshot) is lost


# -- batches ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["redis", "redis+stream"])
async def test_a_large_batch_goes_out_in_order_in_a_few_script_calls(
    rd: Redis, admin: aioredis.Redis, scheme: str
) -> None:
    from cachesync.transports.redis.connection import SCRIPT_BATCH, SCRIPT_BATCH_BYTES

    big = b"B" * (SCRIPT_BATCH_BYTES + 10)  # alone in its call
    payloads = [b"%d" % i for i in range(2 * SCRIPT_BATCH + 3)]
    payloads.insert(5, big)
    calls_before = _eval_calls(await admin.info("commandstats"))
    async with (
        from_url(rd.url(scheme, rd.sub_name), connect_timeout=5.0) as transport,
        from_url(rd.url(scheme, rd.pub_name), connect_timeout=5.0) as pub,
        subscribed(transport, rd.channel) as sub,
    ):
        await pub.publish_many(rd.channel, payloads)
        assert await sub.wait_for(len(payloads)) == payloads
    calls = _eval_calls(await admin.info("commandstats")) - calls_before
    assert 4 <= calls <= 6  # 5 expected; other tests may run scripts too, not many


def _eval_calls(stats: dict[str, object]) -> int:
    entry = stats.get("cmdstat_eval")
    return int(entry["calls"]) if isinstance(entry, dict) else 0


@pytest.mark.parametrize("scheme", ["redis", "redis+stream"])
async def test_a_server_that_refuses_scripts_gets_one_command_per_message(
    rd: Redis, admin: aioredis.Redis, scheme: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    user = f"cachesync-noscript-{unique}"
    await admin.execute_command(
        "ACL", "SETUSER", user, "on", ">secret", "~*", "&*", "+@all", "-eval"
    )
    try:
        url = rd.url(scheme, rd.pub_name).replace("redis://", f"redis://{user}:secret@", 1)
        url = url.replace("redis+stream://", f"redis+stream://{user}:secret@", 1)
        payloads = [b"%d" % i for i in range(10)]
        async with (
            from_url(rd.url(scheme, rd.sub_name), connect_timeout=5.0) as transport,
            from_url(url, connect_timeout=5.0) as pub,
            subscribed(transport, rd.channel) as sub,
        ):
            with caplog.at_level("INFO", logger="cachesync.transports.redis"):
                await pub.publish_many(rd.channel, payloads[:5])
                await pub.publish_many(rd.channel, payloads[5:])
            assert await sub.wait_for(10) == payloads
        refused = [r for r in caplog.records if "does not run scripts" in r.getMessage()]
        assert len(refused) == 1  # then it no longer tries
        assert "secret" not in refused[0].getMessage()
    finally:
        await admin.execute_command("ACL", "DELUSER", user)


async def test_a_refusal_not_about_scripts_leaves_batches_as_scripts(
    rd: Redis, admin: aioredis.Redis, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An ACL that denies the stream's key refuses the EVAL (NOPERM) and the XADD alike: the
    # server does run scripts. Once the ACL lets the key through, batches are scripts again.
    user = f"cachesync-nokey-{unique}"
    await admin.execute_command("ACL", "SETUSER", user, "on", ">secret", "~other:*", "&*", "+@all")
    try:
        url = rd.url("redis+stream", rd.pub_name).replace(
            "redis+stream://", f"redis+stream://{user}:secret@", 1
        )
        async with from_url(url, connect_timeout=5.0) as pub:
            with caplog.at_level("INFO", logger="cachesync.transports.redis"):
                with pytest.raises(TransportError, match="refused"):
                    await pub.publish_many(rd.channel, [b"1", b"2"])
                await admin.execute_command("ACL", "SETUSER", user, "~*")
                await pub.publish_many(rd.channel, [b"3", b"4"])
            clients = [c for c in await admin.client_list() if c["name"] == rd.pub_name]
            assert [c["cmd"] for c in clients] == ["eval"]
        assert not [r for r in caplog.records if "does not run scripts" in r.getMessage()]
        assert [fields[b"d"] for _, fields in await admin.xrange(rd.channel)] == [b"3", b"4"]
    finally:
        await admin.execute_command("ACL", "DELUSER", user)


async def test_a_user_allowed_the_channel_but_no_keys_publishes_batches_as_scripts(
    rd: Redis, admin: aioredis.Redis, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A channel is not a key: an ACL that grants the channel and no key pattern (or only the
    # application's keys) lets a pub/sub batch go out as a script.
    user = f"cachesync-channelonly-{unique}"
    await admin.execute_command("ACL", "SETUSER", user, "on", ">secret", "~app:*", "&*", "+@all")
    try:
        url = rd.url("redis", rd.pub_name).replace("redis://", f"redis://{user}:secret@", 1)
        payloads = [b"%d" % i for i in range(4)]
        async with (
            from_url(rd.url("redis", rd.sub_name), connect_timeout=5.0) as transport,
            from_url(url, connect_timeout=5.0) as pub,
            subscribed(transport, rd.channel) as sub,
        ):
            with caplog.at_level("INFO", logger="cachesync.transports.redis"):
                await pub.publish_many(rd.channel, payloads)
            assert await sub.wait_for(4) == payloads
            clients = [c for c in await admin.client_list() if c["name"] == rd.pub_name]
            assert [c["cmd"] for c in clients] == ["eval"]
        assert not [r for r in caplog.records if "does not run scripts" in r.getMessage()]
    finally:
        await admin.execute_command("ACL", "DELUSER", user)


@pytest.mark.timeout(60)
async def test_batches_go_out_on_a_cluster_node_whatever_the_channel_slot(
    redis_cluster: RedisClusterDeployment, unique: str
) -> None:
    # A plain PUBLISH on any node of a Redis Cluster reaches subscribers on every node: a batch
    # script must not name the channel as a key, which the node would answer with MOVED.
    port, (first, last) = next(iter(redis_cluster.primaries().items()))
    node = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        names = [f"cachesync-test-{unique}-{i}" for i in range(64)]
        slots = [await node.execute_command("CLUSTER", "KEYSLOT", name) for name in names]
        channel = next(n for n, slot in zip(names, slots, strict=True) if not first <= slot <= last)
    finally:
        await node.aclose()
    url = f"redis://127.0.0.1:{port}"
    payloads = [b"%d" % i for i in range(5)]
    async with (
        from_url(url, connect_timeout=5.0) as transport,
        from_url(url, connect_timeout=5.0) as pub,
        subscribed(transport, channel) as sub,
    ):
        await pub.publish_many(channel, payloads)
        assert await sub.wait_for(len(payloads)) == payloads
