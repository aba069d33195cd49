"""Soak: many consumers, a steady stream of changes over Redis pub/sub, subscribers killed at
random, and every read checked against the owner. Not a test: never run it in CI.

    .venv/bin/python -m benchmarks.soak                        # 5 min, 8 consumers, 10,000 ev/s
    .venv/bin/python -m benchmarks.soak --duration 60 --consumers 4 --rate 2000
    .venv/bin/python -m benchmarks.soak --help                 # every knob

Needs Redis (``docker compose up -d redis``) and ``cachesync.transports.redis``.

What runs
    ``--owners`` owner processes split the keys between them. Each one is the owner service of
    its keys: its "database" is Redis (``<prefix>:cur`` holds each key's current version,
    ``<prefix>:c:<key>`` the commit time of each of its last ``--retention`` versions). Every
    10 ms it commits a batch of changes in one MULTI/EXEC, then publishes one event per change
    with a :class:`~cachesync.Publisher` (heartbeats every ``--heartbeat`` seconds).
    ``--consumers`` consumer processes each run a :class:`~cachesync.CacheSync` on ``redis://``
    and read keys through ``@sync.cached`` (``--reads`` per second, 80 % of them on the first
    ``--hot`` keys); a miss fetches the current version from Redis. The harness kills the
    consumers' pub/sub connections (``CLIENT KILL``) every ``--kill-min`` to ``--kill-max``
    seconds: each of them with probability 1/2, at least one.

Stale beyond the bound, exactly
    Every read is checked. With ``k`` the key, ``v`` the version the read returned, ``t0`` the
    wall-clock time at which the read began, and ``c(k, v+1)`` the commit time of the next
    version, the read's **staleness** is ``t0 - c(k, v+1)`` if version ``v+1`` exists (zero if
    it does not, or if it was committed after ``t0``): how long the value it returned had already
    been outdated when it was asked for. A read is **stale beyond the bound** when its staleness
    exceeds ``--bound`` (default: 2 heartbeat intervals). ``c`` is taken just before the EXEC
    that commits, so it is never later than the commit and staleness is never underestimated;
    the check reads ``c(k, v+1)`` and the current version in one MULTI, so "not yet committed"
    and "committed, then trimmed from the retained history" are told apart (the latter is
    reported as unverifiable and counted as stale beyond the bound). Owner and consumers share
    the host's clock.

Reported
    Lost-event detections by cause, kills per consumer, reads, stale reads and maximum
    staleness, reads stale beyond the bound (must be 0), the event lag, each consumer's RSS over
    time (first, last, max, slope; must stay flat), a :class:`~cachesync.contrib.monitor.
    ConsistencyMonitor`'s view. (The listener fuzz is a test: ``tests/test_fuzz_listener.py``.)
    Prints a table, writes ``benchmarks/results/SOAK.md`` and, with matplotlib,
    ``benchmarks/results/soak_rss.png``.

Restricting the kills to this run's consumers: they connect with ``?client_name=<prefix>-cN``
and the harness kills only pub/sub clients whose name starts with the run's prefix. If the
transport does not pass the name on to Redis, the harness finds the consumers' connections by
their local ports instead (from ``/proc/<pid>/fd`` and ``/proc/<pid>/net/tcp``) and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import logging
import math
import multiprocessing
import os
import platform
import queue
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from benchmarks.common import pyplot

RESULTS = Path(__file__).resolve().parent / "results"
NS = "items"
TICK = 0.01
CHECK_EVERY = 0.1
LAG_SAMPLES = 10_000
STALL = 10.0
MIN_RSS_WINDOW = 120.0  # seconds after warm-up needed to judge the RSS slope
STALENESS_BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0, math.inf)
LOST_CAUSES = ("gap", "source", "reconnect", "heartbeat")


@dataclass(frozen=True)
class Config:
    """Every knob of one soak run (see ``--help``)."""

    url: str = "redis://127.0.0.1:6379/0"
    duration: float = 300.0
    consumers: int = 8
    rate: float = 10_000.0
    owners: int = 2
    keys: int = 1000
    hot: int = 100
    reads: float = 1000.0
    heartbeat: float = 0.5
    bound: float = 1.0
    kill_min: float = 10.0
    kill_max: float = 30.0
    retention: int = 256
    monitor_rate: float = 20.0
    rss_every: float = 5.0
    seed: int = 0
    run_id: str = ""
    client_names: bool = True

    @property
    def prefix(self) -> str:
        """Prefix of every Redis key, channel and client name of this run."""
        return f"cachesync-soak-{self.run_id}"

    @property
    def channel(self) -> str:
        return self.prefix

    @property
    def db_url(self) -> str:
        """The owner's "database": the same Redis, without the transport's options."""
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(query=""))

    def key(self, i: int) -> str:
        return f"k{i:06d}"


# -- the owner -------------------------------------------------------------------------------


def owner_process(cfg: Config, index: int, results: Any, stop: MpEvent) -> None:
    """Entry point of an owner process."""
    _log_to_stderr(f"owner {index}")
    try:
        results.put(("owner", index, asyncio.run(_owner(cfg, index, results, stop))))
    except BaseException as exc:  # report, or the harness waits for nothing
        results.put(("error", f"owner {index}", repr(exc)))


async def _owner(cfg: Config, index: int, results: Any, stop: MpEvent) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from cachesync import Publisher

    rng = random.Random(cfg.seed * 1000 + index)
    mine = [cfg.key(i) for i in range(cfg.keys) if i % cfg.owners == index]
    versions = dict.fromkeys(mine, 0)
    db = aioredis.from_url(cfg.db_url)
    cur = f"{cfg.prefix}:cur"
    per_tick = cfg.rate / cfg.owners * TICK
    sent = 0
    behind = 0
    try:
        async with Publisher(cfg.url, cfg.channel, heartbeat_interval=cfg.heartbeat) as pub:
            results.put(("owner-ready", index, None))
            started = time.monotonic()
            next_tick = started
            credit = 0.0
            while not stop.is_set():
                credit += per_tick
                n = int(credit)
                credit -= n
                batch = []
                # Read before the pipeline is sent, so never later than the commit (EXEC).
                committed = time.time()
                pipe = db.pipeline(transaction=True)
                for _ in range(n):
                    key = rng.choice(mine)
                    versions[key] += 1
                    version = versions[key]
                    batch.append((key, version))
                    history = f"{cfg.prefix}:c:{key}"
                    pipe.hset(cur, key, version)
                    pipe.hset(history, str(version), repr(committed))
                    if version > cfg.retention:
                        pipe.hdel(history, str(version - cfg.retention))
                if batch:
                    await pipe.execute()
                for key, version in batch:
                    await pub.changed(NS, key, version=version, ts=committed)
                sent += len(batch)
                next_tick += TICK
                delay = next_tick - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -1.0:
                    behind += 1  # more than a second behind the schedule: do not burst
                    next_tick = time.monotonic()
            elapsed = time.monotonic() - started
    finally:
        await db.aclose()
    return {"sent": sent, "elapsed": elapsed, "rate": sent / elapsed, "fell_behind": behind}


# -- a consumer ------------------------------------------------------------------------------


@dataclass
class ReadChecks:
    """What the checker found about a consumer's reads."""

    reads: int = 0
    read_errors: int = 0
    checked: int = 0
    stale: int = 0
    beyond_bound: int = 0
    unverifiable: int = 0
    max_staleness: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(STALENESS_BUCKETS))
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, key: str, version: int, t0: float, staleness: float, bound: float) -> None:
        self.checked += 1
        if staleness <= 0:
            return
        self.stale += 1
        self.max_staleness = max(self.max_staleness, staleness)
        for i, edge in enumerate(STALENESS_BUCKETS):
            if staleness <= edge:
                self.buckets[i] += 1
                break
        if staleness > bound:
            self.beyond_bound += 1
            if len(self.examples) < 10:
                self.examples.append(
                    {"key": key, "version": version, "t0": t0, "staleness": staleness}
                )


