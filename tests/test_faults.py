"""Guarantee 5 on the real brokers: cut, kill and stall the subscriber's connection while the
owner keeps changing data. No read may return a value older than the bound, and caching must
resume (hits again) after recovery.

Connections are cut from the broker side (``CLIENT KILL`` by client name, ``rabbitmqctl
close_connection`` by connection name) or by the project's own TCP proxy between the consumer
and the broker; never by killing a process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

from cachesync import CacheSync, Publisher

from .helpers import eventually
from .tcpproxy import TcpProxy, proxied_url
from .test_transport_contract import kill_redis_clients

pytestmark = pytest.mark.timeout(60)

HEARTBEAT = 0.1


@dataclass
class VersionedOwner:
    """The owner: a version per key, the time each version was committed, and a call count."""

    version: int = 1
    commits: list[tuple[float, int]] = field(default_factory=lambda: [(0.0, 1)])
    calls: int = 0

    async def fetch(self, key: str) -> int:
        self.calls += 1
        return self.version

    def commit(self) -> int:
        self.version += 1
        self.commits.append((time.monotonic(), self.version))
        return self.version

    def newest_before(self, moment: float) -> int:
        return max(v for t, v in self.commits if t <= moment)


@dataclass
class Reads:
    """Every read: when it began and the version it returned."""

    log: list[tuple[float, int]] = field(default_factory=list)

    def stale_beyond(self, owner: VersionedOwner, bound: float) -> list[tuple[float, int, int]]:
        """Reads that returned a version older than one committed more than ``bound`` before
        the read began."""
        return [
            (began, got, owner.newest_before(began - bound))
            for began, got in self.log
            if got < owner.newest_before(began - bound)
        ]


async def run_scenario(
    consumer_url: str,
    publisher_url: str,
    channel: str,
    fault: Callable[[], Awaitable[None]],
    recover: Callable[[CacheSync], Awaitable[None]] | None = None,
    *,
    bound: float,
    heartbeat_timeout: float | None = None,
) -> tuple[CacheSync, VersionedOwner, Reads]:
    """Readers and an owner that commits and publishes every 20 ms; ``fault`` strikes in the
    middle, ``recover(sync)`` after it. Returns once the client is live and caching again."""
    owner = VersionedOwner()
    reads = Reads()
    sync = CacheSync(
        consumer_url,
        channel=channel,
        reconnect_initial=0.02,
        reconnect_max=0.2,
        connect_timeout=5.0,
        heartbeat_timeout=heartbeat_timeout,
    )
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            began = time.monotonic()
            reads.log.append((began, await get("USD")))
            await asyncio.sleep(0.002)

    async def writer(pub: Publisher, count: int) -> None:
        for _ in range(count):
            await pub.changed("fx", "USD", version=owner.commit())
            await asyncio.sleep(0.02)

    async with Publisher(publisher_url, channel=channel, heartbeat_interval=HEARTBEAT) as pub:
        await sync.start()
        try:
            readers = [asyncio.create_task(reader()) for _ in range(3)]
            await writer(pub, 10)
            await fault()
            await writer(pub, 15)
            if recover is not None:
                await recover(sync)
            await sync.wait_ready(10)
            await writer(pub, 5)
            stop.set()
            await asyncio.gather(*readers)
            # Caching resumes: with no more changes, repeated reads are hits.
            await get("USD")
            hits = sync.stats()["namespaces"]["fx"]["hits"]
            for _ in range(10):
                assert await get("USD") == owner.version
            assert sync.stats()["namespaces"]["fx"]["hits"] == hits + 10
        finally:
            stop.set()
            await sync.stop()
    return sync, owner, reads


def assert_coherent(sync: CacheSync, owner: VersionedOwner, reads: Reads, bound: float) -> None:
    assert len(reads.log) > 50
    assert reads.stale_beyond(owner, bound) == []


async def test_client_kill_of_the_pubsub_connection(redis_url: str, unique: str) -> None:
    tag = f"cachesync-fault-{unique}"
    consumer_url = f"{redis_url}?client_name={tag}"

    async def kill() -> None:
        assert await kill_redis_clients(redis_url, tag) >= 1

    sync, owner, reads = await run_scenario(consumer_url, redis_url, unique, kill, bound=0.5)
    assert_coherent(sync, owner, reads, 0.5)
    assert sync.stats()["listener"]["reconnects"] >= 1


async def test_client_kill_of_the_stream_reader_replays_instead_of_flushing(
    redis_url: str, unique: str
) -> None:
    tag = f"cachesync-fault-{unique}"
    stream_url = redis_url.replace("redis://", "redis+stream://")
    consumer_url = f"{stream_url}?client_name={tag}"

    async def kill() -> None:
        assert await kill_redis_clients(redis_url, tag) >= 1

    sync, owner, reads = await run_scenario(consumer_url, stream_url, unique, kill, bound=0.5)
    assert_coherent(sync, owner, reads, 0.5)
    listener = sync.stats()["listener"]
    assert listener["reconnects"] >= 1
    assert listener["replays"] >= 1


async def test_broker_closes_the_amqp_connection(amqp_url: str, unique: str) -> None:
    from .amqp_tools import close_amqp_connections, rabbitmqctl_available

    if not rabbitmqctl_available():
        pytest.skip("rabbitmqctl is not on the PATH")
    tag = f"cachesync-fault-{unique}"
    consumer_url = f"{amqp_url}?name={tag}"

    async def close() -> None:
        assert await close_amqp_connections(tag) >= 1

    sync, owner, reads = await run_scenario(consumer_url, amqp_url, unique, close, bound=0.5)
    assert_coherent(sync, owner, reads, 0.5)
    listener = sync.stats()["listener"]
    # rabbitmqctl can take seconds on a loaded machine: the watchdog may restart the connection
    # on missed heartbeats before the broker closes it. Either way the cut was noticed.
    assert listener["reconnects"] + listener["heartbeat_misses"] >= 1


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
async def test_cut_by_proxy_while_the_broker_is_down_reads_go_to_the_owner(
    scheme: str, request: pytest.FixtureRequest, unique: str
) -> None:
    url = str(request.getfixturevalue("redis_url" if scheme == "redis" else "amqp_url"))
    target = urlsplit(url)
    async with TcpProxy(target.hostname or "127.0.0.1", target.port or 0) as proxy:

        async def down() -> None:
            proxy.refuse(True)
            await proxy.cut()

        async def up(_: CacheSync) -> None:
            proxy.refuse(False)

        sync, owner, reads = await run_scenario(
            proxied_url(url, proxy), url, unique, down, up, bound=0.5
        )
    assert_coherent(sync, owner, reads, 0.5)
    namespace = sync.stats()["namespaces"]["fx"]
    assert namespace["bypassed"] > 0  # reads went to the owner while the broker was away


async def test_stalled_connection_is_found_by_missed_heartbeats(
    redis_url: str, unique: str
) -> None:
    timeout = 3 * HEARTBEAT
    async with TcpProxy("127.0.0.1", 6379) as proxy:

        async def stall() -> None:
            proxy.stall()

        async def resume(sync: CacheSync) -> None:
            # Only the missing heartbeats can reveal the stall: resume once they have.
            await eventually(lambda: sync.stats()["listener"]["heartbeat_misses"] >= 1)
            proxy.resume()

        sync, owner, reads = await run_scenario(
            proxied_url(redis_url, proxy),
            redis_url,
            unique,
            stall,
            resume,
            bound=timeout + 0.5,
            heartbeat_timeout=timeout,
        )
    # Nothing tells the client the network went quiet but the missing heartbeats.
    assert_coherent(sync, owner, reads, timeout + 0.5)
    assert sync.stats()["listener"]["heartbeat_misses"] >= 1
