"""Batch reads against single reads: 100 keys of which 10 % miss.

One round drops 10 of 100 cached keys (as events would) and reads all 100, either with one
``@sync.cached_many`` call (one owner call for the 10 misses) or with 100 ``@sync.cached``
reads (10 owner calls), awaited one after another or gathered. The owner answers after a
simulated round trip (``--rtt``; 0 measures the library's own cost).

    python -m benchmarks.batch [--rtt 0.001] [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from cachesync import CacheSync

KEYS = [f"K{i:03d}" for i in range(100)]
MISSES = 10


async def _owner_call(rtt: float) -> None:
    if rtt:
        await asyncio.sleep(rtt)


async def run(rtt: float, rounds: int) -> dict[str, float]:
    """Seconds per round of each way of reading the 100 keys."""
    async with CacheSync("memory://bench-batch") as sync:
        owner_calls = 0

        @sync.cached("items", ttl=3600)
        async def get_one(key: str) -> str:
            nonlocal owner_calls
            owner_calls += 1
            await _owner_call(rtt)
            return key.lower()

        @sync.cached_many("items", shares=get_one)
        async def get_many(keys: list[str]) -> dict[str, str]:
            nonlocal owner_calls
            owner_calls += 1
            await _owner_call(rtt)
            return {key: key.lower() for key in keys}

        async def batch() -> None:
            await get_many(KEYS)

        async def singles() -> None:
            for key in KEYS:
                await get_one(key)

        async def gathered() -> None:
            await asyncio.gather(*(get_one(key) for key in KEYS))

        ways: dict[str, Callable[[], Awaitable[None]]] = {
            "batch (1 call)": batch,
            "100 singles, sequential": singles,
            "100 singles, gathered": gathered,
        }
        rng = random.Random(7)
        await batch()
        results: dict[str, float] = {}
        calls: dict[str, float] = {}
        for name, way in ways.items():
            total = 0.0
            owner_calls = 0
            for _ in range(rounds):
                for key in rng.sample(KEYS, MISSES):
                    get_one.cache.invalidate(key)
                started = time.perf_counter()
                await way()
                total += time.perf_counter() - started
            results[name] = total / rounds
            calls[name] = owner_calls / rounds
        return {**results, **{f"{name} owner calls": n for name, n in calls.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt", type=float, default=0.001, help="owner round trip, seconds")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    for rtt in sorted({0.0, args.rtt}):
        results = asyncio.run(run(rtt, args.rounds))
        base = results["batch (1 call)"]
        print(f"\n100 keys, {MISSES} % misses, owner round trip {rtt * 1000:g} ms")
        print(f"{'way':<28}{'per round':>12}{'vs batch':>10}{'owner calls':>13}")
        for name in ("batch (1 call)", "100 singles, sequential", "100 singles, gathered"):
            per = results[name]
            calls = results[f"{name} owner calls"]
            print(f"{name:<28}{per * 1e6:>10.0f}us{per / base:>9.1f}x{calls:>13.1f}")


if __name__ == "__main__":
    main()
