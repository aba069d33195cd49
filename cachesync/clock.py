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
import weakref
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
    """The monotonic time as of the event loop's last tick; see the module docstring.

    The ticker is a task on the loop of the read that woke it. When that loop ends (its
    tasks cancelled by ``asyncio.run``, or the loop closed and its tasks collected), the
    ticker pauses the clock on its way out, so a reading can never stay frozen in the past:
    reads from a later loop find it paused and wake a ticker there.
    """

    __slots__ = ("now", "resolution", "lease", "_clock", "_tickers", "_until")

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
        # Loop -> its ticker, weakly: a dead loop or a finished ticker drops out by itself,
        # and nothing here keeps a ticker (and its coroutine) alive.
        self._tickers: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, weakref.ref[asyncio.Task[None]]
        ] = weakref.WeakKeyDictionary()
        self._until = _PAUSED

    @property
    def ticking(self) -> bool:
        """Whether a ticker runs (on some loop)."""
        return any(_alive(ref) for ref in list(self._tickers.values()))

    def wake(self) -> None:
        """Keep ``now`` current for the next ``lease`` seconds, ticking on the running loop.
        Outside a running loop it stays paused."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        now = self._clock()
        self._until = now + self.lease
        ref = self._tickers.get(loop)
        if ref is None or not _alive(ref):
            self.now = now
            task = loop.create_task(self._tick(), name="cachesync-hit-clock")
            self._tickers[loop] = weakref.ref(task)

    def close(self) -> None:
        """Stop ticking; ``now`` pauses so that reads fall back to the real clock."""
        for ref in list(self._tickers.values()):
            task = ref()
            if task is not None and not task.done():
                try:
                    task.cancel()
                except RuntimeError:  # its loop is closed: it will never tick again
                    pass
        self._tickers.clear()
        self.now = _PAUSED

    async def _tick(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.resolution)
                now = self._clock()
                if now >= self._until:
                    return
                self.now = now
        finally:
            # Lease over, cancelled, or collected with a closed loop: never leave a reading
            # that no longer moves.
            self.now = _PAUSED


def _alive(ref: weakref.ref[asyncio.Task[None]]) -> bool:
    task = ref()
    return task is not None and not task.done()


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
