"""A publisher and a consumer come back by themselves after an outage longer than every timeout,
and ``publish_timeout`` bounds a publish on a stalled network, on the real brokers.

Both sides talk to the broker through the TCP proxy (tests/tcpproxy.py): the network first
stalls (bytes held, nothing closed), then the broker goes "down" (connections reset, new ones
refused), then everything flows again. Nobody restarts anything in between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from cachesync import CacheSync, Publisher
from cachesync.errors import StateError, TransportError
from cachesync.owner.outbox import Outbox, OutboxRelay
from cachesync.transports.memory import MemoryTransport

from .helpers import eventually
from .outbox_tools import Collector
from .tcpproxy import TcpProxy, proxied_url
from .test_outbox import _commit

pytestmark = pytest.mark.timeout(60)

KINDS = ["redis", "redis+stream", "amqp"]
TIMEOUT = 0.5  # connect_timeout, publish_timeout, socket_timeout: every timeout in play
OUTAGE = 1.5  # each phase of the outage lasts three times as long


@asynccontextmanager
async def proxied(
    kind: str, request: pytest.FixtureRequest, unique: str
) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A proxy to the broker of ``kind``, and the URL through it."""
    if kind == "amqp":
        pytest.importorskip("aio_pika")
        base = str(request.getfixturevalue("amqp_url"))
        async with TcpProxy("127.0.0.1", 5672) as proxy:
            yield proxy, proxied_url(base, proxy)
        return
    base = str(request.getfixturevalue("redis_url"))
    async with TcpProxy("127.0.0.1", 6379) as proxy:
        url = proxied_url(base, proxy).replace("redis://", f"{kind}://", 1)
        options = "?health_check_interval=0.2"
        if kind == "redis+stream":
            options += "&block_ms=100"
        yield proxy, url + options
        if kind == "redis+stream":
            import redis.asyncio as aioredis

            admin = aioredis.Redis.from_url(base)
            try:
                await admin.delete(f"recovery-{unique}")
            finally:
                await admin.aclose()


