"""LocalCache on a fake clock: TTLs, jitter, LRU, negative entries, versions, trust."""

from __future__ import annotations

import random
import threading

import pytest

from cachesync.cache import TOMBSTONE, LocalCache
from cachesync.cached import wrap_sync

from .helpers import FakeClock


def make(clock: FakeClock, **options: object) -> LocalCache:
    options.setdefault("ttl", 10.0)
    options.setdefault("jitter", 0.0)
    cache = LocalCache("ns", clock=clock, **options)  # type: ignore[arg-type]
    cache.trust()
    return cache


def fill(cache: LocalCache, key: str, value: object, version: int | None = None) -> bool:
    return cache.finish_fill(cache.begin_fill(key, None), value, version)


def test_entry_is_fresh_until_its_ttl() -> None:
    clock = FakeClock()
    cache = make(clock)
    assert fill(cache, "a", 1)
    clock.advance(9.99)
    assert cache.get_fresh("a") is not None
    clock.advance(0.02)
    assert cache.get_fresh("a") is None


def test_jitter_spreads_expiry_within_bounds() -> None:
    clock = FakeClock()
    cache = make(clock, ttl=100.0, jitter=0.1, rng=random.Random(1))
    for i in range(200):
        fill(cache, str(i), i)
    lifetimes = [cache.data[str(i)].expires - clock.now for i in range(200)]
    assert min(lifetimes) >= 90.0 and max(lifetimes) <= 110.0
    assert max(lifetimes) - min(lifetimes) > 10.0


def test_eviction_gives_a_read_entry_a_second_chance() -> None:
    clock = FakeClock()
    cache = make(clock, maxsize=2)
    fill(cache, "a", 1)
    fill(cache, "b", 2)
    cache.data["a"].used = True  # what a hit does
    fill(cache, "c", 3)
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.stats.evictions == 1
    assert not cache.data["a"].used  # its chance is spent, and it went to the back
    fill(cache, "d", 4)
    assert "c" not in cache and "a" in cache and "d" in cache


def test_eviction_never_drops_what_was_just_stored_and_ends() -> None:
    clock = FakeClock()
    cache = make(clock, maxsize=3)
    for key in "abc":
        fill(cache, key, key)
    for key in "abc":
        cache.data[key].used = True  # everything was read
    fill(cache, "d", "d")
    assert "d" in cache and len(cache) == 3 and cache.stats.evictions == 1


def test_hits_through_the_wrappers_protect_entries_from_eviction() -> None:
    clock = FakeClock()
    cache = make(clock, maxsize=2)
    calls: list[str] = []

    def fetch(key: str) -> str:
        calls.append(key)
        return key

    get = wrap_sync(fetch, cache, key_func=None, version_of=None, submit=lambda job: job())
    get("a")
    get("b")
    get("a")  # a hit: "a" gets a second chance
    get("c")  # evicts "b", the one not read since it was stored
    get("a")
    assert calls == ["a", "b", "c"]


def test_none_is_cached_only_with_negative_ttl() -> None:
    clock = FakeClock()
    plain = make(clock)
    assert not fill(plain, "missing", None)
    negative = make(clock, negative_ttl=2.0)
    assert fill(negative, "missing", None)
    clock.advance(2.5)
    assert negative.get_fresh("missing") is None


def test_invalidate_voids_fill_in_progress() -> None:
    cache = make(FakeClock())
    flight = cache.begin_fill("a", None)
    cache.invalidate("a")
    assert flight.void
    assert not cache.finish_fill(flight, "old")
    assert "a" not in cache


def test_versioned_invalidation_leaves_tombstone_that_refuses_older_values() -> None:
    cache = make(FakeClock())
    fill(cache, "a", "v1", version=1)
    assert cache.invalidate("a", version=3)
    assert cache.data["a"].value is TOMBSTONE and cache.version_of("a") == 3
    assert not cache.apply_value("a", "v2", version=2)
    assert not fill(cache, "a", "v2", version=2)
    assert cache.apply_value("a", "v4", version=4)
    assert cache.get_fresh("a").value == "v4"  # type: ignore[union-attr]


def test_invalidation_older_than_entry_is_ignored() -> None:
    cache = make(FakeClock())
    fill(cache, "a", "v5", version=5)
    assert not cache.invalidate("a", version=4)
    assert cache.get_fresh("a") is not None
    assert cache.stats.ignored_older == 1


def test_unversioned_fill_after_tombstone_keeps_known_version() -> None:
    cache = make(FakeClock())
    fill(cache, "a", "v1")
    cache.invalidate("a", version=3)
    assert fill(cache, "a", "v3")
    assert cache.version_of("a") == 3
    assert not cache.apply_value("a", "v2", version=2)


def test_refresh_ignores_keys_not_held() -> None:
    cache = make(FakeClock())
    assert not cache.apply_value("never-read", 1, version=1)
    assert len(cache) == 0


def test_suspect_all_keeps_values_for_stale_if_error_only() -> None:
    clock = FakeClock()
    cache = make(clock, stale_if_error=60.0, stale_while_revalidate=30.0)
    fill(cache, "a", 1)
    cache.suspect_all()
    assert cache.get_fresh("a") is None
    assert cache.get_stale("a", for_error=False) is None
    assert cache.get_stale("a", for_error=True) is not None


def test_distrust_hides_entries_and_refuses_fills_then_trust_restores() -> None:
    cache = make(FakeClock())
    fill(cache, "a", 1)
    flight = cache.begin_fill("b", None)
    cache.distrust()
    assert cache.get_fresh("a") is None
    assert flight.void
    assert not fill(cache, "c", 3)
    cache.trust()
    assert cache.get_fresh("a") is not None


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("ttl", 0),
        ("ttl", -1),
        ("ttl", "10"),
        ("maxsize", 0),
        ("maxsize", 1.5),
        ("negative_ttl", 0),
        ("jitter", 1.0),
        ("stale_if_error", -1),
        ("stale_while_revalidate", -0.1),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        make(FakeClock(), **{option: value})


def test_a_fill_begun_in_another_thread_before_an_invalidation_is_voided() -> None:
    """invalidate() looks for fills to void only when some are under way: a fill begun in
    another thread just before it (threaded, plain, or a bulk one) must still be voided."""
    cache = make(FakeClock())
    started = done = 0
    stop = False
    progress = threading.Condition()

    def invalidator() -> None:
        nonlocal started, done
        while not stop:
            started += 1
            cache.invalidate("a")
            with progress:
                done += 1
                progress.notify_all()

    thread = threading.Thread(target=invalidator, daemon=True)
    thread.start()
    try:
        for i in range(300):
            bulk = cache.begin_bulk() if i % 3 == 2 else None
            flight = cache.begin_fill("a", None, threaded=i % 3 == 1)
            after = started  # an invalidation started after this began the fills
            with progress:
                assert progress.wait_for(lambda: done > after, timeout=5.0)  # noqa: B023
            assert not cache.finish_fill(flight, "old"), i
            if bulk is not None:
                assert not bulk.put("a", "old")
                bulk.close()
    finally:
        stop = True
        thread.join(timeout=5.0)
