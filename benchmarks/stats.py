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
    qs: Sequence[float],
    reps: int = 400,
    level: float = 0.95,
    seed: int = 1,
) -> dict[float, tuple[float, float]]:
    """Percentile bootstrap intervals of the percentiles ``qs`` over ``clusters`` (one array
    per probe update: the windows every instance saw for it, NaN where none). Updates are
    resampled whole, so instances that saw the same slow commit do not count as independent
    evidence."""
    kept = [np.asarray(c, dtype=float) for c in clusters if np.asarray(c).size]
    if not kept:
        return {q: (math.nan, math.nan) for q in qs}
    width = max(c.size for c in kept)
    matrix = np.full((len(kept), width), np.nan)
    for i, c in enumerate(kept):
        matrix[i, : c.size] = c
    rng = np.random.default_rng(seed)
    estimates = np.empty((reps, len(qs)))
    for i in range(reps):
        values = matrix[rng.integers(0, len(kept), len(kept))].ravel()
        values = values[~np.isnan(values)]
        if values.size == 0:
            estimates[i] = math.nan
            continue
        estimates[i] = np.percentile(values, list(qs), method="inverted_cdf")
    tail = (1 - level) / 2 * 100
    out = {}
    for j, q in enumerate(qs):
        column = estimates[:, j]
        column = column[~np.isnan(column)]
        out[q] = (percentile(column, tail), percentile(column, 100 - tail))
    return out


def rate_bounds(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided interval of an event rate from ``k`` events in ``n`` trials (Poisson, exact
    for small ``k``, normal beyond 100). With ``k = 0`` the upper bound is about ``3 / n``: the
    rarest rate ``n`` reads can rule out."""
    if n <= 0:
        return math.nan, math.nan
    alpha = (1 - level) / 2

    def cdf(k_: int, mu: float) -> float:
        term = total = math.exp(-mu)
        for i in range(1, k_ + 1):
            term *= mu / i
            total += term
        return total

    def solve(target: float, k_: int) -> float:
        low, high = 0.0, max(10.0, 4.0 * (k_ + 1))
        for _ in range(100):
            mid = (low + high) / 2
            if cdf(k_, mid) > target:
                low = mid
            else:
                high = mid
        return (low + high) / 2

    if k > 100:
        half = 1.96 * math.sqrt(k)
        return max(0.0, k - half) / n, (k + half) / n
    upper = solve(alpha, k)
    lower = 0.0 if k == 0 else solve(1 - alpha, k - 1)
    return lower / n, upper / n


def nines_verdict(k: int, n: int, nines: float) -> str:
    """Verdict on "stale-read rate <= 10**-nines" from ``k`` stale reads of ``n``."""
    low, high = rate_bounds(k, n)
    if math.isnan(high):
        return NOT_SHOWN
    if high <= 10**-nines:
        return PASS
    if low > 10**-nines:
        return FAIL
    return NOT_SHOWN


def against_limit(
    interval: tuple[float, float], limit: tuple[float, float], n: int, q: float
) -> str:
    """Verdict on "percentile ``q`` <= limit" from its bootstrap ``interval`` and the limit's
    own interval (``(x, x)`` for a fixed limit): PASS when the whole interval is below the
    limit's, FAIL when it is wholly above, else (or with too small a sample) "not shown"."""
    low, high = interval
    if any(math.isnan(v) for v in (low, high, *limit)) or not shown(n, q):
        return NOT_SHOWN
    if high <= limit[0]:
        return PASS
    if low > limit[1]:
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
