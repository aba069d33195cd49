"""ConsistencyMonitor: samples entries, asks a fake owner, counts what stayed stale too long.

Most tests drive the monitor by hand (``sample()``, then ``check_due()`` after moving a fake
clock) so nothing waits on real time; one runs the background task end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cachesync import CacheSync, ChangeEvent, Op, StateError
from cachesync.contrib.monitor import ConsistencyMonitor
from cachesync.contrib.prometheus import PrometheusMetrics

from .helpers import FakeClock, eventually

BOUND = 2.0


class VersionedOwner:
    """The owner's rows and versions; ``current_version`` is what the monitor asks."""

    def __init__(self, keys: int = 10) -> None:
        self.versions: dict[str, int] = {f"k{i}": 1 for i in range(keys)}
        self.asked = 0
        self.asked_keys: set[str] = set()
        self.fail: BaseException | None = None
        self.hang = False

    async def fetch(self, key: str) -> dict[str, Any]:
        return {"key": key, "version": self.versions[key]}

    async def current_version(self, key: str) -> int | None:
        self.asked += 1
        self.asked_keys.add(key)
        if self.fail is not None:
            raise self.fail
        if self.hang:
            await asyncio.Event().wait()
        return self.versions.get(key)


def version_of(value: dict[str, Any]) -> int:
    return int(value["version"])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sync(unique: str, clock: FakeClock) -> AsyncIterator[CacheSync]:
    async with CacheSync(f"memory://{unique}", clock=clock) as client:
        yield client


async def filled(sync: CacheSync, owner: VersionedOwner) -> Any:
    get = sync.cached("items", ttl=3600, jitter=0, version_of=version_of)(owner.fetch)
    for key in owner.versions:
        await get(key)
    return get


def upsert(key: str, version: int, seq: int) -> bytes:
    return ChangeEvent(
        source="owner", seq=seq, ns="items", op=Op.UPSERT, keys=(key,), version=version, ts=0.0
    ).encode()


@pytest.mark.timeout(10)
async def test_all_fresh_counts_no_stale(sync: CacheSync, clock: FakeClock) -> None:
    owner = VersionedOwner()
    await filled(sync, owner)
    monitor = ConsistencyMonitor(
        sync, "items", owner.current_version, bound=BOUND, clock=clock, sample_rate=10
    )
    outcomes = [await monitor.sample() for _ in range(50)]
    assert outcomes == ["fresh"] * 50
    clock.advance(BOUND * 2)
    assert monitor.check_due() == 0
    stats = sync.stats()["consistency"]["items"]
    assert stats["checked"] == 50
    assert stats["fresh"] == 50
    assert stats["stale"] == 0
    assert stats["stale_ratio"] == 0.0
    assert stats["bound"] == BOUND
    assert stats["sample_rate"] == 10


@pytest.mark.timeout(10)
async def test_an_entry_stale_beyond_the_bound_is_counted(
    sync: CacheSync, clock: FakeClock
) -> None:
    owner = VersionedOwner(keys=1)
    get = await filled(sync, owner)
    metrics = PrometheusMetrics()
    monitor = ConsistencyMonitor(
        sync, "items", owner.current_version, bound=BOUND, clock=clock, metrics=metrics
    )
    # The owner committed v2 and its event never came; the cache still serves v1 as fresh.
    owner.versions["k0"] = 2
    assert await monitor.sample() == "behind"
    assert sync.stats()["consistency"]["items"]["pending"] == 1
    clock.advance(BOUND / 2)
    assert monitor.check_due() == 0  # within the bound: the invalidation may be in flight
    clock.advance(BOUND / 2)
    assert monitor.check_due() == 1
    stats = sync.stats()["consistency"]["items"]
    assert (stats["stale"], stats["pending"], stats["stale_ratio"]) == (1, 0, 1.0)
    assert (await get("k0"))["version"] == 1  # indeed still stale: the monitor only reports
    labels = {"namespace": "items", "outcome": "stale"}
    assert metrics.registry.get_sample_value("cachesync_consistency_checks_total", labels) == 1


