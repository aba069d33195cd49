"""What the outbox tests share: a raw subscriber, a broker with an off switch, a stallable
one, and the PostgreSQL sessions of a relay (found by their application_name)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from cachesync import ChangeEvent, Op, TransportError
from cachesync.transports.base import from_url
from cachesync.transports.memory import MemoryTransport


class Collector:
    """A raw subscriber: every event of ``channel``, decoded, in arrival order."""

    def __init__(self, url: str, channel: str = "cachesync") -> None:
        self.transport = from_url(url)
        self.channel = channel
        self.events: list[ChangeEvent] = []
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def changes(self) -> list[ChangeEvent]:
        return [e for e in self.events if e.op != Op.HEARTBEAT]

    async def __aenter__(self) -> Collector:
        await self.transport.connect()
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(5):
            await self._ready.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.transport.close()

    async def _run(self) -> None:
        async for payload in self.transport.subscribe(self.channel, lambda _: self._ready.set()):
            self.events.append(ChangeEvent.decode(payload))
            self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_changes(self, count: int, timeout: float = 10.0) -> list[ChangeEvent]:
        await self.wait_for(lambda: len(self.changes) >= count, timeout)
        return self.changes


class FlakyTransport(MemoryTransport):
    """The memory bus with a switch that makes the broker unreachable."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.down = False
        self.attempts = 0

    async def connect(self) -> None:
        if self.down:
            raise TransportError("broker down (test)")
        await super().connect()

    async def publish(self, channel: str, payload: bytes) -> None:
        self.attempts += 1
        # Like a real broker client (and unlike the bare memory bus): a closed or failed
        # connection is a TransportError, which makes the publisher reconnect.
        if self.down or not self.connected:
            raise TransportError("broker down (test)")
        await super().publish(channel, payload)


class StallingTransport(MemoryTransport):
    """The memory bus whose next publish, once armed, waits until released: a publish that
    is on the wire while the world moves on."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.armed = False
        self.stalled = asyncio.Event()
        self.release = asyncio.Event()

    async def _stall(self) -> None:
        if self.armed:
            self.armed = False
            self.stalled.set()
            await self.release.wait()

    async def publish_many(self, channel: str, payloads: Sequence[bytes]) -> None:
        await self._stall()
        for payload in payloads:
            await super().publish(channel, payload)

    async def publish(self, channel: str, payload: bytes) -> None:
        await self._stall()
        await super().publish(channel, payload)


async def session_pids(admin: AsyncEngine, application_name: str) -> list[int]:
    """The server pids of the sessions named ``application_name`` (ask through ``admin``, an
    engine whose sessions carry another name)."""
    async with admin.connect() as conn:
        result = await conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE application_name = :name ORDER BY pid"),
            {"name": application_name},
        )
        return [int(pid) for pid in result.scalars()]


async def terminate_sessions(admin: AsyncEngine, application_name: str) -> list[int]:
    """``pg_terminate_backend`` every session named ``application_name`` and wait until they
    are gone (so their advisory locks are free). Returns their pids."""
    pids = await session_pids(admin, application_name)
    async with admin.connect() as conn:
        for pid in pids:
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    async with asyncio.timeout(5):
        while set(pids) & set(await session_pids(admin, application_name)):
            await asyncio.sleep(0.01)
    return pids
