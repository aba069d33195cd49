"""Inbox: the payloads a transport's callback received, waiting for a subscription's iterator.

The memory bus and the AMQP consumer callback push payloads; the subscription's ``async for``
drains them. Like Redis with a slow pub/sub client, a subscriber that falls more than
``max_backlog`` payloads behind is cut: what it had not read is dropped (the consumer flushes
anyway when its subscription ends), and the iterator raises ``ConnectionLost``. A callback
that can wait (nats-py awaits its callback before it delivers the next message) uses
:meth:`Inbox.put` instead: it waits for room, and the client library's own bounded queue
holds the rest.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

from ..errors import ConnectionLost

__all__ = ["Inbox"]

T = TypeVar("T")


class Inbox(Generic[T]):
    """A bounded buffer between a delivering callback and one subscription's iterator.

    The iterator's loop::

        while True:
            while inbox.buffer:
                yield inbox.buffer.popleft()
            await inbox.refill(what)
    """

    __slots__ = ("buffer", "wakeup", "room", "lost", "reason", "max_backlog")

    def __init__(self, max_backlog: int) -> None:
        self.buffer: deque[T] = deque()
        self.wakeup = asyncio.Event()
        self.room = asyncio.Event()  # set while put() may add more
        self.room.set()
        self.lost = False
        self.reason = ""
        self.max_backlog = max_backlog

    def deliver(self, payload: T) -> None:
        """Queue ``payload`` for the iterator; cut the subscription if it is too far behind."""
        if self.lost:
            return
        if len(self.buffer) >= self.max_backlog:
            self.cut(f"the subscriber fell more than {self.max_backlog} messages behind")
            return
        self.buffer.append(payload)
        self.wakeup.set()

    async def put(self, payload: T) -> None:
        """Queue ``payload`` for the iterator; once ``max_backlog`` wait, wait until the
        iterator has taken them (or the subscription was cut). Never cuts by itself."""
        if self.lost:
            return
        self.buffer.append(payload)
        self.wakeup.set()
        if len(self.buffer) >= self.max_backlog:
            self.room.clear()
            await self.room.wait()

    def cut(self, reason: str) -> None:
        """End the subscription: the iterator raises ConnectionLost(``reason``). The first
        reason given stays."""
        if self.lost:
            return
        self.lost = True
        self.reason = reason
        self.buffer.clear()
        self.wakeup.set()
        self.room.set()

    async def refill(self, what: str) -> None:
        """Wait until there is something to read, or something else woke the iterator (the
        AMQP subscription's ack timer). Raise ConnectionLost, naming ``what`` and the reason,
        once the subscription was cut."""
        if self.lost:
            raise ConnectionLost(f"{what}: {self.reason}")
        if self.buffer:  # filled while the iterator awaited something else (an ack)
            return
        self.room.set()  # all taken
        self.wakeup.clear()
        await self.wakeup.wait()
        if self.lost:
            raise ConnectionLost(f"{what}: {self.reason}")