@pytest.mark.timeout(10)
async def test_a_value_primed_with_an_older_version_is_counted(
    sync: CacheSync, clock: FakeClock
) -> None:
    owner = VersionedOwner(keys=1)
    get = await filled(sync, owner)
    owner.versions["k0"] = 5
    get.cache_clear()
    assert get.prime("k0", {"key": "k0", "version": 3}, version=3)
    monitor = ConsistencyMonitor(sync, "items", owner.current_version, bound=BOUND, clock=clock)
    assert await monitor.sample() == "behind"
    clock.advance(BOUND)
    assert monitor.check_due() == 1


@pytest.mark.timeout(10)
async def test_an_invalidation_in_flight_is_forgiven(sync: CacheSync, clock: FakeClock) -> None:
    owner = VersionedOwner(keys=1)
    get = await filled(sync, owner)
    monitor = ConsistencyMonitor(sync, "items", owner.current_version, bound=BOUND, clock=clock)
    owner.versions["k0"] = 2
    assert await monitor.sample() == "behind"
    sync.handle_message(upsert("k0", 2, seq=1))  # the event lands within the bound
    clock.advance(BOUND)
    assert monitor.check_due() == 0
    # The next read fetched v2: a later sample is fresh.
    assert (await get("k0"))["version"] == 2
    assert await monitor.sample() == "fresh"
    stats = sync.stats()["consistency"]["items"]
    assert (stats["caught_up"], stats["fresh"], stats["stale"]) == (1, 1, 0)
    assert stats["stale_ratio"] == 0.0


@pytest.mark.timeout(10)
async def test_a_key_the_owner_dropped_but_still_served_is_stale(
    sync: CacheSync, clock: FakeClock
) -> None:
    owner = VersionedOwner(keys=1)
    await filled(sync, owner)
    monitor = ConsistencyMonitor(sync, "items", owner.current_version, bound=BOUND, clock=clock)
    del owner.versions["k0"]  # deleted at the owner; the delete event was lost
    assert await monitor.sample() == "behind"
    clock.advance(BOUND)
    assert monitor.check_due() == 1


@pytest.mark.timeout(10)
async def test_a_key_dropped_then_created_again_and_refetched_caught_up(
    sync: CacheSync, clock: FakeClock
) -> None:
    owner = VersionedOwner(keys=1)
    sync.handle_message(upsert("other", 1, seq=1))  # the owner's hello
    get = await filled(sync, owner)
    monitor = ConsistencyMonitor(sync, "items", owner.current_version, bound=BOUND, clock=clock)
    del owner.versions["k0"]
    assert await monitor.sample() == "behind"
    owner.versions["k0"] = 5  # created again; its event lands and a read fetches it
    sync.handle_message(upsert("k0", 5, seq=2))
    assert (await get("k0"))["version"] == 5
    clock.advance(BOUND)
    assert monitor.check_due() == 0
    assert sync.stats()["consistency"]["items"]["caught_up"] == 1


@pytest.mark.timeout(10)
async def test_entries_not_served_as_fresh_are_not_sampled(
    sync: CacheSync, clock: FakeClock
) -> None:
    owner = VersionedOwner(keys=2)
    monitor = ConsistencyMonitor(sync, "items", owner.current_version, bound=BOUND, clock=clock)
    assert await monitor.sample() is None  # nothing decorated for "items" yet
    get = sync.cached("items", ttl=10, jitter=0, version_of=version_of)(owner.fetch)
    assert await monitor.sample() is None  # empty
    unversioned = sync.cached("plain", ttl=10)(owner.fetch)
    await unversioned("k0")
    assert await ConsistencyMonitor(sync, "plain", owner.current_version).sample() is None
    sync.handle_message(upsert("other", 1, seq=1))  # the owner's hello
    await get("k0")
    await get("k1")
    sync.handle_message(upsert("k0", 2, seq=2))  # leaves a tombstone for k0
    for _ in range(20):
        assert await monitor.sample() == "fresh"
    assert owner.asked_keys == {"k1"}  # never the tombstone
    clock.advance(11)  # k1 expired by TTL: served by a fetch, not from the cache
    assert await monitor.sample() is None
    assert sync.stats()["consistency"]["items"]["idle"] == 3
    assert sync.stats()["consistency"]["plain"]["idle"] == 1


