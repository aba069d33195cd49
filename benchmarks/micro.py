"""Micro benchmarks: the hit paths, the invalidation rate, and the memory per entry.

Every figure that has a target is a ratio of two measurements taken side by side in one run
(interleaved repeats, best of each side), so a noisy machine moves both sides alike.

    python -m benchmarks.micro [--full]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import cachetools

from cachesync import CacheSync, ChangeEvent, Op
from cachesync.events import SCHEMA_VERSION, decode_event
from cachesync.transports.memory import bus_for


@dataclass
class MicroResult:
    """One micro benchmark: our figure, the baseline's, and the verdict against the target."""

    name: str
    ours: float
    baseline: float | None
    unit: str
    target: str
    passed: bool | None
    detail: str = ""

    @property
    def ratio(self) -> float | None:
        """ours / baseline."""
        if self.baseline is None or self.baseline == 0:
            return None
        return self.ours / self.baseline

    @property
    def verdict(self) -> str:
        """PASS, FAIL, or - when there is no target."""
        if self.passed is None:
            return "-"
        return "PASS" if self.passed else "FAIL"


@dataclass(frozen=True)
class MicroSizes:
    """How much work each micro benchmark does."""

    hit_calls: int = 200_000
    repeats: int = 5
    events: int = 100_000
    event_rounds: int = 3
    entries: int = 10_000
    memory_entries: int = 20_000
    flush_entries: int = 1_000_000


SHORT = MicroSizes()
FULL = MicroSizes(hit_calls=1_000_000, repeats=7, events=1_000_000, memory_entries=100_000)
TINY = MicroSizes(
    hit_calls=2_000,
    repeats=2,
    events=2_000,
    event_rounds=1,
    entries=500,
    memory_entries=1_000,
    flush_entries=1_000,
)
"""For the smoke test: exercises the code, measures nothing worth reading."""


def _memory_url() -> str:
    return f"memory://micro-{uuid.uuid4().hex[:8]}"


def _best_of(
    repeats: int, ours: Callable[[], float], baseline: Callable[[], float]
) -> tuple[float, float]:
    """Interleave ``repeats`` runs of both sides; the best (lowest) time of each."""
    best_ours = best_base = math.inf
    for _ in range(repeats):
        best_ours = min(best_ours, ours())
        best_base = min(best_base, baseline())
    return best_ours, best_base


async def _async_best_of(
    repeats: int,
    ours: Callable[[], Awaitable[float]],
    baseline: Callable[[], Awaitable[float]],
) -> tuple[float, float]:
    best_ours = best_base = math.inf
    for _ in range(repeats):
        best_ours = min(best_ours, await ours())
        best_base = min(best_base, await baseline())
    return best_ours, best_base


# -- hit paths --------------------------------------------------------------------------------


