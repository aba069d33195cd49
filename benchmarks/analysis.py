"""Offline analysis of one strategy run: hit rate, load on the owner, stale reads, staleness.

Inputs are the readers' recorded reads and probe polls and the owner's update log, all stamped
with the same system-wide monotonic clock.

- **Stale read**: a workload read that returned a version older than the one the owner had
  committed more than ``tolerance`` (10 ms) before the read started. Its *age* is the time
  since the first newer version was committed.
- **Staleness window**: for each update of the probe key committed during the measured window,
  in each instance, the time from the commit to the *start* of the instance's first probe read
  that returned the new version (or a newer one): reads that started earlier returned the old
  one. Its resolution is the probe's polling gap. The time until that read *returned* (which adds
  the fetch a miss waits for) is kept as ``in_hand``. An instance that never got the version
  before the end gives a censored sample (a lower bound: the time to the end), and a percentile
  that such a sample may move is shown as a lower bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .stats import bootstrap, median_spread, percentile
from .workload import PROBE_KEY, Schedule

STALE_TOLERANCE_NS = 10_000_000


@dataclass
class Percentiles:
    """p50/p99/p99.9/max of a sample, in ms; ``lower_bound[q]`` marks a censored percentile."""

    n: int = 0
    censored: int = 0
    values: dict[str, float] = field(default_factory=dict)
    lower_bound: dict[str, bool] = field(default_factory=dict)

    def fmt(self, q: str) -> str:
        """The percentile for a table: ``1.23``, ``≥6000``, or ``-``."""
        if q not in self.values:
            return "-"
        return ("≥" if self.lower_bound.get(q) else "") + fmt_ms(self.values[q])


QUANTILES = {"p50": 50.0, "p99": 99.0, "p99.9": 99.9, "max": 100.0}


def fmt_ms(value: float) -> str:
    """Milliseconds with three significant digits."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def percentiles(values_ms: np.ndarray, censored: np.ndarray | None = None) -> Percentiles:
    """Percentiles of ``values_ms``; censored samples are lower bounds of the true values."""
    out = Percentiles(n=int(values_ms.size))
    if values_ms.size == 0:
        return out
    cens = censored if censored is not None else np.zeros(values_ms.size, dtype=bool)
    out.censored = int(cens.sum())
    min_censored = float(values_ms[cens].min()) if out.censored else math.inf
    for name, q in QUANTILES.items():
        value = percentile(values_ms, q)
        out.values[name] = value
        out.lower_bound[name] = min_censored <= value
    return out


@dataclass
class StrategyResult:
    """Every figure of one strategy, as printed and plotted."""

    name: str
    label: str
    family: str
    status: str = "ok"  # ok | failed | skipped
    reason: str = ""
    reads: int = 0
    read_errors: int = 0
    reads_per_s: float = 0.0  # per reader
    hit_rate: float = math.nan
    owner_rps: float = math.nan
    misses_per_s: float = math.nan
    stale_reads: int = 0
    stale_rate: float = math.nan
    stale_age_max_ms: float = math.nan
    window: Percentiles = field(default_factory=Percentiles)
    in_hand: Percentiles = field(default_factory=Percentiles)  # until the new value returned
    probe_gap_ms: float = math.nan  # median time between two probe polls (worst reader)
    delivery: Percentiles = field(default_factory=Percentiles)  # commit to event applied
    announce: Percentiles = field(default_factory=Percentiles)  # commit to announcement sent
    windows_ms: list[float] = field(default_factory=list)
    windows_censored: list[bool] = field(default_factory=list)
    hit_p50_us: float = math.nan
    hit_p99_us: float = math.nan
    # hits timed inside the library's own thread (redis-py's sync client: without the wait
    # for that thread); NaN for the others
    hit_service_p50_us: float = math.nan
    hit_service_p99_us: float = math.nan
    miss_p50_ms: float = math.nan
    events_per_s: float | None = None
    probe_polls: int = 0
    probe_regressions: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Zero grace: a read is stale as soon as the owner had committed a newer version before it
    # began; ``stale0_age`` is how far behind each such read was (ms).
    stale0_reads: int = 0
    stale0_age: Percentiles = field(default_factory=Percentiles)
    rounds: int = 1
    per_round: dict[str, list[float]] = field(default_factory=dict)
    window_ci: dict[str, list[float]] = field(default_factory=dict)  # "p99" -> [low, high]
    updates: int = 0  # probe updates whose windows were measured
    curve: dict[str, list[float]] = field(default_factory=dict)  # cold start, by time bin
    samples: dict[str, Any] = field(default_factory=dict, repr=False)  # raw, not in JSON

    @property
    def nines(self) -> float:
        """The stale-read rate as nines: 1e-6 is 6.0; no stale read at all is infinite."""
        if self.reads == 0 or math.isnan(self.stale_rate):
            return math.nan
        if self.stale_reads == 0:
            return math.inf
        return -math.log10(self.stale_rate)


