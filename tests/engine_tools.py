"""What the engine fault tests share: a reader that reconnects the way the client's listener does,
and a publisher that keeps publishing numbered events through failures."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass, field

import pytest

from cachesync.errors import TransportError
from cachesync.transports.base import Transport


def require_binary(name: str) -> str:
    """The path of server binary ``name``; fail under CI, skip elsewhere, when it is missing."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on the PATH; install it to run the cluster fault tests"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class Reader:
    """Subscribes, and after every ConnectionLost (or other TransportError) connects and
    subscribes again, as ``CacheSync``'s listener does. Records every payload and ready."""

    transport: Transport
    channel: str
    numbers: list[int] = field(default_factory=list)
    readies: list[tuple[float, bool]] = field(default_factory=list)
    losses: list[tuple[float, str]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> Reader:
        self.task = asyncio.create_task(self._run())
        return self

    def _ready(self, resumed: bool) -> None:
        self.readies.append((time.monotonic(), resumed))
        self._changed.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.transport.connect()
                async for payload in self.transport.subscribe(self.channel, self._ready):
                    self.numbers.append(int(payload))
                    self.arrivals.append(time.monotonic())
                    self._changed.set()
            except TransportError as exc:
                self.losses.append((time.monotonic(), str(exc)))
                self._changed.set()
                await asyncio.sleep(0.05)

    async def wait(self, condition: object, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not condition():  # type: ignore[operator]
                assert self.task is not None and not self.task.done(), "the reader died"
                self._changed.clear()
                await self._changed.wait()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.transport.close()


@dataclass
class Feeder:
    """Publishes ``0, 1, 2, ...`` every ``interval`` seconds; on a failure, reconnects and
    publishes the same number again (at least once)."""

    transport: Transport
    channel: str
    interval: float = 0.005
    sent: int = 0
    failures: int = 0
    task: asyncio.Task[None] | None = None

    def start(self) -> Feeder:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        await self.transport.connect()
        while True:
            try:
                await self.transport.publish(self.channel, b"%d" % self.sent)
            except TransportError:
                self.failures += 1
                await self.transport.close()
                try:
                    await self.transport.connect()
                except TransportError:
                    pass
                continue
            self.sent += 1
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.transport.close()


def in_order_without_gaps(numbers: list[int]) -> bool:
    """From the first number seen on, none is skipped (duplicates and repeats, from
    at-least-once publishing and replay, are allowed)."""
    highest = numbers[0] - 1 if numbers else -1
    for number in numbers:
        if number > highest + 1:
            return False
        highest = max(highest, number)
    return True
