"""Tables for the console and ``RESULTS.md``: the same Markdown tables in both places."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .analysis import QUANTILES, fmt_ms
from .common import table
from .stats import (
    FAIL,
    NOT_SHOWN,
    PASS,
    TIE,
    against_limit,
    compare,
    median_spread,
    nines_verdict,
    rate_bounds,
    shown,
)

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
    # "baseline": the raw client for every target but the hand-rolled apply rate's.
    return table(["transport", "target", "baseline", "ours", "limit", "result"], rows)


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
    """The drain rate of each round, raw, hand-rolled and ours, the consumer's CPU time per
    event (median and range over the rounds), and what ours did meanwhile."""
    rows = []
    for r in results:
        for side in ("raw", "hand-rolled", "ours"):
            rates = r.drain.get(side)
            if not rates:
                continue
            cpu = r.cpu.get(side) or []
            rows.append(
                [
                    f"{r.scheme}://",
                    side,
                    ", ".join(f"{x:,.0f}" for x in rates),
                    f"{max(rates):,.0f}",
                    _spread(cpu, "{:.1f}") if cpu else "-",
                    r.notes.get(side, "-"),
                ]
            )
    headers = ["transport", "side", "events/s per round", "best", "CPU us/event"]
    return table([*headers, "ours applied"], rows)


def nines(result: StrategyResult) -> str:
    """Stale reads (10 ms grace) as ``count (nines)``: ``0 (∞)``, ``12 (3.6)``."""
    n = result.nines
    if math.isnan(n):
        return "-"
    shown = "∞" if math.isinf(n) else f"{n:.1f}"
    return f"{result.stale_reads:,} ({shown})"


def _spread(values: Sequence[float], fmt: str) -> str:
    """``median (min–max)`` of per-round figures; the median alone for one round."""
    mid, low, high = median_spread(values)
    if math.isnan(mid):
        return "-"
    if len(values) < 2:
        return fmt.format(mid)
    return f"{fmt.format(mid)} ({fmt.format(low)}–{fmt.format(high)})"


def _ci(r: StrategyResult, q: str) -> str:
    """A window percentile with its bootstrap interval, or "not shown" beside it when the
    sample holds too few windows beyond it."""
    value = r.window.fmt(q)
    if value == "-":
        return value
    low, high = r.window_ci.get(q, [math.nan, math.nan])
    cell = value if math.isnan(low) else f"{value} [{fmt_ms(low)}, {fmt_ms(high)}]"
    if not shown(r.window.n, QUANTILES[q]):
        cell += " (not shown)"
    return cell


def strategy_table(results: Sequence[StrategyResult]) -> str:
    """One row per strategy (failed and skipped ones say why): medians of rounds with their
    range, window percentiles over every round's probe updates with a 95% bootstrap interval."""
    headers = [
        "strategy",
        "rounds",
        "reads/s/inst",
        "hit rate (min–max)",
        "owner req/s",
        "misses/s",
        "window p50",
        "p99 [95% CI]",
        "p99.9 [95% CI]",
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
                str(r.rounds),
                _num(r.reads_per_s),
                _spread([h * 100 for h in r.per_round.get("hit_rate", [])], "{:.2f}%"),
                _num(r.owner_rps, "{:,.1f}"),
                _num(r.misses_per_s, "{:,.1f}"),
                r.window.fmt("p50"),
                _ci(r, "p99"),
                _ci(r, "p99.9"),
                r.window.fmt("max"),
                r.in_hand.fmt("p99"),
                nines(r),
                _num(r.hit_p50_us, "{:.1f}") + _in_thread(r.hit_service_p50_us),
                _num(r.hit_p99_us, "{:.1f}") + _in_thread(r.hit_service_p99_us),
                _num(r.events_per_s, "{:.1f}"),
            ]
        )
    return table(headers, rows)


def _in_thread(value: float) -> str:
    return "" if math.isnan(value) else f" (in its thread: {value:.1f})"


def hit_key(r: StrategyResult) -> str:
    """The per-round hit latency a comparison uses: timed inside the library's own thread when
    the reader has one (the peer's hit path without the wait for its thread), else around the
    call."""
    service = r.per_round.get("hit_service_p50_us", [])
    return "hit_service_p50_us" if any(not math.isnan(v) for v in service) else "hit_p50_us"


