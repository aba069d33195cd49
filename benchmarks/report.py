"""Tables for the console and ``RESULTS.md``: the same Markdown tables in both places."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .common import table

if TYPE_CHECKING:  # types only: no module of benchmarks/ is imported at run time
    from .analysis import StrategyResult
    from .latency import TransportResult
    from .micro import MicroResult
    from .strategies import Settings

__all__ = ["table"]


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def micro_table(results: Sequence[MicroResult]) -> str:
    """The micro benchmarks with their ratios and verdicts."""
    rows = []
    for r in results:
        ratio = r.ratio
        rows.append(
            [
                r.name,
                f"{r.ours:,.0f} {r.unit}",
                "-" if r.baseline is None else f"{r.baseline:,.0f} {r.unit}",
                "-" if ratio is None else f"{ratio:.2f}x",
                r.target or "-",
                r.verdict,
                r.detail,
            ]
        )
    return table(["benchmark", "ours", "baseline", "ratio", "target", "result", "detail"], rows)


def latency_table(results: Sequence[TransportResult]) -> str:
    """The transport targets (latency vs the raw client, apply rate) with their verdicts."""
    rows = []
    for r in results:
        for c in r.checks():
            target = c.target if r.status == "ok" else f"{r.status}: {r.reason}"
            rows.append([c.transport, target, c.raw, c.ours, c.limit, c.verdict])
    return table(["transport", "target", "raw", "ours", "limit", "result"], rows)


def latency_detail_table(results: Sequence[TransportResult]) -> str:
    """Every latency distribution measured, raw and ours side by side at each rate."""
    rows = []
    for r in results:
        for rate in sorted(r.latency.get("raw", {})):
            for side in ("raw", "ours"):
                lat = r.at(side, rate)
                rows.append(
                    [
                        f"{r.scheme}://",
                        f"{rate:,.0f}/s",
                        side,
                        f"{len(lat.samples_ms):,}",
                        str(lat.lost),
                        _num(lat.achieved),
                        *(_num(lat.pct(q), "{:.3f}") for q in (50, 90, 99)),
                        _num(max(lat.samples_ms, default=math.nan), "{:.3f}"),
                    ]
                )
    headers = ["transport", "rate", "side", "events", "lost", "sent/s", "p50", "p90", "p99"]
    return table([*headers, "max (ms)"], rows)


def apply_rate_table(results: Sequence[TransportResult]) -> str:
    """The drain rate of each round, raw and ours, and what ours did meanwhile."""
    rows = []
    for r in results:
        for side in ("raw", "ours"):
            rates = r.drain.get(side)
            if not rates:
                continue
            rows.append(
                [
                    f"{r.scheme}://",
                    side,
                    ", ".join(f"{x:,.0f}" for x in rates),
                    f"{max(rates):,.0f}",
                    r.notes.get(side, "-"),
                ]
            )
    return table(["transport", "side", "events/s per round", "best", "ours applied"], rows)


def nines(result: StrategyResult) -> str:
    """Stale reads as ``count (nines)``: ``0 (∞)``, ``12 (3.6)``."""
    n = result.nines
    if math.isnan(n):
        return "-"
    shown = "∞" if math.isinf(n) else f"{n:.1f}"
    return f"{result.stale_reads:,} ({shown})"


def strategy_table(results: Sequence[StrategyResult]) -> str:
    """One row per strategy run (failed and skipped ones say why)."""
    headers = [
        "strategy",
        "reads/s/inst",
        "hit rate",
        "owner req/s",
        "misses/s",
        "window p50",
        "p99",
        "p99.9",
        "max (ms)",
        "in hand p99",
        "stale reads (nines)",
        "hit p50 µs",
        "hit p99 µs",
        "events/s/inst",
    ]
    rows = []
    for r in results:
        if r.status != "ok":
            rows.append([r.name, f"{r.status} (see below)"] + [""] * (len(headers) - 2))
            continue
        rows.append(
            [
                r.name,
                _num(r.reads_per_s),
                _num(r.hit_rate * 100, "{:.2f}%"),
                _num(r.owner_rps, "{:,.1f}"),
                _num(r.misses_per_s, "{:,.1f}"),
                r.window.fmt("p50"),
                r.window.fmt("p99"),
                r.window.fmt("p99.9"),
                r.window.fmt("max"),
                r.in_hand.fmt("p99"),
                nines(r),
                _num(r.hit_p50_us, "{:.1f}"),
                _num(r.hit_p99_us, "{:.1f}"),
                _num(r.events_per_s, "{:.1f}"),
            ]
        )
    return table(headers, rows)


def diagnostics_table(results: Sequence[StrategyResult]) -> str:
    """Where the staleness window goes: the owner's announcement, the delivery to the
    instance, and the probe's polling; plus anything that went wrong."""
    headers = [
        "strategy",
        "announce p50/p99",
        "applied p50/p99/max",
        "window p50/p99",
        "windows",
        "probe gap",
        "problems",
    ]
    rows = []
    for r in results:
        if r.status != "ok":
            continue
        problems = []
        if r.read_errors:
            problems.append(f"{r.read_errors} read errors")
        if r.probe_regressions:
            problems.append(f"{r.probe_regressions} probe regressions")
        if r.stale_reads:
            problems.append(f"oldest stale read {r.stale_age_max_ms:.1f} ms behind")
        listener = r.extra.get("listener", {})
        for name in ("gaps", "source_changes", "heartbeat_misses", "reconnects", "bad_events"):
            if listener.get(name):
                problems.append(f"{name}={listener[name]}")
        rows.append(
            [
                r.name,
                f"{r.announce.fmt('p50')} / {r.announce.fmt('p99')}" if r.announce.n else "-",
                f"{r.delivery.fmt('p50')} / {r.delivery.fmt('p99')} / {r.delivery.fmt('max')}"
                if r.delivery.n
                else "-",
                f"{r.window.fmt('p50')} / {r.window.fmt('p99')}" if r.window.n else "-",
                f"{r.window.n} ({r.window.censored} censored)" if r.window.n else "-",
                _num(r.probe_gap_ms, "{:.2f}"),
                ", ".join(problems) or "-",
            ]
        )
    return table(headers, rows)