def _time_sync_calls(fn: Callable[[str], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn("USD")
    return (time.perf_counter() - start) / n * 1e9


async def bench_sync_hit(sizes: MicroSizes) -> MicroResult:
    """A hit through ``@sync.cached`` on a plain function vs ``cachetools.cached(TTLCache)``."""

    def fetch(code: str) -> dict[str, str]:
        return {"code": code}

    sync = CacheSync(_memory_url())
    ours = sync.cached("currencies", ttl=3600)(fetch)
    theirs = cachetools.cached(cachetools.TTLCache(maxsize=10_000, ttl=3600))(fetch)
    async with sync:  # started: the cache is trusted, so hits are served
        ours("USD")
        theirs("USD")
        n = sizes.hit_calls
        t_ours, t_base = _best_of(
            sizes.repeats,
            lambda: _time_sync_calls(ours, n),
            lambda: _time_sync_calls(theirs, n),
        )
        hits = sync.stats()["namespaces"]["currencies"]["hits"]
    ratio = t_ours / t_base
    return MicroResult(
        "sync hit: @sync.cached vs cachetools.cached(TTLCache)",
        t_ours,
        t_base,
        "ns/call",
        "<= 0.5x",
        ratio <= 0.5,
        f"{hits:,} hits counted",
    )


def _background_hit(sizes: MicroSizes) -> MicroResult:
    """As :func:`bench_sync_hit`, with the listener on the background runner's thread and the
    calls made from another thread (a sync app's request thread)."""

    def fetch(code: str) -> dict[str, str]:
        return {"code": code}

    sync = CacheSync(_memory_url())
    ours = sync.cached("currencies", ttl=3600)(fetch)
    theirs = cachetools.cached(cachetools.TTLCache(maxsize=10_000, ttl=3600))(fetch)
    with sync.running():
        ours("USD")
        theirs("USD")
        n = sizes.hit_calls
        t_ours, t_base = _best_of(
            sizes.repeats,
            lambda: _time_sync_calls(ours, n),
            lambda: _time_sync_calls(theirs, n),
        )
        hits = sync.stats()["namespaces"]["currencies"]["hits"]
    ratio = t_ours / t_base
    return MicroResult(
        "sync hit from a request thread (background runner): "
        "@sync.cached vs cachetools.cached(TTLCache)",
        t_ours,
        t_base,
        "ns/call",
        "<= 0.5x",
        ratio <= 0.5,
        f"{hits:,} hits counted",
    )


async def bench_sync_hit_background(sizes: MicroSizes) -> MicroResult:
    """The sync hit path of a sync app: see :func:`_background_hit`."""
    return await asyncio.to_thread(_background_hit, sizes)


async def _time_async_calls(fn: Callable[[str], Awaitable[Any]], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await fn("USD")
    return (time.perf_counter() - start) / n * 1e9


def dict_cached(fn: Callable[[str], Awaitable[Any]]) -> Callable[[str], Awaitable[Any]]:
    """The least an async cache can be: a dict in front of the coroutine."""
    store: dict[str, Any] = {}

    async def wrapper(key: str) -> Any:
        try:
            return store[key]
        except KeyError:
            value = store[key] = await fn(key)
            return value

    return wrapper


async def bench_async_hit(sizes: MicroSizes) -> MicroResult:
    """A hit through ``@sync.cached`` on a coroutine vs a minimal dict-backed async decorator."""

    async def fetch(code: str) -> dict[str, str]:
        return {"code": code}

    sync = CacheSync(_memory_url())
    ours = sync.cached("currencies", ttl=3600)(fetch)
    theirs = dict_cached(fetch)
    async with sync:
        await ours("USD")
        await theirs("USD")
        n = sizes.hit_calls
        t_ours, t_base = await _async_best_of(
            sizes.repeats,
            lambda: _time_async_calls(ours, n),
            lambda: _time_async_calls(theirs, n),
        )
    ratio = t_ours / t_base
    return MicroResult(
        "async hit: @sync.cached vs minimal dict decorator",
        t_ours,
        t_base,
        "ns/call",
        "<= 2x",
        ratio <= 2.0,
    )


# -- invalidation rate ------------------------------------------------------------------------


def encoded_events(source: str, first_seq: int, n: int, n_keys: int) -> list[bytes]:
    """``n`` encoded upserts of one source, seq from ``first_seq``, cycling over the keys with a
    growing version (each one really replaces what the cache holds).

    Encoded with a template of ``ChangeEvent.encode()``'s output (same bytes, checked on the
    first one): building 10^5 pydantic models would take longer than applying them."""
    ts = time.time()
    template = (
        '{"v":%d,"source":"%s","seq":%d,"ns":"items","op":"upsert","keys":["k%d"],'
        '"version":%d,"ts":%r}'
    )
    out = [
        (template % (SCHEMA_VERSION, source, seq, seq % n_keys, 2 + seq // n_keys, ts)).encode()
        for seq in range(first_seq, first_seq + n)
    ]
    expected = ChangeEvent(
        source=source,
        seq=first_seq,
        ns="items",
        op=Op.UPSERT,
        keys=(f"k{first_seq % n_keys}",),
        version=2 + first_seq // n_keys,
        ts=ts,
    ).encode()
    if out and out[0] != expected:
        raise AssertionError(f"event template drifted from ChangeEvent.encode(): {expected!r}")
    return out


async def bench_invalidations(sizes: MicroSizes) -> list[MicroResult]:
    """Events applied per second by one started client: end to end from the memory:// bus
    (publish N encoded events, wait until all are applied), and ``handle_message`` alone."""
    url = _memory_url()
    sync = CacheSync(url, channel="bench")

    @sync.cached("items", ttl=3600, maxsize=sizes.entries * 2)
    async def fetch(key: str) -> str:
        return key

    n, n_keys = sizes.events, sizes.entries
    source = uuid.uuid4().hex
    bus = bus_for(url)
    async with sync:
        hello = ChangeEvent(source=source, seq=0, op=Op.HEARTBEAT, ts=time.time()).encode()
        bus.publish("bench", hello)
        while sync.stats()["listener"]["messages"] < 1:
            await asyncio.sleep(0.001)
        for i in range(n_keys):  # the namespace holds entries: each event has work to do
            fetch.prime(f"k{i}", f"v{i}", version=1)
        end_to_end = alone = 0.0
        seq = 1
        for _ in range(sizes.event_rounds):  # best of a few rounds, as for the hit paths
            on_bus = encoded_events(source, seq, n, n_keys)
            direct = encoded_events(source, seq + n, n, n_keys)
            seq += 2 * n
            applied = sync.stats()["listener"]["messages"] + n
            gc.collect()
            start = time.perf_counter()
            for payload in on_bus:
                bus.publish("bench", payload)
            while sync.stats()["listener"]["messages"] < applied:
                await asyncio.sleep(0.0005)
            end_to_end = max(end_to_end, n / (time.perf_counter() - start))
            start = time.perf_counter()
            handle = sync.handle_message
            for payload in direct:
                handle(payload)
            alone = max(alone, n / (time.perf_counter() - start))
        stats = sync.stats()
        decode_n = min(n, 50_000)
        start = time.perf_counter()
        for payload in direct[:decode_n]:
            ChangeEvent.decode(payload)
        decode = decode_n / (time.perf_counter() - start)
        start = time.perf_counter()
        for payload in direct[:decode_n]:
            decode_event(payload)
        fast_decode = decode_n / (time.perf_counter() - start)
    listener, ns = stats["listener"], stats["namespaces"]["items"]
    detail = (
        f"best of {sizes.event_rounds} rounds of {n:,}; {ns['invalidations']:,} invalidations, "
        f"gaps={listener['gaps']}, "
        f"bad={listener['bad_events']}; ChangeEvent.decode alone: {decode:,.0f}/s, "
        f"decode_event (the listener's) alone: {fast_decode:,.0f}/s"
    )
    return [
        MicroResult(
            "invalidations applied from memory:// (one consumer)",
            end_to_end,
            None,
            "events/s",
            ">= 200,000/s",
            end_to_end >= 200_000,
            detail,
        ),
        MicroResult(
            "handle_message(bytes) alone",
            alone,
            None,
            "events/s",
            "",
            None,
            f"{len(direct[0])} bytes per event",
        ),
    ]


# -- memory -----------------------------------------------------------------------------------


def _retained_bytes(fill: Callable[[], None]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


async def bench_memory(sizes: MicroSizes) -> MicroResult:
    """Bytes each cached entry costs beyond its key and value, filled through each decorator
    with the same (pre-built) keys and values."""
    n = sizes.memory_entries
    keys = [f"key-{i:07d}" for i in range(n)]
    values = {key: (key, i) for i, key in enumerate(keys)}

    def fetch(key: str) -> tuple[str, int]:
        return values[key]

    sync = CacheSync(_memory_url())
    ours = sync.cached("mem", ttl=3600, maxsize=n * 2)(fetch)
    theirs = cachetools.cached(cachetools.TTLCache(maxsize=n * 2, ttl=3600))(fetch)
    async with sync:

        def fill_ours() -> None:
            for key in keys:
                ours(key)

        def fill_theirs() -> None:
            for key in keys:
                theirs(key)

        b_ours = _retained_bytes(fill_ours) / n
        b_theirs = _retained_bytes(fill_theirs) / n
        size = len(sync.namespace("mem"))
    ratio = b_ours / b_theirs
    return MicroResult(
        "bytes per entry (tracemalloc) vs cachetools TTLCache",
        b_ours,
        b_theirs,
        "bytes",
        "<= 2x",
        ratio <= 2.0,
        f"{n:,} entries ({size:,} held)",
    )


async def bench_flush(sizes: MicroSizes) -> list[MicroResult]:
    """How long a lost event (a sequence gap) and a flush event hold the event loop, on one
    namespace of ``flush_entries`` entries: both retire every entry in O(1)."""
    url = _memory_url()
    sync = CacheSync(url, channel="bench")
    n = sizes.flush_entries

    @sync.cached("big", ttl=3600, maxsize=n)
    async def fetch(key: str) -> str:
        return key

    source = uuid.uuid4().hex
    results = []
    async with sync:
        handle = sync.handle_message
        handle(ChangeEvent(source=source, seq=0, op=Op.HEARTBEAT, ts=time.time()).encode())
        cache = fetch.cache
        for i in range(n):
            cache.prime(f"k{i}", i)
        gap = ChangeEvent(source=source, seq=5, op=Op.HEARTBEAT, ts=time.time()).encode()
        flush = ChangeEvent(source=source, seq=6, ns="big", op=Op.FLUSH, ts=time.time()).encode()
        for name, payload in (("sequence gap", gap), ("flush event", flush)):
            for i in range(0, n, max(1, n // 10)):  # entries served before, as after a refill
                cache.prime(f"k{i}", i)
            assert await fetch("k0") == 0
            start = time.perf_counter()
            handle(payload)
            held = time.perf_counter() - start
            served = cache.get_fresh("k0") is not None
            results.append(
                MicroResult(
                    f"{name} on a {n:,}-entry namespace: event loop held",
                    held * 1e6,
                    None,
                    "us",
                    "< 1,000 us",
                    held < 0.001 and not served,
                    f"{len(cache):,} entries held; none served as fresh after: {not served}",
                )
            )
    return results


async def run_all(
    sizes: MicroSizes, say: Callable[[str], None] = lambda _: None
) -> list[MicroResult]:
    """Every micro benchmark, in report order."""
    results: list[MicroResult] = []
    say("  sync hit ...")
    results.append(await bench_sync_hit(sizes))
    say("  sync hit, background runner ...")
    results.append(await bench_sync_hit_background(sizes))
    say("  async hit ...")
    results.append(await bench_async_hit(sizes))
    say("  invalidation rate ...")
    results += await bench_invalidations(sizes)
    say("  memory per entry ...")
    results.append(await bench_memory(sizes))
    say("  flush of a big namespace ...")
    results += await bench_flush(sizes)
    return results


def main() -> None:
    """``python -m benchmarks.micro``: print the micro table."""
    from .report import micro_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more calls and repeats")
    args = parser.parse_args()
    results = asyncio.run(run_all(FULL if args.full else SHORT, print))
    print(micro_table(results))


if __name__ == "__main__":
    main()
