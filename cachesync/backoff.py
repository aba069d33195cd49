"""Capped exponential backoff with equal jitter, shared by every reconnect loop."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Delays of ``initial * factor**n`` capped at ``maximum``, each drawn from [d/2, d]
    ("equal jitter": never shorter than half the step, so a retry storm still spreads out
    without retrying at once, as full jitter's [0, d] may).

    ``next_delay()`` gives the next delay; ``reset()`` starts over after a success.
    """

    initial: float = 0.05
    maximum: float = 5.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")

    def next_delay(self) -> float:
        """The delay before the next attempt."""
        cap = min(self.maximum, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return self.rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        """Forget past failures."""
        self.attempt = 0
