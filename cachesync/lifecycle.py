"""What every long-running part (client, publisher, relay, monitor) shares: ``async with``."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self

__all__ = ["Service"]


class Service(abc.ABC):
    """Something with ``start()`` and ``stop()``; ``async with it:`` runs them around a block."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the background work."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop it; idempotent."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
