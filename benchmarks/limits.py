"""Where the costs are: memory at 1,000,000 entries, GC pauses with GC not frozen, the miss
path, and CPU per 1,000 events/s per consumer. Each part is small and bounded.

    .venv/bin/python -m benchmarks.limits [--entries 1000000] [--seconds 5]

- **Memory**: a fresh process fills one cache with ``--entries`` entries (keys ``k0``...,
  values ``v0``..., built before the baseline is taken) through its public API and reports the
  growth of its RSS per entry: a plain ``dict``, cachetools ``TTLCache``, and a cachesync
  namespace on a started client (``memory://``, ``fn.prime(key, value, version=1)``).
- **GC pauses**, in the same processes, GC left on and not frozen: every collection is timed
  through ``gc.callbacks`` while the process applies 200,000 change events (cachesync:
  ``handle_message``; the others: replacing an entry) and does 200,000 hits (the automatic
  collections of that work); then one full ``gc.collect()``, timed on its own: what a
  generation-2 collection costs at this size whenever the interpreter decides to run one.
- **Miss path**: ``@sync.cached`` on a function that returns at once, each call a new key (a
  miss: fetch, store, return), against calling the function directly and a minimal
  dict-backed decorator; ns per call, best of 5.
- **CPU per 1,000 events/s**: a consumer process (``CacheSync`` on ``redis://``, 10,000 cached
  entries) while a publisher sends upserts at 1,000 and 5,000 events/s for ``--seconds``; the
  consumer's own CPU time (user + system) over that window, per 1,000 events/s.

Writes ``benchmarks/results/LIMITS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .common import table
from .micro import encoded_events
from .stats import percentile

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("dict", "cachetools", "cachesync")
EVENTS = 200_000


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class _GcTimer:
    """Times every collection, per generation."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses[info["generation"]].append((time.perf_counter() - self._start) * 1e3)