def _log_to_stderr(role: str) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s {role} %(name)s: %(message)s",
        stream=sys.stderr,
    )


def consumer_process(cfg: Config, index: int, results: Any, go: MpEvent, stop: MpEvent) -> None:
    """Entry point of a consumer process."""
    _log_to_stderr(f"consumer {index}")
    try:
        result = asyncio.run(_consumer(cfg, index, results, go, stop))
        results.put(("consumer", index, result))
    except BaseException as exc:
        results.put(("error", f"consumer {index}", repr(exc)))


def _consumer_url(cfg: Config, index: int) -> str:
    if not cfg.client_names:
        return cfg.url
    sep = "&" if urlsplit(cfg.url).query else "?"
    return f"{cfg.url}{sep}client_name={cfg.prefix}-c{index}"


async def print_tasks_after(seconds: float) -> None:
    """Print the stack of every task every ``seconds`` (a hung shutdown explains itself)."""
    while True:
        await asyncio.sleep(seconds)
        print(f"--- pid {os.getpid()}: still stopping; tasks:", file=sys.stderr)
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stderr)


def rss_mb() -> float:
    """Resident set size of this process, in MB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


async def _consumer(
    cfg: Config, index: int, results: Any, go: MpEvent, stop: MpEvent
) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from cachesync import CacheSync, ConfigError
    from cachesync.contrib.monitor import ConsistencyMonitor
    from cachesync.contrib.prometheus import PrometheusMetrics

    rng = random.Random(cfg.seed * 1000 + 500 + index)

    class SoakMetrics(PrometheusMetrics):
        """Also keeps the maximum lag and a fixed-size sample of lags (for the p99): a
        growing list would show up in the RSS this soak watches."""

        max_lag = 0.0
        seen = 0
        lags: list[float] = []

        def event_applied(self, ns: str, op: str, lag_seconds: float) -> None:
            super().event_applied(ns, op, lag_seconds)
            self.max_lag = max(self.max_lag, lag_seconds)
            self.seen += 1
            if len(self.lags) < LAG_SAMPLES:
                self.lags.append(lag_seconds)
            else:
                slot = rng.randrange(self.seen)
                if slot < LAG_SAMPLES:
                    self.lags[slot] = lag_seconds

    metrics = SoakMetrics()
    metrics.lags = []
    named = cfg.client_names
    try:
        sync = CacheSync(
            _consumer_url(cfg, index),
            cfg.channel,
            observer=metrics,
            reconnect_initial=0.05,
            reconnect_max=1.0,
        )
    except ConfigError:
        named = False  # the transport refuses the option: the harness matches by port
        sync = CacheSync(
            cfg.url, cfg.channel, observer=metrics, reconnect_initial=0.05, reconnect_max=1.0
        )
    metrics.bind(sync)
    db = aioredis.from_url(cfg.db_url)
    cur = f"{cfg.prefix}:cur"

    @sync.cached(NS, ttl=3600, maxsize=cfg.keys * 2, version_of=lambda v: v)
    async def current(key: str) -> int:
        value = await db.hget(cur, key)
        return int(value or 0)

    async def owner_version(key: str) -> int | None:
        # Like current(): a key never committed is version 0, not a key the owner dropped.
        return int(await db.hget(cur, key) or 0)

    # Helpers stop on this flag rather than on cancel(): redis-py 8.1's asyncio client
    # sometimes swallows a cancellation that lands while it waits for a reply.
    stopping = asyncio.Event()

    async def pause(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)

    checks = ReadChecks()
    pending: list[tuple[str, int, float]] = []
    rss: list[tuple[float, float]] = []
    hot_share = 0.8 if cfg.hot < cfg.keys else 0.0

    def pick() -> str:
        if rng.random() < hot_share:
            return cfg.key(rng.randrange(cfg.hot))
        return cfg.key(rng.randrange(cfg.keys))

    async def reader() -> None:
        per_tick = cfg.reads * TICK
        credit = 0.0
        next_tick = time.monotonic()
        while not stopping.is_set():
            credit += per_tick
            n = int(credit)
            credit -= n
            for _ in range(n):
                key = pick()
                t0 = time.time()
                try:
                    version = await current(key)
                except Exception:
                    checks.read_errors += 1
                    continue
                checks.reads += 1
                pending.append((key, version, t0))
            next_tick += TICK
            delay = next_tick - time.monotonic()
            if delay < -1.0:
                next_tick = time.monotonic()
            await asyncio.sleep(max(0.0, delay))

    async def check_pending() -> None:
        batch = pending[:]
        del pending[:]
        if not batch:
            return
        pipe = db.pipeline(transaction=True)
        for key, version, _ in batch:
            pipe.hget(f"{cfg.prefix}:c:{key}", str(version + 1))
            pipe.hget(cur, key)
        answers = await pipe.execute()
        for i, (key, version, t0) in enumerate(batch):
            committed, now = answers[2 * i], answers[2 * i + 1]
            if committed is not None:
                checks.add(key, version, t0, t0 - float(committed), cfg.bound)
            elif now is not None and int(now) >= version + 1:
                checks.unverifiable += 1  # committed, then trimmed: older than the retention
                checks.beyond_bound += 1
            else:
                checks.add(key, version, t0, 0.0, cfg.bound)

    async def checker() -> None:
        while not stopping.is_set():
            await pause(CHECK_EVERY)
            await check_pending()

    async def sampler(started: float) -> None:
        while not stopping.is_set():
            rss.append((time.monotonic() - started, rss_mb()))
            await pause(cfg.rss_every)

    async def stall_detector() -> None:
        # Re-armed every second: if the event loop stops turning for STALL seconds, a thread
        # of faulthandler prints every stack to stderr (a blocked loop explains itself).
        while not stopping.is_set():
            faulthandler.dump_traceback_later(STALL, repeat=True, file=sys.stderr)
            await pause(1.0)

    try:
        async with sync:
            monitor = ConsistencyMonitor(
                sync,
                NS,
                owner_version,
                sample_rate=cfg.monitor_rate,
                bound=cfg.bound,
                metrics=metrics,
            )
            results.put(("consumer-ready", index, None))
            # Reads start once the owners are up, so their first events find empty caches
            # (a hello, not a lost-event detection).
            while not go.is_set():
                await asyncio.sleep(0.05)
            started = time.monotonic()
            tasks = [
                asyncio.create_task(reader()),
                asyncio.create_task(checker()),
                asyncio.create_task(sampler(started)),
                asyncio.create_task(stall_detector()),
            ]
            async with monitor:
                while not stop.is_set():
                    await asyncio.sleep(0.1)
                    for task in tasks:
                        if task.done():
                            task.result()  # a crashed helper ends the run with its error
            faulthandler.cancel_dump_traceback_later()
            # Stopping must not hang either: every task's stack is printed if it takes STALL s.
            stuck = asyncio.create_task(print_tasks_after(STALL))
            stopping.set()
            await asyncio.wait(tasks)
            for task in tasks:
                task.result()
            await check_pending()
            rss.append((time.monotonic() - started, rss_mb()))
            stats = sync.stats()
    finally:
        await db.aclose()
        faulthandler.cancel_dump_traceback_later()
    stuck.cancel()
    lost = {
        cause: metrics.registry.get_sample_value(
            "cachesync_lost_event_detections_total", {"cause": cause}
        )
        for cause in LOST_CAUSES
    }
    lags = sorted(metrics.lags)
    return {
        "named": named,
        "checks": asdict(checks),
        "listener": stats["listener"],
        "namespace": stats["namespaces"][NS],
        "consistency": stats["consistency"][NS],
        "lost": lost,
        "lag_max": metrics.max_lag,
        "lag_p99": lags[int(0.99 * (len(lags) - 1))] if lags else None,
        "rss": rss,
    }


# -- killing subscriber connections ----------------------------------------------------------


def local_ports(pid: int, remote_port: int) -> set[int]:
    """Local ports of ``pid``'s TCP connections to ``remote_port`` (Linux /proc)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                local, remote, inode = cols[1], cols[2], cols[9]
                if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


