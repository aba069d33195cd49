"""The client's contract over every transport: a Publisher and CacheSync instances on the same
URL keep caches coherent, and a lost connection is noticed and recovered from.

Runs against the real Redis and RabbitMQ on 127.0.0.1 (see tests/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cachesync import CacheSync, Publisher

from .helpers import Owner, eventually

pytestmark = pytest.mark.timeout(30)

TRANSPORTS = ["memory", "redis", "redis+stream", "amqp"]


@pytest.fixture(params=TRANSPORTS)
def url(request: pytest.FixtureRequest, unique: str) -> str:
    kind = request.param
    if kind == "memory":
        return f"memory://{unique}"
    if kind == "amqp":
        return str(request.getfixturevalue("amqp_url"))
    base = str(request.getfixturevalue("redis_url"))
    return base.replace("redis://", "redis+stream://") if kind == "redis+stream" else base


@pytest.fixture
async def publisher(url: str, unique: str) -> AsyncIterator[Publisher]:
    async with Publisher(url, channel=unique, heartbeat_interval=0.1) as pub:
        yield pub


async def started(url: str, channel: str, owner: Owner, **options: object) -> CacheSync:
    sync = CacheSync(url, channel=channel, reconnect_initial=0.01, **options)  # type: ignore[arg-type]
    sync.cached("fx", ttl=3600)(owner.fetch)
    await sync.start()
    return sync


async def test_every_instance_applies_an_invalidation(
    url: str, unique: str, publisher: Publisher
) -> None:
    owner = Owner(USD=1.0)
    instances = [await started(url, unique, owner) for _ in range(3)]
    try:
        gets = [s.cached("fx", ttl=3600)(owner.fetch) for s in instances]
        # Each instance learns of the publisher (its first heartbeat) before caching.
        for sync in instances:
            await eventually(lambda s=sync: s.stats()["listener"]["heartbeats"] >= 1)  # type: ignore[misc]
        for get in gets:
            assert await get("USD") == 1.0
            assert await get("USD") == 1.0
        calls = owner.calls
        owner.commit("USD", 1.1)
        await publisher.changed("fx", "USD", version=2)
        for sync in instances:
            await eventually(lambda s=sync: s.stats()["namespaces"]["fx"]["invalidations"] == 1)  # type: ignore[misc]
        for get in gets:
            assert await get("USD") == 1.1
        assert owner.calls == calls + 3
    finally:
        for sync in instances:
            await sync.stop()


async def test_refresh_mode_applies_the_carried_value_without_a_fetch(
    url: str, unique: str, publisher: Publisher
) -> None:
    owner = Owner(USD={"rate": 1.0})
    async with CacheSync(url, channel=unique) as sync:
        get = sync.cached("fx", ttl=3600, mode="refresh")(owner.fetch)
        await eventually(lambda: sync.stats()["listener"]["heartbeats"] >= 1)
        await get("USD")
        await publisher.changed("fx", "USD", version=2, value={"rate": 1.2})
        await eventually(lambda: sync.stats()["namespaces"]["fx"]["refreshes"] == 1)
        assert await get("USD") == {"rate": 1.2}
        assert owner.calls == 1


async def test_a_lost_last_event_is_found_by_the_next_heartbeat(
    url: str, unique: str, publisher: Publisher
) -> None:
    owner = Owner(USD=1.0)
    async with CacheSync(url, channel=unique) as sync:
        get = sync.cached("fx", ttl=3600)(owner.fetch)
        await eventually(lambda: sync.stats()["listener"]["heartbeats"] >= 1)
        await get("USD")
        owner.commit("USD", 1.1)
        publisher.seq += 1  # the event for this commit was never delivered
        loop = asyncio.get_running_loop()
        lost_at = loop.time()
        await eventually(lambda: sync.stats()["listener"]["gaps"] == 1)
        assert loop.time() - lost_at < 2 * 0.1 + 0.5  # about two heartbeats, not the TTL
        assert await get("USD") == 1.1