async def _memory_and_gc(kind: str, entries: int) -> dict[str, Any]:
    keys = [f"k{i}" for i in range(entries)]
    values = [f"v{i}" for i in range(entries)]
    gc.collect()
    base = _rss_mb()
    timer = _GcTimer()
    out: dict[str, Any] = {"kind": kind}
    if kind == "cachesync":
        from cachesync import CacheSync

        sync = CacheSync("memory://", f"limits-{uuid.uuid4().hex[:8]}")

        @sync.cached("items", ttl=3600, maxsize=entries + 10)
        async def fetch(key: str) -> str:
            return key

        async with sync:
            started = _rss_mb()
            for key, value in zip(keys, values, strict=True):
                fetch.prime(key, value, version=1)
            gc.collect()
            out["mb"] = _rss_mb() - started
            payloads = encoded_events(uuid.uuid4().hex, 1, EVENTS, entries)
            gc.callbacks.append(timer)
            t0 = time.perf_counter()
            for payload in payloads:
                sync.handle_message(payload)
            for key in keys[: EVENTS // 2] * 2:
                await fetch(key)
            out["work_s"] = time.perf_counter() - t0
    else:
        store: Any
        if kind == "dict":
            store = {}
        else:
            from cachetools import TTLCache

            store = TTLCache(maxsize=entries + 10, ttl=3600)
        for key, value in zip(keys, values, strict=True):
            store[key] = value
        gc.collect()
        out["mb"] = _rss_mb() - base
        gc.callbacks.append(timer)
        t0 = time.perf_counter()
        for i in range(EVENTS):
            store[keys[i % entries]] = values[(i + 1) % entries]
        for key in keys[: EVENTS // 2] * 2:
            _ = store[key]
        out["work_s"] = time.perf_counter() - t0
    gc.callbacks.remove(timer)  # the pauses are the automatic collections only
    t0 = time.perf_counter()
    gc.collect()
    out["full_collect_ms"] = (time.perf_counter() - t0) * 1e3
    out["bytes_per_entry"] = out["mb"] * 2**20 / entries
    out["pauses"] = timer.pauses
    out["rss_mb"] = _rss_mb()
    return out


def _memory_child(kind: str, entries: int, queue: Any) -> None:
    queue.put(asyncio.run(_memory_and_gc(kind, entries)))


async def _time_calls(fn: Callable[[str], Awaitable[Any]], keys: list[str]) -> float:
    t0 = time.perf_counter_ns()
    for key in keys:
        await fn(key)
    return (time.perf_counter_ns() - t0) / len(keys)


async def miss_path(n: int = 50_000) -> dict[str, float]:
    """ns per call: direct, a dict-backed decorator's miss, cachesync's miss; best of 5."""
    from cachesync import CacheSync

    from .micro import dict_cached

    async def source(key: str) -> str:
        return key

    best = {"direct": float("inf"), "dict decorator miss": float("inf"), "cachesync miss": 1e18}
    for round_no in range(5):
        keys = [f"r{round_no}-k{i}" for i in range(n)]
        sync = CacheSync("memory://", f"limits-miss-{uuid.uuid4().hex[:8]}")
        fn = sync.cached("items", ttl=3600, maxsize=n * 2)(source)
        async with sync:
            best["cachesync miss"] = min(best["cachesync miss"], await _time_calls(fn, keys))
        best["direct"] = min(best["direct"], await _time_calls(source, keys))
        plain = dict_cached(source)
        best["dict decorator miss"] = min(
            best["dict decorator miss"], await _time_calls(plain, keys)
        )
    return best


def _cpu_child(url: str, channel: str, conn: Any) -> None:
    async def run() -> None:
        from cachesync import CacheSync

        sync = CacheSync(url, channel)

        @sync.cached("items", ttl=3600, maxsize=20_000)
        async def fetch(key: str) -> str:
            return key

        async with sync:
            for i in range(10_000):
                fetch.prime(f"k{i}", f"v{i}", version=1)
            conn.send("ready")
            loop = asyncio.get_running_loop()
            while True:
                command = await loop.run_in_executor(None, conn.recv)
                if command == "stop":
                    return
                usage = resource.getrusage(resource.RUSAGE_SELF)
                applied = sync.stats()["listener"]["messages"]
                conn.send((usage.ru_utime + usage.ru_stime, time.monotonic(), applied))

    asyncio.run(run())


async def _publish_and_sample(
    url: str, channel: str, rates: tuple[float, ...], seconds: float, conn: Any
) -> list[dict[str, float]]:
    """One publisher (one source: a new one would make the consumer flush) at each rate in
    turn; the consumer's CPU time sampled around each."""
    from cachesync import Publisher

    def sample() -> tuple[float, float, int]:
        conn.send("sample")
        cpu, at, messages = conn.recv()
        return float(cpu), float(at), int(messages)

    out = []
    async with Publisher(url, channel) as publisher:
        version = 2
        for rate in rates:
            await asyncio.sleep(1.0)  # the previous rate's last events
            cpu0, t0, messages0 = sample()
            n = int(rate * seconds)
            start = time.monotonic()
            for i in range(n):
                wait = start + i / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await publisher.changed("items", f"k{i % 10_000}", version=version)
                version += 1
            await asyncio.sleep(0.5)
            cpu1, t1, messages1 = sample()
            busy = (cpu1 - cpu0) / (t1 - t0) * 100
            achieved = n / (time.monotonic() - 0.5 - start)
            out.append(
                {
                    "rate": rate,
                    "sent": n,
                    "applied": messages1 - messages0,
                    "cpu_percent": busy,
                    "per_1000": busy / (min(rate, achieved) / 1000),
                }
            )
    return out


def cpu_per_events(url: str, rates: tuple[float, ...], seconds: float) -> list[dict[str, float]]:
    """Consumer CPU (% of one core) while events arrive at each rate."""
    ctx = multiprocessing.get_context("spawn")
    channel = f"cachesync-limits-{uuid.uuid4().hex[:8]}"
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_cpu_child, args=(url, channel, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(30) or parent.recv() != "ready":
            raise RuntimeError("the consumer did not start within 30 s")
        return asyncio.run(_publish_and_sample(url, channel, rates, seconds, parent))
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(1)


def _pause_cells(pauses: dict[Any, list[float]]) -> list[str]:
    cells = []
    for generation in (0, 1, 2):
        p = pauses.get(generation) or pauses.get(str(generation)) or []
        cells.append(f"{len(p)}: {percentile(p, 50):.2f} / {max(p):.2f}" if p else "0: -")
    return cells


def main(argv: list[str] | None = None) -> int:
    """Run the parts, print the tables and write LIMITS.md."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    memory = []
    for kind in KINDS:
        print(f"memory and GC: {kind} with {args.entries:,} entries", file=sys.stderr)
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_child, args=(kind, args.entries, queue), daemon=True)
        proc.start()
        memory.append(queue.get(timeout=600))
        proc.join(30)
    mem_table = table(
        [
            "cache",
            "RSS growth (MB)",
            "bytes/entry",
            "RSS at end (MB)",
            "gen0 pauses: n: p50 / max (ms)",
            "gen1",
            "gen2 (automatic)",
            "full gc.collect() (ms)",
        ],
        [
            [
                m["kind"],
                f"{m['mb']:,.0f}",
                f"{m['bytes_per_entry']:,.0f}",
                f"{m['rss_mb']:,.0f}",
                *_pause_cells(m["pauses"]),
                f"{m['full_collect_ms']:,.0f}",
            ]
            for m in memory
        ],
    )
    print(mem_table)
    print("miss path", file=sys.stderr)
    miss = asyncio.run(miss_path())
    miss_table = table(
        ["call", "ns per call (best of 5)"], [[k, f"{v:,.0f}"] for k, v in miss.items()]
    )
    print(miss_table)
    print("CPU per 1,000 events/s", file=sys.stderr)
    cpu = cpu_per_events(args.redis_url, (1000.0, 5000.0), args.seconds)
    cpu_table = table(
        [
            "events/s offered",
            "sent",
            "messages received",
            "consumer CPU (% of a core)",
            "per 1,000 events/s",
        ],
        [
            [
                f"{c['rate']:,.0f}",
                f"{c['sent']:,.0f}",
                f"{c['applied']:,.0f}",
                f"{c['cpu_percent']:.1f}%",
                f"{c['per_1000']:.2f}%",
            ]
            for c in cpu
        ],
    )
    print(cpu_table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    command = " ".join(["python -m benchmarks.limits", *argv])
    method = "\n\n".join((__doc__ or "").split("\n\n")[2:])
    (out / "LIMITS.md").write_text(
        f"# Limits\n\nCommand: `{command}` (load average at the end: {load}).\n\n{method}\n\n"
        f"## Memory and GC pauses ({args.entries:,} entries; pauses: count: p50 / max)\n\n"
        f"{mem_table}\n\n## Miss path\n\n{miss_table}\n\n"
        f"## CPU per 1,000 events/s (redis://, one consumer)\n\n{cpu_table}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
