"""Prometheus metrics of change feeds (the ``prometheus`` extra): lag and counts per feed.

::

    registry = prometheus_client.CollectorRegistry()
    register_feed_metrics(registry, feed)         # read from feed.stats() at scrape time

``cachesync_feed_lag_bytes`` is the log the feed's confirmed position is behind the server's
end (for PostgreSQL: the WAL its slot holds back); alert on it. A slot left by a dead feed is
not read by any feed: watch it in SQL (see :mod:`cachesync.owner.feeds.postgres`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .base import ChangeFeed

__all__ = ["register_feed_metrics"]

_COUNTERS = (
    ("transactions", "feed_transactions", "Transactions read and confirmed."),
    ("upserts", "feed_upserts", "Inserted or updated rows published as changed."),
    ("deletes", "feed_deletes", "Deleted rows published as deleted."),
    ("flushes", "feed_flushes", "Namespace flushes published (TRUNCATE, unreadable keys)."),
    ("schema_errors", "feed_schema_errors", "Rows the table mapping could not read fully."),
    ("reconnects", "feed_reconnects", "Times the feed reopened the log after an interruption."),
)


class _FeedCollector:
    def __init__(self, feeds: tuple[ChangeFeed, ...], prefix: str, core: Any) -> None:
        self._feeds = feeds
        self._prefix = prefix
        self._core = core

    def describe(self) -> Iterator[Any]:
        return self._families(with_values=False)

    def collect(self) -> Iterator[Any]:
        return self._families(with_values=True)

    def _families(self, *, with_values: bool) -> Iterator[Any]:
        core, p = self._core, self._prefix
        stats = [(feed.name, feed.stats()) for feed in self._feeds] if with_values else []
        for field, doc in (
            ("lag_bytes", "Bytes of log between the feed's confirmed position and the end."),
            ("lag_seconds", "Seconds the oldest change not yet confirmed has waited."),
        ):
            gauge = core.GaugeMetricFamily(f"{p}_feed_{field}", doc, labels=["feed"])
            for name, values in stats:
                value = values.get(field)
                if isinstance(value, int | float):
                    gauge.add_metric([name], float(value))
            yield gauge
        for field, suffix, doc in _COUNTERS:
            counter = core.CounterMetricFamily(f"{p}_{suffix}", doc, labels=["feed"])
            for name, values in stats:
                value = values.get(field)
                if isinstance(value, int):
                    counter.add_metric([name], value)
            yield counter


def register_feed_metrics(registry: Any, *feeds: ChangeFeed, prefix: str = "cachesync") -> None:
    """Register the lag gauges and counters of ``feeds`` in a ``prometheus_client`` registry;
    values are read from ``feed.stats()`` at each scrape."""
    try:
        import prometheus_client.metrics_core as core
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "feed metrics need prometheus-client: pip install 'cachesync[prometheus]'"
        ) from exc
    registry.register(_FeedCollector(feeds, prefix, core))
