"""The PNG plots: hit rate against p99 staleness, the staleness CDFs, and the micro ratios."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .analysis import StrategyResult
from .common import pyplot
from .micro import MicroResult

FLOOR_MS = 0.1
"""Staleness below this is drawn at this value (log scale)."""


def hit_rate_vs_staleness(results: Sequence[StrategyResult], path: Path) -> Path | None:
    """Hit rate (x) against p99 staleness window (y, log): the TTL curve, and the others."""
    runs = [
        r
        for r in results
        if r.status == "ok" and r.window.n and not math.isnan(r.hit_rate) and r.family != "none"
    ]
    if not runs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ttl = sorted(
        (r for r in runs if r.family == "ttl" and not r.window.lower_bound.get("p99")),
        key=lambda r: r.hit_rate,
    )
    if len(ttl) > 1:  # only TTL points whose p99 is known (a censored one is a lower bound)
        ax.plot(
            [r.hit_rate * 100 for r in ttl],
            [max(r.window.values["p99"], FLOOR_MS) for r in ttl],
            "--",
            color="tab:blue",
            alpha=0.6,
            label="TTL trade-off (uncensored points)",
        )
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(sorted(runs, key=lambda r: r.window.values["p99"])):
        y = max(r.window.values["p99"], FLOOR_MS)
        x = r.hit_rate * 100
        censored = bool(r.window.lower_bound.get("p99"))
        rates = [h * 100 for h in r.per_round.get("hit_rate", [])] or [x]
        low, high = r.window_ci.get("p99", [y, y])
        if math.isnan(low):
            low, high = y, y
        ax.errorbar(
            x,
            y,
            xerr=[[max(0.0, x - min(rates))], [max(0.0, max(rates) - x)]],
            yerr=[[max(0.0, y - max(low, FLOOR_MS))], [max(0.0, max(high, FLOOR_MS) - y)]],
            fmt="^" if censored else "o",
            color=cmap(i % 10),
            markersize=7,
            capsize=3,
            zorder=3,
            label=r.name + (" (p99 is a lower bound)" if censored else ""),
        )
        if censored:
            ax.annotate(
                "", xy=(x, y * 4), xytext=(x, y), arrowprops={"arrowstyle": "->", "lw": 0.8}
            )
    ax.set_yscale("log")
    ax.set_xlabel("hit rate (%)")
    ax.set_ylabel("p99 staleness window (ms, log; bars: 95% CI; ▲↑ = lower bound)")
    ax.set_title("Hit rate (bars: range over rounds) vs p99 staleness; down-right is better")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def staleness_cdf(results: Sequence[StrategyResult], path: Path) -> Path | None:
    """The distribution of staleness windows per strategy (censored samples at their bound)."""
    runs = [r for r in results if r.status == "ok" and r.windows_ms]
    if not runs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    cmap = plt.get_cmap("tab20")
    styles = {"cachesync": "-", "ttl": "--", "redis-csc": ":", "cashews": "-."}
    for i, r in enumerate(runs):
        values = sorted(max(v, FLOOR_MS) for v in r.windows_ms)
        n = len(values)
        # Censored windows are lower bounds: the curve stops below the smallest of them.
        cut = min(
            (v for v, c in zip(r.windows_ms, r.windows_censored, strict=False) if c),
            default=math.inf,
        )
        shown = [v for v in values if v < cut]
        label = r.name if cut == math.inf else f"{r.name} (censored from {cut:,.0f} ms)"
        ax.step(
            shown,
            [(k + 1) / n for k in range(len(shown))],
            where="post",
            label=label,
            color=cmap(i % 20),
            linestyle=styles.get(r.family, "-"),
            linewidth=2 if r.family == "cachesync" else 1.3,
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"staleness window (ms, log; under {FLOOR_MS:g} ms drawn at {FLOOR_MS:g})")
    ax.set_ylabel("fraction of (update, instance) pairs")
    ax.set_title("Staleness window CDF (probe key)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def micro_ratios(results: Sequence[MicroResult], path: Path) -> Path | None:
    """Each micro ratio against its target."""
    ratios = [(r, r.ratio) for r in results if r.ratio is not None]
    if not ratios:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r.name.split(":")[0] for r, _ in ratios]
    values = [v for _, v in ratios]
    colors = ["tab:green" if r.passed else "tab:red" for r, _ in ratios]
    ax.barh(names, values, color=colors)
    for i, (r, v) in enumerate(ratios):
        ax.text(v, i, f" {v:.2f}x (target {r.target})", va="center", fontsize=8)
    ax.set_xlabel("ours / baseline (lower is better)")
    ax.set_xlim(0, max(values) * 1.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