async def publish_until_it_works(pub: Publisher, version: int, timeout: float = 15.0) -> None:
    """What an owner does with a failed publish: try again later (the outbox does this)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await pub.changed("items", "k", version=version)
            return
        except TransportError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("kind", KINDS)
async def test_publisher_and_consumer_come_back_after_a_long_outage(
    kind: str, request: pytest.FixtureRequest, unique: str
) -> None:
    owner = {"k": 1}

    async with proxied(kind, request, unique) as (proxy, url):
        channel = f"recovery-{unique}"
        sync = CacheSync(
            url,
            channel,
            connect_timeout=TIMEOUT,
            heartbeat_timeout=0.6,
            reconnect_initial=0.05,
            reconnect_max=0.2,
        )

        @sync.cached("items", ttl=3600)
        async def get(key: str) -> int:
            return owner[key]

        pub = Publisher(url, channel, heartbeat_interval=0.1, publish_timeout=TIMEOUT)
        async with sync, pub:
            assert await get("k") == 1
            owner["k"] = 2
            await pub.changed("items", "k", version=2)
            await eventually(lambda: sync.namespace("items").snapshot()["events"] >= 1)
            assert await get("k") == 2

            # 1. A silent network: nothing flows, nothing is closed.
            proxy.stall()
            started = time.monotonic()
            with pytest.raises(TransportError):
                await pub.changed("items", "k", version=3)
            assert time.monotonic() - started < TIMEOUT + 1.0  # publish_timeout, not 10 s
            await eventually(lambda: not sync.listener_up, timeout=5)
            await asyncio.sleep(OUTAGE)  # the outage goes on, past every timeout

            # 2. The broker is down: every connection reset, new ones refused.
            proxy.refuse(True)
            await proxy.cut()
            proxy.resume()
            with pytest.raises(TransportError):
                await pub.changed("items", "k", version=3)
            await asyncio.sleep(OUTAGE)
            heartbeat = pub._heartbeat_task  # noqa: SLF001 - the heartbeat must outlive it all
            assert heartbeat is not None and not heartbeat.done()

            # 3. Back. Nobody calls connect(), start() or anything else.
            proxy.refuse(False)
            owner["k"] = 4
            await publish_until_it_works(pub, 4)
            await eventually(lambda: sync.listener_up, timeout=15)
            # The listener may be back before the change reaches it (a stream it resumed
            # with nothing missed, the change published just after): bounded staleness, not
            # read-your-writes. The change (or the gap its seq shows) arrives within it.
            deadline = time.monotonic() + 5
            while await get("k") != 4:
                assert time.monotonic() < deadline, "the consumer never saw the change"
                await asyncio.sleep(0.02)
            owner["k"] = 5
            await publish_until_it_works(pub, 5)
            deadline = time.monotonic() + 10
            while await get("k") != 5:
                assert time.monotonic() < deadline, "the consumer never saw the change"
                await asyncio.sleep(0.02)
            assert not heartbeat.done()
        # stop() ran for both without raising (the async with would have re-raised it).


@pytest.mark.parametrize("kind", ["redis", "amqp"])
async def test_publish_timeout_bounds_a_publish_on_a_stalled_network(
    kind: str, request: pytest.FixtureRequest, unique: str
) -> None:
    async with proxied(kind, request, unique) as (proxy, url):
        async with Publisher(
            url, f"stalled-{unique}", heartbeat_interval=0.05, publish_timeout=TIMEOUT
        ) as pub:
            await pub.changed("items", "k", version=1)
            proxy.stall()
            for version in (2, 3):
                started = time.monotonic()
                with pytest.raises(TransportError, match="within 0.5s"):
                    await pub.changed("items", "k", version=version)
                elapsed = time.monotonic() - started
                # The deadline, plus at most one heartbeat that held the lock (itself bounded
                # by the heartbeat interval): never the 10 s of the transport's own timeouts.
                assert elapsed < TIMEOUT + 1.0, elapsed
            proxy.resume()
            await proxy.cut()
            await publish_until_it_works(pub, 4)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    made = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'owner.db'}")
    await Outbox.create_table(made)
    yield made
    await made.dispose()


@pytest.mark.parametrize("kind", ["redis", "redis+stream"])
async def test_the_outbox_relay_publishes_every_row_after_a_long_outage(
    kind: str, request: pytest.FixtureRequest, unique: str, engine: AsyncEngine
) -> None:
    channel = f"relay-{unique}"
    async with proxied(kind, request, unique) as (proxy, url):
        # The collector reads Redis directly, without the proxied URL's short stall timeouts:
        # a busy machine must not end the observer of the test.
        direct = url.partition("?")[0].replace(f"127.0.0.1:{proxy.port}", "127.0.0.1:6379", 1)
        publisher = Publisher(url, channel, heartbeat_interval=0.1, publish_timeout=TIMEOUT)
        relay = OutboxRelay(engine, publisher, poll_interval=0.05, backoff_max=0.1)
        async with Collector(direct, channel) as collector, publisher, relay:
            await _commit(engine, ("items", "a", 1), channel=channel)
            await collector.wait_changes(1)

            proxy.refuse(True)
            await proxy.cut()
            await _commit(engine, ("items", "b", 1), ("items", "c", 1), channel=channel)
            await eventually(lambda: relay.stats()["publish_errors"] >= 2, timeout=10)
            await asyncio.sleep(OUTAGE)  # longer than every timeout

            proxy.refuse(False)

            # At least once: a row whose publish raced the cut may go out twice.
            def first_seen() -> list[tuple[str, ...]]:
                return list(dict.fromkeys(c.keys for c in collector.changes))

            await collector.wait_for(lambda: len(first_seen()) == 3, timeout=15)
            assert first_seen() == [("a",), ("b",), ("c",)]


class _Unreliable(MemoryTransport):
    """The memory bus, failing publish (and close) on demand."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.error: Exception | None = None
        self.attempts = 0

    async def publish(self, channel: str, payload: bytes) -> None:
        self.attempts += 1
        if self.error is not None:
            raise self.error
        await super().publish(channel, payload)

    async def close(self) -> None:
        await super().close()
        if self.error is not None:
            raise self.error


async def test_the_heartbeat_outlives_any_error_and_stop_never_raises(unique: str) -> None:
    url = f"memory://{unique}"
    transport = _Unreliable(url)
    pub = Publisher(url, transport=transport, heartbeat_interval=0.01, publish_timeout=0.05)
    await pub.start()
    heartbeat = pub._heartbeat_task  # noqa: SLF001
    assert heartbeat is not None
    for error in (TransportError("down"), RuntimeError("a bug in a transport"), StateError("x")):
        transport.error = error
        seen = transport.attempts
        await eventually(lambda seen=seen: transport.attempts >= seen + 3)  # still beating
        assert not heartbeat.done()
    transport.error = None
    seen = pub.published
    await eventually(lambda: pub.published > seen)  # and beats go out again
    transport.error = TransportError("close failed")
    await pub.stop()  # logged, not raised
    assert heartbeat.done()