@dataclass
class OwnerLog:
    """The owner's update log as arrays: workload commits, probe commits, announce delays."""

    key: np.ndarray
    version: np.ndarray
    ts: np.ndarray
    probe_version: np.ndarray
    probe_ts: np.ndarray
    announce_ns: np.ndarray  # commit to announcement sent, every update


def split_log(log: Sequence[Sequence[Any]]) -> OwnerLog:
    """Entries ``[key, version, committed_ns, announced_ns]`` (announced may be missing)."""
    keys, versions, stamps, probe_v, probe_ts, announce = [], [], [], [], [], []
    for entry in log:
        key, version, ts = entry[0], entry[1], entry[2]
        if len(entry) > 3 and entry[3]:
            announce.append(entry[3] - ts)
        if key == PROBE_KEY:
            probe_v.append(version)
            probe_ts.append(ts)
        else:
            keys.append(int(key[1:]))
            versions.append(version)
            stamps.append(ts)
    return OwnerLog(
        np.array(keys, dtype=np.int64),
        np.array(versions, dtype=np.int64),
        np.array(stamps, dtype=np.int64),
        np.array(probe_v, dtype=np.int64),
        np.array(probe_ts, dtype=np.int64),
        np.array(announce, dtype=np.int64),
    )


def stale_reads(
    read_key: np.ndarray,
    read_version: np.ndarray,
    read_t0: np.ndarray,
    log_key: np.ndarray,
    log_version: np.ndarray,
    log_ts: np.ndarray,
    tolerance_ns: int = STALE_TOLERANCE_NS,
) -> tuple[np.ndarray, np.ndarray]:
    """Which reads were stale, and the age (ns) of each read's version at read time.

    Versions start at 1 and each commit adds one, so the owner's version of a key at time ``t``
    is one plus the number of its commits at or before ``t``.
    """
    if read_t0.size == 0:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64)
    base = int(min(read_t0.min(), log_ts.min() if log_ts.size else read_t0.min())) - tolerance_ns
    span = int(max(read_t0.max(), log_ts.max() if log_ts.size else 0)) - base
    if span >= 1 << 40:
        raise ValueError("a run longer than 18 minutes does not fit the composite index")
    order = np.lexsort((log_version, log_key))
    c_key, c_ts = log_key[order], log_ts[order]
    composite = (c_key << 40) + (c_ts - base)
    r_key = read_key.astype(np.int64)
    first = np.searchsorted(composite, r_key << 40, side="left")
    cutoff = np.maximum(read_t0 - tolerance_ns - base, 0)
    committed = np.searchsorted(composite, (r_key << 40) + cutoff, side="right") - first
    expected = 1 + committed
    got = read_version.astype(np.int64)
    stale = got < expected
    age = np.zeros(read_t0.size, dtype=np.int64)
    if stale.any():
        newer = first[stale] + (got[stale] - 1)  # index of the commit of version got + 1
        age[stale] = read_t0[stale] - c_ts[newer]
    return stale, age