@dataclass
class Kill:
    at: float
    how: str
    victims: list[int]


async def killer(
    cfg: Config,
    pids: dict[int, int],
    rng: random.Random,
    deadline: float,
    kills: list[Kill],
) -> None:
    """Kill a random subset of the consumers' pub/sub connections every kill-min..kill-max s."""
    import redis.asyncio as aioredis

    admin = aioredis.from_url(cfg.db_url)
    redis_port = urlsplit(cfg.db_url).port or 6379
    started = time.monotonic()
    try:
        while True:
            wait = rng.uniform(cfg.kill_min, cfg.kill_max)
            if time.monotonic() + wait >= deadline:
                return
            await asyncio.sleep(wait)
            clients = await admin.client_list(_type="pubsub")
            ours: dict[str, int] = {}  # client id -> consumer index
            how = "name"
            for client in clients:
                name = client.get("name", "")
                if name.startswith(f"{cfg.prefix}-c"):
                    ours[client["id"]] = int(name.rsplit("-c", 1)[1])
            if not ours:
                how = "port"
                by_port = {
                    port: index
                    for index, pid in pids.items()
                    for port in local_ports(pid, redis_port)
                }
                for client in clients:
                    port = int(client["addr"].rsplit(":", 1)[1])
                    if port in by_port:
                        ours[client["id"]] = by_port[port]
            if not ours:
                kills.append(Kill(time.monotonic() - started, "none found", []))
                continue
            ids = [i for i in ours if rng.random() < 0.5] or [rng.choice(list(ours))]
            for client_id in ids:
                await admin.client_kill_filter(_id=client_id)
            kills.append(Kill(time.monotonic() - started, how, sorted(ours[i] for i in ids)))
    finally:
        await admin.aclose()


