"""Progress lines on stderr: a countdown on a terminal, a line every few seconds otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """Reports what the benchmark is doing; quiet mode prints nothing."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._last_line = 0.0

    def say(self, message: str) -> None:
        """One line of progress."""
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def wait(self, until_monotonic: float, what: str) -> None:
        """Sleep until ``until_monotonic`` (``time.monotonic()``), showing what is running."""
        while True:
            left = until_monotonic - time.monotonic()
            if left <= 0:
                break
            if not self.quiet:
                now = time.monotonic()
                if self.tty:
                    print(f"\r    {what}: {left:5.1f} s left ", end="", file=sys.stderr, flush=True)
                elif now - self._last_line >= 10:
                    self._last_line = now
                    print(f"    {what}: {left:.0f} s left", file=sys.stderr, flush=True)
            time.sleep(min(left, 0.5))
        if self.tty and not self.quiet:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
