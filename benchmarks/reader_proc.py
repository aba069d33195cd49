"""One consumer instance of the strategy comparison, run in its own process.

Protocol over the pipe to the harness: the reader connects and prefills, sends
``("ready", None)``, waits for ``("go", Schedule)``, runs the workload and the probe, and sends
``("done", ReaderResult)`` — or ``("error", message)`` at any point.
"""

from __future__ import annotations

import asyncio
import signal
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import httpx
import numpy as np

from .adapters import Reader
from .strategies import Settings, Strategy, make_reader
from .workload import (
    PROBE_KEY,
    ProbeLog,
    ReadLog,
    Schedule,
    ZipfKeys,
    key_name,
    run_reads,
    workload_keys,
)


@dataclass
class ReaderResult:
    """What one reader measured."""

    reads: dict[str, np.ndarray]
    read_errors: int
    probe_t0: np.ndarray
    probe_t1: np.ndarray
    probe_version: np.ndarray
    probe_polls: int
    probe_regressions: int
    probe_gap_ms: float
    probe_applied: np.ndarray
    events: int | None
    extra: dict[str, Any] = field(default_factory=dict)
    hit_service: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))


@dataclass(frozen=True)
class ReaderJob:
    """Everything a reader process needs."""

    index: int
    strategy: Strategy
    settings: Settings
    base_url: str
    channel: str
    redis_prefix: str


def collect(
    reader: Reader, reads: ReadLog, probe_log: ProbeLog, events_before: int | None
) -> ReaderResult:
    """Pack what a reader recorded, with the events it applied since ``events_before``."""
    after = reader.events()
    return ReaderResult(
        reads=reads.arrays(),
        read_errors=reads.errors,
        probe_t0=np.array(probe_log.t0, dtype=np.int64),
        probe_t1=np.array(probe_log.t1, dtype=np.int64),
        probe_version=np.array(probe_log.version, dtype=np.int64),
        probe_polls=probe_log.polls,
        probe_regressions=probe_log.regressions,
        probe_gap_ms=probe_log.median_gap_ms(),
        probe_applied=np.array(reader.probe_applied, dtype=np.int64),
        events=None if events_before is None or after is None else after - events_before,
        extra=reader.extra(),
        hit_service=np.array(reader.hit_service, dtype=np.int64).reshape(-1, 2),
    )


async def events_at(reader: Reader, t_ns: int) -> int | None:
    """The reader's event count at monotonic time ``t_ns`` (the start of the measurement)."""
    await asyncio.sleep(max(0.0, (t_ns - time.monotonic_ns()) / 1e9))
    return reader.events()


def planned_keys(settings: Settings, index: int) -> np.ndarray:
    """The item indexes reader ``index`` will read during the run, in order."""
    zipf = ZipfKeys(settings.n_keys, settings.zipf_s)
    seconds = settings.warmup + settings.duration
    return workload_keys(zipf, settings.seed * 7919 + index, settings.rate, seconds)


def items_to_prefill(items: list[dict[str, Any]], keys: np.ndarray) -> list[dict[str, Any]]:
    """The items a reader will read (and the probe's): holding any other one changes nothing
    the run measures, and redis-py and cashews load them one read at a time."""
    wanted = {key_name(int(i)) for i in np.unique(keys)} | {PROBE_KEY}
    return [item for item in items if item["key"] in wanted]


async def _flush_at(reader: Reader, start_ns: int, seconds: float) -> None:
    await asyncio.sleep(max(0.0, (start_ns + int(seconds * 1e9) - time.monotonic_ns()) / 1e9))
    await reader.flush()


async def _wait_for_owner(client: httpx.AsyncClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await client.get("/health", timeout=1.0)).status_code == 200:
                return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


async def _wait_for_go(conn: Connection) -> Schedule:
    while not conn.poll():
        await asyncio.sleep(0.005)
    kind, payload = conn.recv()
    if kind != "go":
        raise RuntimeError(f"expected 'go', got {kind!r}")
    assert isinstance(payload, Schedule)
    return payload


async def run_reader(job: ReaderJob, conn: Connection) -> None:
    """Connect, prefill, report ready, run on the harness's schedule, send the results."""
    settings = job.settings
    # One connection per read in flight, all kept alive (httpx keeps 20 by default).
    n = settings.max_in_flight + 4
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=job.base_url, timeout=10.0, limits=limits) as client:
        reader = make_reader(
            job.strategy,
            settings,
            client=client,
            base_url=job.base_url,
            channel=job.channel,
            redis_prefix=job.redis_prefix,
            seed=settings.seed * 1000 + job.index,
        )
        try:
            await _wait_for_owner(client)
            await reader.start()
            keys = planned_keys(settings, job.index)
            response = await client.get("/items")
            response.raise_for_status()
            if settings.prefill:
                await reader.prefill(items_to_prefill(response.json(), keys))
            conn.send(("ready", None))
            schedule = await _wait_for_go(conn)
            events_before = asyncio.create_task(events_at(reader, schedule.measure))
            if settings.flush_at is not None:
                flush = asyncio.create_task(_flush_at(reader, schedule.start, settings.flush_at))
            reads, probe_log = await run_reads(
                reader.get,
                keys=keys,
                rate=settings.rate,
                max_in_flight=settings.max_in_flight,
                schedule=schedule,
                probe_interval=settings.probe_interval if job.strategy.family != "none" else None,
            )
            before = await events_before
            if settings.flush_at is not None:
                await flush
            conn.send(("done", collect(reader, reads, probe_log, before)))
        finally:
            await reader.stop()


def main(job: ReaderJob, conn: Connection) -> None:
    """Process entry. Ctrl-C is left to the harness, which stops this process itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(run_reader(job, conn))
    except BaseException as exc:
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        try:
            conn.send(("error", last))
        except (BrokenPipeError, OSError):
            pass
    finally:
        conn.close()
