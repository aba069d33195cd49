""" "Why is this key stale here?": what one instance knows about one key, for an operator.

The client keeps a small :class:`History` as it applies events (off the read path): the last
event applied to each recently named key, the last flush of each namespace and why, and the
lag of each source's last message. :meth:`CacheSync.explain <cachesync.client.CacheSync.explain>`
joins it with what each cache holds for the key, into a plain JSON-ready dict.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .cache import NOBODY, TOMBSTONE, LocalCache

if TYPE_CHECKING:
    from .events import ChangeEvent

__all__ = ["FlushRecord", "History", "KeyEvent", "describe_entry"]

MAX_KEYS = 100_000
"""How many (namespace, key) pairs the history remembers the last event of (LRU)."""


@dataclass(slots=True)
class KeyEvent:
    """The last event applied to a key: what it said, who sent it, when it was applied."""

    op: str
    source: str
    seq: int
    version: int | None
    owner_ts: float
    applied_at: float  # wall clock, seconds since the epoch
    carried_value: bool


@dataclass(slots=True)
class FlushRecord:
    """A flush: ``cause`` is ``flush`` (an event), ``tags``, ``gap``, ``source``,
    ``first message``, ``reconnect``, ``heartbeat``, ``silent`` or ``schema``."""

    cause: str
    at: float  # wall clock
    details: dict[str, Any]


class History:
    """What the listener did lately, bounded; written only on the event path."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self.keys: OrderedDict[tuple[str, str], KeyEvent] = OrderedDict()
        self.flushes: dict[str, FlushRecord] = {}
        self.everything: FlushRecord | None = None
        self.source_lag: dict[str, tuple[float, float]] = {}  # source -> (lag, wall at)

    def applied(self, event: ChangeEvent, wall: float) -> None:
        """Remember ``event`` as the last one of each of its keys (and its source's lag)."""
        self.source_lag[event.source] = (wall - event.ts, wall)
        if event.op == "flush":
            self.flush(event.ns, "flush", wall, source=event.source, seq=event.seq)
        elif event.tags is not None:
            self.flush(event.ns, "tags", wall, tags=list(event.tags), source=event.source)
        if not event.keys:
            return
        record = KeyEvent(
            str(event.op),
            event.source,
            event.seq,
            event.version,
            event.ts,
            wall,
            event.value is not None,
        )
        keys = self.keys
        ns = event.ns
        for key in event.keys:
            pair = (ns, key)
            keys[pair] = record
            keys.move_to_end(pair)
        while len(keys) > self.max_keys:
            keys.popitem(last=False)

    def heard(self, source: str, lag: float, wall: float) -> None:
        """A heartbeat of ``source`` arrived ``lag`` seconds after it was sent."""
        self.source_lag[source] = (lag, wall)

    def flush(self, ns: str | None, cause: str, wall: float, **details: Any) -> None:
        """Namespace ``ns`` (None: every namespace) was flushed because of ``cause``."""
        record = FlushRecord(cause, wall, details)
        if ns is None:
            self.everything = record
        else:
            self.flushes[ns] = record

    def last_flush(self, ns: str) -> FlushRecord | None:
        """The latest flush that reached ``ns``."""
        own = self.flushes.get(ns)
        if own is None or (self.everything is not None and self.everything.at > own.at):
            return self.everything
        return own

    def last_event(self, ns: str, key: str) -> KeyEvent | None:
        """The last event applied to ``key`` of ``ns``, if still remembered."""
        return self.keys.get((ns, key))


def describe_entry(cache: LocalCache, key: str) -> dict[str, Any]:
    """What ``cache`` holds for ``key`` now: state, version, age, expiry, fills in flight."""
    now = cache.clock()
    entry = cache.data.get(key)
    info: dict[str, Any] = {
        "function": cache.function or None,
        "trusted": cache.trusted,
        "fill_in_flight": key in cache.flights or key in cache.thread_flights,
    }
    if entry is None:
        info.update(cached=False, state="not cached")
        return info
    if entry.value is TOMBSTONE:
        state = "invalidated"
    elif entry.gen is not cache.gen:
        state = "flushed"
    elif cache.serving is NOBODY:
        state = "not served (listener down or namespace silent)"
    elif entry.expires <= now:
        state = "expired"
    else:
        state = "fresh"
    info.update(
        cached=state == "fresh",
        state=state,
        version=entry.version,
        age=None if entry.stored == float("-inf") else round(now - entry.stored, 6),
        expires_in=None if entry.value is TOMBSTONE else round(entry.expires - now, 6),
        stale_if_error_for=max(0.0, round(entry.error_until - now, 6))
        if entry.value is not TOMBSTONE
        else None,
        absent=entry.value is None,
    )
    if cache.tag_index is not None:
        info["tags"] = list(cache.tag_index.tags_of(key))
    return info


def as_dict(record: KeyEvent | FlushRecord | None, wall: float) -> dict[str, Any] | None:
    """``record`` as a dict, with how long ago (seconds) it happened."""
    if record is None:
        return None
    data = asdict(record)
    when = record.applied_at if isinstance(record, KeyEvent) else record.at
    data["ago"] = round(wall - when, 6)
    return data
