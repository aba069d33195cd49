"""ConsistencyMonitor: measure, in production, how often this instance serves stale data.

Meta's Polaris, in small. Events keep the local caches coherent, and lost-event detection bounds
how stale an entry can get; the monitor checks that promise from the outside. At
``sample_rate`` per second it picks a random entry of one namespace that would be served as
fresh and has a known version, asks the owner for that key's current version, and compares:

- the owner's version is not newer: the sample is **fresh**;
- the owner's version is newer (or the owner no longer has the key): the entry is *behind*.
  That is expected for a moment (the invalidation may be in flight), so the monitor looks again
  ``bound`` seconds after the owner answered. If by then the entry is no longer served as fresh,
  or holds the owner's version, it **caught up**; if it is still served with an older version,
  it was **stale beyond the bound**: the owner's newer version was committed before the answer,
  so the entry served outdated data for longer than ``bound``.

A sample that is counted stale is always really stale beyond the bound (the monitor may miss a
short staleness, never invent one). The share ``stale / (fresh + caught_up + stale)`` is
``stale_ratio``, in ``sync.stats()["consistency"][ns]``, and counted in a
:class:`~cachesync.contrib.prometheus.PrometheusMetrics` if one is given. Samples are uniform
over entries, not over reads. The owner is asked at most ``sample_rate`` times per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from ..cache import TOMBSTONE, LocalCache
from ..errors import StateError
from ..lifecycle import Service
from ..logutil import RateLimitedLogger

if TYPE_CHECKING:
    from ..client import CacheSync
    from .prometheus import PrometheusMetrics

__all__ = ["ConsistencyMonitor", "ConsistencyStats", "CurrentVersion"]

CurrentVersion = Callable[[str], Awaitable[int | None]]
"""Asks the owner for the current version of a key; ``None`` when the owner no longer has it."""

STATS_SECTION = "consistency"
"""The section of ``sync.stats()`` the monitors of a client fill, one entry per namespace."""

# At most this many entries are behind and awaiting their re-check; more are not sampled until
# some are decided (so an owner far ahead of a cache cannot grow memory without bound).
MAX_PENDING = 10_000

# How many random entries a sample looks at to find one that is fresh and has a version.
_PICKS = 16

log = logging.getLogger("cachesync.monitor")


@dataclass(slots=True)
class ConsistencyStats:
    """Counters of the monitor(s) of one namespace (``stats()["consistency"][ns]``).

    ``checked``: the owner answered about a sampled entry. Of those, ``fresh`` were not behind,
    ``caught_up`` were behind but caught up within the bound, ``stale`` stayed behind for longer
    than the bound, and ``pending`` await their re-check. ``errors``: the owner did not answer.
    ``idle``: there was no fresh entry with a version to sample (empty cache, listener down).
    """

    checked: int = 0
    fresh: int = 0
    caught_up: int = 0
    stale: int = 0
    pending: int = 0
    errors: int = 0
    idle: int = 0
    bound: float = 0.0
    sample_rate: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        """The counters as a dict, with ``stale_ratio`` (None until a sample is decided)."""
        result: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        decided = self.fresh + self.caught_up + self.stale
        result["stale_ratio"] = self.stale / decided if decided else None
        return result


class _Section:
    """What a client's ``stats()["consistency"]`` reads: the stats of each monitored namespace.

    Registered with ``sync.add_stats`` by the first monitor of a client; the next ones find it
    there with ``sync.stats_source``, so the client holds it and nothing else does.
    """

    def __init__(self) -> None:
        self.namespaces: dict[str, ConsistencyStats] = {}

    def __call__(self) -> dict[str, Any]:
        return {ns: stats.snapshot() for ns, stats in self.namespaces.items()}


def _section_for(sync: CacheSync) -> _Section:
    section = sync.stats_source(STATS_SECTION)
    if section is None:
        section = _Section()
        sync.add_stats(STATS_SECTION, section)
    elif not isinstance(section, _Section):
        raise ValueError(
            f"sync.stats() section {STATS_SECTION!r} is taken by something other than a "
            "ConsistencyMonitor"
        )
    return section


@dataclass(slots=True)
class _Suspect:
    cache: LocalCache
    key: str
    cached_version: int
    owner_version: int | None
    due: float


class ConsistencyMonitor(Service):
    """Samples cached entries of namespace ``ns`` of ``sync`` and reports how many were stale
    for longer than ``bound`` seconds. See the module docstring for what is counted.

    ``current_version(key)`` asks the owner for the key's current version (``None``: the owner
    no longer has the key); it is given ``timeout`` seconds. ``sample_rate`` is samples per
    second; ``clock`` is the monotonic clock that measures ``bound``. ``metrics``, if given,
    counts each decided sample by outcome.

    Run it with ``async with ConsistencyMonitor(...)`` (or :meth:`start`/:meth:`stop`), which
    owns one background task; or drive it by hand with :meth:`sample` and :meth:`check_due`.
    Monitors of one namespace of one client share their counters.
    """

    def __init__(
        self,
        sync: CacheSync,
        ns: str,
        current_version: CurrentVersion,
        *,
        sample_rate: float = 1.0,
        bound: float = 5.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        metrics: PrometheusMetrics | None = None,
    ) -> None:
        if not isinstance(ns, str) or not ns:
            raise ValueError(f"ns must be a non-empty namespace name, got {ns!r}")
        if not callable(current_version):
            raise TypeError("current_version must be an async function of the key")
        for name, value in (("sample_rate", sample_rate), ("bound", bound), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.sync = sync
        self.ns = ns
        self.sample_rate = float(sample_rate)
        self.bound = float(bound)
        self.timeout = float(timeout)
        self._current_version = current_version
        self._clock = clock
        self._random = rng or random.Random()
        self._metrics = metrics
        self._pending: list[_Suspect] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._warn = RateLimitedLogger(log, per_seconds=60.0)
        section = _section_for(sync)
        stats = section.namespaces.get(ns)
        if stats is None:
            stats = section.namespaces[ns] = ConsistencyStats()
        stats.bound = self.bound
        stats.sample_rate = self.sample_rate
        self.counters = stats

    def stats(self) -> dict[str, Any]:
        """The counters of this monitor's namespace as a dict (also in
        ``sync.stats()["consistency"][ns]``); :attr:`counters` are the live ones."""
        return self.counters.snapshot()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the background task runs."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start sampling in a background task."""
        if self._task is not None:
            raise StateError("this ConsistencyMonitor is already started")
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"cachesync-monitor-{self.ns}")

    async def stop(self) -> None:
        """Cancel the background task and wait for it to end. Idempotent; the monitor may be
        started again. Pending re-checks are dropped (they stay undecided)."""
        task = self._task
        if task is None:
            return
        self._task = None
        # The flag as well as the cancel: some clients swallow a cancellation that lands
        # while they wait for a reply (redis-py 8.1's asyncio client does), and the loop
        # would then go on forever.
        self._stopping = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._pending.clear()
        self.counters.pending = 0

    # -- one step at a time ----------------------------------------------------------------

    async def sample(self) -> str | None:
        """Take one sample now: ``"fresh"``, ``"behind"`` (to be re-checked after the bound),
        ``"error"``, or None when there was nothing to sample."""
        stats = self.counters
        picked = self._pick()
        if picked is None:
            stats.idle += 1
            return None
        cache, key, cached_version = picked
        try:
            async with asyncio.timeout(self.timeout):
                owner_version = await self._current_version(key)
        except Exception as exc:
            # Whatever the owner's client raises, the monitor must go on.
            stats.errors += 1
            self._count("error")
            self._warn.warning(
                "monitor_owner", "consistency monitor: the owner did not answer: %r", exc
            )
            return "error"
        stats.checked += 1
        if owner_version is not None and owner_version <= cached_version:
            stats.fresh += 1
            self._count("fresh")
            return "fresh"
        # The owner committed its version before it answered, so from now on the entry is
        # behind for at least as long as it stays behind: look again after the bound.
        self._pending.append(
            _Suspect(cache, key, cached_version, owner_version, self._clock() + self.bound)
        )
        stats.pending = len(self._pending)
        return "behind"

    def check_due(self) -> int:
        """Decide the entries whose bound has passed; return how many were stale."""
        if not self._pending:
            return 0
        now = self._clock()
        due = [s for s in self._pending if s.due <= now]
        if not due:
            return 0
        self._pending = [s for s in self._pending if s.due > now]
        stale = 0
        for suspect in due:
            if self._still_behind(suspect.cache, suspect):
                stale += 1
                self.counters.stale += 1
                self._count("stale")
                log.warning(
                    "consistency monitor: an entry stayed stale beyond the bound",
                    extra={
                        "ns": self.ns,
                        "key": suspect.key,
                        "owner_version": suspect.owner_version,
                        "bound": self.bound,
                    },
                )
            else:
                self.counters.caught_up += 1
                self._count("caught_up")
        self.counters.pending = len(self._pending)
        return stale

    # -- internals -------------------------------------------------------------------------

    def _caches(self) -> list[LocalCache]:
        try:
            return self.sync.caches(self.ns)
        except KeyError:  # nothing decorated for ns yet
            return []

    def _pick(self) -> tuple[LocalCache, str, int] | None:
        """A random key served as fresh now, with its cache and version."""
        if len(self._pending) >= MAX_PENDING:
            return None
        caches = [cache for cache in self._caches() if cache.trusted and len(cache)]
        if not caches:
            return None
        cache = self._random.choice(caches)
        keys = cache.keys()  # a copy taken in one step: reader threads may reorder entries
        # Rejection sampling keeps the pick uniform over the entries that qualify.
        if len(keys) <= _PICKS:
            candidates = self._random.sample(keys, len(keys))
        else:
            candidates = [self._random.choice(keys) for _ in range(_PICKS)]
        for key in candidates:
            entry = cache.get_fresh(key)
            if entry is not None and entry.value is not TOMBSTONE and entry.version is not None:
                return cache, key, entry.version
        return None

    @staticmethod
    def _still_behind(cache: LocalCache, suspect: _Suspect) -> bool:
        entry = cache.get_fresh(suspect.key)
        if entry is None or entry.value is TOMBSTONE or entry.version is None:
            return False  # no longer served as fresh, or no longer comparable
        if suspect.owner_version is None:
            # The owner had no such key: behind while the entry it was asked about is still
            # served (a key created again since, and fetched again, has a new version).
            return entry.version <= suspect.cached_version
        return entry.version < suspect.owner_version

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.consistency_checked(self.ns, outcome)

    async def _run(self) -> None:
        interval = 1.0 / self.sample_rate
        next_sample = self._clock()
        while not self._stopping:
            self.check_due()
            if self._clock() >= next_sample:
                await self.sample()
                # Do not catch up on samples missed while the owner was slow: the rate is a
                # promise to the owner as much as a setting.
                next_sample = max(next_sample + interval, self._clock())
            wake = next_sample
            if self._pending:
                wake = min(wake, min(s.due for s in self._pending))
            await asyncio.sleep(max(0.0, wake - self._clock()))
