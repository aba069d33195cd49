"""One test per way a read could outlive its event, each found by attacking the client as a
user would: threads against flushes, internal markers, keys that collide or never match,
lost, replayed or unversioned events, a frozen hit clock, an HTTP body cached as a coroutine,
burnt sequence numbers, and publishers that fall silent."""

from __future__ import annotations

import asyncio
import math
import random
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from cachesync import (
    CacheSync,
    Change,
    ChangeEvent,
    ConsistencyMonitor,
    HttpFetcher,
    Op,
    Publisher,
)
from cachesync.cache import LocalCache
from cachesync.clock import LoopClock
from cachesync.signing import Signer
from cachesync.transports.memory import bus_for

from .helpers import FakeClock, eventually

pytestmark = pytest.mark.timeout(30)

KEY = b"a signing key of 32 bytes, fake"


def event(
    seq: int,
    *keys: str,
    source: str = "s1",
    op: Op = Op.UPSERT,
    ns: str = "fx",
    version: int | None = None,
    value: Any = None,
) -> ChangeEvent:
    return ChangeEvent(
        source=source, seq=seq, ns=ns, op=op, keys=keys, version=version, value=value, ts=0.0
    )


def heartbeat(seq: int, source: str = "s1") -> bytes:
    return event(seq, source=source, op=Op.HEARTBEAT, ns="").encode()


@pytest.fixture
async def sync(unique: str) -> AsyncIterator[CacheSync]:
    async with CacheSync(f"memory://{unique}", reconnect_initial=0.01) as client:
        client.handle_message(heartbeat(0))  # the source is known from its start
        yield client


# 1 -----------------------------------------------------------------------------------------


async def test_reader_threads_never_break_a_flush_nor_the_listener(unique: str) -> None:
    """Reader threads reorder the entries (LRU) while the listener flushes after gaps and
    reconnects: every flush is whole, and the listener survives."""
    url = f"memory://{unique}"
    keys = [f"k{i}" for i in range(100_000)]
    hot = keys[-100:]
    owner_round = 0  # the owner's data: changed by every lost event
    flushed_round = 0  # the round whose gap the listener has applied

    def fetch(key: str) -> int:
        return owner_round

    stop = threading.Event()
    progress = threading.Event()
    stale: list[str] = []

    async with CacheSync(url, reconnect_initial=0.01) as sync:
        get = sync.cached("fx", maxsize=len(keys), version_of=lambda got: got + 1)(fetch)
        for key in keys:
            assert get.prime(key, 0, version=1)
        sync.handle_message(heartbeat(0))

        async def current_version(key: str) -> int:
            return owner_round + 1

        # The consistency monitor samples the same entries the threads reorder.
        monitor = ConsistencyMonitor(sync, "fx", current_version, bound=3600)

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            count = 0
            while not stop.is_set():
                key = rng.choice(hot)  # hits, moved to the LRU end while a flush runs
                required = flushed_round
                got = get(key)
                if got < required:
                    stale.append(f"{key}: round {got} after the flush of round {required}")
                count += 1
                if count % 500 == 0:
                    progress.set()

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # switch threads as often as possible
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
        try:
            for thread in threads:
                thread.start()
            seq = 0
            for _ in range(20):
                progress.clear()
                assert await asyncio.to_thread(progress.wait, 10)
                await monitor.sample()
                owner_round += 1
                seq += 2  # seq - 1, about some key, was lost
                sync.handle_message(event(seq, "other").encode())
                flushed_round = owner_round
            bus_for(url).disconnect_all()
            await eventually(lambda: sync.stats()["listener"]["reconnects"] == 1)
            await sync.wait_ready(5)
            progress.clear()
            assert await asyncio.to_thread(progress.wait, 10)
        finally:
            stop.set()
            sys.setswitchinterval(interval)
            for thread in threads:
                thread.join(10)
        listener = sync.stats()["listener"]
        assert stale == []
        assert listener["gaps"] == 20
        assert listener["bad_events"] == 0
        assert sync.listener_up
        assert monitor.stats()["checked"] > 0


# 2 -----------------------------------------------------------------------------------------


