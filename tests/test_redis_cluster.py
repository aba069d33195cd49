"""redis+cluster:// beyond the contract suite, on 3 primaries and 3 replicas started by the tests:
namespaces spread over shards, SPUBLISH only, one reader per node, a graceful failover
(server-sent ``sunsubscribe``) and a killed primary while events flow."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cachesync import CacheSync, Publisher
from cachesync.errors import ConfigError, ConnectionLost
from cachesync.transports.base import from_url

from .clusters import RedisClusterDeployment, wait_until
from .engine_tools import Feeder, Reader
from .helpers import eventually
from .test_transport_contract import Subscriber

pytest.importorskip("redis")

from cachesync.transports.redis_cluster import RedisClusterTransport  # noqa: E402

pytestmark = pytest.mark.timeout(45)


def test_url_is_parsed_and_checked() -> None:
    transport = from_url("redis+cluster://:pw@h1:7000,h2:7001?health_check_interval=2")
    assert isinstance(transport, RedisClusterTransport)
    assert transport.health_check_interval == 2
    assert "pw" not in repr(transport)
    with pytest.raises(ConfigError, match="database 0"):
        from_url("redis+cluster://h1:7000/3")


async def _until_value(get: Any, value: int, timeout: float = 5.0) -> None:
    """Read until the cached function returns ``value`` (its event has been applied)."""
    async with asyncio.timeout(timeout):
        while await get("k") != value:
            await asyncio.sleep(0.01)


def _sync_client(port: int) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0)


def _command_calls(deployment: RedisClusterDeployment, command: str) -> int:
    total = 0
    for port in deployment.ports:
        client = _sync_client(port)
        try:
            stats = client.info("commandstats").get(f"cmdstat_{command}", {})
            total += int(stats.get("calls", 0))
        finally:
            client.close()
    return total


async def test_namespaces_spread_over_shards_and_only_spublish_is_used(
    redis_cluster: RedisClusterDeployment, unique: str
) -> None:
    transport = RedisClusterTransport(redis_cluster.url)
    wires = [transport.channel_for(f"c-{unique}", f"ns{i}") for i in range(12)]
    assert wires[0] == f"c-{unique}{{ns0}}"
    assert len({_owner_of(redis_cluster, wire) for wire in wires}) == 3

    publishes = _command_calls(redis_cluster, "publish")
    channel = f"cachesync-{unique}"
    sync = CacheSync(redis_cluster.url, channel=channel, connect_timeout=5.0)
    values = {f"ns{i}": 1 for i in range(6)}
    getters = {}

    def reader(ns: str) -> Any:
        async def fetch(key: str) -> int:  # one parameter: the key is the owner's key
            return values[ns]

        return fetch

    for ns in values:
        getters[ns] = sync.cached(ns)(reader(ns))
    async with sync, Publisher(redis_cluster.url, channel=channel) as pub:
        for get in getters.values():
            assert await get("k") == 1
        for ns in values:
            values[ns] = 2
            await pub.changed(ns, "k", version=2)
        for get in getters.values():
            await _until_value(get, 2)
        # A new publisher's first heartbeats, and changes, went to the namespaces' channels.
        assert sync.stats()["listener"]["gaps"] == 0
    assert _command_calls(redis_cluster, "publish") == publishes


async def test_a_quiet_shard_does_not_delay_another(
    redis_cluster: RedisClusterDeployment, unique: str
) -> None:
    # One reader per node: the reader of a quiet node sits in a long read, and a message on
    # another node arrives at once all the same.
    transport = RedisClusterTransport(redis_cluster.url, health_check_interval=10.0)
    pub = RedisClusterTransport(redis_cluster.url)
    await transport.connect()
    await pub.connect()
    wires = [transport.channel_for(unique, f"ns{i}") for i in range(12)]
    try:
        received: list[float] = []
        ready = asyncio.Event()

        async def consume() -> None:
            async for _ in transport.subscribe_many(wires, lambda resumed: ready.set()):
                received.append(time.monotonic())

        task = asyncio.create_task(consume())
        try:
            await asyncio.wait_for(ready.wait(), 10)
            for wire in wires:
                sent = time.monotonic()
                await pub.publish(wire, b"x")
                count = len(received)
                await eventually(lambda count=count: len(received) > count, timeout=2.0)
                assert received[-1] - sent < 0.5
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await transport.close()
        await pub.close()


async def test_a_namespace_added_while_listening_is_subscribed_too(
    redis_cluster: RedisClusterDeployment, unique: str
) -> None:
    channel = f"cachesync-{unique}"
    values = {"a": 1, "b": 1}
    sync = CacheSync(redis_cluster.url, channel=channel, connect_timeout=5.0)

    async def fetch_a(key: str) -> int:
        return values["a"]

    async def fetch_b(key: str) -> int:
        return values["b"]

    get_a = sync.cached("a")(fetch_a)
    async with sync, Publisher(redis_cluster.url, channel=channel) as pub:
        get_b = sync.cached("b")(fetch_b)  # its channel is not subscribed yet
        await sync.wait_ready(10)
        assert await get_a("k") == 1 and await get_b("k") == 1
        values["b"] = 2
        await pub.changed("b", "k", version=2)
        await _until_value(get_b, 2)
        # Its events arrive (not only reads through to the owner while untrusted), and its
        # entries are trusted again: reads are hits.
        assert sync.stats()["namespaces"]["b"]["events"] >= 1
        hits = sync.stats()["namespaces"]["b"]["hits"]
        assert await get_b("k") == 2
        assert sync.stats()["namespaces"]["b"]["hits"] == hits + 1


def _owner_of(deployment: RedisClusterDeployment, wire: str) -> int:
    """The port of the primary serving ``wire``'s slot; -1 while no node claims it (in the
    middle of a failover the slot map may name none)."""
    from redis.cluster import key_slot

    slot = key_slot(wire.encode())
    return next((p for p, (a, b) in deployment.primaries().items() if a <= slot <= b), -1)


def _replica_of(deployment: RedisClusterDeployment, primary: int) -> int:
    client = _sync_client(primary)
    try:
        info = client.info("replication")
        return int(info["slave0"]["port"])
    finally:
        client.close()


async def test_a_graceful_failover_ends_the_subscription_and_it_comes_back(
    redis_cluster: RedisClusterDeployment, unique: str
) -> None:
    redis_cluster.wait_healthy()
    transport = RedisClusterTransport(redis_cluster.url, health_check_interval=1.0)
    pub = RedisClusterTransport(redis_cluster.url)
    wire = transport.channel_for(unique, "fx")
    primary = _owner_of(redis_cluster, wire)
    replica = _replica_of(redis_cluster, primary)
    await transport.connect()
    await pub.connect()
    try:
        sub = Subscriber(transport, wire)
        try:
            await sub.live()
            client = _sync_client(replica)
            try:
                client.execute_command("CLUSTER", "FAILOVER")
            finally:
                client.close()
            # The old primary gives up the channel: it says so (sunsubscribe).
            ended = await sub.ended(timeout=10.0)
            assert isinstance(ended, ConnectionLost)
            assert "gave up" in str(ended)
        finally:
            await sub.stop()
        wait_until(lambda: _owner_of(redis_cluster, wire) == replica, 10.0, "the failover")
        await transport.connect()
        await pub.connect()
        async with asyncio.timeout(10):
            again = Subscriber(transport, wire)
            try:
                await again.live()
                await pub.publish(wire, b"after")
                assert await again.wait_for(1) == [b"after"]
                assert again.log[0] == ("ready", False)
            finally:
                await again.stop()
    finally:
        await transport.close()
        await pub.close()


async def test_a_killed_primary_while_events_flow(
    redis_cluster: RedisClusterDeployment, unique: str
) -> None:
    redis_cluster.wait_healthy()
    url = f"{redis_cluster.url}?health_check_interval=1&socket_timeout=1"
    channel = RedisClusterTransport(url).channel_for(f"cachesync-{unique}", "fx")
    victim = redis_cluster.node_at(_owner_of(redis_cluster, channel))
    reader = Reader(RedisClusterTransport(url, connect_timeout=5.0), channel)
    feeder = Feeder(RedisClusterTransport(url, connect_timeout=5.0), channel)
    try:
        reader.start()
        await reader.wait(lambda: reader.readies, 10)
        feeder.start()
        await reader.wait(lambda: len(reader.numbers) >= 50, 10)
        killed_at = time.monotonic()
        redis_cluster.group.kill(victim)
        newest = max(reader.numbers)
        await reader.wait(lambda: max(reader.numbers) >= newest + 100, 25)
        back = next(
            at
            for at, number in zip(reader.arrivals, reader.numbers, strict=True)
            if at > killed_at and number > newest
        )
        print(f"redis cluster failover: events flow again {back - killed_at:.2f}s after the kill")
        assert reader.losses and not any(resumed for _, resumed in reader.readies)
        assert back - killed_at < 15
    finally:
        await feeder.stop()
        await reader.stop()
        redis_cluster.restart(victim, wait=False)


async def test_cached_reads_stay_coherent_when_a_primary_is_killed(
    redis_cluster: RedisClusterDeployment, unique: str
) -> None:
    from .test_faults import assert_coherent, run_scenario

    redis_cluster.wait_healthy()
    url = f"{redis_cluster.url}?health_check_interval=1&socket_timeout=1"
    channel = f"cachesync-{unique}"
    victim = redis_cluster.node_at(
        _owner_of(redis_cluster, RedisClusterTransport(url).channel_for(channel, "fx"))
    )

    async def kill() -> None:
        redis_cluster.group.kill(victim)

    try:
        sync, owner, reads = await run_scenario(url, url, channel, kill, bound=0.5)
        assert_coherent(sync, owner, reads, bound=0.5)
        assert sync.stats()["listener"]["reconnects"] >= 1
    finally:
        redis_cluster.restart(victim, wait=False)
