"""max_bytes: a memory budget per function, LRU eviction by weight, bytes in stats and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cachesync import CacheSync, LocalCache, PrometheusMetrics
from cachesync.weight import ENTRY_OVERHEAD, estimate_size

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def sync(unique: str) -> AsyncIterator[CacheSync]:
    async with CacheSync(f"memory://{unique}") as client:
        yield client


def _weight(key: str, size: int) -> int:
    return size + len(key) + ENTRY_OVERHEAD


async def test_eviction_by_weight_passes_over_recently_read_entries(sync: CacheSync) -> None:
    budget = 3 * _weight("K0", 1000)

    @sync.cached("blobs", ttl=3600, max_bytes=budget, weigher=len)
    async def blob(key: str) -> bytes:
        return b"x" * 1000

    for key in ("K0", "K1", "K2"):
        await blob(key)
    assert blob.cache.bytes == budget
    await blob("K0")  # K0 was read: it gets a second chance
    await blob("K3")  # over budget: K1, the oldest not read since, goes
    assert sorted(blob.cache.keys()) == ["K0", "K2", "K3"]
    assert blob.cache.bytes == budget
    counters = sync.stats()["namespaces"]["blobs"]
    assert counters["bytes"] == budget and counters["evictions"] == 1


async def test_invalidation_and_tombstones_keep_the_count_right(sync: CacheSync) -> None:
    @sync.cached("blobs", ttl=3600, max_bytes=1 << 20, weigher=len, version_of=lambda v: 1)
    async def blob(key: str) -> bytes:
        return b"x" * 100

    await blob("A")
    await blob("B")
    assert blob.invalidate("A")  # versioned: a tombstone remains, light
    blob.cache.invalidate("B", version=5)
    assert blob.cache.bytes == sum(ENTRY_OVERHEAD + len(k) for k in ("A", "B"))  # two tombstones
    blob.cache.clear()
    for key in ("A", "B"):
        await blob(key)
    # A is stored again; B's fetch (version 1) is older than its tombstone (5): not stored.
    assert blob.cache.bytes == _weight("A", 100) + ENTRY_OVERHEAD + len("B")


async def test_a_value_over_the_whole_budget_is_not_stored(sync: CacheSync) -> None:
    @sync.cached("blobs", ttl=3600, max_bytes=500, weigher=len)
    async def blob(key: str) -> bytes:
        return b"x" * (10 if key == "small" else 10_000)

    assert await blob("big") == b"x" * 10_000  # served, not stored
    await blob("small")
    assert blob.cache.keys() == ["small"]
    assert sync.stats()["namespaces"]["blobs"]["evictions"] == 1


async def test_default_weigher_and_unbounded_count(sync: CacheSync) -> None:
    @sync.cached("items", ttl=3600, max_bytes=10 << 20)
    async def item(key: str) -> dict[str, object]:
        return {"key": key, "payload": "y" * 200, "tags": [1, 2, 3]}

    for i in range(20_000 // 1000):
        await item(f"I{i}")
    assert item.cache.maxsize > 10_000  # max_bytes replaces the default maxsize
    expected = estimate_size({"key": "I0", "payload": "y" * 200, "tags": [1, 2, 3]})
    assert expected > 200 + 3 * 28
    assert item.cache.bytes >= 20 * expected


def test_settings_checked() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        LocalCache("ns", ttl=1, max_bytes=0)
    sync = CacheSync("memory://settings")
    with pytest.raises(ValueError, match="needs max_bytes"):
        sync.cached("ns", weigher=len)
    with pytest.raises(TypeError, match="weigher"):
        sync.cached("ns", max_bytes=10, weigher=5)  # type: ignore[arg-type]


async def test_bytes_in_prometheus(unique: str) -> None:
    from prometheus_client import generate_latest

    metrics = PrometheusMetrics()
    async with CacheSync(f"memory://{unique}", observer=metrics) as sync:
        metrics.bind(sync)

        @sync.cached("blobs", ttl=3600, max_bytes=1 << 20, weigher=len)
        async def blob(key: str) -> bytes:
            return b"x" * 100

        await blob("A")
        text = generate_latest(metrics.registry)
        assert f'cachesync_cache_bytes{{namespace="blobs"}} {_weight("A", 100)}.0'.encode() in text
        metrics.unbind()


def test_bytes_match_the_entries_held_after_random_operations() -> None:
    import random

    from cachesync.cache import TOMBSTONE
    from cachesync.weight import TOMBSTONE_WEIGHT

    rng = random.Random(1)
    cache = LocalCache("ns", ttl=60, max_bytes=5_000, weigher=len, tags=lambda v: [v[:1]])
    for _ in range(3_000):
        key = f"K{rng.randrange(40)}"
        action = rng.random()
        if action < 0.5:
            cache.prime(key, "ab"[rng.randrange(2)] * rng.randrange(1, 400), rng.randrange(9))
        elif action < 0.7:
            cache.invalidate(key, rng.choice([None, rng.randrange(9)]))
        elif action < 0.8:
            cache.invalidate_tags([rng.choice("ab")])
        elif action < 0.85:
            cache.clear()
        else:
            flight = cache.begin_fill(key, None)
            cache.finish_fill(flight, "a" * rng.randrange(1, 400), rng.randrange(9))
        expected = sum(
            TOMBSTONE_WEIGHT + len(k)
            if e.value is TOMBSTONE
            else len(e.value) + len(k) + ENTRY_OVERHEAD
            for k, e in cache.data.items()
        )
        assert cache.bytes == expected <= 5_000
        assert set(cache.tag_index.by_key) <= set(cache.data)  # type: ignore[union-attr]