def not_run(results: Sequence[StrategyResult]) -> str:
    """Why each strategy that did not run did not, and any note on one that did."""
    lines = [f"- `{r.name}` {r.status}: {r.reason}" for r in results if r.status != "ok"]
    lines += [f"- `{r.name}`: {note}" for r in results for note in r.notes]
    return "\n".join(lines)


@dataclass
class Target:
    """One target of the strategy comparison and its verdict."""

    name: str
    verdict: str  # PASS | FAIL | TIE | n/a
    detail: str


def _by_name(results: Sequence[StrategyResult]) -> dict[str, StrategyResult]:
    return {r.name: r for r in results if r.status == "ok"}


def strategy_targets(results: Sequence[StrategyResult]) -> list[Target]:
    """Check the comparison's targets against what ran."""
    runs = _by_name(results)
    out: list[Target] = []
    ttl60, ttl1 = runs.get("ttl-60s"), runs.get("ttl-1s")
    invalidate = [r for name, r in runs.items() if name.startswith("cachesync-invalidate-")]
    for r in invalidate:
        name = f"{r.name}: hit rate >= ttl-60s's and p99 window <= 1/100 of ttl-1s's"
        if ttl60 is None or ttl1 is None:
            out.append(Target(name, "n/a", "ttl-60s and ttl-1s must both run"))
            continue
        limit = ttl1.window.values.get("p99", math.nan) / 100
        p99 = r.window.values.get("p99", math.nan)
        ok = r.hit_rate >= ttl60.hit_rate and p99 <= limit
        out.append(
            Target(
                name,
                "PASS" if ok else "FAIL",
                f"hit {r.hit_rate:.2%} vs {ttl60.hit_rate:.2%}; "
                f"p99 {p99:.2f} ms vs limit {limit:.2f} ms "
                f"({'≥' if ttl1.window.lower_bound.get('p99') else ''}"
                f"{ttl1.window.values.get('p99', math.nan):.0f} ms / 100)",
            )
        )
    redis_runs = [
        r for name, r in runs.items() if name.startswith("cachesync-") and "-redis" in name
    ]
    if not redis_runs:
        out.append(
            Target(
                "cachesync stale-read rate over loopback Redis >= 6 nines",
                "n/a",
                "no cachesync run over redis:// or redis+stream:// (see skipped runs)",
            )
        )
    for r in redis_runs:
        ok = r.stale_reads == 0 or r.stale_rate <= 1e-6
        out.append(
            Target(
                f"{r.name}: stale-read rate >= 6 nines",
                "PASS" if ok else "FAIL",
                f"{r.stale_reads} stale of {r.reads:,} reads"
                + (f" (a sample this size can show at most {math.log10(r.reads):.1f} nines)")
                * (r.stale_reads == 0),
            )
        )
    peers = [runs[n] for n in ("redis-py-csc-fixed", "cashews-fixed") if n in runs]
    cachesync_runs = [r for name, r in runs.items() if name.startswith("cachesync-")]
    for mine in cachesync_runs:
        for peer in peers:
            faster = mine.hit_p50_us < peer.hit_p50_us
            mine_p99 = mine.window.values.get("p99", math.nan)
            peer_p99 = peer.window.values.get("p99", math.nan)
            # Windows closer than the probe's polling gap cannot be told apart.
            resolution = max(mine.probe_gap_ms, peer.probe_gap_ms)
            verdict = "PASS" if faster and mine_p99 <= peer_p99 else "FAIL"
            detail = (
                f"hit p50 {mine.hit_p50_us:.1f} vs {peer.hit_p50_us:.1f} µs; "
                f"p99 window {mine_p99:.2f} vs {peer_p99:.2f} ms"
            )
            if verdict == "FAIL" and faster and mine_p99 - peer_p99 <= resolution:
                verdict = "TIE"
                detail += f" (within the probe's resolution, {resolution:.1f} ms)"
            out.append(
                Target(
                    f"{mine.name} ahead of {peer.name} (hit latency and staleness)", verdict, detail
                )
            )
    return out


def targets_table(targets: Sequence[Target]) -> str:
    """The verdicts as a table."""
    return table(["target", "result", "measured"], [[t.name, t.verdict, t.detail] for t in targets])


def settings_text(settings: Settings, strategies: int) -> str:
    """The workload in one paragraph."""
    s = settings
    return (
        f"{s.readers} reader processes x {s.rate:,.0f} reads/s offered (open loop, at most "
        f"{s.max_in_flight} in flight each) over {s.n_keys:,} keys drawn from Zipf({s.zipf_s:g}); "
        f"the owner updates {s.update_rate:g} keys/s ({s.update_dist}, Poisson arrivals) and the "
        f"probe key {s.probe_rate:g} times/s; every reader polls the probe key every "
        f"{s.probe_interval * 1000:g} ms. Each of the {strategies} runs: prefill, "
        f"{s.warmup:g} s warm-up, {s.duration:g} s measured."
    )


def machine_table(machine: dict[str, Any]) -> str:
    """The machine description as a two-column table."""
    return table(["", ""], [[k, str(v)] for k, v in machine.items()])
