"""Smoke tests of the benchmarks: the code runs and its pieces agree. Nothing here is timed.

Speed targets live in ``python -m benchmarks``, never in tests.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from benchmarks import micro
from benchmarks.analysis import StrategyResult, percentiles, probe_windows, stale_reads
from benchmarks.inprocess import run_in_process
from benchmarks.report import micro_table, strategy_table, strategy_targets
from benchmarks.runner import Run, build_settings, parse_args, render
from benchmarks.strategies import Settings, select
from benchmarks.workload import Schedule, ZipfKeys

TINY = Settings(
    n_keys=200,
    readers=2,
    rate=300.0,
    max_in_flight=8,
    update_rate=20.0,
    probe_rate=10.0,
    warmup=0.2,
    duration=1.5,
)


@pytest.mark.timeout(60)
async def test_micro_benchmarks_run() -> None:
    results = await micro.run_all(micro.TINY)
    units = ["ns/call", "ns/call", "ns/call", "events/s", "events/s", "bytes", "us", "us"]
    assert [r.unit for r in results] == units
    for r in results:
        assert r.ours > 0 and math.isfinite(r.ours)
        assert r.verdict in ("PASS", "FAIL", "-")
    assert "async hit" in micro_table(results)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["cachesync-invalidate-redis", "cachesync-refresh-redis"])
async def test_cachesync_strategy_in_process(name: str) -> None:
    (strategy,) = select([name])  # runs over memory:// in process, whatever its scheme
    result = await run_in_process(strategy, TINY)
    assert result.status == "ok"
    assert result.reads > 0 and result.read_errors == 0
    assert 0.0 <= result.hit_rate <= 1.0
    assert result.window.n > 0
    assert result.events_per_s is not None and result.events_per_s > 0
    assert result.probe_regressions == 0
    assert result.extra["listener"]["gaps"] == 0


@pytest.mark.timeout(60)
async def test_ttl_strategy_in_process() -> None:
    (strategy,) = select(["ttl-1s"])
    result = await run_in_process(strategy, TINY)
    assert result.status == "ok" and result.reads > 0
    assert result.window.n > 0


def test_zipf_prefers_low_indexes() -> None:
    keys = ZipfKeys(1000, 1.1).sample(np.random.default_rng(1), 20_000)
    assert keys.min() >= 0 and keys.max() < 1000
    assert (keys == 0).sum() > (keys == 10).sum() > (keys == 500).sum()


def test_stale_reads_against_the_update_log() -> None:
    ms = 1_000_000
    # key 3 became version 2 at t=100 ms and version 3 at t=200 ms
    log_key = np.array([3, 3])
    log_version = np.array([2, 3])
    log_ts = np.array([100 * ms, 200 * ms])
    reads_t0 = np.array([50, 105, 150, 150, 250, 205]) * ms
    reads_key = np.array([3, 3, 3, 3, 3, 3], dtype=np.int32)
    reads_version = np.array([1, 1, 1, 2, 2, 2], dtype=np.int32)
    stale, age = stale_reads(reads_key, reads_version, reads_t0, log_key, log_version, log_ts)
    # v1 at 50 ms: current. v1 at 105 ms: within the 10 ms tolerance. v1 at 150 ms: stale,
    # 50 ms old. v2 at 150: current. v2 at 250 ms: stale. v2 at 205 ms: within tolerance.
    assert stale.tolist() == [False, False, True, False, True, False]
    assert age[2] == 50 * ms and age[4] == 50 * ms


def test_probe_windows_and_censoring() -> None:
    ms = 1_000_000
    schedule = Schedule(start=0, measure=0, end=3000 * ms)
    versions = np.array([2, 3, 4])
    commits = np.array([100, 500, 1900]) * ms
    seen_at = np.array([0, 103, 900]) * ms  # saw v1, then v2, then v3; never v4
    seen_version = np.array([1, 2, 3])
    windows, censored = probe_windows(versions, commits, seen_at, seen_version, schedule)
    assert (windows // ms).tolist() == [3, 400, 1100]
    assert censored.tolist() == [False, False, True]
    p = percentiles(windows / 1e6, censored)
    assert p.lower_bound["max"] and not p.lower_bound["p50"]


def test_report_renders_without_absolute_paths() -> None:
    ok = StrategyResult("cachesync-invalidate-redis", "cachesync", "cachesync", reads=10)
    ok.hit_rate, ok.stale_rate = 0.99, 0.0
    skipped = StrategyResult("cashews-fixed", "cashews", "cashews", "skipped", "redis is down")
    settings = build_settings(parse_args(["--duration", "3"]))
    assert settings.duration == 3 and dataclasses.replace(settings, duration=5) != settings
    run = Run("python -m benchmarks --duration 3", False, settings, strategies=[ok, skipped])
    text = render(run)
    assert "| cachesync-invalidate-redis" in text and "skipped: redis is down" in text
    assert "/work/" not in text and "/tmp/" not in text
    assert strategy_table([ok, skipped]).count("\n") == 3
    assert all(t.verdict in ("PASS", "FAIL", "TIE", "not shown") for t in strategy_targets([ok]))


# -- the transport latency benchmark (benchmarks/latency.py) ------------------------------------


def test_latency_checks_and_tables() -> None:
    from benchmarks import latency
    from benchmarks.report import apply_rate_table, latency_detail_table, latency_table

    ok = latency.TransportResult("redis")
    for side, shift in (("raw", 0.0), ("ours", 0.1)):
        lat = ok.at(side, 200.0)
        lat.samples_ms += [0.5 + shift + (i % 100) / 1000 for i in range(2000)]
        lat.sent, lat.seconds = 2001, 0.5
        few = ok.at(side, 1000.0)  # 100 events: a p99 rests on one of them
        few.samples_ms += [0.5 + shift + i / 100 for i in range(100)]
        few.sent, few.seconds = 100, 0.1
    ok.drain = {"raw": [40_000.0, 50_000.0], "hand-rolled": [45_000.0], "ours": [39_000.0]}
    ok.cpu = {"raw": [20.0, 18.0, 30.0], "ours": [24.5]}
    skipped = latency.TransportResult("amqp", "skipped", "rabbitmq is down")
    checks = ok.checks()
    # p50 and p99 at 200/s, then at 1,000/s (p99 not shown: too few events), then 0.78x of
    # raw and 0.87x of hand-rolled
    assert [c.verdict for c in checks][:2] == ["PASS", "PASS"]
    assert checks[3].verdict == "not shown" and checks[-2].verdict == "FAIL"
    assert "hand-rolled" in checks[-1].target and checks[-1].verdict == "PASS"
    assert ok.at("ours", 200.0).lost == 1 and latency.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert skipped.checks()[0].verdict == "n/a"
    text = latency_table([ok, skipped])
    assert "rabbitmq is down" in text and "0.78x" in text and "0.87x" in text
    assert latency_detail_table([ok]).count("\n") == 5
    rates = apply_rate_table([ok])
    assert "39,000" in rates and "45,000" in rates
    assert "20.0 (18.0–30.0)" in rates and "24.5" in rates
    run = Run("python -m benchmarks --only latency", False, Settings(), latency=[ok, skipped])
    assert "## Transport latency" in render(run)


def test_latency_recorder_reads_the_send_time() -> None:
    from benchmarks.latency import Recorder
    from cachesync import ChangeEvent, Op

    recorder = Recorder()
    sent = 1_000
    upsert = ChangeEvent(
        source="s", seq=1, ns="items", op=Op.UPSERT, keys=("k",), version=sent, ts=1.0
    )
    recorder.hit(upsert.encode())
    recorder.hit(ChangeEvent(source="s", seq=1, op=Op.HEARTBEAT, ts=1.0).encode())
    received = recorder.times[0]
    assert recorder.count_versioned() == 1
    # The heartbeat carries no send time, so only the upsert gives a latency.
    assert recorder.take_latencies() == [received - sent]
    assert recorder.take_latencies() == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["redis", "redis+stream", "amqp"])
def test_latency_benchmark_runs(scheme: str) -> None:
    from benchmarks import latency

    from .conftest import AMQP_URL, REDIS_URL, require_server

    require_server("rabbitmq" if scheme == "amqp" else "redis")
    up = {"redis": True, "rabbitmq": True}
    (result,) = latency.run_all(latency.TINY, REDIS_URL, AMQP_URL, up, (scheme,))
    assert result.status == "ok", result.reason
    for side in latency.SIDES:
        assert len(result.at(side, 1000.0).samples_ms) == 20
    for side in latency.DRAIN_SIDES:
        assert result.drain[side][0] > 0 and result.cpu[side][0] > 0
    assert "300 invalidations" in result.notes["ours"]
    assert all(c.verdict in ("PASS", "FAIL", "not shown") for c in result.checks())


@pytest.mark.timeout(60)
async def test_stream_cost_benchmark_runs() -> None:
    from benchmarks import stream_cost

    from .conftest import REDIS_URL, require_server

    require_server("redis")
    rounds = await stream_cost.run(REDIS_URL, events=300, rounds=1)
    assert set(rounds[0]) == set(stream_cost.STEPS)
    assert all(cpu > 0 for cpu in rounds[0].values())
    text = stream_cost.report(rounds, "python -m benchmarks.stream_cost", 300)
    assert "| ours " in text and "the target is 0.80x" in text


@pytest.mark.timeout(60)
async def test_replay_cost_benchmark_runs() -> None:
    from benchmarks import replay_cost

    from .conftest import require_server

    require_server("redis")
    results = await replay_cost.run(["redis+stream"], messages=200, rounds=1)
    assert len(results["redis+stream"]) == 1 and results["redis+stream"][0] > 0


async def test_batch_benchmark_runs() -> None:
    from benchmarks import batch

    results = await batch.run(0.0, 2)
    assert results["batch (1 call) owner calls"] == 1.0
    assert results["100 singles, sequential owner calls"] == 10.0


def _benchmark_imports() -> dict[str, set[str]]:
    """Module -> the benchmarks modules it imports at run time (anywhere in the file; imports
    under ``if TYPE_CHECKING:`` left out)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    names = {p.stem for p in root.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        skip: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.ImportFrom):
                continue
            module = node.module or ""
            if node.level == 1 and not module:
                found |= {a.name for a in node.names if a.name in names}
            elif node.level == 1 or module.startswith("benchmarks."):
                found.add(module.removeprefix("benchmarks.").split(".")[0])
            elif module == "benchmarks":
                found |= {a.name for a in node.names if a.name in names}
        graph[path.stem] = found - {path.stem}
    return graph


