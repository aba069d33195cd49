"""redis+sentinel:// beyond the contract suite: the master (a process these tests started) is
killed while events flow and readers read; Sentinel promotes the replica and the transport
follows it."""

from __future__ import annotations

import time

import pytest

from cachesync.errors import ConfigError
from cachesync.transports.base import from_url

from .clusters import SentinelDeployment
from .engine_tools import Feeder, Reader

pytest.importorskip("redis")

from cachesync.transports.redis_sentinel import RedisSentinelTransport  # noqa: E402

pytestmark = pytest.mark.timeout(45)


def test_url_is_parsed_and_checked() -> None:
    transport = from_url("redis+sentinel://:pw@s1,s2:26380/cache/2?health_check_interval=3")
    assert isinstance(transport, RedisSentinelTransport)
    assert (transport.service, transport.db, transport.health_check_interval) == ("cache", 2, 3)
    assert "pw" not in repr(transport)
    with pytest.raises(ConfigError, match="service name"):
        from_url("redis+sentinel://s1:26379/")
    with pytest.raises(ConfigError, match="unknown option"):
        from_url("redis+sentinel://s1:26379/mymaster?helth=1")


async def test_publisher_and_subscriber_follow_a_killed_master(
    sentinel: SentinelDeployment, unique: str
) -> None:
    sentinel.wait_settled()
    channel = f"cachesync-sentinel-{unique}"
    url = f"{sentinel.url}?health_check_interval=1"
    reader = Reader(RedisSentinelTransport(url, connect_timeout=5.0), channel)
    feeder = Feeder(RedisSentinelTransport(url, connect_timeout=5.0, socket_timeout=1.0), channel)
    victim = sentinel.node_at(sentinel.master_port())
    try:
        reader.start()
        await reader.wait(lambda: reader.readies, 10)
        feeder.start()
        await reader.wait(lambda: len(reader.numbers) >= 50, 10)
        killed_at = time.monotonic()
        sentinel.group.kill(victim)
        newest = max(reader.numbers)
        await reader.wait(lambda: max(reader.numbers) >= newest + 100, 25)
        back = next(
            at
            for at, number in zip(reader.arrivals, reader.numbers, strict=True)
            if at > killed_at and number > newest
        )
        print(f"sentinel failover: events flow again {back - killed_at:.2f}s after the kill")
        # The subscription broke with the master, and the reader was told that events may
        # have been lost (pub/sub keeps no log): it came back with resumed=False.
        assert reader.losses and reader.losses[0][0] >= killed_at
        assert len(reader.readies) >= 2
        assert not any(resumed for _, resumed in reader.readies)
        assert sentinel.node_at(sentinel.master_port()) != victim
        assert back - killed_at < 15
    finally:
        await feeder.stop()
        await reader.stop()
        sentinel.restart(victim, wait=False)


async def test_cached_reads_stay_coherent_when_the_master_is_killed(
    sentinel: SentinelDeployment, unique: str
) -> None:
    from .test_faults import assert_coherent, run_scenario

    sentinel.wait_settled()
    victim = sentinel.node_at(sentinel.master_port())
    url = f"{sentinel.url}?health_check_interval=1&socket_timeout=1"

    async def kill() -> None:
        sentinel.group.kill(victim)

    try:
        sync, owner, reads = await run_scenario(url, url, f"cachesync-{unique}", kill, bound=0.5)
        assert_coherent(sync, owner, reads, bound=0.5)
        assert sync.stats()["listener"]["reconnects"] >= 1
    finally:
        sentinel.restart(victim, wait=False)
