"""``python -m benchmarks``: micro benchmarks, the strategy comparison, the transport latency
benchmark, then the report.

Servers that are down are named with the command that starts them, and the strategies that
need them are skipped. Ctrl-C stops every process the run started and still writes what was
measured so far.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import env, latency, micro, plots
from .analysis import StrategyResult, merge_rounds
from .comparison import Harness
from .latency import TransportResult
from .micro import MicroResult
from .progress import Progress
from .report import (
    apply_rate_table,
    diagnostics_table,
    latency_detail_table,
    latency_table,
    machine_table,
    micro_table,
    not_run,
    settings_text,
    strategy_table,
    strategy_targets,
    targets_table,
    zero_grace_table,
)
from .strategies import FULL, SHORT_DEFAULT, Settings, Strategy, select, transport_url

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Run:
    """Everything one invocation measured, complete or not."""

    command: str
    full: bool
    settings: Settings
    machine: dict[str, str] = field(default_factory=dict)
    micro: list[MicroResult] = field(default_factory=list)
    strategies: list[StrategyResult] = field(default_factory=list)
    latency: list[TransportResult] = field(default_factory=list)
    planned: int = 0
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    short, full = Settings(), FULL
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="cachesync benchmarks: micro benchmarks and the strategy comparison. "
        "The default is the short run (about 5 minutes); --full is the documented long run.",
    )
    p.add_argument("--full", action="store_true", help="long run (all strategies, 5 x 45 s)")
    p.add_argument("--only", choices=("all", "micro", "strategies", "latency"), default="all")
    p.add_argument(
        "--strategies",
        help="comma-separated name globs (default: a short list; every strategy under --full)",
    )
    p.add_argument("--list", action="store_true", help="list the strategies and exit")
    p.add_argument(
        "--duration",
        type=float,
        help=f"measured s per strategy ({short.duration:g}; --full {full.duration:g})",
    )
    p.add_argument(
        "--warmup",
        type=float,
        help=f"warm-up s per strategy ({short.warmup:g}; --full {full.warmup:g})",
    )
    p.add_argument(
        "--rounds", type=int, help=f"rounds per strategy ({short.rounds}; --full {full.rounds})"
    )
    p.add_argument("--readers", type=int, help=f"reader processes ({short.readers})")
    p.add_argument("--rate", type=float, help=f"reads/s per reader ({short.rate:g})")
    p.add_argument("--max-in-flight", type=int, help=f"per reader ({short.max_in_flight})")
    p.add_argument("--keys", type=int, help=f"items ({short.n_keys})")
    p.add_argument("--zipf", type=float, help=f"Zipf exponent of reads ({short.zipf_s:g})")
    p.add_argument("--update-rate", type=float, help=f"updates/s ({short.update_rate:g})")
    p.add_argument("--update-dist", choices=("zipf", "uniform"), help="which keys change (zipf)")
    p.add_argument("--probe-rate", type=float, help=f"probe updates/s ({short.probe_rate:g})")
    p.add_argument("--probe-interval-ms", type=float, help="probe polling interval (1 ms)")
    p.add_argument("--seed", type=int, help=f"({short.seed})")
    p.add_argument("--redis-url", help=f"({short.redis_url})")
    p.add_argument("--amqp-url", help=f"({short.amqp_url})")
    p.add_argument("--out", help="results directory (benchmarks/results)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--no-budget",
        action="store_true",
        help="short run: run every round even past the ~5 minute budget",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    """The defaults of the chosen length, with every flag given applied."""
    base = FULL if args.full else Settings()
    overrides = {
        "duration": args.duration,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "readers": args.readers,
        "rate": args.rate,
        "max_in_flight": args.max_in_flight,
        "n_keys": args.keys,
        "zipf_s": args.zipf,
        "update_rate": args.update_rate,
        "update_dist": args.update_dist,
        "probe_rate": args.probe_rate,
        "probe_interval": None if args.probe_interval_ms is None else args.probe_interval_ms / 1e3,
        "seed": args.seed,
        "redis_url": args.redis_url,
        "amqp_url": args.amqp_url,
    }
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _skip(strategy: Strategy, reason: str) -> StrategyResult:
    return StrategyResult(strategy.name, strategy.label, strategy.family, "skipped", reason)


def run_micro(run: Run, progress: Progress) -> None:
    """The micro benchmarks, before any other process starts (they need a quiet machine)."""
    progress.say("micro benchmarks")
    sizes = micro.FULL if run.full else micro.SHORT
    run.micro = asyncio.run(micro.run_all(sizes, progress.say))


def run_latency(run: Run, progress: Progress, up: dict[str, bool]) -> None:
    """Publish-to-applied latency and apply rate per transport, ours against the raw client
    (``benchmarks/latency.py``); after the strategies, so nothing else of this run competes."""
    sizes = latency.FULL if run.full else latency.SHORT
    progress.say(f"transport latency and apply rate (about {sizes.estimate():.0f} s)")
    s = run.settings
    latency.run_all(sizes, s.redis_url, s.amqp_url, up, say=progress.say, results=run.latency)


def plan(run: Run, patterns: list[str], up: dict[str, bool]) -> list[Strategy]:
    """The strategies to run; those that cannot run here are recorded as skipped."""
    settings = run.settings
    runnable = []
    problems: dict[str, str | None] = {}
    svcs = env.services(settings.redis_url, settings.amqp_url)
    for strategy in select(patterns):
        down = [n for n in strategy.needs if not up.get(n)]
        if down:
            svc = svcs[down[0]]
            reason = f"{svc.name} is down (start it: `{svc.how_to_start}`)"
            run.strategies.append(_skip(strategy, reason))
            continue
        if strategy.is_cachesync:
            assert strategy.scheme is not None
            if strategy.scheme not in problems:
                url = transport_url(strategy.scheme, settings)
                problems[strategy.scheme] = env.transport_problem(strategy.scheme, url)
            problem = problems[strategy.scheme]
            if problem is not None:
                run.strategies.append(_skip(strategy, problem))
                continue
        runnable.append(strategy)
    run.planned = len(runnable)
    return runnable


SHORT_BUDGET = 300.0
"""Seconds the short run may take in all: past :data:`MIN_ROUNDS`, a round that would end past
it is not started, so every strategy runs the same number of rounds (never some strategies
and not others)."""

MIN_ROUNDS = 5
"""Rounds every strategy runs whatever the budget (fewer leave the spread meaningless)."""

RUN_OVERHEAD = 3.5
"""Seconds a strategy run takes besides its warm-up and measurement (start, prefill, stop)."""


def run_strategies(
    run: Run, strategies: list[Strategy], progress: Progress, budget: float | None
) -> None:
    """Every strategy in each of ``settings.rounds`` rounds, in a new shuffled order each round
    (so drifting load on a shared machine hits every strategy alike); then one result per
    strategy from its rounds. A round that would overrun ``budget`` (seconds since the start
    of the whole run) is not started, for any strategy."""
    settings = run.settings
    harness = Harness(settings, progress)
    per_round = len(strategies) * (settings.warmup + settings.duration + RUN_OVERHEAD)
    rng = random.Random(settings.seed)
    done: dict[str, list[StrategyResult]] = {s.name: [] for s in strategies}
    try:
        for round_no in range(1, settings.rounds + 1):
            elapsed = time.monotonic() - run.started
            over = budget is not None and elapsed + per_round > budget
            if over and round_no > min(MIN_ROUNDS, settings.rounds):
                run.warnings.append(
                    f"the short run's time budget ({budget:.0f} s) allowed {round_no - 1} of "
                    f"{settings.rounds} rounds (every strategy ran in each)"
                )
                break
            order = list(strategies)
            rng.shuffle(order)
            progress.say(f"round {round_no}/{settings.rounds}: {', '.join(s.name for s in order)}")
            for strategy in order:
                result = harness.run(strategy)
                done[strategy.name].append(result)
                if result.status != "ok":
                    progress.say(f"    {strategy.name}: {result.status}: {result.reason}")
                    continue
                progress.say(
                    f"    {strategy.name}: hit {result.hit_rate:.2%}, window p99 "
                    f"{result.window.fmt('p99')} ms, stale reads {result.stale_reads}, "
                    f"{result.reads_per_s:,.0f} reads/s/instance"
                )
    finally:
        for strategy in strategies:
            rounds = done[strategy.name]
            if rounds:
                run.strategies.append(merge_rounds(rounds))
            else:
                run.strategies.append(_skip(strategy, "interrupted (Ctrl-C) before it ran"))


def _order(results: list[StrategyResult]) -> list[StrategyResult]:
    rank = {s.name: i for i, s in enumerate(select(["*"]))}
    return sorted(results, key=lambda r: rank.get(r.name, len(rank)))


def render(run: Run) -> str:
    """RESULTS.md."""
    elapsed = time.monotonic() - run.started
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# cachesync benchmark results",
        "",
        f"Command: `{run.command}` ({'full' if run.full else 'short'} run, {elapsed:.0f} s, "
        f"{stamp}).",
    ]
    if run.interrupted:
        lines += ["", "**Interrupted (Ctrl-C): partial results.**"]
    lines += ["", "## Machine", "", machine_table(run.machine), ""]
    lines += [
        "The machine is shared: other work ran during the measurement (see the load average),"
        " so compare ratios and strategies measured side by side in this one run, not absolute"
        " numbers across runs.",
        "",
    ]
    for warning in run.warnings:
        lines += [f"- {warning}"]
    if run.micro:
        lines += ["", "## Micro benchmarks", "", micro_table(run.micro), ""]
        lines += [MICRO_NOTES, ""]
        lines += ["![micro ratios](micro_ratios.png)", ""]
    if run.strategies:
        results = _order(run.strategies)
        lines += ["## Strategy comparison", "", settings_text(run.settings, run.planned), ""]
        lines += [strategy_table(results), "", STATISTICS_NOTES, ""]
        if not_run(results):
            lines += [not_run(results), ""]
        lines += [COLUMN_NOTES, ""]
        lines += ["### Staleness with zero grace", "", zero_grace_table(results), ""]
        lines += [ZERO_GRACE_NOTES, ""]
        lines += ["### Where the window goes (ms)", "", diagnostics_table(results), ""]
        lines += [DIAGNOSTICS_NOTES, ""]
        reading = invalidate_vs_refresh(results)
        if reading:
            lines += [reading, ""]
        targets = strategy_targets(results)
        if targets:
            lines += ["### Targets", "", targets_table(targets), ""]
        lines += [
            "![hit rate vs p99 staleness](hit_rate_vs_staleness.png)",
            "",
            "![staleness CDF](staleness_cdf.png)",
            "",
        ]
        lines += ["### How each strategy is configured", "", STRATEGY_NOTES, ""]
        notes = peer_notes(results, run.machine.get("Redis server", "?"))
        lines += ["### Peers that do not run as documented here", "", notes, ""]
        lines += ["### Server versions each strategy supports", "", SERVER_VERSIONS, ""]
    if run.latency:
        lines += ["## Transport latency and apply rate, ours vs the raw client", ""]
        lines += [latency_table(run.latency), "", LATENCY_NOTES, ""]
        lines += ["### Latency distributions (ms)", "", latency_detail_table(run.latency), ""]
        lines += ["### Apply rate", "", apply_rate_table(run.latency), ""]
        lines += ["![transport latency](transport_latency.png)", ""]
    return "\n".join(lines).rstrip() + "\n"


MICRO_NOTES = """\
Hit benchmarks run on a started client (`async with sync:` on memory://, so the cache is
trusted). Each ratio is ours / baseline from interleaved repeats in this one run, best of each
side. The invalidation rate publishes N encoded upserts (each names a key the namespace holds,
with a newer version) on the memory:// bus and waits until the listener has applied them all,
best of three rounds (the time includes publishing them); `handle_message` alone feeds the
same kind of payloads to the client directly. Bytes per entry:
tracemalloc's retained memory after filling each cache through its decorator with the same
pre-built keys and values, divided by the number of entries."""

COLUMN_NOTES = """\
Columns. *reads/s/inst*: reads completed per reader process (offered: the rate above; a
strategy that cannot keep up shows less). *hit rate*: reads served by the local cache.
*owner req/s*: requests the owner's REST API served. *misses/s*: reads that left the process
(to the owner or to Redis). *window*: staleness window in ms, from the owner's commit of a
probe-key update until the start of an instance's first read that returned it (over every
update × instance; `≥` marks a lower bound, where some instance had not seen an update by the
end of the run). *in hand p99*: the same until that read returned (adds the fetch a miss
waits for). *stale reads (nines)*: workload reads that returned a version older than the one
the owner had committed more than 10 ms before the read started; nines = -log10(rate), ∞ for
none. *hit p50/p99*: latency of reads served by the local cache, measured around the call.
*events/s/inst*: change events (cachesync) or invalidation messages (peers) applied per
instance per second."""

ZERO_GRACE_NOTES = """\
A read is stale here as soon as the owner had committed a newer version of its key before the
read began (no 10 ms allowance); *behind* is how long before the read that newer version was
committed: the staleness each stale read actually served. *rate (95% upper bound)*: the stale
reads over all reads, with the exact Poisson upper bound; *nines shown* = -log10 of that bound,
the most this sample can claim (with no stale read at all, about log10(reads / 3)). A
percentile with fewer than 10 samples beyond it is marked "not shown"."""

STATISTICS_NOTES = """\
Method. Every strategy runs in each round, in a new shuffled order each round, so load that
drifts on a shared machine falls on all of them alike. Per-round figures (reads/s, hit rate,
owner req/s, hit latency) are the median of the rounds, the range beside them. Window
percentiles pool every round's probe updates; the 95% interval is a percentile bootstrap (400
resamples) that resamples probe updates whole, so the 4 instances that saw the same commit are
not counted as independent evidence. Percentiles are nearest-rank everywhere
(`benchmarks/stats.py`). A percentile with fewer than 10 windows beyond it says "not shown"
(a p99.9 needs 10,000 windows: the full run). Verdicts are symmetric: overlapping intervals are
a TIE whichever side is ahead; a claim the sample cannot support is "not shown", never PASS."""

DIAGNOSTICS_NOTES = """\
*announce*: from the owner's commit until its announcement was sent (`Publisher.changed`
returned, or the Redis write did). *applied*: from the commit until the instance applied the
event on the probe key (dropped or replaced its entry; peers: their invalidation handler ran).
*window*: as above, so *window - applied* is the time until the probe's next read.
*windows*: how many (update, instance) pairs were measured; with fewer than 100, p99 is the
largest one. *probe gap*: median time between two probe reads in the slowest instance (the
window's resolution; a blocking client or a saturated instance widens it). *problems*: read
errors, a probe that saw a version go back, the oldest stale read, and the cachesync
listener's gap, source-change, missed-heartbeat, reconnect and bad-event counts."""

SERVER_VERSIONS = """\
- cachesync `redis://`: Redis pub/sub, any server redis-py supports. Runs here.
- cachesync `redis+stream://`: streams (Redis >= 5.0); losses to trimming are detected from
  `XINFO STREAM`'s `entries-added`, Redis >= 7.0. Runs here.
- cachesync `amqp://`: RabbitMQ with fanout exchanges. Runs here.
- redis-py client-side caching (redis-py 8.x): Redis >= 7.4, enforced by
  `CacheProxyConnection.MIN_ALLOWED_VERSION`, although what it uses (RESP3, `CLIENT TRACKING`)
  exists since Redis 6.0. Refused as documented on this machine's Redis; the `-fixed` run
  lowers the gate. On Redis >= 7.4 the documented form runs unchanged.
- cashews `client_side=true`: Redis >= 6.0 (`CLIENT TRACKING … BCAST`); with redis-py >= 5
  (RESP3 by default) its invalidations arrive only over RESP2: as documented it runs but never
  invalidates on any server version; the `-fixed` run adds `protocol=2`."""

STRATEGY_NOTES = """\
- **no cache**: every read is `GET /items/{key}` on the owner (httpx).
- **TTL only**: a cachetools `TTLCache(maxsize=20000, ttl=…)` in front of the same request.
  cachetools' decorators do not support coroutines, so the cache is used directly (check, else
  fetch and store), the usual way in async code. It starts in its steady state: each entry gets
  an age drawn uniformly from [0, TTL), so expiries happen at their steady rate from the first
  second even in a run shorter than the TTL.
- **cachesync**: `@sync.cached("items", ttl=3600, maxsize=20000, mode=…, version_of=…)` over
  `HttpFetcher(owner, "/items/{key}")`, warmed with `HttpFetcher.warm` from `GET /items`;
  the owner publishes with `Publisher.changed(…, version=…)` (and `value=` in refresh mode) on
  the strategy's transport. The reader waits for the publisher's first heartbeat before it
  warms: the first event of a publisher a client has not heard flushes every namespace that
  holds entries, so a warm-up done before it is thrown away (a finding, reported to the lead).
- **redis-py client-side caching**: the owner also writes each item to Redis (`SET`); readers
  `GET` through `redis.Redis(protocol=3, cache_config=CacheConfig(max_size=20000))`, hiredis
  parsing. redis-py 8 has client-side caching on the sync client only (nothing on
  `redis.asyncio`), so each reader drives it as a threaded sync service would: each read in
  flight runs on a thread of its own (32 threads per reader sharing the client, as request
  threads would) and the event loop never blocks on it; the hit latency measured around the
  call includes that thread hop.
- **cashews client-side**: the owner writes each item through cashews; readers use
  `cache.setup("redis://…?client_side=true", local_cache=Memory(size=20000))` and
  `await cache.get(key)`, with cashews' `speedup` extra installed (hiredis, xxhash, bitarray).
- Every cache holds the whole data set (20,000 entries); before the updates start each reader
  loads the items it will read (cachesync: all of them, through `warm`), so every strategy is
  measured warm."""


LATENCY_NOTES = """\
Each transport is measured with consumers each in a process of its own, in turns (raw, ours,
raw, ours, ...): **raw** is the broker's client alone, noting each message and nothing
more (redis-py `PubSub.listen()`; an `XREAD COUNT 500 BLOCK 1000` loop on redis-py, RESP2;
aiormq `basic_consume(no_ack=True)`, the client our AMQP transport uses, on an exclusive
queue bound to the fanout exchange; redis-py parses with hiredis);
**hand-rolled** (apply rate only) is the same raw client doing what a hand-rolled invalidator
would with each message: `json.loads` it and pop its key from a dict of 10,000 entries;
**ours** is `CacheSync` on a namespace of 10,000 entries, a message counting once
`handle_message` has returned (every event invalidates an entry with a newer version: real
work). The *baseline* column is the raw client's figure, except in the apply-rate row against
hand-rolled. *Latency*: a third process runs cachesync's `Publisher` (one per consumer's
channel, so both consumers get the same payloads, heartbeats included) and sends upserts at
200 and 1,000 events/s carrying their send time (`time.monotonic_ns()`, CLOCK_MONOTONIC: one
clock for every process) as `version`; one-way latency is the consumer's time minus that. p99
over a few hundred events (the short run) is close to the largest one: `--full` measures 10x
more. *Apply rate*: the consumer's event loop is held while another process floods its channel
(pipelined PUBLISH/XADD, aio-pika without confirms; AMQP floods are smaller, its clients drain
slower), then released; the rate is messages over the time to drain them; best round of each
side. *CPU us/event* is the consumer process's CPU time per message over the same drain (median
and range of the rounds): on a shared machine it moves far less than the wall-clock rate, which
waits whenever another process has the CPU; no verdict rests on it."""


def invalidate_vs_refresh(results: list[StrategyResult]) -> str:
    """What the two cachesync modes over the same transport show, in numbers."""
    runs = {r.name: r for r in results if r.status == "ok"}
    out = []
    for scheme in ("redis", "redis+stream", "amqp"):
        inv = runs.get(f"cachesync-invalidate-{scheme}")
        ref = runs.get(f"cachesync-refresh-{scheme}")
        if inv is None or ref is None or not inv.delivery.n or not ref.delivery.n:
            continue
        out.append(
            f"- {scheme}://: invalidate makes the instances ask the owner "
            f"{inv.owner_rps:,.0f} times/s (refresh: {ref.owner_rps:,.0f}); event applied "
            f"p99 {inv.delivery.fmt('p99')} vs {ref.delivery.fmt('p99')} ms, window p99 "
            f"{inv.window.fmt('p99')} vs {ref.window.fmt('p99')} ms."
        )
    if not out:
        return ""
    return (
        "Invalidate vs refresh over the same transport. In invalidate mode every change makes "
        "each instance that holds the key fetch it again over HTTP, at the same moment; in "
        "refresh mode the event carries the value. On a small machine that CPU burst (HTTP "
        "client in each instance, FastAPI owner) delays the delivery of the events that follow, "
        "which is what the *applied* columns show:\n\n" + "\n".join(out)
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def peer_notes(results: list[StrategyResult], redis_server: str = "?") -> str:
    """What the as-documented peers did here, and the smallest fix that made them work."""
    by_name = {r.name: r for r in results}
    redis_py, cashews_version = _version("redis"), _version("cashews")
    out = []
    documented = by_name.get("redis-py-csc-documented")
    if documented is not None and documented.status == "ok":
        out.append(
            "- **redis-py client-side caching** ran as documented here "
            f"(redis-py {redis_py}, Redis {redis_server}); the `-fixed` run changes nothing."
        )
    elif documented is not None:
        out.append(
            f"- **redis-py client-side caching** (redis-py {redis_py}, Redis {redis_server}): "
            "as documented, `redis.Redis(protocol=3, cache_config=CacheConfig())` does not "
            f"start: {documented.reason}. redis-py 8 refuses any server older than 7.4 "
            "(`redis.connection.CacheProxyConnection.MIN_ALLOWED_VERSION`), although the server "
            "side it uses (RESP3, `CLIENT TRACKING`) exists since Redis 6.0. Smallest fix (the "
            "`-fixed` run): `CacheProxyConnection.MIN_ALLOWED_VERSION = '6.0.0'` before "
            "connecting. Also by design: sync client only; an invalidation is read only when "
            "the connection sends its next command; each hit deep-copies the cached reply and "
            "the application parses it again."
        )
    cashews = by_name.get("cashews-documented")
    if cashews is not None and cashews.status == "ok" and cashews.events_per_s:
        out.append(
            "- **cashews client_side** applied invalidations as documented here "
            f"(cashews {cashews_version}, redis-py {redis_py}); the `-fixed` run adds "
            "`protocol=2`, which changes nothing then."
        )
    elif cashews is not None:
        if cashews.status == "ok":
            seen = (
                "it runs, but applied no invalidation, and "
                f"{cashews.stale_reads:,} of {cashews.reads:,} reads were stale"
            )
        else:
            seen = f"{cashews.status}: {cashews.reason}"
        out.append(
            f"- **cashews client_side** (cashews {cashews_version}, redis-py {redis_py}): "
            f"as documented, `cache.setup('redis://…?client_side=true')`: {seen}. redis-py 8 "
            "speaks RESP3 by default, so Redis sends the BCAST/REDIRECT invalidations to "
            "cashews' PubSub connection as RESP3 `invalidate` push frames; redis-py hands those "
            "to an invalidation handler that a PubSub never sets, and drops them. cashews "
            "listens for `message`s on `__redis__:invalidate`, which only RESP2 delivers, so "
            "nothing is ever invalidated, and its local entries have no TTL: a changed key "
            "stays stale until the process restarts. Smallest fix (the `-fixed` run): "
            "`&protocol=2` in the setup URL."
        )
    return "\n".join(out) or "(none ran)"


def write_outputs(run: Run, out_dir: Path, with_plots: bool, progress: Progress) -> None:
    """Print the tables, write RESULTS.md, results.json and the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = _order(run.strategies)
    if run.micro:
        print("\nMicro benchmarks\n")
        print(micro_table(run.micro))
    if results:
        print("\nStrategy comparison\n")
        print(strategy_table(results))
        if not_run(results):
            print("\n" + not_run(results))
        print("\nStaleness with zero grace\n")
        print(zero_grace_table(results))
        print("\nWhere the window goes (ms)\n")
        print(diagnostics_table(results))
        targets = strategy_targets(results)
        if targets:
            print("\nTargets\n")
            print(targets_table(targets))
    if run.latency:
        print("\nTransport latency and apply rate, ours vs the raw client\n")
        print(latency_table(run.latency))
        print("\nLatency distributions (ms)\n")
        print(latency_detail_table(run.latency))
        print("\nApply rate\n")
        print(apply_rate_table(run.latency))
    if with_plots:
        try:
            plots.micro_ratios(run.micro, out_dir / "micro_ratios.png")
            plots.hit_rate_vs_staleness(results, out_dir / "hit_rate_vs_staleness.png")
            plots.staleness_cdf(results, out_dir / "staleness_cdf.png")
            latency.plot(run.latency, out_dir / "transport_latency.png")
        except ImportError:
            run.warnings.append("matplotlib is not installed: no plots (pip install matplotlib)")
    (out_dir / "RESULTS.md").write_text(render(run))
    (out_dir / "results.json").write_text(json.dumps(_as_json(run), indent=1, default=str))
    shown = os.path.relpath(out_dir / "RESULTS.md")
    print(f"\nWrote {shown} and the plots beside it.")
    progress.say(f"done in {time.monotonic() - run.started:.0f} s")


def _as_json(run: Run) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    cleaned: dict[str, Any] = clean(
        {
            "command": run.command,
            "full": run.full,
            "interrupted": run.interrupted,
            "settings": dataclasses.asdict(run.settings),
            "machine": run.machine,
            "micro": [dataclasses.asdict(m) | {"ratio": m.ratio} for m in run.micro],
            "strategies": [
                {k: v for k, v in dataclasses.asdict(s).items() if k != "samples"}
                for s in _order(run.strategies)
            ],
            "latency": [
                dataclasses.asdict(t) | {"checks": [dataclasses.asdict(c) for c in t.checks()]}
                for t in run.latency
            ],
        }
    )
    return cleaned


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; 0 when done, 130 when interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list:
        for s in select(["*"]):
            print(f"{s.name:34} {s.label}")
        return 0
    settings = build_settings(args)
    run = Run(" ".join(["python -m benchmarks", *argv]), args.full, settings)
    progress = Progress(args.quiet)
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    patterns = (
        [p.strip() for p in args.strategies.split(",") if p.strip()]
        if args.strategies
        else (["*"] if args.full else list(SHORT_DEFAULT))
    )
    try:
        select(patterns)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    svcs = env.services(settings.redis_url, settings.amqp_url)
    up = {name: env.reachable(svc) for name, svc in svcs.items()}
    if args.only != "micro":
        for name, ok in up.items():
            if not ok:
                message = env.down_message(svcs[name], "the strategies that need it")
                print(message, file=sys.stderr)
                run.warnings.append(message)
    run.machine = env.machine(settings.redis_url, settings.amqp_url, up)
    try:
        if args.only in ("all", "micro"):
            run_micro(run, progress)
        if args.only in ("all", "strategies"):
            strategies = plan(run, patterns, up)
            for skipped in run.strategies:
                progress.say(f"skipping {skipped.name}: {skipped.reason}")
            budget = None if args.full or args.no_budget else SHORT_BUDGET
            if budget is not None and args.only == "all":
                budget -= latency.SHORT.estimate()  # the latency benchmark comes after
            run_strategies(run, strategies, progress, budget)
        if args.only in ("all", "latency"):
            run_latency(run, progress, up)
    except KeyboardInterrupt:
        run.interrupted = True
        print(
            "\nInterrupted: every process started was stopped; writing partial results.",
            file=sys.stderr,
        )
    load = os.getloadavg()
    run.machine["load average at end (1/5/15 min)"] = (
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )
    run.machine["Python speed at end"] = env.speed_index()
    write_outputs(run, out_dir, not args.no_plots, progress)
    return 130 if run.interrupted else 0