@pytest.mark.timeout(10)
async def test_an_owner_that_fails_or_hangs_is_counted_as_error(
    sync: CacheSync, clock: FakeClock
) -> None:
    owner = VersionedOwner(keys=1)
    await filled(sync, owner)
    monitor = ConsistencyMonitor(
        sync, "items", owner.current_version, bound=BOUND, clock=clock, timeout=0.01
    )
    owner.fail = ConnectionError("owner down")
    assert await monitor.sample() == "error"
    owner.fail = None
    owner.hang = True
    assert await monitor.sample() == "error"
    stats = sync.stats()["consistency"]["items"]
    assert (stats["errors"], stats["checked"], stats["stale_ratio"]) == (2, 0, None)


@pytest.mark.timeout(10)
async def test_background_task_samples_at_the_rate_and_stops(unique: str) -> None:
    owner = VersionedOwner(keys=4)
    async with CacheSync(f"memory://{unique}") as sync:
        await filled(sync, owner)
        owner.versions["k2"] = 9  # one of four keys is stale and stays so
        stats = sync.stats
        monitor = ConsistencyMonitor(
            sync, "items", owner.current_version, sample_rate=200, bound=0.05
        )
        async with monitor:
            assert monitor.running
            with pytest.raises(StateError):
                await monitor.start()
            await eventually(lambda: stats()["consistency"]["items"]["stale"] >= 3)
        assert not monitor.running
        asked = owner.asked
        section = stats()["consistency"]["items"]
        assert section["pending"] == 0
        assert section["fresh"] > 0
        assert 0 < section["stale_ratio"] < 1
        await monitor.stop()  # idempotent
        await asyncio.sleep(0.02)  # the task is gone: nothing asks the owner any more
        assert owner.asked == asked


@pytest.mark.timeout(10)
async def test_stop_ends_even_if_the_owner_client_swallows_the_cancellation(
    unique: str,
) -> None:
    """redis-py 8.1's asyncio client sometimes returns normally from a cancelled command;
    stop() must not wait forever for a loop that never saw its CancelledError."""
    asked = asyncio.Event()

    async def stubborn(key: str) -> int:
        asked.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass  # what a client that swallows the cancellation does
        return 1

    owner = VersionedOwner(keys=1)
    async with CacheSync(f"memory://{unique}") as sync:
        await filled(sync, owner)
        monitor = ConsistencyMonitor(sync, "items", stubborn, sample_rate=1000)
        await monitor.start()
        await asked.wait()
        await monitor.stop()
        assert not monitor.running


@pytest.mark.timeout(10)
async def test_monitors_of_two_namespaces_share_the_section(
    sync: CacheSync, clock: FakeClock
) -> None:
    owner = VersionedOwner(keys=1)
    await filled(sync, owner)
    a = ConsistencyMonitor(sync, "items", owner.current_version, clock=clock)
    ConsistencyMonitor(sync, "other", owner.current_version, clock=clock)
    await a.sample()
    section = sync.stats()["consistency"]
    assert set(section) == {"items", "other"}
    assert section["items"]["checked"] == 1
    # A new monitor of a namespace goes on counting where the previous one stopped.
    b = ConsistencyMonitor(sync, "items", owner.current_version, clock=clock)
    await b.sample()
    assert sync.stats()["consistency"]["items"]["checked"] == 2


@pytest.mark.timeout(5)
async def test_arguments_are_checked(unique: str) -> None:
    sync = CacheSync(f"memory://{unique}")
    owner = VersionedOwner()
    with pytest.raises(ValueError, match="ns"):
        ConsistencyMonitor(sync, "", owner.current_version)
    with pytest.raises(TypeError, match="current_version"):
        ConsistencyMonitor(sync, "items", None)  # type: ignore[arg-type]
    for name in ("sample_rate", "bound", "timeout"):
        with pytest.raises(ValueError, match=name):
            ConsistencyMonitor(sync, "items", owner.current_version, **{name: 0})
        with pytest.raises(TypeError, match=name):
            ConsistencyMonitor(sync, "items", owner.current_version, **{name: "1"})
