"""Prometheus metrics for a :class:`~cachesync.client.CacheSync` (the ``prometheus`` extra).

One :class:`PrometheusMetrics` per client, with its own registry unless one is given::

    metrics = PrometheusMetrics()
    sync = CacheSync(url, observer=metrics)   # timings and edges, pushed as they happen
    metrics.bind(sync)                        # counters, read from sync.stats() when scraped
    app.mount("/metrics", metrics.asgi_app())

Two sources feed it, so the read hot path pays nothing:

- As the client's :class:`~cachesync.observe.Observer` it records what needs a distribution or
  an edge: fetch latency by namespace and outcome, event lag (owner commit to applied) by
  namespace and op, lost-event detections by cause, and whether the listener is up.
- Bound to the client, a collector reads ``sync.stats()`` at scrape time and exports every
  entry of it: reads by namespace and result (hit, miss, stale, bypass), every other counter
  of each namespace (fetches, fetch errors, events, invalidations, cache size...) and of the
  listener (messages, bad events, gaps, reconnects...), and the sections add-ons add with
  ``sync.add_stats`` (the consistency monitor's, by namespace). The export is derived from
  the stats, so a new counter needs no change here; :func:`exported_names` names the metric
  of each entry.

Nothing is created at import time: ``prometheus_client`` is imported when the first
:class:`PrometheusMetrics` is built, and every metric lives in that instance's registry, so two
clients in one process (or two tests) never collide.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric

    from ..client import CacheSync

__all__ = [
    "CONSISTENCY_OUTCOMES",
    "FETCH_BUCKETS",
    "LAG_BUCKETS",
    "LOST_CAUSES",
    "PrometheusMetrics",
    "exported_names",
]

LOST_CAUSES = ("gap", "source", "reconnect", "heartbeat", "schema")
"""The causes :meth:`~cachesync.observe.Observer.lost_events` reports; pre-set to 0 so a rate
over them exists before the first detection."""

CONSISTENCY_OUTCOMES = ("fresh", "caught_up", "stale", "error")
"""What a consistency sample can end as (see :mod:`cachesync.contrib.monitor`)."""

FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Buckets (seconds) of the fetch latency histogram: a REST call to the owner."""

