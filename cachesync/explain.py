""" "Why is this key stale here?": what one instance knows about one key, for an operator.

As it applies events (off the read path) the client keeps, per namespace, the last event
applied to each recently named key (the immutable event itself, or a summary of one that
carried a value), a :class:`History` of the last flush of each namespace and why, and per
source its last seq and the owner's time of its last message. ``CacheSync.explain`` joins
them with what each cache holds for the key, into a plain JSON-ready dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .cache import NOBODY, TOMBSTONE, LocalCache

if TYPE_CHECKING:
    from .events import EventView

__all__ = [
    "MAX_RECENT_KEYS",
    "FlushRecord",
    "History",
    "KeyEvent",
    "describe_entry",
    "key_event",
    "summary",
    "trim",
]

MAX_RECENT_KEYS = 100_000
"""How many keys of each namespace the client remembers the last event of."""


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
    """What the listener did lately, bounded; written only on the event path, so kept in
    plain dicts (the listener pays a dict store per key)."""

    def __init__(self) -> None:
        self.flushes: dict[str, FlushRecord] = {}
        self.everything: FlushRecord | None = None

    def flushed_by(self, event: EventView, wall: float) -> None:
        """A flush event, or a tag invalidation, reached ``event.ns``."""
        if event.op == "flush":
            self.flush(event.ns, "flush", wall, source=event.source, seq=event.seq)
        elif event.tags is not None:
            self.flush(event.ns, "tags", wall, tags=list(event.tags), source=event.source)

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


def key_event(record: tuple[Any, float] | None, wall: float, now: float) -> KeyEvent | None:
    """The :class:`KeyEvent` of a record the client keeps per key (the event, or its
    summary, and the monotonic time it was applied); ``wall`` and ``now`` date it."""
    if record is None:
        return None
    event, at = record
    carried = isinstance(event, _Summary) or event.value is not None
    return KeyEvent(
        str(event.op), event.source, event.seq, event.version, event.ts, wall - (now - at), carried
    )


def trim(recent: dict[str, Any], bound: int) -> None:
    """Drop the first inserted keys of ``recent`` until it holds ``bound``."""
    while len(recent) > bound:
        del recent[next(iter(recent))]


class _Summary:
    """The fields of an event that carried a value, without the value."""

    __slots__ = ("op", "source", "seq", "version", "ts")

    def __init__(self, op: str, source: str, seq: int, version: int | None, ts: float) -> None:
        self.op = op
        self.source = source
        self.seq = seq
        self.version = version
        self.ts = ts


def summary(event: EventView) -> _Summary:
    """The fields of ``event`` explain() reports, without its value."""
    return _Summary(str(event.op), event.source, event.seq, event.version, event.ts)


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