HORIZON_NS = 1_000_000_000
"""Probe updates committed in the last second of a run are not counted: an instance that has
not seen one yet says nothing about the window (a censored sample of a few ms)."""


def counted_updates(
    probe_version: np.ndarray, probe_ts: np.ndarray, schedule: Schedule
) -> tuple[np.ndarray, np.ndarray]:
    """The probe updates whose windows are measured: committed while measuring, a second or
    more before the end."""
    horizon = min(HORIZON_NS, (schedule.end - schedule.measure) // 2)
    keep = (probe_ts >= schedule.measure) & (probe_ts < schedule.end - horizon)
    return probe_version[keep], probe_ts[keep]


def probe_windows(
    probe_version: np.ndarray,
    probe_ts: np.ndarray,
    seen_at: np.ndarray,
    seen_version: np.ndarray,
    schedule: Schedule,
) -> tuple[np.ndarray, np.ndarray]:
    """For each counted probe update: the time (ns) from the commit to ``seen_at`` of the first
    poll of this reader that returned that version or a newer one, and whether no poll did
    before the end (censored)."""
    versions, commits = counted_updates(probe_version, probe_ts, schedule)
    if versions.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    if seen_version.size == 0:
        return schedule.end - commits, np.ones(versions.size, dtype=bool)
    best = np.maximum.accumulate(seen_version)
    idx = np.searchsorted(best, versions, side="left")
    censored = idx >= best.size
    got_at = np.where(censored, schedule.end, seen_at[np.minimum(idx, best.size - 1)])
    return np.maximum(got_at - commits, 0), censored


def delivery_times(probe_ts: np.ndarray, applied: np.ndarray, schedule: Schedule) -> np.ndarray:
    """For each counted probe update: the time (ns) from the commit to the reader's first
    application of an event on the probe key after it (missing ones are left out)."""
    _, commits = counted_updates(np.zeros(probe_ts.size, dtype=np.int64), probe_ts, schedule)
    if applied.size == 0 or commits.size == 0:
        return np.zeros(0, dtype=np.int64)
    applied = np.sort(applied)
    idx = np.searchsorted(applied, commits, side="left")
    found = idx < applied.size
    delays: np.ndarray = applied[idx[found]] - commits[found]
    return delays


def ideal_hits(
    keys: np.ndarray,
    t0: np.ndarray,
    log_key: np.ndarray,
    log_ts: np.ndarray,
    flush_ns: int | None = None,
) -> np.ndarray:
    """The trace-driven ideal: which reads a coherent cache of unbounded size, starting empty,
    would have served locally. A read hits when this instance read the same key before and
    the owner committed no change of it in between (nor did a flush, at ``flush_ns``, fall in
    between)."""
    if t0.size == 0:
        return np.zeros(0, dtype=bool)
    k = keys.astype(np.int64)
    order = np.lexsort((t0, k))
    sk, st = k[order], t0[order].astype(np.int64)
    same = np.r_[False, sk[1:] == sk[:-1]]
    prev = np.where(same, np.r_[st[0], st[:-1]], st)
    base = int(min(st.min(), log_ts.min() if log_ts.size else st.min())) - 1
    lo = np.lexsort((log_ts, log_key))
    composite = (log_key[lo].astype(np.int64) << 40) + (log_ts[lo] - base)
    upto = np.searchsorted(composite, (sk << 40) + (st - base), side="right")
    before = np.searchsorted(composite, (sk << 40) + (prev - base), side="right")
    hit = same & (upto == before)
    if flush_ns is not None:
        hit &= ~((prev < flush_ns) & (st >= flush_ns))
    out = np.zeros(t0.size, dtype=bool)
    out[order] = hit
    return out


def hit_curve(
    readers: Sequence[Any],
    log_key: np.ndarray,
    log_ts: np.ndarray,
    schedule: Schedule,
    bin_s: float,
    flush_ns: int | None,
) -> dict[str, list[float]]:
    """Hit rate, the ideal's and misses/s (reads that left the process, to the owner or to
    Redis) per time bin since the start, over every reader."""
    width = int(bin_s * 1e9)
    bins = max(1, int((schedule.end - schedule.start) // width))
    hits, ideal, n = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for reader in readers:
        reads = reader.reads
        index = np.clip((reads["t0"] - schedule.start) // width, 0, bins - 1).astype(np.int64)
        np.add.at(hits, index, reads["hit"].astype(float))
        best = ideal_hits(reads["key"], reads["t0"], log_key, log_ts, flush_ns)
        np.add.at(ideal, index, best.astype(float))
        np.add.at(n, index, 1.0)
    safe = np.maximum(n, 1)
    return {
        "t": [round(i * bin_s, 3) for i in range(bins)],
        "hit_rate": (hits / safe).tolist(),
        "ideal": (ideal / safe).tolist(),
        "misses_per_s": ((n - hits) / bin_s).tolist(),
        "ideal_hits": [float(ideal.sum())],
        "reads": [float(n.sum())],
    }


def analyze(
    result: StrategyResult,
    readers: Sequence[Any],
    log: Sequence[Sequence[Any]],
    schedule: Schedule,
    owner_requests: int,
    curve_bin: float | None = None,
    flush_at: float | None = None,
) -> StrategyResult:
    """Fill ``result`` from the readers' :class:`~benchmarks.reader_proc.ReaderResult` s and the
    owner's log and request count over the measured window."""
    seconds = (schedule.end - schedule.measure) / 1e9
    owner_log = split_log(log)
    log_key, log_version, log_ts = owner_log.key, owner_log.version, owner_log.ts
    probe_v, probe_ts = owner_log.probe_version, owner_log.probe_ts
    deliveries: list[np.ndarray] = []
    hits = misses = 0
    hit_lat: list[np.ndarray] = []
    miss_lat: list[np.ndarray] = []
    windows: list[np.ndarray] = []
    censored: list[np.ndarray] = []
    in_hand: list[np.ndarray] = []
    in_hand_censored: list[np.ndarray] = []
    gaps: list[float] = []
    events: list[int] = []
    ages0: list[np.ndarray] = []
    service_lat: list[np.ndarray] = []
    max_age = 0
    for reader in readers:
        reads = reader.reads
        n = int(reads["t0"].size)
        result.reads += n
        result.read_errors += reader.read_errors
        hit = reads["hit"]
        hits += int(hit.sum())
        misses += n - int(hit.sum())
        hit_lat.append(reads["latency"][hit])
        miss_lat.append(reads["latency"][~hit])
        stale, age = stale_reads(
            reads["key"], reads["version"], reads["t0"], log_key, log_version, log_ts
        )
        result.stale_reads += int(stale.sum())
        if stale.any():
            max_age = max(max_age, int(age[stale].max()))
        stale0, age0 = stale_reads(
            reads["key"], reads["version"], reads["t0"], log_key, log_version, log_ts, 0
        )
        result.stale0_reads += int(stale0.sum())
        ages0.append(age0[stale0])
        if reader.events is not None:
            events.append(reader.events)
        service = getattr(reader, "hit_service", None)
        if service is not None and len(service):
            service_lat.append(service[service[:, 0] >= schedule.measure, 1])
        _merge_extra(result.extra, reader.extra)
        if reader.probe_polls == 0:  # no probe (no cache): no window to measure
            continue
        w, c = probe_windows(probe_v, probe_ts, reader.probe_t0, reader.probe_version, schedule)
        windows.append(w)
        censored.append(c)
        w, c = probe_windows(probe_v, probe_ts, reader.probe_t1, reader.probe_version, schedule)
        in_hand.append(w)
        in_hand_censored.append(c)
        gaps.append(reader.probe_gap_ms)
        deliveries.append(delivery_times(probe_ts, reader.probe_applied, schedule))
        result.probe_polls += reader.probe_polls
        result.probe_regressions += reader.probe_regressions
    n_readers = max(len(readers), 1)
    result.reads_per_s = result.reads / seconds / n_readers
    result.hit_rate = hits / result.reads if result.reads else math.nan
    result.owner_rps = owner_requests / seconds
    result.misses_per_s = misses / seconds
    result.stale_rate = result.stale_reads / result.reads if result.reads else math.nan
    result.stale_age_max_ms = max_age / 1e6
    all_windows = np.concatenate(windows) / 1e6 if windows else np.zeros(0)
    all_censored = np.concatenate(censored) if censored else np.zeros(0, dtype=bool)
    result.window = percentiles(all_windows, all_censored)
    age0_ms = np.concatenate(ages0) / 1e6 if ages0 else np.zeros(0)
    result.stale0_age = percentiles(age0_ms)
    # One row per probe update, one column per instance: the cluster the bootstrap resamples.
    clusters = np.stack(windows, axis=1) / 1e6 if windows else np.zeros((0, 0))
    result.updates = int(clusters.shape[0])
    result.windows_ms = [round(float(x), 4) for x in all_windows]
    result.windows_censored = [bool(x) for x in all_censored]
    if in_hand:
        result.in_hand = percentiles(
            np.concatenate(in_hand) / 1e6, np.concatenate(in_hand_censored)
        )
    result.probe_gap_ms = max(gaps) if gaps else math.nan
    if deliveries:
        result.delivery = percentiles(np.concatenate(deliveries) / 1e6)
    result.announce = percentiles(owner_log.announce_ns / 1e6)
    hl = np.concatenate(hit_lat) if hit_lat else np.zeros(0)
    ml = np.concatenate(miss_lat) if miss_lat else np.zeros(0)
    if hl.size:
        result.hit_p50_us = percentile(hl, 50) / 1e3
        result.hit_p99_us = percentile(hl, 99) / 1e3
    if ml.size:
        result.miss_p50_ms = percentile(ml, 50) / 1e6
    sl = np.concatenate(service_lat) if service_lat else np.zeros(0)
    if sl.size:
        result.hit_service_p50_us = percentile(sl, 50) / 1e3
        result.hit_service_p99_us = percentile(sl, 99) / 1e3
    if events:
        result.events_per_s = sum(events) / len(events) / seconds
    result.samples = {
        "clusters": [clusters],
        "censored": all_censored,
        "in_hand": np.concatenate(in_hand) / 1e6 if in_hand else np.zeros(0),
        "in_hand_censored": np.concatenate(in_hand_censored) if in_hand else np.zeros(0, bool),
        "delivery": np.concatenate(deliveries) / 1e6 if deliveries else np.zeros(0),
        "announce": owner_log.announce_ns / 1e6,
        "hit_lat": hl,
        "miss_lat": ml,
        "service_lat": sl,
        "age0": age0_ms,
        "max_age": max_age,
        "events": [e / seconds for e in events],
    }
    result.per_round = {
        "hit_rate": [result.hit_rate],
        "window_p99": [result.window.values.get("p99", math.nan)],
        "reads_per_s": [result.reads_per_s],
        "owner_rps": [result.owner_rps],
        "hit_p50_us": [result.hit_p50_us],
        "hit_service_p50_us": [result.hit_service_p50_us],
    }
    _intervals(result)
    if curve_bin:
        flush_ns = None if flush_at is None else schedule.start + int(flush_at * 1e9)
        result.curve = hit_curve(readers, log_key, log_ts, schedule, curve_bin, flush_ns)
    return result


CI_QUANTILES = {"p50": 50.0, "p99": 99.0, "p99.9": 99.9}


def _intervals(result: StrategyResult, reps: int = 400) -> None:
    """Bootstrap intervals of the window percentiles, resampling probe updates whole."""
    rows = [row for matrix in result.samples.get("clusters", []) for row in matrix]
    found = bootstrap(rows, list(CI_QUANTILES.values()), reps=reps)
    result.window_ci = {name: list(found[q]) for name, q in CI_QUANTILES.items()}


def merge_rounds(rounds: Sequence[StrategyResult]) -> StrategyResult:
    """One result from the rounds of one strategy: counts summed, samples pooled (percentiles
    and their intervals over every round's probe updates), per-round figures kept for their
    median and spread (the headline hit rate, reads/s and owner load are medians of rounds)."""
    ok = [r for r in rounds if r.status == "ok"]
    if not ok:
        return rounds[0]
    first = ok[0]
    out = StrategyResult(first.name, first.label, first.family, rounds=len(ok))
    failed = len(rounds) - len(ok)
    if failed:
        reasons = "; ".join(sorted({r.reason for r in rounds if r.status != "ok"}))
        out.notes.append(f"{failed} of {len(rounds)} rounds failed: {reasons}")
    for r in ok:
        out.reads += r.reads
        out.read_errors += r.read_errors
        out.stale_reads += r.stale_reads
        out.stale0_reads += r.stale0_reads
        out.probe_polls += r.probe_polls
        out.probe_regressions += r.probe_regressions
        out.updates += r.updates
        _merge_extra(out.extra, r.extra)
        out.notes += [n for n in r.notes if n not in out.notes]
        for key, values in r.per_round.items():
            out.per_round.setdefault(key, []).extend(values)

    def pooled(key: str) -> np.ndarray:
        parts = [r.samples[key] for r in ok if key in r.samples]
        return np.concatenate(parts) if parts else np.zeros(0)

    def median(key: str) -> float:
        return median_spread(out.per_round.get(key, []))[0]

    out.reads_per_s = median("reads_per_s")
    out.hit_rate = median("hit_rate")
    out.owner_rps = median("owner_rps")
    out.misses_per_s = float(np.median([r.misses_per_s for r in ok]))
    out.stale_rate = out.stale_reads / out.reads if out.reads else math.nan
    out.stale_age_max_ms = max(r.stale_age_max_ms for r in ok)
    clusters = [m for r in ok for m in r.samples.get("clusters", [])]
    flat = np.concatenate([m.ravel() for m in clusters]) if clusters else np.zeros(0)
    censored = pooled("censored").astype(bool)
    out.window = percentiles(flat, censored)
    out.windows_ms = [round(float(x), 4) for x in flat]
    out.windows_censored = [bool(x) for x in censored]
    out.in_hand = percentiles(pooled("in_hand"), pooled("in_hand_censored").astype(bool))
    out.delivery = percentiles(pooled("delivery"))
    out.announce = percentiles(pooled("announce"))
    out.stale0_age = percentiles(pooled("age0"))
    out.probe_gap_ms = max(r.probe_gap_ms for r in ok)
    hl, ml = pooled("hit_lat"), pooled("miss_lat")
    if hl.size:
        out.hit_p50_us = percentile(hl, 50) / 1e3
        out.hit_p99_us = percentile(hl, 99) / 1e3
    if ml.size:
        out.miss_p50_ms = percentile(ml, 50) / 1e6
    sl = pooled("service_lat")
    if sl.size:
        out.hit_service_p50_us = percentile(sl, 50) / 1e3
        out.hit_service_p99_us = percentile(sl, 99) / 1e3
    events = [r.events_per_s for r in ok if r.events_per_s is not None]
    out.events_per_s = float(np.median(events)) if events else None
    out.samples = {"clusters": clusters}
    _intervals(out)
    return out


def _merge_extra(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """Sum the integer counters of each reader's extra stats."""
    for section, counters in extra.items():
        if not isinstance(counters, dict):
            continue
        target = into.setdefault(section, {})
        for name, value in counters.items():
            if isinstance(value, bool) or not isinstance(value, int):
                continue
            target[name] = target.get(name, 0) + value