# -- the harness -----------------------------------------------------------------------------


async def _wait_for(results: Any, kind: str, count: int, timeout: float) -> dict[int, Any]:
    """Collect ``count`` messages of ``kind`` from the processes; fail on an error report."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    loop = asyncio.get_running_loop()
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"waited {timeout:g}s for {count} {kind!r}, got {len(got)}")
        try:
            message = await loop.run_in_executor(None, results.get, True, min(left, 1.0))
        except queue.Empty:
            continue
        if message[0] == "error":
            raise RuntimeError(f"{message[1]} failed: {message[2]}")
        if message[0] == kind:
            got[message[1]] = message[2]
    return got


async def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the soak; return everything measured (also what :func:`report` formats)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    go, stop_owners, stop_consumers = ctx.Event(), ctx.Event(), ctx.Event()
    consumers = [
        ctx.Process(
            target=consumer_process, args=(cfg, i, results, go, stop_consumers), daemon=True
        )
        for i in range(cfg.consumers)
    ]
    owners = [
        ctx.Process(target=owner_process, args=(cfg, i, results, stop_owners), daemon=True)
        for i in range(cfg.owners)
    ]
    kills: list[Kill] = []
    try:
        for p in consumers:
            p.start()
        await _wait_for(results, "consumer-ready", cfg.consumers, 60)
        log(f"{cfg.consumers} consumers subscribed; starting {cfg.owners} owner(s)")
        for p in owners:
            p.start()
        await _wait_for(results, "owner-ready", cfg.owners, 60)
        go.set()
        started = time.monotonic()
        deadline = started + cfg.duration
        pids = {i: p.pid for i, p in enumerate(consumers) if p.pid is not None}
        kill_task = asyncio.create_task(killer(cfg, pids, random.Random(cfg.seed), deadline, kills))
        last_log = started
        while time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, deadline - time.monotonic()))
            if kill_task.done():
                kill_task.result()
            if time.monotonic() - last_log >= 30:
                last_log = time.monotonic()
                log(f"  {last_log - started:5.0f}s  kills so far: {len(kills)}")
        kill_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await kill_task
        # Consumers stop first, while the owners still publish and beat: a silent owner at
        # the end would only add heartbeat detections that say nothing about the run.
        stop_consumers.set()
        consumer_results = await _wait_for(results, "consumer", cfg.consumers, 120)
        stop_owners.set()
        owner_results = await _wait_for(results, "owner", cfg.owners, 60)
    finally:
        stop_owners.set()
        stop_consumers.set()
        for p in consumers + owners:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        await _cleanup(cfg)
    return {
        "config": asdict(cfg),
        "owners": owner_results,
        "consumers": consumer_results,
        "kills": [asdict(k) for k in kills],
    }


async def _cleanup(cfg: Config) -> None:
    """Delete this run's keys (and nothing else) from Redis."""
    import redis.asyncio as aioredis

    db = aioredis.from_url(cfg.db_url)
    try:
        batch = [k async for k in db.scan_iter(match=f"{cfg.prefix}:*", count=1000)]
        for i in range(0, len(batch), 1000):
            await db.unlink(*batch[i : i + 1000])
    finally:
        await db.aclose()


