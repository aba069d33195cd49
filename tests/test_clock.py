"""The hit clock: the loop-refreshed time the async hit path compares expiries with."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from cachesync import CacheSync
from cachesync.clock import ExactClock, LoopClock

from .helpers import FakeClock, Owner, eventually

pytestmark = pytest.mark.timeout(20)


def test_paused_until_woken_in_a_running_loop() -> None:
    clock = LoopClock(FakeClock())
    assert clock.now == math.inf
    clock.wake()  # no running loop: nothing to tick on
    assert clock.now == math.inf
    assert not clock.ticking


@pytest.mark.parametrize(
    ("options", "name"), [({"resolution": 0}, "resolution"), ({"lease": 0.001}, "lease")]
)
def test_bad_options_are_refused(options: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LoopClock(**options)


async def test_ticks_follow_the_clock_until_the_lease_runs_out() -> None:
    source = FakeClock()
    clock = LoopClock(source, resolution=0.001, lease=1.0)
    try:
        clock.wake()
        assert clock.now == 1000.0
        assert clock.ticking
        source.advance(0.5)
        await eventually(lambda: clock.now == 1000.5)
        source.advance(0.6)  # past the lease: the next tick pauses
        await eventually(lambda: not clock.ticking)
        assert clock.now == math.inf
        clock.wake()  # a read woke it again
        assert clock.now == 1001.1
        assert clock.ticking
    finally:
        clock.close()


async def test_never_ahead_of_the_real_clock() -> None:
    clock = LoopClock(resolution=0.001)
    try:
        clock.wake()
        seen = {clock.now}
        while len(seen) < 5:  # a few ticks
            assert clock.now <= time.monotonic()
            seen.add(clock.now)
            await eventually(lambda: clock.now not in seen or clock.now == math.inf, timeout=2)
    finally:
        clock.close()


async def test_close_pauses() -> None:
    clock = LoopClock()
    clock.wake()
    clock.close()
    assert clock.now == math.inf
    assert not clock.ticking


def test_exact_clock_reads_at_every_access() -> None:
    source = FakeClock()
    clock = ExactClock(source)
    source.advance(3)
    assert clock.now == 1003.0


# -- through CacheSync ---------------------------------------------------------------------


async def test_a_paused_hit_clock_still_serves_hits_and_wakes(unique: str) -> None:
    owner = Owner(USD=1.0)
    async with CacheSync(f"memory://{unique}") as sync:
        get = sync.cached("fx", ttl=3600)(owner.fetch)
        await get("USD")
        hit_clock = get.cache.hit_clock
        assert isinstance(hit_clock, LoopClock)
        hit_clock.close()  # as after a second without reads
        assert await get("USD") == 1.0
        assert owner.calls == 1
        assert sync.stats()["namespaces"]["fx"]["hits"] == 1
        assert hit_clock.ticking  # woken by that read
        assert await get("USD") == 1.0
        assert sync.stats()["namespaces"]["fx"]["hits"] == 2


async def test_ttl_expiry_is_seen_once_the_clock_ticks_past_it(unique: str) -> None:
    owner = Owner(USD=1.0)
    async with CacheSync(f"memory://{unique}") as sync:
        get = sync.cached("fx", ttl=0.05, jitter=0)(owner.fetch)
        await get("USD")
        await get("USD")  # a hit that wakes the hit clock
        expires = get.cache.data["USD"].expires
        hit_clock = get.cache.hit_clock
        await eventually(lambda: math.inf > hit_clock.now > expires)
        owner.commit("USD", 2.0)
        assert await get("USD") == 2.0
        assert owner.calls == 2


async def test_stop_closes_the_hit_clock(unique: str) -> None:
    owner = Owner(USD=1.0)
    async with CacheSync(f"memory://{unique}") as sync:
        get = sync.cached("fx", ttl=3600)(owner.fetch)
        await get("USD")
        await get("USD")
        assert get.cache.hit_clock.ticking
    assert not get.cache.hit_clock.ticking
    assert get.cache.hit_clock.now == math.inf


def test_a_loop_that_ends_without_stop_leaves_nothing_served(unique: str) -> None:
    """asyncio.run() cancels the listener of a client nobody stopped: the caches must stop
    serving (no more events reach them) and the hit clock must not stay frozen."""

    owner = Owner(USD=1.0)
    sync = CacheSync(f"memory://{unique}")
    get = sync.cached("fx", ttl=3600)(owner.fetch)

    async def main() -> None:
        await sync.start()
        await get("USD")
        await get("USD")
        assert get.cache.hit_clock.ticking

    asyncio.run(main())
    assert not get.cache.trusted
    assert not get.cache.hit_clock.ticking
    assert get.cache.hit_clock.now == math.inf
