"""Logging helpers: a per-reason rate limit, so a flood of bad input cannot fill a disk."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["RateLimitedLogger"]


class RateLimitedLogger:
    """Logs at most one record per ``reason`` every ``per_seconds``; the next record that gets
    through says how many were suppressed meanwhile (``extra={"suppressed": N}``)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        per_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.per_seconds = per_seconds
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def _allow(self, reason: str) -> int | None:
        now = self._clock()
        last = self._last.get(reason)
        if last is not None and now - last < self.per_seconds:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return None
        if len(self._last) > 1000:  # reasons are a fixed set in practice; stay bounded anyway
            self._last.clear()
        self._last[reason] = now
        return self._suppressed.pop(reason, 0)

    def warning(self, reason: str, msg: str, *args: Any, **extra: Any) -> None:
        """Log ``msg % args`` at WARNING unless ``reason`` was logged too recently."""
        suppressed = self._allow(reason)
        if suppressed is not None:
            self.logger.warning(
                msg, *args, extra={"reason": reason, "suppressed": suppressed, **extra}
            )

    def exception(self, reason: str, msg: str, *args: Any) -> None:
        """Like :meth:`warning` at ERROR, with the current exception's traceback."""
        suppressed = self._allow(reason)
        if suppressed is not None:
            self.logger.exception(msg, *args, extra={"reason": reason, "suppressed": suppressed})
