"""One deterministic test per guarantee of DESIGN.md that the core holds (1, 2, 3, 4, 7, 8).

Events are applied with ``handle_message`` (what the listener calls for each message) so the
order of fetches and events is fixed by the test, not by the scheduler. Guarantee 5 lives in
``test_lost_events.py``, 6 in ``test_outbox.py``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cachesync import CacheSync, ChangeEvent, Op

from .helpers import FakeClock, Owner, eventually

pytestmark = pytest.mark.timeout(20)


class Events:
    """Builds the events of one publisher, in sequence."""

    def __init__(self, source: str = "owner-1") -> None:
        self.source = source
        self.seq = 0

    def hello(self) -> bytes:
        """A heartbeat, so the client knows this publisher before anything is cached (the
        first contact with an unknown publisher flushes, since it may follow a restart)."""
        return ChangeEvent(source=self.source, seq=self.seq, op=Op.HEARTBEAT, ts=0.0).encode()

    def upsert(self, key: str, version: int | None = None, value: Any = None) -> bytes:
        self.seq += 1
        return ChangeEvent(
            source=self.source,
            seq=self.seq,
            ns="fx",
            op=Op.UPSERT,
            keys=(key,),
            version=version,
            value=value,
            ts=0.0,
        ).encode()


@pytest.fixture
async def sync(unique: str) -> AsyncIterator[CacheSync]:
    async with CacheSync(f"memory://{unique}") as client:
        yield client


# -- 1. A read after an event has been applied never returns the value from before it -------


async def test_g1_read_after_event_gets_new_value(sync: CacheSync) -> None:
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    events = Events()
    assert await get("USD") == 1.0
    owner.commit("USD", 1.1)
    sync.handle_message(events.upsert("USD", version=2))
    assert await get("USD") == 1.1


async def test_g1_read_after_event_does_not_join_a_fetch_that_began_before_it(
    sync: CacheSync,
) -> None:
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    owner.gate = asyncio.Event()
    early = asyncio.create_task(get("USD"))  # reads 1.0 from the owner, then waits
    await owner.started.wait()
    owner.commit("USD", 1.1)
    sync.handle_message(Events().upsert("USD", version=2))
    owner.gate.set()
    late = await get("USD")  # began after the event: must not share the early fetch
    assert late == 1.1
    assert await early == 1.0  # began before the event: the old value is fair
    assert owner.calls == 2


async def test_g1_stale_while_revalidate_never_serves_an_invalidated_value(unique: str) -> None:
    clock = FakeClock()
    async with CacheSync(f"memory://{unique}", clock=clock) as sync:
        owner = Owner(USD=1.0)
        get = sync.cached("fx", ttl=10, jitter=0, stale_while_revalidate=60)(owner.fetch)
        await get("USD")
        clock.advance(11)  # expired, inside the revalidation window
        owner.commit("USD", 1.1)
        sync.handle_message(Events().upsert("USD"))
        assert await get("USD") == 1.1


# -- 2. A fetch that started before an invalidation does not store its result as fresh -------


async def test_g2_fetch_racing_an_invalidation_is_not_stored(sync: CacheSync) -> None:
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    owner.gate = asyncio.Event()
    racing = asyncio.create_task(get("USD"))
    await owner.started.wait()  # the response with 1.0 is on its way
    owner.commit("USD", 1.1)
    sync.handle_message(Events().upsert("USD", version=2))  # invalidation lands first
    owner.gate.set()
    assert await racing == 1.0
    assert "USD" not in sync.namespace("fx")
    assert await get("USD") == 1.1
    assert owner.calls == 2


def test_g2_threaded_fetch_racing_an_invalidation_is_not_stored() -> None:
    async def scenario() -> None:
        async with CacheSync("memory://g2-threads") as sync:
            values = {"USD": 1.0}
            started, release = threading.Event(), threading.Event()

            @sync.cached("fx", ttl=3600)
            def get(code: str) -> float:
                value = values[code]
                started.set()
                release.wait(5)
                return value

            racing = asyncio.get_running_loop().run_in_executor(None, get, "USD")
            await asyncio.to_thread(started.wait, 5)
            values["USD"] = 1.1
            sync.handle_message(Events().upsert("USD"))
            release.set()
            assert await racing == 1.0
            assert await asyncio.to_thread(get, "USD") == 1.1

    asyncio.run(scenario())


# -- 3. Concurrent misses of one key in one instance make one fetch ---------------------------


async def test_g3_concurrent_async_misses_make_one_fetch(sync: CacheSync) -> None:
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    owner.gate = asyncio.Event()
    readers = [asyncio.create_task(get("USD")) for _ in range(200)]
    await owner.started.wait()
    await asyncio.sleep(0)
    owner.gate.set()
    assert await asyncio.gather(*readers) == [1.0] * 200
    assert owner.calls == 1


async def test_g3_concurrent_thread_misses_make_one_fetch(sync: CacheSync) -> None:
    calls = 0
    release = threading.Event()
    lock = threading.Lock()

    @sync.cached("fx", ttl=3600)
    def get(code: str) -> str:
        nonlocal calls
        with lock:
            calls += 1
        release.wait(5)
        return code.lower()

    readers = [asyncio.to_thread(get, "USD") for _ in range(16)]
    gathered = asyncio.gather(*readers)
    await eventually(lambda: calls >= 1)
    await asyncio.sleep(0.05)  # give the other threads time to pile onto the flight
    release.set()
    assert await gathered == ["usd"] * 16
    assert calls == 1


async def test_g3_a_cancelled_first_reader_does_not_fail_the_others(sync: CacheSync) -> None:
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    owner.gate = asyncio.Event()
    first = asyncio.create_task(get("USD"))
    await owner.started.wait()
    second = asyncio.create_task(get("USD"))
    await asyncio.sleep(0)
    first.cancel()
    owner.gate.set()
    assert await second == 1.0
    assert owner.calls == 1


# -- 4. Events applied out of order never replace a newer version with an older one ----------


async def test_g4_out_of_order_refresh_keeps_the_newer_version(sync: CacheSync) -> None:
    owner = Owner(USD={"rate": 1.0, "version": 1})
    get = sync.cached("fx", ttl=3600, mode="refresh", version_of=lambda v: v["version"])(
        owner.fetch
    )
    await get("USD")
    events = Events()
    v3 = events.upsert("USD", version=3, value={"rate": 1.3, "version": 3})
    v2 = events.upsert("USD", version=2, value={"rate": 1.2, "version": 2})
    sync.handle_message(v3)
    sync.handle_message(v2)
    assert (await get("USD"))["version"] == 3
    assert owner.calls == 1  # both applied without a fetch


async def test_g4_late_value_after_newer_invalidation_is_ignored(sync: CacheSync) -> None:
    owner = Owner(USD={"rate": 1.0, "version": 1})
    get = sync.cached("fx", ttl=3600, mode="refresh", version_of=lambda v: v["version"])(
        owner.fetch
    )
    await get("USD")
    owner.values["USD"] = {"rate": 1.3, "version": 3}
    events = Events()
    sync.handle_message(events.upsert("USD", version=3))  # invalidate to v3
    sync.handle_message(events.upsert("USD", version=2, value={"rate": 1.2, "version": 2}))
    assert (await get("USD"))["version"] == 3


async def test_g4_older_invalidation_does_not_drop_a_newer_value(sync: CacheSync) -> None:
    owner = Owner(USD={"rate": 1.0, "version": 5})
    get = sync.cached("fx", ttl=3600, version_of=lambda v: v["version"])(owner.fetch)
    events = Events()
    sync.handle_message(events.hello())
    await get("USD")
    sync.handle_message(events.upsert("USD", version=4))
    await get("USD")
    assert owner.calls == 1


# -- 7. Owner down: within stale_if_error the last value, past it a clear error --------------


async def test_g7_stale_if_error_serves_last_value_then_raises(unique: str) -> None:
    clock = FakeClock()
    async with CacheSync(f"memory://{unique}", clock=clock) as sync:
        owner = Owner(USD=1.0)
        get = sync.cached("fx", ttl=10, jitter=0, stale_if_error=60)(owner.fetch)
        assert await get("USD") == 1.0
        owner.fail = ConnectionError("owner is down")
        clock.advance(30)  # expired 20 s ago; inside the 60 s allowance
        assert await get("USD") == 1.0
        assert sync.stats()["namespaces"]["fx"]["stale_serves"] == 1
        clock.advance(50)  # 70 s past expiry
        with pytest.raises(ConnectionError, match="owner is down"):
            await get("USD")


async def test_g7_every_waiter_of_a_failed_flight_gets_the_same_exception(
    sync: CacheSync,
) -> None:
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    owner.gate = asyncio.Event()
    owner.fail = RuntimeError("503 from owner")
    readers = [asyncio.create_task(get("USD")) for _ in range(5)]
    await owner.started.wait()
    owner.gate.set()
    results = await asyncio.gather(*readers, return_exceptions=True)
    assert len({id(r) for r in results}) == 1 and isinstance(results[0], RuntimeError)
    assert owner.calls == 1
    owner.fail = None
    assert await get("USD") == 1.0  # nothing was cached by the failure
    assert owner.calls == 2


# -- 8. Bad input never crashes a listener or a read path, and is visible ---------------------


async def test_g8_garbage_on_the_channel_is_counted_and_the_listener_goes_on(
    unique: str,
) -> None:
    from cachesync.transports.memory import bus_for

    async with CacheSync(f"memory://{unique}") as sync:
        owner = Owner(USD=1.0)
        get = sync.cached("fx", ttl=3600)(owner.fetch)
        await get("USD")
        bus = bus_for(f"memory://{unique}")
        for payload in (
            b"\x00\xff garbage",
            b'{"v": 9}',
            b"{" * 10,
            b'{"source":"s","seq":1,"op":"upsert","ts":1,"ns":"fx","keys":"USD"}',
            b"x" * (2 << 20),
        ):
            bus.publish("cachesync", payload)
        bus.publish("cachesync", Events().upsert("nobody-reads-this-ns"))
        owner.commit("USD", 1.1)
        bus.publish("cachesync", Events("owner-2").upsert("USD"))
        await eventually(lambda: sync.stats()["listener"]["messages"] == 7)
        listener = sync.stats()["listener"]
        assert listener["bad_events"] == 4
        assert listener["unknown_schema"] == 1  # {"v": 9}: counted apart, flushes everything
        assert listener["listener_up"]
        assert await get("USD") == 1.1


async def test_g8_event_for_unknown_namespace_is_counted(sync: CacheSync) -> None:
    sync.cached("fx", ttl=60)(Owner().fetch)
    payload = ChangeEvent(source="s", seq=1, ns="other", op=Op.FLUSH, ts=0.0).encode()
    sync.handle_message(payload)
    assert sync.stats()["listener"]["unknown_namespace"] == 1


async def test_g8_from_event_failure_is_counted_and_falls_back_to_invalidation(
    sync: CacheSync,
) -> None:
    owner = Owner(USD=1.0)

    def strict(value: Any) -> float:
        if not isinstance(value, float):
            raise ValueError("not a rate")
        return value

    get = sync.cached("fx", ttl=3600, mode="refresh", from_event=strict)(owner.fetch)
    await get("USD")
    owner.commit("USD", 1.2)
    sync.handle_message(Events().upsert("USD", value="garbage"))
    assert await get("USD") == 1.2
    assert sync.stats()["namespaces"]["fx"]["errors"] == 1