def test_no_import_cycle_in_benchmarks() -> None:
    graph = _benchmark_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert graph["common"] == set() and graph["stats"] == set()


def test_one_percentile_rule_nearest_rank() -> None:
    from benchmarks.stats import percentile

    samples = [float(v) for v in range(1, 11)]  # 1..10
    assert percentile(samples, 50) == 5.0  # ceil(0.5 * 10) = 5th smallest
    assert percentile(samples, 99) == 10.0
    assert percentile(samples, 0) == 1.0 and percentile(samples, 100) == 10.0
    assert percentile(np.array(samples), 95) == 10.0
    assert math.isnan(percentile([], 50))


def test_verdicts_are_symmetric_and_say_not_shown() -> None:
    from benchmarks.stats import (
        FAIL,
        NOT_SHOWN,
        PASS,
        TIE,
        against_limit,
        bootstrap,
        compare,
        nines_verdict,
    )

    assert compare((1.0, 2.0), (1.5, 3.0)) == TIE == compare((1.5, 3.0), (1.0, 2.0))
    assert compare((1.0, 2.0), (3.0, 4.0)) == "ahead"
    assert compare((3.0, 4.0), (1.0, 2.0)) == "behind"
    # 500 samples cannot show a p99.9; 20,000 can
    assert against_limit((1.0, 2.0), (5.0, 5.0), 500, 99.9) == NOT_SHOWN
    assert against_limit((1.0, 2.0), (5.0, 5.0), 20_000, 99.9) == PASS
    assert against_limit((1.0, 6.0), (5.0, 5.0), 20_000, 99.9) == NOT_SHOWN
    assert against_limit((6.0, 7.0), (5.0, 5.0), 20_000, 99.9) == FAIL
    # 32,000 reads without a stale one cannot show 6 nines (the old PASS); 10 stale can FAIL it
    assert nines_verdict(0, 32_000, 6) == NOT_SHOWN
    assert nines_verdict(0, 5_000_000, 6) == PASS
    assert nines_verdict(10, 32_000, 6) == FAIL
    rng = np.random.default_rng(3)
    clusters = [rng.exponential(1.0, 4) for _ in range(300)]
    low, high = bootstrap(clusters, [50.0], reps=100)[50.0]
    assert low <= high and 0.4 < low < high < 1.2


def test_ideal_hits_follow_the_trace() -> None:
    from benchmarks.analysis import ideal_hits

    ms = 1_000_000
    # key 1 read at 0, 10, 30 ms, changed at 20 ms; key 2 read at 5 and 40 ms; a flush at 35 ms
    keys = np.array([1, 2, 1, 1, 2], dtype=np.int32)
    t0 = np.array([0, 5, 10, 30, 40], dtype=np.int64) * ms
    log_key, log_ts = np.array([1], dtype=np.int64), np.array([20 * ms], dtype=np.int64)
    assert ideal_hits(keys, t0, log_key, log_ts).tolist() == [False, False, True, False, True]
    flushed = ideal_hits(keys, t0, log_key, log_ts, flush_ns=35 * ms)
    assert flushed.tolist() == [False, False, True, False, False]
