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


def _color(result: StrategyResult) -> str:
    return {
        "cachesync": "tab:green",
        "ttl": "tab:blue",
        "redis-csc": "tab:red",
        "cashews": "tab:purple",
    }.get(result.family, "tab:gray")


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
    ttl = sorted((r for r in runs if r.family == "ttl"), key=lambda r: r.hit_rate)
    if len(ttl) > 1:
        ax.plot(
            [r.hit_rate * 100 for r in ttl],
            [max(r.window.values["p99"], FLOOR_MS) for r in ttl],
            "--",
            color="tab:blue",
            alpha=0.6,
            label="TTL trade-off",
        )
    for i, r in enumerate(sorted(runs, key=lambda r: r.window.values["p99"])):
        y = max(r.window.values["p99"], FLOOR_MS)
        marker = "^" if r.window.lower_bound.get("p99") else "o"
        ax.scatter(r.hit_rate * 100, y, color=_color(r), marker=marker, s=60, zorder=3)
        # Points crowd near 100 %: labels go left of them, alternating up and down.
        left = r.hit_rate > 0.6
        ax.annotate(
            r.name,
            (r.hit_rate * 100, y),
            textcoords="offset points",
            xytext=(-8 if left else 8, 6 if i % 2 else -10),
            ha="right" if left else "left",
            fontsize=7,
        )
    ax.set_yscale("log")
    ax.set_xlabel("hit rate (%)")
    ax.set_ylabel("p99 staleness window (ms, log; ▲ = lower bound)")
    ax.set_title("Hit rate vs p99 staleness (up-left is worse, down-right is better)")
    ax.grid(True, which="both", alpha=0.3)
    if len(ttl) > 1:
        ax.legend(loc="upper left")
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
        ax.step(
            values,
            [(k + 1) / n for k in range(n)],
            where="post",
            label=r.name,
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