async def test_an_entry_a_reader_holds_never_changes_under_it(sync: CacheSync) -> None:
    """A reader past its expiry check returns ``entry.value``: an invalidation must replace the
    entry, not turn its value into the internal tombstone."""
    get = sync.cached("fx", version_of=lambda v: v["v"])(lambda key: {"v": 1})
    assert get("USD") == {"v": 1}
    held = get.cache.get_fresh("USD")  # what the hit path holds after its checks
    assert held is not None
    sync.handle_message(event(1, "USD", version=2).encode())
    assert held.value == {"v": 1}
    assert get.cache.get_fresh("USD") is None


# 3 -----------------------------------------------------------------------------------------


async def test_different_arguments_never_share_a_key(sync: CacheSync) -> None:
    calls: list[tuple[str, str]] = []

    @sync.cached("rates")
    async def rate(base: str, quote: str) -> str:
        calls.append((base, quote))
        return f"{base}/{quote}"

    assert await rate("a:b", "c") == "a:b/c"
    assert await rate("a", "b:c") == "a/b:c"
    assert rate.key_for("a:b", "c") != rate.key_for("a", "b:c")
    assert len(calls) == 2


async def test_a_variadic_function_never_shares_a_key_between_arities(sync: CacheSync) -> None:
    @sync.cached("tags")
    async def tags(first: str, *rest: str, **options: str) -> tuple[object, ...]:
        return (first, rest, options)

    assert await tags("x:y") == ("x:y", (), {})
    assert await tags("x", "y") == ("x", ("y",), {})
    assert await tags("x:b=1") == ("x:b=1", (), {})
    assert await tags("x", b="1") == ("x", (), {"b": "1"})
    assert tags.key_for("USD") == "USD"  # a plain key reads the same, escaped or not


# 4 -----------------------------------------------------------------------------------------


async def test_functions_of_one_namespace_keep_their_own_entries_and_options(
    unique: str,
) -> None:
    clock = FakeClock()
    async with CacheSync(f"memory://{unique}", clock=clock) as sync:
        calls = {"rate": 0, "name": 0}

        @sync.cached("currencies", ttl=10, jitter=0)
        async def rate(code: str) -> float:
            calls["rate"] += 1
            return 1.25

        @sync.cached("currencies", ttl=100, jitter=0)
        async def name(code: str) -> str:
            calls["name"] += 1
            return "US dollar"

        assert await rate("USD") == 1.25
        assert await name("USD") == "US dollar"
        assert await rate("USD") == 1.25
        assert calls == {"rate": 1, "name": 1}
        # Each keeps its own TTL.
        clock.advance(50)
        assert await rate("USD") == 1.25
        assert await name("USD") == "US dollar"
        assert calls == {"rate": 2, "name": 1}
        # An event for the namespace reaches both.
        sync.handle_message(event(1, "USD", ns="currencies").encode())
        await rate("USD")
        await name("USD")
        assert calls == {"rate": 3, "name": 2}


# 5 -----------------------------------------------------------------------------------------


async def test_a_method_is_invalidated_by_the_owners_key(sync: CacheSync) -> None:
    class Repo:
        def __init__(self) -> None:
            self.calls = 0

        @sync.cached("fx")
        async def get(self, code: str) -> str:
            self.calls += 1
            return f"{code}@{self.calls}"

    repo = Repo()
    assert await repo.get("USD") == "USD@1"
    assert await repo.get("USD") == "USD@1"
    sync.handle_message(event(1, "USD").encode())
    assert await repo.get("USD") == "USD@2"


# 6 -----------------------------------------------------------------------------------------


async def test_a_default_argument_may_be_left_out_and_names_the_same_entry(
    sync: CacheSync,
) -> None:
    calls = 0

    @sync.cached("fx")
    async def get(code: str = "USD") -> str:
        nonlocal calls
        calls += 1
        return code

    assert await get() == "USD"
    assert await get("USD") == "USD"
    assert await get(code="USD") == "USD"
    assert calls == 1
    sync.handle_message(event(1, "USD").encode())
    assert await get() == "USD"
    assert calls == 2


# 7 -----------------------------------------------------------------------------------------


async def test_an_event_lost_before_the_first_one_heard_flushes(unique: str) -> None:
    version = 1

    async with CacheSync(f"memory://{unique}") as sync:
        get = sync.cached("fx")(lambda key: version)
        assert get("USD") == 1
        version = 2  # its event, seq 1, is lost
        sync.handle_message(event(2, "EUR").encode())  # the first message heard is past seq 1
        assert get("USD") == 2
        assert sync.stats()["namespaces"]["fx"]["flushes"] == 1


