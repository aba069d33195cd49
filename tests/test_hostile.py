"""The core attacked as a hostile user would: raising callbacks, cancelled and orphaned fills,
event loops that end, odd signatures, replayed heartbeats, sources that fall silent.

Every test here failed before the fix that came with it. Events are applied with
``handle_message`` (what the listener calls for each message) and time is a fake clock, so
each interleaving is fixed by the test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import pytest

from cachesync import CacheSync, ChangeEvent, Op, Publisher
from cachesync.cache import LocalCache
from cachesync.cached import wrap_sync

from .helpers import FakeClock, eventually

pytestmark = pytest.mark.timeout(20)


def heartbeat(source: str, seq: int, interval: float = 1.0) -> bytes:
    return ChangeEvent(
        source=source, seq=seq, op=Op.HEARTBEAT, value={"interval": interval}, ts=0.0
    ).encode()


def upsert(source: str, seq: int, key: str, ns: str = "fx", value: Any = None) -> bytes:
    return ChangeEvent(
        source=source, seq=seq, ns=ns, op=Op.UPSERT, keys=(key,), value=value, ts=0.0
    ).encode()


def flush(source: str, seq: int, ns: str = "fx") -> bytes:
    return ChangeEvent(source=source, seq=seq, ns=ns, op=Op.FLUSH, ts=0.0).encode()


class RaisingObserver:
    """A metrics hook that fails on every call."""

    def fetch_done(self, ns: str, seconds: float, ok: bool) -> None:
        raise RuntimeError("fetch_done failed")

    def event_applied(self, ns: str, op: str, lag_seconds: float) -> None:
        raise RuntimeError("event_applied failed")

    def lost_events(self, cause: str) -> None:
        raise RuntimeError("lost_events failed")

    def listener_state(self, up: bool) -> None:
        raise RuntimeError("listener_state failed")


# -- a raising observer ------------------------------------------------------------------------


async def test_a_raising_observer_neither_stops_events_nor_leaves_caches_trusted_unfed(
    unique: str,
) -> None:
    # Before: event_applied raised, _set_down() then raised in listener_state(False) before it
    # distrusted anything, and the listener died on it with every cache still trusted.
    async with CacheSync(f"memory://{unique}", observer=RaisingObserver()) as sync:
        calls = 0

        async def fetch(code: str) -> int:
            nonlocal calls
            calls += 1
            return calls

        get = sync.cached("fx")(fetch)
        sync.handle_message(heartbeat("A", 0))
        assert await get("USD") == 1
        sync.handle_message(upsert("A", 1, "USD"))  # raised before
        assert sync.listener_up and get.cache.trusted
        assert await get("USD") == 2  # the event was applied


async def test_a_raising_fetch_observer_does_not_strand_the_readers(unique: str) -> None:
    # Before: fetch_done raised inside the fill, whose waiter was never resolved: both readers
    # (and every later read of the key) waited forever.
    async with CacheSync(f"memory://{unique}", observer=RaisingObserver()) as sync:
        gate = asyncio.Event()

        async def fetch(code: str) -> str:
            await gate.wait()
            return code.lower()

        get = sync.cached("fx")(fetch)
        first, second = asyncio.create_task(get("USD")), asyncio.create_task(get("USD"))
        await asyncio.sleep(0)
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(first, second), 5) == ["usd", "usd"]
        assert await get("USD") == "usd"


def test_a_raising_fetch_observer_does_not_strand_reader_threads(unique: str) -> None:
    sync = CacheSync(f"memory://{unique}", observer=RaisingObserver())

    def fetch(code: str) -> str:
        return code.lower()

    get = sync.cached("fx")(fetch)
    assert get("USD") == "usd"  # raised fetch_done's error, and left the flight behind
    assert not get.cache.thread_flights  # where every later reader of USD waited forever


# -- fills that never run, fills on another loop ------------------------------------------------


async def test_stop_before_a_fill_ran_releases_its_reader(unique: str) -> None:
    # Before: stop() cancelled the fill task before its first step, so its cleanup never ran
    # and the reader waited forever.
    sync = CacheSync(f"memory://{unique}")
    await sync.start()

    async def fetch(code: str) -> str:
        return code

    get = sync.cached("fx")(fetch)
    reader = asyncio.create_task(get("USD"))
    await asyncio.sleep(0)  # the reader has spawned the fill, which has not run yet
    await sync.stop()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(reader, 5)
    assert not get.cache.flights


def test_a_background_refresh_that_cannot_start_strands_nobody() -> None:
    # Before: a failed submit (executor shut down) left the flight registered; once the stale
    # window was over every reader of the key waited on it forever.
    clock = FakeClock()
    cache = LocalCache("fx", ttl=10, jitter=0, stale_while_revalidate=60, clock=clock)
    cache.trust()

    def refuse(job: Any) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")

    calls = 0

    def fetch(code: str) -> int:
        nonlocal calls
        calls += 1
        return calls

    get = wrap_sync(fetch, cache, key_func=None, version_of=None, submit=refuse)
    assert get("USD") == 1
    clock.advance(11)  # expired, inside the revalidation window
    assert get("USD") == 1  # raised the executor's error before
    clock.advance(60)  # past the window: a plain miss
    assert not cache.thread_flights
    assert get("USD") == 2


def test_reads_of_one_key_on_two_event_loops(unique: str) -> None:
    # A background thread's loop and the main loop read one key at once. Before: the second
    # joined the first's flight, a future of another loop, and raised RuntimeError.
    sync = CacheSync(f"memory://{unique}")
    started, release = threading.Event(), threading.Event()

    async def fetch(code: str) -> str:
        started.set()
        await asyncio.to_thread(release.wait, 5)
        return code.lower()

    get = sync.cached("fx")(fetch)
    results: list[str] = []
    thread = threading.Thread(target=lambda: results.append(asyncio.run(get("USD"))))
    thread.start()
    assert started.wait(5)

    async def main_loop_read() -> str:
        reader = asyncio.create_task(get("USD"))
        await asyncio.sleep(0)
        release.set()
        return await asyncio.wait_for(reader, 5)

    try:
        assert asyncio.run(main_loop_read()) == "usd"
    finally:
        release.set()
        thread.join(5)
    assert results == ["usd"]


def test_a_batch_read_of_a_key_filling_on_another_loop_fetches_it_here(unique: str) -> None:
    # A single read on a background thread's loop fills USD; a batch read on the main loop
    # wants USD too. Before: the batch joined the other loop's flight, a future it cannot
    # await, and raised RuntimeError.
    sync = CacheSync(f"memory://{unique}")
    started, release = threading.Event(), threading.Event()

    async def fetch_many(codes: list[str]) -> dict[str, str]:
        started.set()
        await asyncio.to_thread(release.wait, 5)
        return {code: code.lower() for code in codes}

    get_many = sync.cached_many("fx")(fetch_many)
    results: list[dict[str, str]] = []
    thread = threading.Thread(target=lambda: results.append(asyncio.run(get_many(["USD"]))))
    thread.start()
    assert started.wait(5)

    async def main_loop_read() -> dict[str, str]:
        reader = asyncio.create_task(get_many(["USD", "EUR"]))
        await asyncio.sleep(0)
        release.set()
        return await asyncio.wait_for(reader, 5)

    try:
        assert asyncio.run(main_loop_read()) == {"USD": "usd", "EUR": "eur"}
    finally:
        release.set()
        thread.join(5)
    assert results == [{"USD": "usd"}]


def test_a_fill_on_another_loop_cannot_store_after_an_invalidation(unique: str) -> None:
    # A read on a second loop starts its own fill instead of joining the first loop's. The
    # first fill, no longer in the map of flights, must not be left where no invalidation
    # can void it: it read the old value.
    async def scenario() -> None:
        async with CacheSync(f"memory://{unique}") as sync:
            value, started, release = "v1", threading.Event(), threading.Event()

            async def fetch(code: str) -> str:
                seen = value
                started.set()
                await asyncio.to_thread(release.wait, 5)
                return seen

            get = sync.cached("fx")(fetch)
            sync.handle_message(heartbeat("A", 0))
            thread = threading.Thread(target=lambda: asyncio.run(get("USD")))
            thread.start()  # fill 1, on another loop, reads v1 and waits
            assert await asyncio.to_thread(started.wait, 5)
            started.clear()
            reader = asyncio.create_task(get("USD"))  # fill 2, on this loop
            assert await asyncio.to_thread(started.wait, 5)
            value = "v2"
            sync.handle_message(upsert("A", 1, "USD"))  # the owner changed USD
            release.set()
            await asyncio.to_thread(thread.join, 5)
            await reader
            assert await get("USD") == "v2"

    asyncio.run(scenario())


# -- sources: silence, replays, memory ----------------------------------------------------------


def counting_fetch() -> Any:
    calls = 0

    async def fetch(code: str) -> int:
        nonlocal calls
        calls += 1
        return calls

    return fetch


async def test_a_live_source_that_starts_feeding_a_silent_namespace_makes_it_served(
    unique: str,
) -> None:
    # Two owner instances, A and B; only A had written fx when it died. Before: B's events
    # for fx never ended fx's silence, so every read went to the owner for good.
    clock = FakeClock()
    async with CacheSync(f"memory://{unique}", clock=clock) as sync:
        get = sync.cached("fx")(counting_fetch())
        sync.handle_message(heartbeat("A", 0))
        sync.handle_message(heartbeat("B", 0))
        sync.handle_message(upsert("A", 1, "USD"))
        for _ in range(4):  # A falls silent; B beats
            clock.advance(1)
            sync.handle_message(heartbeat("B", 0))
            sync.check_sources()
        assert sync.stats()["namespaces"]["fx"]["silent"] == 1
        sync.handle_message(upsert("B", 1, "EUR"))  # B feeds fx from now on
        assert sync.stats()["namespaces"]["fx"]["silent"] == 0
        assert get.cache.trusted
        first = await get("USD")
        assert await get("USD") == first  # served from the cache again


async def test_a_namespace_registered_while_every_source_is_silent_is_not_served(
    unique: str,
) -> None:
    clock = FakeClock()
    async with CacheSync(f"memory://{unique}", clock=clock) as sync:
        sync.cached("fx")(counting_fetch())
        sync.handle_message(heartbeat("A", 0))
        clock.advance(5)
        sync.check_sources()  # A is silent: nothing feeds any namespace
        late = sync.cached("rates")(counting_fetch())  # before: trusted, and never fed
        assert not late.cache.trusted
        assert await late("USD") == 1
        assert await late("USD") == 2  # read through to the owner
        sync.handle_message(heartbeat("A", 0))  # heard again
        assert late.cache.trusted


async def test_replayed_old_messages_do_not_keep_a_dead_source_alive(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: a captured (signed) heartbeat or event, replayed, counted as a sign of life, so
    # the namespace stayed trusted while its owner was gone.
    clock = FakeClock()
    async with CacheSync(f"memory://{unique}", clock=clock) as sync:
        get = sync.cached("fx")(counting_fetch())
        sync.handle_message(heartbeat("A", 0))
        sync.handle_message(upsert("A", 1, "USD"))
        sync.handle_message(upsert("A", 2, "EUR"))
        sync.handle_message(heartbeat("A", 2))
        assert await get("USD") == 1
        for _ in range(5):
            clock.advance(1)
            sync.handle_message(heartbeat("A", 1))
            sync.handle_message(upsert("A", 2, "EUR"))
            sync.check_sources()
        assert sync.stats()["listener"]["heartbeat_misses"] == 1
        assert sync.stats()["listener"]["duplicates"] == 10
        assert not get.cache.trusted
        assert "reused a source id" in caplog.text  # the other way to get here


async def test_what_namespaces_remember_of_sources_stays_bounded(
    unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cachesync.client

    monkeypatch.setattr(cachesync.client, "MAX_SOURCES", 4)
    monkeypatch.setattr(cachesync.client, "MAX_RETIRED_SOURCES", 8)
    async with CacheSync(f"memory://{unique}") as sync:
        sync.cached("fx")(counting_fetch())
        for n in range(100):  # every owner start is a new source
            sync.handle_message(upsert(f"owner-{n}", 1, "USD"))
        assert len(sync._namespaces["fx"].heard) <= 4 + 8  # before: all 100


# -- keys -------------------------------------------------------------------------------------


async def test_variadic_calls_never_share_an_entry(unique: str) -> None:
    # Before: get("a:b") and get("a", "b") were both key "a:b", and so were
    # rate("x:day=1") and rate("x", day="1"): the second call returned the first's value.
    async with CacheSync(f"memory://{unique}") as sync:

        async def fetch(*parts: str) -> tuple[str, ...]:
            return parts

        async def fetch_rate(base: str, **extra: str) -> tuple[str, dict[str, str]]:
            return base, extra

        get = sync.cached("parts")(fetch)
        rate = sync.cached("rates")(fetch_rate)
        assert await get("a:b") == ("a:b",)
        assert await get("a", "b") == ("a", "b")
        assert await rate("x:day=1") == ("x:day=1", {})
        assert await rate("x", day="1") == ("x", {"day": "1"})
        assert get.key_for("USD") == "USD"  # plain keys are unchanged


async def test_a_lone_keyword_only_argument_is_keyed_by_its_text(unique: str) -> None:
    # Before: get(code="USD") was key "code=USD", so the owner's events for "USD" never
    # reached it: stale until the TTL.
    async with CacheSync(f"memory://{unique}") as sync:
        calls = 0

        async def fetch(*, code: str) -> int:
            nonlocal calls
            calls += 1
            return calls

        get = sync.cached("fx")(fetch)
        sync.handle_message(heartbeat("A", 0))
        assert await get(code="USD") == 1
        sync.handle_message(upsert("A", 1, "USD"))
        assert await get(code="USD") == 2


# -- stale_if_error across flushes --------------------------------------------------------------


async def test_stale_if_error_never_serves_a_value_from_before_a_flush(unique: str) -> None:
    # Before: after the owner's flush (or cache_clear()) a failed fetch served the value from
    # before it, which an invalidation of that key never does. A possible loss (a gap) still
    # leaves the last value to stale_if_error: nothing is known to have changed.
    clock = FakeClock()
    async with CacheSync(f"memory://{unique}", clock=clock) as sync:
        value, down = 1, False

        async def fetch(code: str) -> int:
            if down:
                raise RuntimeError("owner down")
            return value

        get = sync.cached("fx", stale_if_error=600, jitter=0)(fetch)
        sync.handle_message(heartbeat("A", 0))
        assert await get("USD") == 1
        sync.handle_message(heartbeat("A", 5))  # a gap: maybe nothing changed
        down = True
        assert await get("USD") == 1
        sync.handle_message(flush("A", 6))  # the owner says everything changed
        with pytest.raises(RuntimeError, match="owner down"):
            await get("USD")
        down, value = False, 2
        assert await get("USD") == 2
        get.cache_clear()
        down = True
        with pytest.raises(RuntimeError, match="owner down"):
            await get("USD")


# -- user callbacks ---------------------------------------------------------------------------


async def test_a_version_of_that_returns_text_cannot_break_the_listener(unique: str) -> None:
    # The owner's JSON gives the version as "3". Before: stored as is, then every versioned
    # event for the key raised comparing "3" with 5 in the listener (restart, flush, again),
    # and a fetch after a tombstone raised in the fill, stranding its readers.
    async with CacheSync(f"memory://{unique}") as sync:
        calls = 0

        async def fetch(code: str) -> dict[str, Any]:
            nonlocal calls
            calls += 1
            return {"version": str(calls), "code": code}

        get = sync.cached("fx", version_of=lambda row: row["version"])(fetch)
        sync.handle_message(heartbeat("A", 0))
        assert (await get("USD"))["version"] == "1"
        sync.handle_message(
            ChangeEvent(
                source="A", seq=1, ns="fx", op=Op.UPSERT, keys=("USD",), version=5, ts=0.0
            ).encode()
        )
        assert sync.listener_up and sync.stats()["listener"]["apply_failures"] == 0
        assert (await asyncio.wait_for(get("USD"), 5))["version"] == "2"
        assert get.cache.stats.errors == 2


async def test_prime_refuses_a_version_that_is_not_an_int(unique: str) -> None:
    # Before: stored, and the next versioned event for the key raised in the listener.
    async with CacheSync(f"memory://{unique}") as sync:
        get = sync.cached("fx")(counting_fetch())
        with pytest.raises(TypeError, match="version must be an int"):
            get.prime("USD", 1.0, version="3")  # type: ignore[arg-type]
        with get.bulk() as bulk, pytest.raises(TypeError, match="version must be an int"):
            bulk.put("EUR", 1.0, version=2.5)  # type: ignore[arg-type]
        sync.handle_message(heartbeat("A", 0))
        sync.handle_message(
            ChangeEvent(
                source="A", seq=1, ns="fx", op=Op.DELETE, keys=("USD", "EUR"), version=5, ts=0.0
            ).encode()
        )
        assert sync.stats()["listener"]["apply_failures"] == 0


@pytest.mark.parametrize("kind", [staticmethod, classmethod])
def test_cached_over_a_staticmethod_or_classmethod_says_which_order_works(
    unique: str, kind: Any
) -> None:
    # Before: an async staticmethod was taken for a plain function whose every call failed
    # with "make it 'async def'", and a classmethod was "not a function".
    sync = CacheSync(f"memory://{unique}")

    async def get(code: str) -> str:
        return code

    with pytest.raises(TypeError, match=f"put @{kind.__name__} above @cached"):
        sync.cached("fx")(kind(get))


# -- memory -----------------------------------------------------------------------------------


def test_decorating_per_instance_is_reported(unique: str, caplog: pytest.LogCaptureFixture) -> None:
    # Each decoration registers a cache that the client keeps (and feeds every event of its
    # namespace) for its whole life: per instance, that grows without end. Before: silently.
    sync = CacheSync(f"memory://{unique}")

    class Repo:
        def __init__(self) -> None:
            self.get = sync.cached("fx")(self.fetch)

        def fetch(self, code: str) -> str:
            return code

    for _ in range(128):
        Repo()
    assert "128 functions cache under namespace 'fx'" in caplog.text
    assert "Decorate once" in caplog.text


async def test_another_owners_new_source_does_not_end_a_namespace_silence(unique: str) -> None:
    # One channel, two owners: X feeds fx, Y feeds rates. Both fall silent; Y comes back as a
    # new source while X stays dead. Before: any new source ended every silence, so fx was
    # served from the cache for good with nothing feeding it.
    clock = FakeClock()
    async with CacheSync(f"memory://{unique}", clock=clock) as sync:
        get = sync.cached("fx")(counting_fetch())
        sync.handle_message(heartbeat("X", 0))
        sync.handle_message(heartbeat("Y", 0))
        sync.handle_message(upsert("X", 1, "USD", ns="fx"))
        sync.handle_message(upsert("Y", 1, "a", ns="rates"))
        clock.advance(5)
        sync.check_sources()
        sync.handle_message(heartbeat("Y2", 0))  # Y restarted
        for _ in range(10):
            clock.advance(1)
            sync.handle_message(heartbeat("Y2", 0))
            sync.check_sources()
        assert not get.cache.trusted
        assert await get("USD") == 1
        assert await get("USD") == 2  # read through to the owner
        sync.handle_message(upsert("X2", 1, "EUR", ns="fx"))  # fx's owner is back
        assert get.cache.trusted


@pytest.mark.parametrize("option", ["from_event", "version_of", "key"])
def test_async_callbacks_are_refused_when_decorating(unique: str, option: str) -> None:
    # Before: an async from_event made the listener cache a coroutine object as the value
    # (readers got it instead of data), and an async version_of or key= failed only later.
    sync = CacheSync(f"memory://{unique}")

    async def callback(*args: Any) -> Any:
        return None

    with pytest.raises(TypeError, match="must be a plain function"):
        sync.cached("fx", mode="refresh", **{option: callback})


def test_a_refresh_cancelled_before_it_ran_strands_no_reader() -> None:
    # A background refresh waits in the executor's queue; the client stops, cancelling it.
    # Before: its flight stayed, and once the stale window was over every reader of the key
    # joined it and waited forever for a refresh that would never run.
    clock = FakeClock()
    cache = LocalCache("fx", ttl=10, jitter=0, stale_while_revalidate=5, clock=clock)
    cache.trust()
    queued: list[concurrent.futures.Future[None]] = []

    def submit(job: Any) -> concurrent.futures.Future[None]:
        queued.append(concurrent.futures.Future())  # queued behind busy workers
        return queued[-1]

    get = wrap_sync(lambda code: code, cache, key_func=None, version_of=None, submit=submit)
    assert get("USD") == "USD"
    clock.advance(11)
    assert get("USD") == "USD"  # stale, and a refresh is queued
    queued[0].cancel()  # what stop() does to the executor's queue
    clock.advance(5)  # past the stale window
    outcome: list[str] = []
    reader = threading.Thread(target=lambda: outcome.append(get("USD")), daemon=True)
    reader.start()
    reader.join(5)
    assert outcome == ["USD"]


async def test_an_event_numbered_zero_is_not_dropped_unnoticed(unique: str) -> None:
    # A publisher that numbers its events from 0. Before: after its heartbeat at seq 0, the
    # event at seq 0 passed for a duplicate and was dropped: USD stayed stale.
    async with CacheSync(f"memory://{unique}") as sync:
        get = sync.cached("fx")(counting_fetch())
        sync.handle_message(heartbeat("A", 0))
        assert await get("USD") == 1
        sync.handle_message(upsert("A", 0, "USD"))
        assert await get("USD") == 2
        listener = sync.stats()["listener"]
        assert (listener["gaps"], listener["duplicates"]) == (1, 0)


async def test_from_event_raising_cancelled_error_does_not_end_the_listener(unique: str) -> None:
    url = f"memory://{unique}"

    def from_event(value: Any) -> Any:
        raise asyncio.CancelledError

    async with Publisher(url, heartbeat_interval=None) as pub, CacheSync(url) as sync:
        get = sync.cached("fx", mode="refresh", from_event=from_event)(_counting_fetch())
        assert await get("USD") == 1
        await pub.changed("fx", "USD", version=2, value={"rate": 2})
        await eventually(lambda: sync.stats()["namespaces"]["fx"]["errors"] == 1)
        assert sync.listener_up
        assert await get("USD") == 2  # the entry was dropped; the listener goes on
        await pub.changed("fx", "EUR")
        await eventually(lambda: sync.stats()["listener"]["messages"] == 2)
        assert sync.listener_up


def _counting_fetch() -> Any:
    calls = 0

    async def fetch(key: str) -> int:
        nonlocal calls
        calls += 1
        return calls

    return fetch
