"""LocalCache: one cached function's entries, with TTLs, versions, fill reservations and trust.

The cache knows nothing of transports or events. The client tells it what happened
(``invalidate``, ``apply_value``, ``clear``, ``suspect_all``, ``distrust``/``trust``) and the
wrappers read it and fill it through reservations (:class:`Flight`):

- **Entries are immutable.** An event replaces an entry, never changes it, so a reader that
  holds an entry sees one consistent value (never the internal ``TOMBSTONE``).
- **Generations make flushes O(1).** Every entry belongs to the generation that was current
  when it was stored; readers serve an entry only if its generation is the one ``serving``.
  A flush or a possible loss (:meth:`suspect_all`, :meth:`clear`) starts a new generation,
  and :meth:`distrust` sets ``serving`` to none at all: one assignment, atomic for readers in
  any thread, whatever the number of entries. Nothing walks the entries.
- **Reservations** guard against a fetch that raced an invalidation (guarantee 2). A fill
  starts with :meth:`begin_fill`; every invalidation of that key, every flush and every change of
  trust *voids* the flights in progress, and :meth:`finish_fill` stores nothing for a void
  flight. A void flight is also detached from the key, so a read that starts after the
  invalidation makes a new fetch instead of joining the old one (guarantee 1).
- **Versions** keep an older event or fetch from replacing a newer value (guarantee 4). An
  invalidation replaces a versioned entry with a *tombstone* that remembers the version.
- **Trust**: while the listener is down the client calls :meth:`distrust`; reads then miss,
  fills are not stored, and single-flight still holds (guarantee 5). :meth:`trust` serves the
  current generation again: the entries no possible loss has touched meanwhile.

Mutations take a lock, so a plain function may be called from any thread; the read of a fresh
entry takes none (a dict lookup and two comparisons).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, Final

from .clock import ExactClock, HitClock
from .tags import TagFunc, TagIndex, tagger_of
from .weight import ENTRY_OVERHEAD, TOMBSTONE_WEIGHT, estimate_size

__all__ = [
    "BulkFill",
    "Entry",
    "Flight",
    "Generation",
    "LocalCache",
    "NamespaceStats",
    "TOMBSTONE",
    "check_settings",
]


log = logging.getLogger("cachesync.cache")


class _Tombstone:
    __slots__ = ()

    def __repr__(self) -> str:
        return "TOMBSTONE"


TOMBSTONE: Final = _Tombstone()
"""The value of an entry that only remembers the last version an invalidation named."""

_NEVER = float("-inf")


class Generation:
    """The identity of one generation of entries (see the module docstring); ``number`` grows
    by one per generation of a cache."""

    __slots__ = ("number",)

    def __init__(self, number: int) -> None:
        self.number = number


NOBODY: Final = Generation(-1)
"""What ``serving`` is while the cache is distrusted: no entry belongs to it."""


class Entry:
    """One cached value, immutable once stored: fresh until ``expires``; servable while
    revalidating until ``stale_until``; servable when the owner fails until ``error_until``
    (monotonic seconds); served at all only while its ``gen`` is the cache's ``serving``.

    ``used`` is the one field that changes: a hit sets it, and eviction gives an entry read
    since it was stored (or last passed over) a second chance (CLOCK, an approximation of
    least-recently-used that costs a hit one attribute store instead of a reordering).
    Nothing a reader returns depends on it."""

    __slots__ = (
        "value",
        "expires",
        "stale_until",
        "error_until",
        "version",
        "gen",
        "stored",
        "used",
    )

    def __init__(
        self,
        value: Any,
        expires: float,
        stale_until: float,
        error_until: float,
        version: int | None,
        gen: Generation,
        stored: float = _NEVER,
    ) -> None:
        self.value = value
        self.expires = expires
        self.stale_until = stale_until
        self.error_until = error_until
        self.version = version
        self.gen = gen
        self.stored = stored  # when it was stored (monotonic), for explain()
        self.used = False

    def __repr__(self) -> str:
        return f"Entry({self.value!r}, expires={self.expires}, version={self.version})"


class Flight:
    """A fill in progress for one key: a reservation that invalidation can void.

    ``waiter`` is whatever the caller uses to hand the result to concurrent readers (an
    ``asyncio.Future`` or a ``concurrent.futures.Future``); the cache never touches it.
    """

    __slots__ = ("key", "void", "waiter")

    def __init__(self, key: str, waiter: Any) -> None:
        self.key = key
        self.void = False
        self.waiter = waiter


class BulkFill:
    """A reservation for many keys at once, taken *before* their values are read (a warm-up
    from a list endpoint). A key invalidated meanwhile is refused by :meth:`put`, and a flush
    or a change of trust voids the whole reservation."""

    __slots__ = ("cache", "void", "dropped")

    def __init__(self, cache: LocalCache) -> None:
        self.cache = cache
        self.void = False
        self.dropped: set[str] = set()

    def put(self, key: str, value: Any, version: int | None = None) -> bool:
        """Store ``value`` for ``key`` unless an event for it (or a flush) came since the
        reservation was taken. Returns whether it was stored."""
        return self.cache._bulk_put(self, key, value, version)

    def close(self) -> None:
        """End the reservation."""
        self.cache._end_bulk(self)


@dataclass(slots=True)
class NamespaceStats:
    """Counters of one namespace. ``snapshot()`` gives them as a plain dict."""

    misses: int = 0
    fetches: int = 0
    fetch_errors: int = 0
    stale_serves: int = 0
    events: int = 0
    invalidations: int = 0
    refreshes: int = 0
    ignored_older: int = 0
    flushes: int = 0
    evictions: int = 0
    bypassed: int = 0
    errors: int = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict (hits are counted by the wrappers: see
        :meth:`LocalCache.snapshot`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class LocalCache:
    """The entries of one cached function. See the module docstring for the rules it keeps.

    ``ttl`` is the safety net; each stored entry gets ``ttl`` times a random factor in
    ``[1 - jitter, 1 + jitter]`` so entries filled together do not expire together.
    ``negative_ttl`` (None: do not cache) applies to results of ``None`` ("absent").
    ``maxsize`` bounds the number of entries (tombstones and entries of old generations
    included), evicting the least recently used (approximately: see :class:`Entry`).
    ``clock`` is the monotonic clock, injectable for tests; ``hit_clock`` is what the async
    hit path compares expiries with (see :mod:`cachesync.clock`; by default it reads
    ``clock`` at every hit).

    ``tags(value)`` (or ``tags(key, value)``) gives the tags of each value stored, for
    :meth:`invalidate_tags` (see :mod:`cachesync.tags`). ``max_bytes`` bounds the weight of
    the entries, evicting the least recently used (approximately), with ``weigher(value)`` (default
    :func:`~cachesync.weight.estimate_size`) plus the key and a per-entry overhead; a value
    heavier than ``max_bytes`` on its own is not stored. Both run when a value is stored,
    never on a hit; a value whose tags or weight cannot be computed is not stored.
    """

    def __init__(
        self,
        name: str,
        *,
        ttl: float,
        maxsize: int = 10_000,
        negative_ttl: float | None = None,
        jitter: float = 0.1,
        stale_while_revalidate: float = 0.0,
        stale_if_error: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        hit_clock: HitClock | None = None,
        rng: random.Random | None = None,
        tags: TagFunc | None = None,
        max_bytes: int | None = None,
        weigher: Callable[[Any], int] | None = None,
    ) -> None:
        check_settings(
            ttl=ttl,
            maxsize=maxsize,
            max_bytes=max_bytes,
            negative_ttl=negative_ttl,
            jitter=jitter,
            stale_while_revalidate=stale_while_revalidate,
            stale_if_error=stale_if_error,
        )
        self.name = name
        self.function = ""  # the qualified name of the function cached here, for explain()
        self.ttl = float(ttl)
        self.maxsize = maxsize
        self.negative_ttl = negative_ttl
        self.jitter = jitter
        self.stale_while_revalidate = float(stale_while_revalidate)
        self.stale_if_error = float(stale_if_error)
        self.clock = clock
        self.hit_clock: HitClock = hit_clock if hit_clock is not None else ExactClock(clock)
        self.stats = NamespaceStats()
        self.lock = threading.RLock()
        # The wrappers' hot path reads these directly; they are never rebound.
        self.data: OrderedDict[str, Entry] = OrderedDict()
        self.flights: dict[str, Flight] = {}
        self.thread_flights: dict[str, Flight] = {}
        self._bulks: set[BulkFill] = set()
        self.gen = Generation(0)
        self.serving: Generation = NOBODY
        # Entries of generations below this one were flushed (not merely suspected): their
        # values are not served even by stale_if_error.
        self._flushed_below = 0
        self._serving_watchers: list[Callable[[Generation], None]] = []
        # Hits are counted in each wrapper's closure (the cheapest counter there is); these
        # report them.
        self.hit_counters: list[Callable[[], int]] = []
        self._random = (rng or random.Random()).random
        self._tagger = tagger_of(tags) if tags is not None else None
        self.tag_index: TagIndex | None = TagIndex() if tags is not None else None
        self.max_bytes = max_bytes
        if weigher is not None and not callable(weigher):
            raise TypeError("weigher= must be a function of the value returning its bytes")
        self._weigher = weigher if weigher is not None else estimate_size
        self._weights: dict[str, int] | None = {} if max_bytes is not None else None
        self.bytes = 0

    @property
    def trusted(self) -> bool:
        """Whether entries are served and fills stored (the listener is live)."""
        return self.serving is self.gen

    def watch_serving(self, watcher: Callable[[Generation], None]) -> None:
        """Call ``watcher(generation)`` now and whenever the generation served changes (the
        wrappers keep it in a local variable: the hit path reads no attribute for it)."""
        with self.lock:
            self._serving_watchers.append(watcher)
            watcher(self.serving)

    def count_misses(self, n: int) -> None:
        """Count ``n`` reads that go to the owner: misses while the cache is trusted,
        bypasses while it is not (its entries are not served then)."""
        if self.trusted:
            self.stats.misses += n
        else:
            self.stats.bypassed += n

    def hits(self) -> int:
        """Reads served as fresh from this cache."""
        return sum(counter() for counter in self.hit_counters)

    def snapshot(self) -> dict[str, int]:
        """Every counter of this cache, hits included, and its size."""
        counters = {"hits": self.hits(), **self.stats.snapshot(), "size": len(self.data)}
        if self._weights is not None:
            counters["bytes"] = self.bytes
        return counters

    def keys(self) -> list[str]:
        """The keys held now (a copy taken in one step, safe while other threads read)."""
        return list(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` holds a value that may be served (fresh or not)."""
        entry = self.data.get(key)  # type: ignore[call-overload]
        return entry is not None and entry.value is not TOMBSTONE and entry.gen is self.gen

    # -- reads -----------------------------------------------------------------------------

    def get_fresh(self, key: str) -> Entry | None:
        """The entry for ``key`` if it may be served as fresh now, else None."""
        entry = self.data.get(key)
        if entry is not None and entry.gen is self.serving and entry.expires > self.clock():
            return entry
        return None

    def get_stale(self, key: str, *, for_error: bool) -> Entry | None:
        """An expired entry still servable: within ``stale_while_revalidate`` of its expiry
        (``for_error=False``, only while trusted and of the generation served) or
        ``stale_if_error`` (``for_error=True``)."""
        entry = self.data.get(key)
        if entry is None or entry.value is TOMBSTONE:
            return None
        now = self.clock()
        if for_error:
            servable = now < entry.error_until and entry.gen.number >= self._flushed_below
            return entry if servable else None
        return entry if entry.gen is self.serving and now < entry.stale_until else None

    def version_of(self, key: str) -> int | None:
        """The last version known for ``key`` (from a value or a tombstone)."""
        entry = self.data.get(key)
        return None if entry is None else entry.version

    # -- fills -----------------------------------------------------------------------------

    def begin_fill(self, key: str, waiter: Any, *, threaded: bool = False) -> Flight:
        """Reserve a fill of ``key``; concurrent readers find it in ``flights``."""
        flight = Flight(key, waiter)
        with self.lock:
            flights = self.thread_flights if threaded else self.flights
            replaced = flights.get(key)
            if replaced is not None:
                # No invalidation can reach a flight once it is out of the map: it must not
                # store (its readers still get its value; they began before this one).
                replaced.void = True
            flights[key] = flight
        return flight

    def finish_fill(self, flight: Flight, value: Any, version: int | None = None) -> bool:
        """Store the result of ``flight`` unless it was voided, the cache is not trusted, or a
        newer version is already known. Returns whether it was stored."""
        with self.lock:
            self._detach(flight)
            if flight.void or not self.trusted:
                return False
            if value is None and self.negative_ttl is None:
                return False
            known = self.data.get(flight.key)
            if _is_older(version, known):
                self.stats.ignored_older += 1
                return False
            if version is None and known is not None:
                # The fetch began after every invalidation applied so far, so its result is at
                # least as new as the version they named: keep that knowledge.
                version = known.version
            ttl = self.negative_ttl if value is None else self.ttl
            assert ttl is not None  # checked above; narrows the type
            return self._store(flight.key, value, ttl, version)

    def abandon_fill(self, flight: Flight) -> None:
        """Forget ``flight`` after its fetch failed; nothing is stored."""
        with self.lock:
            self._detach(flight)

    def prime(self, key: str, value: Any, version: int | None = None) -> bool:
        """Store ``value`` as fresh now, unless untrusted or older than what is known.

        ``value`` must be current *now*: for values read earlier, take a :meth:`begin_bulk`
        reservation before reading them."""
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            # Compared with the events' versions later, in the listener: refuse it here.
            raise TypeError(f"version must be an int or None, got {type(version).__name__}")
        with self.lock:
            if not self.trusted or _is_older(version, self.data.get(key)):
                return False
            self._void_key(key)
            return self._store(key, value, self.ttl, version)

    def begin_bulk(self) -> BulkFill:
        """Reserve a fill of many keys; read their values after this call, then ``put`` them."""
        bulk = BulkFill(self)
        with self.lock:
            bulk.void = not self.trusted
            self._bulks.add(bulk)
        return bulk

    def _bulk_put(self, bulk: BulkFill, key: str, value: Any, version: int | None) -> bool:
        with self.lock:
            if bulk.void or key in bulk.dropped:
                return False
            if key in self.flights or key in self.thread_flights:
                return False  # a fetch that began later is on its way; let it win
            return self.prime(key, value, version)

    def _end_bulk(self, bulk: BulkFill) -> None:
        with self.lock:
            self._bulks.discard(bulk)

    # -- what events do --------------------------------------------------------------------

    def invalidate(self, key: str, version: int | None = None) -> bool:
        """Drop ``key`` and void its fills. With ``version``, remember it in a tombstone, and
        do nothing to an entry that already holds that version or a newer one; without, a
        version the entry knew is remembered all the same.
        Returns whether an entry was dropped."""
        with self.lock:
            if self._bulks or self.flights or self.thread_flights:
                self._void_key(key)
            entry = self.data.get(key)
            if entry is None:
                return False
            if version is not None and entry.version is not None and entry.version >= version:
                self.stats.ignored_older += 1
                return False
            known = version if version is not None else entry.version
            if known is None:
                del self.data[key]
                self._forgotten(key)
            elif entry.value is not TOMBSTONE or entry.version != known:
                self.data[key] = Entry(
                    TOMBSTONE, _NEVER, _NEVER, _NEVER, known, entry.gen, self.clock()
                )
                if self.tag_index is not None:
                    self.tag_index.discard(key)
                if self._weights is not None:
                    self._weigh(key, TOMBSTONE_WEIGHT + len(key))
            self.stats.invalidations += 1
            return True

    def invalidate_tags(self, tags: Iterable[str]) -> int:
        """Drop every entry stored with one of ``tags``, and void every fill in flight (its
        value, not known yet, might carry one). Returns how many entries were dropped."""
        if isinstance(tags, str):
            raise TypeError("tags must be a list of strings, not one str: pass [tag]")
        with self.lock:
            if self.tag_index is None:
                return 0  # nothing here is tagged, nor can a fill be
            dropped = sum(1 for key in self.tag_index.keys_for(tags) if self.invalidate(key))
            self._void_all()
            return dropped

    def apply_value(self, key: str, value: Any, version: int | None) -> bool:
        """Replace the entry of ``key`` with ``value`` carried by an event (refresh mode).

        Only keys this instance holds (or remembers in a tombstone) are refreshed; an event
        whose version is not newer than the known one is ignored. An event without a version
        for a key whose version is known drops the entry instead (keeping the version): its
        value may be older than that version. Returns whether it stored.
        """
        with self.lock:
            entry = self.data.get(key)
            if entry is None:
                self._void_key(key)
                return False
            if version is not None and entry.version is not None and entry.version >= version:
                self.stats.ignored_older += 1
                return False
            self._void_key(key)
            if version is None and entry.version is not None:
                # The value may be older than the version known (a fetch may have read a newer
                # one), and stored under that version it would make the event that names it
                # look applied already: serve neither, keep the version, let the next read
                # fetch.
                if entry.value is not TOMBSTONE:
                    self.data[key] = Entry(
                        TOMBSTONE, _NEVER, _NEVER, _NEVER, entry.version, entry.gen
                    )
                self.stats.invalidations += 1
                return False
            if not self._store(key, value, self.ttl, version):
                return False
            self.stats.refreshes += 1
            return True

    def clear(self) -> None:
        """Nothing stored so far is served any more, not even by ``stale_if_error``, and every
        fill is voided (a flush event, ``cache_clear()``). O(1): entries of the old generation
        stay until evicted, keeping their versions (an older fetch still cannot replace
        them)."""
        with self.lock:
            self._flushed_below = self.gen.number + 1
            self.suspect_all()

    def suspect_all(self) -> None:
        """Events may have been lost: nothing may be served as fresh any more, but values
        stay available to ``stale_if_error`` and versions stay known. Voids every fill. O(1)."""
        with self.lock:
            trusted = self.trusted
            self.gen = Generation(self.gen.number + 1)
            if trusted:
                self._serve(self.gen)
            self._void_all()
            self.stats.flushes += 1

    def distrust(self) -> None:
        """The listener is down: stop serving from the cache and storing fills. O(1)."""
        with self.lock:
            self._serve(NOBODY)
            self._void_all()

    def trust(self) -> None:
        """The listener is live again: serve the current generation and store fills."""
        with self.lock:
            self._void_all()
            self._serve(self.gen)

    # -- internals (lock held) -------------------------------------------------------------

    def _serve(self, gen: Generation) -> None:
        self.serving = gen
        for watcher in self._serving_watchers:
            watcher(gen)

    def _store(self, key: str, value: Any, ttl: float, version: int | None) -> bool:
        tags: tuple[str, ...] = ()
        weight = 0
        if self._tagger is not None or self._weights is not None:
            try:
                if self._tagger is not None and value is not None:
                    tags = tuple(self._tagger(key, value))
                    if any(type(tag) is not str for tag in tags):
                        raise TypeError(f"tags must be strings, got {tags!r}")
                if self._weights is not None:
                    weight = int(self._weigher(value)) + len(key) + ENTRY_OVERHEAD
            except Exception:
                self.stats.errors += 1
                log.warning(
                    "tags= or weigher= failed; the value is not stored",
                    extra={"ns": self.name, "key": key},
                    exc_info=True,
                )
                self.invalidate(key)
                return False
            if self.max_bytes is not None and weight > self.max_bytes:
                self.stats.evictions += 1
                self.invalidate(key)
                return False
        now = self.clock()
        if self.jitter:
            ttl *= 1.0 + self.jitter * (2.0 * self._random() - 1.0)
        expires = now + ttl
        data = self.data
        data[key] = Entry(
            value,
            expires,
            expires + self.stale_while_revalidate,
            expires + self.stale_if_error,
            version,
            self.gen,
            now,
        )
        data.move_to_end(key)
        if self.tag_index is not None:
            self.tag_index.assign(key, tags)
        if self._weights is not None:
            self._weigh(key, weight)
            while self.bytes > self.max_bytes and len(data) > 1:  # type: ignore[operator]
                self._evict_one(keep=key)
        while len(data) > self.maxsize:
            self._evict_one(keep=key)
        return True

    def _evict_one(self, keep: str) -> None:
        """Evict the entry read least recently, approximately: from the oldest end, an entry
        read since it was stored goes to the back once (its flag cleared); the first one not
        read goes. ``keep`` (the entry just stored) is passed over. Bounded: after one pass
        over every entry, the next one goes whatever its flag."""
        data = self.data
        for _ in range(len(data) + 1):
            key, entry = data.popitem(last=False)
            if key == keep or entry.used:
                entry.used = False
                data[key] = entry
                continue
            break
        else:
            key, entry = data.popitem(last=False)
            if key == keep:  # only reachable with one entry; never evict what was just stored
                data[key] = entry
                return
        self._forgotten(key)
        self.stats.evictions += 1

    def _weigh(self, key: str, weight: int) -> None:
        weights = self._weights
        assert weights is not None
        self.bytes += weight - weights.get(key, 0)
        weights[key] = weight

    def _forgotten(self, key: str) -> None:
        """``key`` left ``data``: forget its tags and weight."""
        if self.tag_index is not None:
            self.tag_index.discard(key)
        if self._weights is not None:
            self.bytes -= self._weights.pop(key, 0)

    def _detach(self, flight: Flight) -> None:
        for flights in (self.flights, self.thread_flights):
            if flights.get(flight.key) is flight:
                del flights[flight.key]

    def _void_key(self, key: str) -> None:
        # Checks first: on the listener's path there is rarely a fill or warm-up under way.
        if self._bulks:
            for bulk in self._bulks:
                bulk.dropped.add(key)
        if self.flights:
            flight = self.flights.pop(key, None)
            if flight is not None:
                flight.void = True
        if self.thread_flights:
            flight = self.thread_flights.pop(key, None)
            if flight is not None:
                flight.void = True

    def _void_all(self) -> None:
        for bulk in self._bulks:
            bulk.void = True
        for flights in (self.flights, self.thread_flights):
            for flight in list(flights.values()):
                flight.void = True
            flights.clear()


def _is_older(version: int | None, known: Entry | None) -> bool:
    return (
        version is not None
        and known is not None
        and known.version is not None
        and version < known.version
    )


def check_settings(
    *,
    ttl: object,
    maxsize: object,
    negative_ttl: object,
    max_bytes: object = None,
    jitter: object,
    stale_while_revalidate: object,
    stale_if_error: object,
) -> None:
    """Raise ValueError naming the first setting of a cache that is out of range."""
    _check_positive("ttl", ttl)
    if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 1:
        raise ValueError(f"maxsize must be a positive integer, got {maxsize!r}")
    if max_bytes is not None and (
        not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1
    ):
        raise ValueError(f"max_bytes must be a positive integer (bytes), got {max_bytes!r}")
    if negative_ttl is not None:
        _check_positive("negative_ttl", negative_ttl)
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
        raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
    _check_non_negative("stale_while_revalidate", stale_while_revalidate)
    _check_non_negative("stale_if_error", stale_if_error)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _check_non_negative(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