async def test_a_first_source_heard_from_its_start_flushes_nothing(unique: str) -> None:
    async with CacheSync(f"memory://{unique}") as sync:
        calls = 0

        def fetch(key: str) -> int:
            nonlocal calls
            calls += 1
            return 1

        get = sync.cached("fx")(fetch)
        get("USD")
        sync.handle_message(event(1, "EUR").encode())
        get("USD")
        assert calls == 1


# 8 -----------------------------------------------------------------------------------------


async def test_a_replayed_signed_event_is_dropped_as_a_duplicate(unique: str) -> None:
    signer = Signer([KEY])
    async with CacheSync(f"memory://{unique}", signing_keys=[KEY]) as sync:
        get = sync.cached("fx", mode="refresh")(lambda key: "v0")
        sync.handle_message(signer.sign(event(0, op=Op.HEARTBEAT, ns="")).encode())
        assert get("USD") == "v0"
        first = signer.sign(event(1, "USD", value="v1")).encode()
        sync.handle_message(first)
        sync.handle_message(signer.sign(event(2, "USD", value="v2")).encode())
        assert get("USD") == "v2"
        sync.handle_message(first)  # captured and sent again
        assert get("USD") == "v2"
        assert sync.stats()["listener"]["duplicates"] == 1


async def test_an_unversioned_event_keeps_the_known_version(sync: CacheSync) -> None:
    versions = iter([5, 3])

    def fetch(key: str) -> dict[str, int]:
        return {"v": next(versions)}

    get = sync.cached("fx", version_of=lambda row: row["v"])(fetch)
    assert get("USD") == {"v": 5}
    sync.handle_message(event(1, "USD").encode())  # no version
    assert get.cache.version_of("USD") == 5
    get("USD")  # a lagging replica answers v3: served to this read, never cached over v5
    assert get.cache.get_fresh("USD") is None


async def test_an_unversioned_refresh_does_not_let_an_older_version_back(
    sync: CacheSync,
) -> None:
    owner = {"v": 5}
    get = sync.cached("fx", mode="refresh", version_of=lambda row: row["v"])(
        lambda key: dict(owner)
    )
    assert get("USD") == {"v": 5}
    owner["v"] = 6
    sync.handle_message(event(1, "USD", value={"v": 6}).encode())  # no version
    sync.handle_message(event(2, "USD", version=4, value={"v": 4}).encode())  # late, older
    assert get("USD") == {"v": 6}
    assert get.cache.version_of("USD") == 6


async def test_an_unversioned_refresh_never_hides_a_newer_fetch(sync: CacheSync) -> None:
    """A fetch reads v3 before the events for v2 (unversioned, with its value) and v3 arrive:
    the value of v2 must not be stored under the version v3 the fetch made known, which would
    make the event for v3 look applied already."""
    owner = {"v": 3}
    get = sync.cached("fx", mode="refresh", version_of=lambda row: row["v"])(
        lambda key: dict(owner)
    )
    assert get("USD") == {"v": 3}
    sync.handle_message(event(1, "USD", value={"v": 2}).encode())  # no version
    sync.handle_message(event(2, "USD", version=3).encode())
    assert get("USD") == {"v": 3}


# 9 -----------------------------------------------------------------------------------------


def test_the_hit_clock_never_freezes_when_its_loop_ends() -> None:
    clock = FakeClock()
    hit = LoopClock(clock, resolution=0.001, lease=60)

    async def use() -> None:
        hit.wake()
        clock.advance(1)
        await eventually(lambda: hit.now == clock.now, timeout=5, interval=0.001)

    asyncio.run(use())  # the loop ends with the ticker still leased
    assert hit.now == math.inf  # paused: reads ask the real clock, never a frozen reading
    asyncio.run(use())  # a later loop wakes a ticker of its own
    assert hit.now == math.inf


# 10 ----------------------------------------------------------------------------------------


async def test_an_http_fetcher_as_the_body_caches_its_result(sync: CacheSync) -> None:
    requests = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal requests
        requests += 1
        return httpx.Response(200, json={"code": "USD", "n": requests})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        get = sync.cached("fx")(HttpFetcher("http://owner", "/currencies/{key}", client=client))
        assert await get("USD") == {"code": "USD", "n": 1}
        assert await get("USD") == {"code": "USD", "n": 1}
        sync.handle_message(event(1, "USD").encode())
        assert await get("USD") == {"code": "USD", "n": 2}
        assert requests == 2


