"""Small test helpers: a fake clock, a controllable owner, and a way to await a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Owner:
    """The owner's data with versions, and a fetch whose completion a test can hold back."""

    def __init__(self, **values: Any) -> None:
        self.values: dict[str, Any] = dict(values)
        self.versions: dict[str, int] = {k: 1 for k in values}
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.fail: BaseException | None = None

    def commit(self, key: str, value: Any) -> int:
        self.values[key] = value
        self.versions[key] = self.versions.get(key, 0) + 1
        return self.versions[key]

    async def fetch(self, key: str) -> Any:
        """Read the value *now*, then wait for the gate (if any) before returning it: the
        shape of a slow response that raced a change."""
        self.calls += 1
        value = self.values.get(key)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return value


async def eventually(
    condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005
) -> None:
    """Wait until ``condition()`` holds, checking every ``interval``; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the timeout")
        await asyncio.sleep(interval)


class SilentServer:
    """A TCP server that takes connections, reads what they send and never answers (a hung
    node, or a port forward to one). ``accepted`` counts connections, ``open`` those the
    client has not closed yet. Use as ``async with SilentServer() as server``."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self._writers.add(writer)
        try:
            while await reader.read(4096):
                pass
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.close()

    async def __aenter__(self) -> SilentServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
