"""The core attacked as a hostile user would: raising callbacks, cancelled and orphaned fills,
event loops that end, odd signatures, replayed heartbeats, sources that fall silent.

Every test here failed before the fix that came with it. Events are applied with
``handle_message`` (what the listener calls for each message) and time is a fake clock, so
each interleaving is fixed by the test.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cachesync import CacheSync, ChangeEvent, Op

pytestmark = pytest.mark.timeout(20)


def heartbeat(source: str, seq: int, interval: float = 1.0) -> bytes:
    return ChangeEvent(
        source=source, seq=seq, op=Op.HEARTBEAT, value={"interval": interval}, ts=0.0
    ).encode()


def upsert(source: str, seq: int, key: str, ns: str = "fx", value: Any = None) -> bytes:
    return ChangeEvent(
        source=source, seq=seq, ns=ns, op=Op.UPSERT, keys=(key,), value=value, ts=0.0
    ).encode()


def flush(source: str, seq: int, ns: str = "fx") -> bytes:
    return ChangeEvent(source=source, seq=seq, ns=ns, op=Op.FLUSH, ts=0.0).encode()


class RaisingObserver:
    """A metrics hook that fails on every call."""

    def fetch_done(self, ns: str, seconds: float, ok: bool) -> None:
        raise RuntimeError("fetch_done failed")

    def event_applied(self, ns: str, op: str, lag_seconds: float) -> None:
        raise RuntimeError("event_applied failed")

    def lost_events(self, cause: str) -> None:
        raise RuntimeError("lost_events failed")

    def listener_state(self, up: bool) -> None:
        raise RuntimeError("listener_state failed")


# -- a raising observer ------------------------------------------------------------------------


async def test_a_raising_observer_neither_stops_events_nor_leaves_caches_trusted_unfed(
    unique: str,
) -> None:
    # Before: event_applied raised, _set_down() then raised in listener_state(False) before it
    # distrusted anything, and the listener died on it with every cache still trusted.
    async with CacheSync(f"memory://{unique}", observer=RaisingObserver()) as sync:
        calls = 0

        async def fetch(code: str) -> int:
            nonlocal calls
            calls += 1
            return calls

        get = sync.cached("fx")(fetch)
        sync.handle_message(heartbeat("A", 0))
        assert await get("USD") == 1
        sync.handle_message(upsert("A", 1, "USD"))  # raised before
        assert sync.listener_up and get.cache.trusted
        assert await get("USD") == 2  # the event was applied


async def test_a_raising_fetch_observer_does_not_strand_the_readers(unique: str) -> None:
    # Before: fetch_done raised inside the fill, whose waiter was never resolved: both readers
    # (and every later read of the key) waited forever.
    async with CacheSync(f"memory://{unique}", observer=RaisingObserver()) as sync:
        gate = asyncio.Event()

        async def fetch(code: str) -> str:
            await gate.wait()
            return code.lower()

        get = sync.cached("fx")(fetch)
        first, second = asyncio.create_task(get("USD")), asyncio.create_task(get("USD"))
        await asyncio.sleep(0)
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(first, second), 5) == ["usd", "usd"]
        assert await get("USD") == "usd"


def test_a_raising_fetch_observer_does_not_strand_reader_threads(unique: str) -> None:
    sync = CacheSync(f"memory://{unique}", observer=RaisingObserver())

    def fetch(code: str) -> str:
        return code.lower()

    get = sync.cached("fx")(fetch)
    assert get("USD") == "usd"  # raised fetch_done's error, and left the flight behind
    assert not get.cache.thread_flights  # where every later reader of USD waited forever