# 11 ----------------------------------------------------------------------------------------


async def test_a_rejected_batch_takes_no_seq(unique: str) -> None:
    url = f"memory://{unique}"
    async with (
        Publisher(url, heartbeat_interval=None) as pub,
        CacheSync(url) as sync,
    ):
        get = sync.cached("fx")(lambda key: 1)
        await pub.changed("fx", "EUR")
        await eventually(lambda: sync.stats()["listener"]["messages"] == 1)
        get("USD")
        bad = [
            Change(Op.UPSERT, "fx", ("USD",)),
            Change(Op.UPSERT, "x" * 300, ("USD",)),
            Change(Op.UPSERT, "fx", ("USD",), ts=math.nan),
        ]
        for change in bad[1:]:
            with pytest.raises(ValueError):
                await pub.send_many([bad[0], change])
        assert pub.seq == 1
        await pub.changed("fx", "EUR")
        await eventually(lambda: sync.stats()["listener"]["messages"] == 2)
        assert sync.stats()["listener"]["gaps"] == 0
        assert "USD" in get.cache  # nothing was flushed


# 12 ----------------------------------------------------------------------------------------


async def test_a_namespace_whose_sources_fell_silent_is_not_served(unique: str) -> None:
    clock = FakeClock()
    version = 1
    calls = 0

    def fetch(key: str) -> int:
        nonlocal calls
        calls += 1
        return version

    async with CacheSync(
        f"memory://{unique}", clock=clock, heartbeat_timeout=1.0, reconnect_initial=0.01
    ) as sync:
        get = sync.cached("fx")(fetch)
        sync.handle_message(heartbeat(0))
        sync.handle_message(event(1, "EUR").encode())
        assert get("USD") == 1
        assert get("USD") == 1
        assert calls == 1
        # The publisher stops without a word while the owner keeps committing.
        clock.advance(5)
        await eventually(lambda: sync.stats()["listener"]["heartbeat_misses"] == 1)
        await sync.wait_ready(5)  # the watchdog may restart the connection: let it come back
        for expected in (2, 3, 4):
            version = expected
            assert get("USD") == expected  # read through to the owner, not served as fresh
        assert sync.stats()["namespaces"]["fx"]["silent"] == 1
        # The source speaks again: caching resumes.
        sync.handle_message(heartbeat(1))
        calls = 0
        assert get("USD") == 4
        assert get("USD") == 4
        assert calls == 1
        assert sync.stats()["namespaces"]["fx"]["silent"] == 0


# The listener never dies -------------------------------------------------------------------


def fail_once(cache: LocalCache) -> None:
    """Make the next invalidation of ``cache`` raise: a bug while an event is applied."""
    real = cache.invalidate

    def invalidate(key: str, version: int | None = None) -> bool:
        cache.invalidate = real  # type: ignore[method-assign]
        raise RuntimeError("a bug while applying an event")

    cache.invalidate = invalidate  # type: ignore[method-assign]


async def test_a_failure_while_applying_distrusts_then_restarts_the_listener(
    unique: str,
) -> None:
    url = f"memory://{unique}"
    calls = 0

    def fetch(key: str) -> int:
        nonlocal calls
        calls += 1
        return calls

    async with (
        Publisher(url, heartbeat_interval=None) as pub,
        CacheSync(url, reconnect_initial=1.0) as sync,
    ):
        get = sync.cached("fx")(fetch)
        await pub.changed("fx", "EUR")
        await eventually(lambda: sync.stats()["listener"]["messages"] == 1)
        assert get("USD") == 1
        assert get("USD") == 1
        fail_once(get.cache)
        await pub.changed("fx", "EUR")
        await eventually(lambda: sync.stats()["listener"]["apply_failures"] == 1)
        # Down for the backoff (at least 0.5 s): nothing is served from the cache meanwhile.
        assert not sync.listener_up
        assert not get.cache.trusted
        assert get("USD") == 2
        assert get("USD") == 3
        await sync.wait_ready(5)
        # Back: the cache, which may hold a half-applied event, was flushed.
        assert get("USD") == 4
        assert get("USD") == 4
        listener = sync.stats()["listener"]
        assert listener["listener_up"] and listener["reconnects"] >= 1
