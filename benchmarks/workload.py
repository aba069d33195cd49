"""The read workload: Zipf-distributed keys, paced readers, and the staleness probe.

Every process on this machine shares ``time.monotonic_ns()`` (CLOCK_MONOTONIC is system-wide on
Linux), so the owner's commit times and the readers' read times can be compared offline.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

ITEM_NS = "items"
"""The namespace (cachesync) of the benchmark's entity."""

PROBE_KEY = "probe"
"""A key outside the workload that the owner updates on a fixed beat and every reader polls."""

Get = Callable[[str], Awaitable[tuple[int, bool]]]
"""A reader's read: the version it got for a key, and whether the local cache served it."""


def key_name(index: int) -> str:
    """The key of workload item ``index`` (0-based; index 0 is the most popular)."""
    return f"k{index:05d}"


class ZipfKeys:
    """Draws item indexes ``0..n-1`` with probability proportional to ``1 / (i + 1) ** s``."""

    def __init__(self, n_keys: int, s: float) -> None:
        if n_keys < 1:
            raise ValueError("n_keys must be at least 1")
        weights = 1.0 / np.arange(1, n_keys + 1, dtype=np.float64) ** s
        self.cdf = np.cumsum(weights / weights.sum())
        self.n_keys = n_keys

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` indexes drawn independently."""
        idx = np.searchsorted(self.cdf, rng.random(n), side="right")
        return np.minimum(idx, self.n_keys - 1).astype(np.int32)


@dataclass
class ReadLog:
    """Every measured read of one reader: start time, key, version got, latency, hit."""

    t0: array[int] = field(default_factory=lambda: array("q"))
    key: array[int] = field(default_factory=lambda: array("i"))
    version: array[int] = field(default_factory=lambda: array("i"))
    latency: array[int] = field(default_factory=lambda: array("q"))
    hit: array[int] = field(default_factory=lambda: array("b"))
    errors: int = 0

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns as numpy arrays (picklable, compact)."""
        return {
            "t0": np.frombuffer(self.t0, dtype=np.int64).copy(),
            "key": np.frombuffer(self.key, dtype=np.int32).copy(),
            "version": np.frombuffer(self.version, dtype=np.int32).copy(),
            "latency": np.frombuffer(self.latency, dtype=np.int64).copy(),
            "hit": np.frombuffer(self.hit, dtype=np.int8).astype(bool),
        }


@dataclass
class ProbeLog:
    """The probe's polls of :data:`PROBE_KEY`: each change of version seen, with its times."""

    t0: list[int] = field(default_factory=list)
    t1: list[int] = field(default_factory=list)
    version: list[int] = field(default_factory=list)
    polls: int = 0
    regressions: int = 0
    errors: int = 0
    gaps: array[int] = field(default_factory=lambda: array("q"))  # ns between poll starts, sampled

    def median_gap_ms(self) -> float:
        """The median time between the starts of two polls: the probe's resolution."""
        if not self.gaps:
            return float("nan")
        return float(np.median(np.frombuffer(self.gaps, dtype=np.int64))) / 1e6


@dataclass(frozen=True)
class Schedule:
    """When a reader runs (monotonic ns): warm-up from ``start``, measured from ``measure``."""

    start: int
    measure: int
    end: int


async def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def read_stream(
    get: Get,
    keys: np.ndarray,
    rate: float,
    schedule: Schedule,
    log: ReadLog,
    max_in_flight: int = 64,
) -> None:
    """Issue reads of ``keys`` (in order) at ``rate`` per second, open loop, from
    ``schedule.start`` until ``schedule.end``; record those that start after ``measure``.

    Each read is its own task, as requests to a service are: a slow miss does not hold back the
    reads behind it. At most ``max_in_flight`` reads are outstanding; past that the stream waits
    (the offered rate is then not reached, and the achieved rate says so). A stream that falls
    behind catches up, but by no more than 50 ms of backlog.
    """
    interval = int(1e9 / rate)
    names = [key_name(int(i)) for i in keys]
    n = len(names)
    clock, perf = time.monotonic_ns, time.perf_counter_ns
    measure, end = schedule.measure, schedule.end
    pending: set[asyncio.Task[None]] = set()
    room = asyncio.Event()

    async def one(index: int, name: str) -> None:
        t0 = clock()
        p0 = perf()
        try:
            version, hit = await get(name)
        except Exception:
            log.errors += 1
            return
        latency = perf() - p0
        if t0 >= measure:
            log.t0.append(t0)
            log.key.append(index)
            log.version.append(version)
            log.latency.append(latency)
            log.hit.append(1 if hit else 0)

    def done(task: asyncio.Task[None]) -> None:
        pending.discard(task)
        room.set()

    next_t = schedule.start
    i = 0
    try:
        while True:
            now = clock()
            if now >= end:
                break
            if next_t > now:
                await asyncio.sleep((next_t - now) / 1e9)
                continue
            if now - next_t > 50_000_000:
                next_t = now
            # A few reads per turn of the loop, so that the probe and the library's own tasks
            # (its listener) keep their turn when a blocking client makes each read slow.
            batch = 0
            while next_t <= now and len(pending) < max_in_flight and batch < 8:
                task = asyncio.create_task(one(int(keys[i % n]), names[i % n]))
                task.add_done_callback(done)
                pending.add(task)
                next_t += interval
                i += 1
                batch += 1
            if len(pending) >= max_in_flight:
                room.clear()
                await room.wait()
            else:
                await asyncio.sleep(0)
    finally:
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for task in list(pending):
            task.cancel()


async def probe(get: Get, interval: float, schedule: Schedule, log: ProbeLog) -> None:
    """Poll :data:`PROBE_KEY` every ``interval`` seconds through the reader's own read path and
    record each change of the version seen (a version going back is counted as a regression)."""
    last = -1
    clock = time.monotonic_ns
    previous = 0
    while True:
        t0 = clock()
        if t0 >= schedule.end:
            return
        if previous and t0 >= schedule.measure:
            log.gaps.append(t0 - previous)
        previous = t0
        try:
            version, _ = await get(PROBE_KEY)
        except Exception:
            log.errors += 1
            await asyncio.sleep(interval)
            continue
        t1 = clock()
        log.polls += 1
        if version != last:
            if version < last:
                log.regressions += 1
            log.t0.append(t0)
            log.t1.append(t1)
            log.version.append(version)
            last = version
        await asyncio.sleep(interval)


def workload_keys(zipf: ZipfKeys, seed: int, rate: float, seconds: float) -> np.ndarray:
    """The item indexes one reader will read, in order (a little more than it needs)."""
    rng = np.random.default_rng(seed)
    return zipf.sample(rng, max(1000, int(rate * seconds * 1.1)))


async def run_reads(
    get: Get,
    *,
    keys: np.ndarray,
    rate: float,
    max_in_flight: int,
    schedule: Schedule,
    probe_interval: float | None,
) -> tuple[ReadLog, ProbeLog]:
    """Run the read stream over ``keys`` (``rate`` reads/s) and the probe until the end of
    ``schedule``; return what they recorded."""
    await _sleep_until(schedule.start)
    reads = ReadLog()
    probe_log = ProbeLog()
    tasks = [asyncio.create_task(read_stream(get, keys, rate, schedule, reads, max_in_flight))]
    if probe_interval:
        tasks.append(asyncio.create_task(probe(get, probe_interval, schedule, probe_log)))
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return reads, probe_log
