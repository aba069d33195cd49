"""Hooks for metrics: what an observer of a :class:`~cachesync.client.CacheSync` is told.

Counters (hits, misses, events, gaps...) are not pushed through hooks: they live in
``stats()`` and a metrics exporter reads them when scraped, so the read path pays nothing for
them. Hooks carry only what needs a distribution (latencies) or an edge (listener up/down).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Observer"]


class Observer(Protocol):
    """Receives timings and state changes from a client. Every method must be quick and must
    not raise."""

    def fetch_done(self, ns: str, seconds: float, ok: bool) -> None:
        """A fetch from the owner for namespace ``ns`` took ``seconds``."""

    def event_applied(self, ns: str, op: str, lag_seconds: float) -> None:
        """An event was applied ``lag_seconds`` after the owner's commit (its ``ts``)."""

    def lost_events(self, cause: str) -> None:
        """Events may have been lost: ``gap``, ``source``, ``reconnect``, ``heartbeat`` or
        ``schema`` (an event of a schema this consumer does not read)."""

    def listener_state(self, up: bool) -> None:
        """The listener went up (subscribed, caches trusted) or down."""
