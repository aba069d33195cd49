"""The time the async hit path compares expiries with, without a clock call per hit.

Reading ``time.monotonic()`` costs about as much as the rest of an async hit together. Like
Redis and memcached, which keep a cached "now" for their expiry checks, the hit path reads
an attribute instead: :class:`LoopClock` refreshes it from the event loop every
``resolution`` seconds. It never runs ahead of the real clock, so an entry is never taken as
expired early; it may be served up to ``resolution`` (or as long as the loop is blocked) after
its TTL ran out. The TTL is the safety net, and events do not go through this clock: an
invalidation, a flush or a lost-event flush takes effect at once.

An idle process does not tick: after ``lease`` seconds the clock *pauses* (``now`` is
``+inf``, so every hit check fails) and the next read, which then takes the slow path and
checks the real clock, wakes it again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["ExactClock", "HitClock", "LoopClock"]

_PAUSED = math.inf


class HitClock(Protocol):
    """What the async hit path reads: ``now`` is at most the real monotonic time, or
    ``+inf`` when it must ask the real clock (and call :meth:`wake`)."""

    @property
    def now(self) -> float: ...

    def wake(self) -> None:
        """A read found the clock paused: start keeping ``now`` current."""

    def close(self) -> None:
        """Stop for good (until woken again); ``now`` pauses."""


class LoopClock:
    """The monotonic time as of the event loop's last tick; see the module docstring."""

    __slots__ = ("now", "resolution", "lease", "_clock", "_handle", "_until")

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        resolution: float = 0.01,
        lease: float = 1.0,
    ) -> None:
        if not resolution > 0:
            raise ValueError(f"resolution must be a positive number of seconds, got {resolution!r}")
        if not lease >= resolution:
            raise ValueError(f"lease must be at least the resolution, got {lease!r}")
        self.now = _PAUSED
        self.resolution = resolution
        self.lease = lease
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._until = _PAUSED

    @property
    def ticking(self) -> bool:
        """Whether a tick is scheduled."""
        return self._handle is not None

    def wake(self) -> None:
        """Keep ``now`` current for the next ``lease`` seconds, ticking on the running loop.
        Outside a running loop it stays paused."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        now = self._clock()
        self._until = now + self.lease
        if self._handle is None or self._handle.cancelled():
            self.now = now
            self._handle = loop.call_later(self.resolution, self._tick, loop)

    def close(self) -> None:
        """Stop ticking; ``now`` pauses so that reads fall back to the real clock."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.now = _PAUSED

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = self._clock()
        if now >= self._until:
            self._handle = None
            self.now = _PAUSED
            return
        self.now = now
        self._handle = loop.call_later(self.resolution, self._tick, loop)


class ExactClock:
    """``now`` reads ``clock`` at every access: for an injected (fake) clock, whose moves a
    test expects to see at once."""

    __slots__ = ("_clock",)

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    @property
    def now(self) -> float:
        """The clock's reading, now."""
        return self._clock()

    def wake(self) -> None:
        """Nothing to wake."""

    def close(self) -> None:
        """Nothing to stop."""