LAG_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Buckets (seconds) of the event lag histogram: from sub-millisecond delivery to a backlog."""

_INSTALL_HINT = "pip install 'cachesync[prometheus]'"

# How the entries of ``sync.stats()`` are exported. The export is derived from the stats
# themselves: every entry of ``stats()["namespaces"][ns]`` and ``stats()["listener"]`` is a
# metric, a counter named after it unless listed here, so a new counter is exported without
# a change in this file (its help text defaults to where it comes from; add one to _HELP).
# Sections added with ``sync.add_stats(name, source)`` whose value is ``{ns: {field: n}}``
# (the consistency monitor's) are exported as ``{prefix}_{name}_{field}`` by namespace.
# ``exported_names`` says which metric carries each entry; a test checks them all.

# Reads are one family with a ``result`` label, because "hit ratio" is the question people
# ask of them.
_READ_RESULTS = {"hits": "hit", "misses": "miss", "stale_serves": "stale", "bypassed": "bypass"}
# Entries renamed on export (the name alone would not say what is counted).
_RENAMED = {
    "size": "cache_entries",
    "bytes": "cache_bytes",
    "silent": "namespace_silent",
    "unknown_namespace": "unknown_namespace_events",
    "unknown_schema": "unknown_schema_events",
    "last_event_lag": "last_event_lag_seconds",
}
# Entries that are levels, not counts.
_GAUGES = frozenset(
    {
        "size",
        "bytes",
        "functions",
        "silent",
        "silent_namespaces",
        "last_event_lag",
        "pending",
        "bound",
        "sample_rate",
        "stale_ratio",
    }
)
# Entries another metric carries: the observer keeps ``{prefix}_listener_up`` current as it
# changes, which a read at scrape time cannot do better.
_BY_OBSERVER = {"listener_up": "listener_up"}
_HELP = {
    "fetches": "Fetches from the owner (cache fills).",
    "fetch_errors": "Fetches from the owner that failed.",
    "events": "Events applied to the namespace (heartbeats excluded).",
    "invalidations": "Entries dropped by events or invalidate().",
    "refreshes": "Entries replaced in place by a value an event carried.",
    "ignored_older": "Events or fetches ignored as older than the known value.",
    "flushes": "Whole-namespace flushes (flush events, lost events, clears).",
    "evictions": "Entries evicted to keep maxsize or max_bytes.",
    "errors": "Values refused by from_event() or version_of().",
    "size": "Entries held per namespace (tombstones, and entries a flush retired until "
    "evicted, included).",
    "bytes": "Estimated bytes held per namespace, by the functions cached with max_bytes.",
    "functions": "Functions cached under the namespace.",
    "silent": "1 while the namespace is silent (no event for longer than its silence bound).",
    "messages": "Messages received by the listener.",
    "heartbeats": "Heartbeats received.",
    "bad_events": "Messages dropped as malformed (or that failed to apply).",
    "bad_signatures": "Events dropped for a missing or bad signature.",
    "unknown_namespace": "Events for namespaces not cached here.",
    "unknown_schema": "Events of a schema this consumer cannot read.",
    "gaps": "Gaps in a source's sequence numbers (events lost: caches flushed).",
    "source_changes": "New sources heard (an owner restarted: caches flushed).",
    "reconnects": "Reconnects of the listener.",
    "partial_reconnects": "Parts of the subscription (a shard's channels) lost and live again "
    "(their namespaces flushed, the others kept).",
    "heartbeat_misses": "Sources whose heartbeats stopped (caches flushed).",
    "replays": "Reconnects after which the transport replayed what was missed.",
    "duplicates": "Events received again and ignored (at or below the last applied seq).",
    "apply_failures": "Events that could not be applied (their namespace was flushed).",
    "silent_namespaces": "Namespaces silent now.",
    "oversized_dropped": "Messages dropped by the transport as larger than the limit.",
    "last_event_lag": "Lag of the last event received (commit to receipt), heartbeats excluded.",
}


def _metric_suffix(field: str) -> str:
    return _RENAMED.get(field, field)


def exported_names(stats: Mapping[str, Any], prefix: str = "cachesync") -> dict[str, str]:
    """Which metric carries each entry of ``stats`` (a ``sync.stats()``), as
    ``{"section.field": metric name}``; counters are named as exposed (``..._total``)."""
    names: dict[str, str] = {}

    def name_of(field: str, section_prefix: str = "") -> str:
        if field in _READ_RESULTS:
            return f"{prefix}_reads_total"
        if field in _BY_OBSERVER:
            return f"{prefix}_{_BY_OBSERVER[field]}"
        base = f"{prefix}_{section_prefix}{_metric_suffix(field)}"
        return base if field in _GAUGES else base + "_total"

    for counters in stats.get("namespaces", {}).values():
        for field in counters:
            names[f"namespaces.{field}"] = name_of(field)
    for field in stats.get("listener", {}):
        names[f"listener.{field}"] = name_of(field)
    for section, value in stats.items():
        if section in ("namespaces", "listener") or not isinstance(value, Mapping):
            continue
        for counters in value.values():
            if isinstance(counters, Mapping):
                for field in counters:
                    names[f"{section}.{field}"] = name_of(field, f"{section}_")
    return names


def _import_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            f"cachesync.contrib.prometheus needs prometheus-client: {_INSTALL_HINT}", name=exc.name
        ) from exc
    return prometheus_client


class PrometheusMetrics:
    """Prometheus metrics of one :class:`~cachesync.client.CacheSync`.

    Pass it as the client's ``observer=`` and call :meth:`bind` with the client. Every metric
    is registered in ``registry`` (a new :class:`prometheus_client.CollectorRegistry` by
    default, exposed as :attr:`registry`) with names starting with ``prefix``. Raises
    ImportError naming the extra to install when ``prometheus_client`` is missing.

    The observer methods never raise, and the collector never fails a scrape because of a
    counter it does not know.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        prefix: str = "cachesync",
        *,
        fetch_buckets: Iterable[float] = FETCH_BUCKETS,
        lag_buckets: Iterable[float] = LAG_BUCKETS,
    ) -> None:
        prom = _import_prometheus()
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self._prom = prom
        self.prefix = prefix
        self.registry: CollectorRegistry = (
            registry if registry is not None else prom.CollectorRegistry()
        )
        self._bound: CacheSync | None = None
        self._collector: _StatsCollector | None = None
        reg = self.registry
        self.fetch_seconds: Histogram = prom.Histogram(
            f"{prefix}_fetch_duration_seconds",
            "Time a fetch from the owner took, by namespace and outcome (ok, error).",
            ["namespace", "outcome"],
            buckets=tuple(fetch_buckets),
            registry=reg,
        )
        self.event_lag_seconds: Histogram = prom.Histogram(
            f"{prefix}_event_lag_seconds",
            "Staleness window: from the owner's commit (event ts) to the event being applied "
            "here, by namespace and op.",
            ["namespace", "op"],
            buckets=tuple(lag_buckets),
            registry=reg,
        )
        self.lost_events_total: Counter = prom.Counter(
            f"{prefix}_lost_event_detections",
            "Times events may have been lost and the caches were flushed, by cause "
            "(gap, source, reconnect, heartbeat).",
            ["cause"],
            registry=reg,
        )
        for cause in LOST_CAUSES:
            self.lost_events_total.labels(cause)
        self.listener_up: Gauge = prom.Gauge(
            f"{prefix}_listener_up",
            "1 while the listener is subscribed and the caches are trusted, else 0.",
            registry=reg,
        )
        self.consistency_checks_total: Counter = prom.Counter(
            f"{prefix}_consistency_checks",
            "Consistency monitor samples by namespace and outcome: fresh, caught_up (behind "
            "the owner, but caught up within the bound), stale (behind for longer than the "
            "bound), error (the owner could not answer).",
            ["namespace", "outcome"],
            registry=reg,
        )

    # -- the Observer protocol -------------------------------------------------------------

    def fetch_done(self, ns: str, seconds: float, ok: bool) -> None:
        """Record the latency of one fetch from the owner."""
        self.fetch_seconds.labels(ns, "ok" if ok else "error").observe(seconds)

    def event_applied(self, ns: str, op: str, lag_seconds: float) -> None:
        """Record how long after the owner's commit an event was applied."""
        # A negative lag is clock skew between hosts, and an infinite one a forged ts. Clamping
        # keeps the histogram's _sum finite and never decreasing, which rate() assumes.
        if not math.isfinite(lag_seconds):
            return
        self.event_lag_seconds.labels(ns, op).observe(max(0.0, lag_seconds))

    def lost_events(self, cause: str) -> None:
        """Count one lost-event detection."""
        self.lost_events_total.labels(cause).inc()

    def listener_state(self, up: bool) -> None:
        """Track whether the listener is up."""
        self.listener_up.set(1 if up else 0)

    # -- the consistency monitor -----------------------------------------------------------

    def consistency_checked(self, ns: str, outcome: str) -> None:
        """Count one consistency sample of namespace ``ns`` (see :data:`CONSISTENCY_OUTCOMES`)."""
        self.consistency_checks_total.labels(ns, outcome).inc()

    # -- the collector ---------------------------------------------------------------------

    def bind(self, sync: CacheSync) -> None:
        """Export the counters of ``sync.stats()`` from this registry, read at each scrape.

        One client per :class:`PrometheusMetrics`: the observer hooks carry no client identity,
        so a second client would be mixed into the same histograms. Raises ValueError if a
        client is already bound.
        """
        if self._bound is not None:
            raise ValueError("this PrometheusMetrics is already bound to a CacheSync")
        collector = _StatsCollector(sync, self.prefix, self._prom)
        self.registry.register(collector)
        self._bound = sync
        self._collector = collector

    def unbind(self) -> None:
        """Stop exporting the bound client's counters (no-op if none is bound)."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._bound = None
        self._collector = None

    # -- exposition ------------------------------------------------------------------------

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the text format the ``Accept`` header asks for, and its content
        type: what a ``/metrics`` handler returns, e.g.
        ``Response(content=body, media_type=content_type)``."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def asgi_app(self) -> Any:
        """An ASGI app serving this registry, for ``app.mount("/metrics", ...)`` in FastAPI
        or Starlette (needs neither: it is ``prometheus_client.make_asgi_app``)."""
        return self._prom.make_asgi_app(registry=self.registry)


class _StatsCollector:
    """Turns one ``sync.stats()`` into metric families, at scrape time."""

    def __init__(self, sync: CacheSync, prefix: str, prom: Any) -> None:
        self._sync = sync
        self._prefix = prefix
        self._core = prom.metrics_core

    def describe(self) -> Iterator[Metric]:
        # The names of what collect() gives, so the registry can detect clashes at bind().
        return self._families(self._stats())

    def collect(self) -> Iterator[Metric]:
        return self._families(self._stats())

    def _stats(self) -> dict[str, Any]:
        # A scrape from another thread (prometheus_client's own HTTP server) can meet a dict
        # the event loop is changing; one retry gets a consistent read in practice.
        try:
            return self._sync.stats()
        except RuntimeError:
            return self._sync.stats()

    def _families(self, stats: Mapping[str, Any]) -> Iterator[Metric]:
        from ..cache import NamespaceStats
        from ..client import ClientStats

        core = self._core
        p = self._prefix
        namespaces: Mapping[str, Mapping[str, Any]] = stats.get("namespaces", {})
        listener: Mapping[str, Any] = stats.get("listener", {})

        reads = core.CounterMetricFamily(
            f"{p}_reads",
            "Reads through @cached by namespace and result: hit (fresh entry), miss (fetched), "
            "stale (stale value served), bypass (listener down: read through to the owner).",
            labels=["namespace", "result"],
        )
        for ns, counters in namespaces.items():
            for field, result in _READ_RESULTS.items():
                value = _number(counters.get(field))
                if value is not None:
                    reads.add_metric([ns, result], value)
        yield reads

        # The fields the stats classes declare (so the families exist before the first
        # namespace), then any other entry the stats hold.
        ns_fields = _union(
            [f.name for f in dataclass_fields(NamespaceStats)] + ["size", "bytes", "functions"],
            *namespaces.values(),
        )
        for field in ns_fields:
            if field in _READ_RESULTS or field in _BY_OBSERVER:
                continue
            family = self._family(
                f"{p}_{_metric_suffix(field)}", field, "namespaces", ["namespace"]
            )
            for ns, counters in namespaces.items():
                value = _number(counters.get(field))
                if value is not None:
                    family.add_metric([ns], value)
            yield family

        listener_fields = _union(
            [f.name for f in dataclass_fields(ClientStats)] + ["last_event_lag"], listener
        )
        for field in listener_fields:
            if field in _BY_OBSERVER:
                continue
            family = self._family(f"{p}_{_metric_suffix(field)}", field, "listener", [])
            value = _number(listener.get(field))
            if value is not None:
                family.add_metric([], value)
            yield family

        for section, value in stats.items():
            if section in ("namespaces", "listener") or not isinstance(value, Mapping):
                continue
            per_ns = {ns: c for ns, c in value.items() if isinstance(c, Mapping)}
            for field in _union([], *per_ns.values()):
                family = self._family(
                    f"{p}_{section}_{_metric_suffix(field)}", field, section, ["namespace"]
                )
                for ns, counters in per_ns.items():
                    number = _number(counters.get(field))
                    if number is not None:
                        family.add_metric([ns], number)
                yield family

    def _family(self, name: str, field: str, section: str, labels: list[str]) -> Any:
        doc = _HELP.get(field, f'sync.stats()["{section}"]: {field}.')
        kind = self._core.GaugeMetricFamily if field in _GAUGES else self._core.CounterMetricFamily
        return kind(name, doc, labels=labels)


def _union(first: list[str], *mappings: Mapping[str, Any]) -> list[str]:
    names = dict.fromkeys(first)
    for mapping in mappings:
        names.update(dict.fromkeys(mapping))
    return list(names)


def _number(value: Any) -> float | None:
    """A sample value, or None for what is not one (None, text, NaN)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None