def zero_grace_table(results: Sequence[StrategyResult]) -> str:
    """Stale reads with zero grace (any read that began after a newer commit) and how far
    behind each was; the rarest rate the sample can rule out (95% upper bound)."""
    headers = [
        "strategy",
        "reads",
        "stale reads",
        "rate (95% upper bound)",
        "nines shown",
        "behind p50 (ms)",
        "p99",
        "p99.9",
        "max",
    ]
    rows = []
    for r in results:
        if r.status != "ok" or not r.reads:
            continue
        low, high = rate_bounds(r.stale0_reads, r.reads)
        age = r.stale0_age
        rows.append(
            [
                r.name,
                f"{r.reads:,}",
                f"{r.stale0_reads:,}",
                f"{r.stale0_reads / r.reads:.2e} (≤ {high:.1e})",
                f"{-math.log10(high):.1f}",
                age.fmt("p50"),
                age.fmt("p99") + ("" if shown(age.n, 99) else " (not shown)") * (age.n > 0),
                age.fmt("p99.9") + ("" if shown(age.n, 99.9) else " (not shown)") * (age.n > 0),
                age.fmt("max"),
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


def _window(r: StrategyResult, q: str = "p99") -> tuple[float, float]:
    low, high = r.window_ci.get(q, [math.nan, math.nan])
    return low, high


def _rounds_range(r: StrategyResult, key: str) -> tuple[float, float]:
    _, low, high = median_spread(r.per_round.get(key, []))
    return low, high


def _higher_better(r: StrategyResult, key: str) -> tuple[float, float]:
    """The range of a figure where higher is better, negated for :func:`compare`."""
    low, high = _rounds_range(r, key)
    return -high, -low


def strategy_targets(results: Sequence[StrategyResult]) -> list[Target]:
    """Check the comparison's targets against what ran. Every verdict is symmetric: figures
    whose intervals overlap are a TIE whichever is ahead; a claim the sample cannot support is
    "not shown", never PASS. Window percentiles carry 95% bootstrap intervals (probe updates
    resampled whole); per-round figures (hit rate, hit latency) carry their range over rounds."""
    runs = _by_name(results)
    out: list[Target] = []
    ttl60, ttl1 = runs.get("ttl-60s"), runs.get("ttl-1s")
    invalidate = [r for name, r in runs.items() if name.startswith("cachesync-invalidate-")]
    for r in invalidate:
        name = f"{r.name}: hit rate >= ttl-60s's and p99 window <= 1/100 of ttl-1s's"
        if ttl60 is None or ttl1 is None:
            out.append(Target(name, NOT_SHOWN, "ttl-60s and ttl-1s must both run"))
            continue
        hit = compare(_higher_better(r, "hit_rate"), _higher_better(ttl60, "hit_rate"))
        t_low, t_high = _window(ttl1)
        if ttl1.window.lower_bound.get("p99"):
            t_high = math.inf  # censored: the TTL's true p99 is at least this
        window = against_limit(_window(r), (t_low / 100, t_high / 100), r.window.n, 99)
        if hit == "behind" or window == FAIL:
            verdict = FAIL
        elif window == PASS and hit == "ahead":
            verdict = PASS
        elif window == PASS and hit == TIE:
            verdict = TIE
        else:
            verdict = NOT_SHOWN
        low, high = _rounds_range(r, "hit_rate")
        t60_low, t60_high = _rounds_range(ttl60, "hit_rate")
        out.append(
            Target(
                name,
                verdict,
                f"hit {low:.2%}–{high:.2%} vs {t60_low:.2%}–{t60_high:.2%} ({hit}); "
                f"p99 CI [{_window(r)[0]:.2f}, {_window(r)[1]:.2f}] ms vs "
                f"[{t_low / 100:.2f}, {t_high / 100:.2f}] ms ({window})",
            )
        )
    for r in [x for name, x in runs.items() if name.startswith("cachesync-")]:
        for grace, stale in (("10 ms grace", r.stale_reads), ("zero grace", r.stale0_reads)):
            verdict = nines_verdict(stale, r.reads, 6)
            low, high = rate_bounds(stale, r.reads)
            out.append(
                Target(
                    f"{r.name}: stale-read rate ({grace}) <= 1e-6 (6 nines)",
                    verdict,
                    f"{stale:,} stale of {r.reads:,} reads; 95% interval of the rate "
                    f"[{low:.1e}, {high:.1e}]: this sample can show at most "
                    f"{-math.log10(rate_bounds(0, r.reads)[1]):.1f} nines",
                )
            )
    peers = [runs[n] for n in ("redis-py-csc-fixed", "cashews-fixed") if n in runs]
    for n in ("redis-py-csc-fixed", "cashews-fixed"):
        if n not in runs:
            reason = next((x.reason for x in results if x.name == n), "not selected")
            out.append(Target(f"cachesync ahead of {n}", NOT_SHOWN, f"{n} did not run: {reason}"))
    for mine in [r for name, r in runs.items() if name.startswith("cachesync-")]:
        for peer in peers:
            latency = compare(
                _rounds_range(mine, hit_key(mine)), _rounds_range(peer, hit_key(peer))
            )
            staleness = compare(_window(mine), _window(peer))
            if latency == "ahead" and staleness == "ahead":
                verdict = PASS
            elif "behind" in (latency, staleness):
                verdict = FAIL
            elif latency == TIE and staleness == TIE:
                verdict = TIE
            else:
                verdict = NOT_SHOWN
            m_low, m_high = _rounds_range(mine, hit_key(mine))
            p_low, p_high = _rounds_range(peer, hit_key(peer))
            detail = (
                f"hit p50 {m_low:.1f}–{m_high:.1f} vs {p_low:.1f}–{p_high:.1f} µs ({latency}); "
                f"p99 window CI [{_window(mine)[0]:.2f}, {_window(mine)[1]:.2f}] vs "
                f"[{_window(peer)[0]:.2f}, {_window(peer)[1]:.2f}] ms ({staleness})"
            )
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
        f"{s.probe_interval * 1000:g} ms. Each of the {strategies} strategies, in each of "
        f"{s.rounds} rounds: prefill, {s.warmup:g} s warm-up, {s.duration:g} s measured. "
        "*owner req/s* includes the probe's own refetches (each probe update invalidates "
        "the probe key in every instance); *misses/s* counts workload reads only."
    )


def machine_table(machine: dict[str, Any]) -> str:
    """The machine description as a two-column table."""
    return table(["", ""], [[k, str(v)] for k, v in machine.items()])