# -- analysis and report ---------------------------------------------------------------------


def settle_time(duration: float) -> float:
    """Seconds of warm-up left out of the RSS slope: caches, lag samples and the allocator's
    arenas fill first."""
    return min(max(60.0, 0.2 * duration), duration / 2)


def slope(points: Iterable[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB), in MB per minute."""
    pts = list(points)
    if len(pts) < 2:
        return 0.0
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return 0.0
    return 60.0 * sum((x - mx) * (y - my) for x, y in pts) / sxx


def analyse(data: dict[str, Any]) -> dict[str, Any]:
    """Per-consumer rows and totals from what :func:`run` returned."""
    cfg = data["config"]
    kills_per: dict[int, int] = {}
    for kill in data["kills"]:
        for victim in kill["victims"]:
            kills_per[victim] = kills_per.get(victim, 0) + 1
    rows = []
    for index in sorted(data["consumers"]):
        c = data["consumers"][index]
        ns, checks, rss = c["namespace"], c["checks"], c["rss"]
        values = [mb for _, mb in rss]
        settled = [p for p in rss if p[0] >= settle_time(cfg["duration"])]
        reads = ns["hits"] + ns["misses"] + ns["stale_serves"] + ns["bypassed"]
        rows.append(
            {
                "consumer": index,
                "reads": checks["reads"],
                "hit_ratio": ns["hits"] / reads if reads else 0.0,
                "stale_reads": checks["stale"],
                "max_staleness_ms": 1000 * checks["max_staleness"],
                "beyond_bound": checks["beyond_bound"],
                "unverifiable": checks["unverifiable"],
                "kills": kills_per.get(index, 0),
                **{f"lost_{cause}": int(c["lost"][cause] or 0) for cause in LOST_CAUSES},
                "messages": c["listener"]["messages"],
                "bad_events": c["listener"]["bad_events"],
                "lag_p99_ms": 1000 * (c["lag_p99"] or 0.0),
                "lag_max_ms": 1000 * c["lag_max"],
                "monitor_stale_ratio": c["consistency"]["stale_ratio"],
                "monitor_checked": c["consistency"]["checked"],
                "rss_first": values[0] if values else 0.0,
                "rss_last": values[-1] if values else 0.0,
                "rss_max": max(values) if values else 0.0,
                "rss_slope": slope(rss),
                "rss_slope_settled": slope(settled),
                "read_errors": checks["read_errors"],
                "buckets": checks["buckets"],
                "named": c["named"],
            }
        )
    sent = sum(o["sent"] for o in data["owners"].values())
    elapsed = max(o["elapsed"] for o in data["owners"].values())
    totals = {
        "events_sent": sent,
        "events_per_s": sent / elapsed if elapsed else 0.0,
        "reads": sum(r["reads"] for r in rows),
        "stale_reads": sum(r["stale_reads"] for r in rows),
        "beyond_bound": sum(r["beyond_bound"] for r in rows),
        "unverifiable": sum(r["unverifiable"] for r in rows),
        "max_staleness_ms": max((r["max_staleness_ms"] for r in rows), default=0.0),
        "kills": sum(r["kills"] for r in rows),
        **{f"lost_{cause}": sum(r[f"lost_{cause}"] for r in rows) for cause in LOST_CAUSES},
        "bad_events": sum(r["bad_events"] for r in rows),
        "lag_max_ms": max((r["lag_max_ms"] for r in rows), default=0.0),
        "rss_max_slope": max((r["rss_slope_settled"] for r in rows), default=0.0),
        "monitor_stale": sum(
            data["consumers"][i]["consistency"]["stale"] for i in data["consumers"]
        ),
        "owner_fell_behind": sum(o["fell_behind"] for o in data["owners"].values()),
    }
    return {"rows": rows, "totals": totals}


COLUMNS = [
    ("consumer", "#", "{}"),
    ("reads", "reads", "{:,}"),
    ("hit_ratio", "hit %", "{:.0%}"),
    ("stale_reads", "stale reads", "{:,}"),
    ("max_staleness_ms", "max stale ms", "{:.1f}"),
    ("beyond_bound", "> bound", "{}"),
    ("kills", "kills", "{}"),
    ("lost_reconnect", "reconnect", "{}"),
    ("lost_gap", "gap", "{}"),
    ("lost_source", "source", "{}"),
    ("lost_heartbeat", "heartbeat", "{}"),
    ("lag_p99_ms", "lag p99 ms", "{:.1f}"),
    ("lag_max_ms", "lag max ms", "{:.0f}"),
    ("rss_first", "RSS first", "{:.1f}"),
    ("rss_last", "RSS last", "{:.1f}"),
    ("rss_max", "RSS max", "{:.1f}"),
    ("rss_slope_settled", "MB/min (settled)", "{:+.2f}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    """The per-consumer table, as Markdown (it also reads well in a terminal)."""
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [head, rule]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[k]) for k, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def report(
    data: dict[str, Any],
    analysis: dict[str, Any],
    argv: list[str],
    rss_limit: float,
) -> str:
    """SOAK.md."""
    cfg, totals, rows = data["config"], analysis["totals"], analysis["rows"]
    stale_ok = totals["beyond_bound"] == 0
    settle = settle_time(cfg["duration"])
    judged = cfg["duration"] - settle >= MIN_RSS_WINDOW
    rss_ok = totals["rss_max_slope"] <= rss_limit or not judged
    rss_note = (
        f"limit {rss_limit:g}"
        if judged
        else f"not judged: the run is too short to tell growth from warm-up (needs "
        f"{settle + MIN_RSS_WINDOW:g} s)"
    )
    detections_ok = all(r["lost_reconnect"] >= r["kills"] for r in rows)
    named = all(r["named"] for r in rows)
    how = sorted({k["how"] for k in data["kills"]})
    verdict = "PASS" if stale_ok and rss_ok and detections_ok else "FAIL"
    redis_version = data.get("redis_version", "?")
    short = totals["events_per_s"] < 0.9 * cfg["rate"]
    rate_note = (
        " — **below target: the owners could not keep up (the host is short of CPU); the "
        "checks still hold at the rate reached**"
        if short
        else ""
    )
    edges = ["0"] + [f"{1000 * e:g} ms" for e in STALENESS_BUCKETS[:-1]]
    counts = [sum(r["buckets"][i] for r in rows) for i in range(len(STALENESS_BUCKETS))]
    buckets = "\n".join(
        f"| &nbsp;&nbsp;in ({lo}, {hi}] | {n:,} |"
        for lo, hi, n in zip(edges, [*edges[1:], "∞"], counts, strict=True)
    )
    return f"""# Soak

`{" ".join(["python -m benchmarks.soak", *argv])}`

**{verdict}** — reads stale beyond the bound: **{totals["beyond_bound"]}** (must be 0);
max RSS slope after {settle:g} s of warm-up: **{totals["rss_max_slope"]:+.2f} MB/min** \
({rss_note}); every kill detected as a reconnect: **{"yes" if detections_ok else "NO"}**.

| setting | value |
|---|---|
| duration | {cfg["duration"]:g} s |
| consumers × owners | {cfg["consumers"]} × {cfg["owners"]} |
| events | {totals["events_sent"]:,} sent, {totals["events_per_s"]:,.0f}/s \
(target {cfg["rate"]:,.0f}/s){rate_note} |
| keys (hot) | {cfg["keys"]:,} ({cfg["hot"]}) |
| reads | {cfg["reads"]:,.0f}/s per consumer; {totals["reads"]:,} checked |
| heartbeat / bound | {cfg["heartbeat"]:g} s / {cfg["bound"]:g} s |
| kills | every {cfg["kill_min"]:g}–{cfg["kill_max"]:g} s: {len(data["kills"])} rounds, \
{totals["kills"]} connections, matched by {", ".join(how) or "-"} \
(client names {"passed on" if named else "NOT passed on"}) |
| host | {os.cpu_count()} CPUs, Python {platform.python_version()}, Redis {redis_version} |

## Per consumer

{table(rows)}

Lost-event detections, all consumers: reconnect {totals["lost_reconnect"]}, \
gap {totals["lost_gap"]}, source {totals["lost_source"]}, heartbeat {totals["lost_heartbeat"]}.
A kill shows as a reconnect, usually followed by a gap: the first event after the new
subscription names a later seq than the last one seen (the flush has already happened).

| reads | count |
|---|---:|
| checked | {totals["reads"]:,} |
| stale (staleness > 0: an event in flight) | {totals["stale_reads"]:,} |
{buckets}
| stale beyond the bound ({cfg["bound"]:g} s) | **{totals["beyond_bound"]}** |
| unverifiable (older than the retained history) | {totals["unverifiable"]} |
| maximum staleness | {totals["max_staleness_ms"]:.1f} ms |

Maximum event lag (commit to applied): {totals["lag_max_ms"]:.0f} ms. Bad events:
{totals["bad_events"]}. Consistency monitor: {totals["monitor_stale"]} samples stale beyond the
bound. Owners fell more than 1 s behind their schedule: {totals["owner_fell_behind"]} time(s).
Transport: `{data.get("transport", "?")}`.

Staleness is defined in the docstring of `benchmarks/soak.py`: how long the value a read
returned had already been superseded (by a committed newer version) when the read began.

## Kills

{", ".join(f"{k['at']:.0f}s→{k['victims']}" for k in data["kills"]) or "none"}
"""


def plot(data: dict[str, Any], path: Path) -> bool:
    """RSS over time per consumer; False when matplotlib is missing."""
    try:
        plt = pyplot()
    except ImportError:
        return False

    fig, ax = plt.subplots(figsize=(8, 4))
    for index in sorted(data["consumers"]):
        points = data["consumers"][index]["rss"]
        ax.plot([t for t, _ in points], [mb for _, mb in points], label=f"consumer {index}")
    for kill in data["kills"]:
        ax.axvline(kill["at"], color="grey", linewidth=0.5, linestyle=":")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("Consumer RSS during the soak (dotted: kills)")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def parse_args(argv: list[str]) -> tuple[Config, float, Path]:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--url", default=d.url, help="redis:// URL of the broker and the owner's db")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load")
    p.add_argument("--consumers", type=int, default=d.consumers)
    p.add_argument("--rate", type=float, default=d.rate, help="events per second, all owners")
    p.add_argument("--owners", type=int, default=None, help="default: one per 5,000 events/s")
    p.add_argument("--keys", type=int, default=d.keys)
    p.add_argument("--hot", type=int, default=d.hot, help="keys that get 80%% of the reads")
    p.add_argument("--reads", type=float, default=d.reads, help="reads per second per consumer")
    p.add_argument("--heartbeat", type=float, default=d.heartbeat, help="seconds")
    p.add_argument("--bound", type=float, default=None, help="default: 2 heartbeat intervals")
    p.add_argument("--kill-min", type=float, default=d.kill_min)
    p.add_argument("--kill-max", type=float, default=d.kill_max)
    p.add_argument("--retention", type=int, default=d.retention, help="versions kept per key")
    p.add_argument("--monitor-rate", type=float, default=d.monitor_rate)
    p.add_argument("--rss-limit", type=float, default=1.0, help="MB/min, after warm-up")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-client-names", action="store_true", help="match kills by port")
    p.add_argument("--output", type=Path, default=RESULTS / "SOAK.md")
    p.add_argument("--rebuild", type=Path, metavar="SOAK_JSON", help="only rewrite the report")
    a = p.parse_args(argv)
    if a.consumers < 1 or a.rate <= 0 or a.duration <= 0 or a.keys < 1:
        p.error("--consumers, --rate, --duration and --keys must be positive")
    if not 0 < a.kill_min <= a.kill_max:
        p.error("need 0 < --kill-min <= --kill-max")
    owners = a.owners or max(1, math.ceil(a.rate / 5000))
    cfg = Config(
        url=a.url,
        duration=a.duration,
        consumers=a.consumers,
        rate=a.rate,
        owners=owners,
        keys=a.keys,
        hot=min(a.hot, a.keys),
        reads=a.reads,
        heartbeat=a.heartbeat,
        bound=a.bound if a.bound is not None else 2 * a.heartbeat,
        kill_min=a.kill_min,
        kill_max=a.kill_max,
        retention=a.retention,
        monitor_rate=a.monitor_rate,
        seed=a.seed,
        run_id=uuid.uuid4().hex[:8],
        client_names=not a.no_client_names,
    )
    return cfg, a.rss_limit, a.output


def rebuild(saved: Path, output: Path, rss_limit: float) -> int:
    """Write the report again from a saved ``soak.json`` (no run)."""
    data = json.loads(saved.read_text())
    for part in ("consumers", "owners"):  # JSON made the process indexes strings
        data[part] = {int(k): v for k, v in data[part].items()}
    analysis = analyse(data)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report(data, analysis, data.get("argv", []), rss_limit))
    plot(data, output.parent / "soak_rss.png")
    print(table(analysis["rows"]))
    print(f"wrote {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, rss_limit, output = parse_args(argv)
    if "--rebuild" in argv:
        return rebuild(Path(argv[argv.index("--rebuild") + 1]), output, rss_limit)
    from cachesync import ConfigError, from_url

    try:
        from_url(cfg.url)
    except ConfigError as exc:
        print(f"the soak needs the redis:// transport: {exc}")
        return 2
    print(
        f"soak {cfg.run_id}: {cfg.duration:g}s, {cfg.consumers} consumers, "
        f"{cfg.rate:,.0f} events/s, bound {cfg.bound:g}s"
    )
    data = asyncio.run(run(cfg))
    transport = type(from_url(cfg.url))
    data["transport"] = f"{transport.__module__}.{transport.__qualname__}"
    data["redis_version"] = asyncio.run(_redis_version(cfg))
    analysis = analyse(data)
    print(table(analysis["rows"]))
    print(json.dumps(analysis["totals"], indent=1))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report(data, analysis, argv, rss_limit))
    saved = {**data, **analysis, "argv": argv}
    (output.parent / "soak.json").write_text(json.dumps(saved))
    if plot(data, output.parent / "soak_rss.png"):
        print(f"wrote {output} and {output.parent / 'soak_rss.png'}")
    else:
        print(f"wrote {output} (no plot: matplotlib is not installed)")
    failed = analysis["totals"]["beyond_bound"]
    return 1 if failed else 0


async def _redis_version(cfg: Config) -> str:
    import redis.asyncio as aioredis

    db = aioredis.from_url(cfg.db_url)
    try:
        return str((await db.info("server")).get("redis_version", "?"))
    finally:
        await db.aclose()


if __name__ == "__main__":
    sys.exit(main())
