"""The statistics every benchmark uses: one percentile rule, medians with their spread, a
bootstrap interval clustered by update, and one symmetric verdict.

**Percentile rule: nearest rank.** The ``q``-th percentile of ``n`` samples is the
``ceil(q / 100 * n)``-th smallest (the first for ``q = 0``): always a value that was measured,
never an interpolation between two. ``numpy.percentile(method="inverted_cdf")`` is the same rule;
every table, plot and verdict in ``benchmarks/`` goes through :func:`percentile`.

**What a sample can show.** A percentile ``q`` rests on the ``n * (1 - q / 100)`` largest
samples; with fewer than :data:`MIN_TAIL` of them beyond it, the figure is printed but a verdict
on it is "not shown" (p99.9 needs at least 10,000 samples).

**Verdict.** Two figures whose bootstrap intervals overlap are a TIE, whichever is ahead
(symmetric: a tie is a tie both ways); a target against a limit PASSes only when the whole
interval is on the right side of it, FAILs when the whole interval is on the wrong side, and is
"not shown" otherwise or when the sample is too small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MIN_TAIL = 10
"""Samples needed beyond a percentile before a verdict rests on it."""

PASS, FAIL, TIE, NOT_SHOWN = "PASS", "FAIL", "TIE", "not shown"


def percentile(samples: Sequence[float] | np.ndarray, q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``samples``; NaN when empty."""
    values = np.asarray(samples, dtype=float)
    if values.size == 0:
        return math.nan
    return float(np.percentile(values, q, method="inverted_cdf"))


def shown(n: int, q: float) -> bool:
    """Whether ``n`` samples hold enough of a tail to rest a verdict on percentile ``q``."""
    return n * (1 - q / 100) >= MIN_TAIL if q < 100 else False


def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of per-round figures; NaN when empty."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan, math.nan
    return float(np.median(finite)), min(finite), max(finite)


def bootstrap(
    clusters: Sequence[np.ndarray],
    q: float,
    reps: int = 400,
    level: float = 0.95,
    seed: int = 1,
) -> tuple[float, float]:
    """A percentile bootstrap interval of percentile ``q`` over ``clusters`` (one array per
    update: the windows every instance saw for it). Updates are resampled whole, so instances
    that saw the same slow commit are not counted as independent evidence."""
    kept = [c for c in clusters if c.size]
    if not kept:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    sizes = np.array([c.size for c in kept])
    flat = np.concatenate(kept)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    estimates = np.empty(reps)
    for i in range(reps):
        picks = rng.integers(0, len(kept), len(kept))
        index = np.concatenate([np.arange(starts[p], starts[p] + sizes[p]) for p in picks])
        estimates[i] = percentile(flat[index], q)
    tail = (1 - level) / 2 * 100
    return percentile(estimates, tail), percentile(estimates, 100 - tail)


def against_limit(interval: tuple[float, float], limit: float, n: int, q: float) -> str:
    """Verdict on "percentile ``q`` <= ``limit``" from its bootstrap ``interval``."""
    low, high = interval
    if math.isnan(low) or math.isnan(limit) or not shown(n, q):
        return NOT_SHOWN
    if high <= limit:
        return PASS
    if low > limit:
        return FAIL
    return NOT_SHOWN


def compare(ours: tuple[float, float], theirs: tuple[float, float]) -> str:
    """Lower is better: "ahead", "behind" or TIE (overlapping intervals), or "not shown"."""
    if any(math.isnan(v) for v in (*ours, *theirs)):
        return NOT_SHOWN
    if ours[1] < theirs[0]:
        return "ahead"
    if ours[0] > theirs[1]:
        return "behind"
    return TIE
