"""Guarantee 5 on the memory bus: a lost event is detected (gap, source change, reconnect,
missed heartbeat) and the namespaces are flushed at once; while the listener is down reads go
to the owner, with single-flight. The same behaviours over real brokers are in
``test_faults.py``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cachesync import CacheSync, ChangeEvent, Op, Publisher
from cachesync.transports.base import OnReady
from cachesync.transports.memory import MemoryTransport, bus_for

from .helpers import Owner, eventually

pytestmark = pytest.mark.timeout(20)


def event(seq: int, *, source: str = "s1", op: Op = Op.UPSERT, key: str = "OTHER") -> bytes:
    keys = (key,) if op is Op.UPSERT else ()
    return ChangeEvent(source=source, seq=seq, ns="fx", op=op, keys=keys, ts=0.0).encode()


@pytest.fixture
async def sync(unique: str) -> AsyncIterator[CacheSync]:
    async with CacheSync(f"memory://{unique}", reconnect_initial=0.01) as client:
        yield client


async def cached_usd(sync: CacheSync, owner: Owner) -> None:
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    await get("USD")
    await get("USD")
    assert owner.calls == 1


async def test_sequence_gap_flushes(sync: CacheSync) -> None:
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    sync.handle_message(event(1))
    await get("USD")
    sync.handle_message(event(2))
    await get("USD")
    assert owner.calls == 1
    sync.handle_message(event(4))  # seq 3 was lost: it might have been about USD
    await get("USD")
    assert owner.calls == 2
    assert sync.stats()["listener"]["gaps"] == 1


async def test_heartbeat_reveals_a_lost_last_event(sync: CacheSync) -> None:
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    sync.handle_message(event(1))
    await get("USD")
    sync.handle_message(event(1, op=Op.HEARTBEAT))  # nothing missed
    await get("USD")
    assert owner.calls == 1
    sync.handle_message(event(2, op=Op.HEARTBEAT))  # event 2 never arrived
    await get("USD")
    assert owner.calls == 2
    assert sync.stats()["listener"]["gaps"] == 1


async def test_new_source_flushes(sync: CacheSync) -> None:
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    sync.handle_message(event(1, source="before-restart"))
    await get("USD")
    sync.handle_message(event(1, source="after-restart"))
    await get("USD")
    assert owner.calls == 2
    assert sync.stats()["listener"]["source_changes"] == 1


async def test_duplicate_and_reordered_sequence_numbers_do_not_flush(sync: CacheSync) -> None:
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    sync.handle_message(event(1))
    sync.handle_message(event(2))
    await get("USD")
    sync.handle_message(event(2))  # at-least-once delivery may repeat
    sync.handle_message(event(1))
    await get("USD")
    assert owner.calls == 1
    assert sync.stats()["listener"]["gaps"] == 0


async def test_missed_heartbeats_flush_and_forget_the_source(unique: str) -> None:
    url = f"memory://{unique}"
    owner = Owner(USD=1.0)
    async with CacheSync(url, heartbeat_timeout=0.3, reconnect_initial=0.01) as sync:
        get = sync.cached("fx", ttl=3600)(owner.fetch)
        async with Publisher(url, heartbeat_interval=0.05):
            await eventually(lambda: sync.stats()["listener"]["heartbeats"] >= 1)
            await get("USD")
            await get("USD")
            assert owner.calls == 1
        # The publisher is gone without a word: its last events may be lost.
        await eventually(lambda: sync.stats()["listener"]["heartbeat_misses"] == 1)
        await sync.wait_ready(5)
        await get("USD")
        assert owner.calls == 2


async def test_reconnect_flushes_and_caching_resumes(unique: str) -> None:
    url = f"memory://{unique}"
    owner = Owner(USD=1.0)
    async with CacheSync(url, reconnect_initial=0.01) as sync:
        get = sync.cached("fx", ttl=3600)(owner.fetch)
        await get("USD")
        bus_for(url).disconnect_all()  # events published now are lost
        owner.commit("USD", 1.1)
        await eventually(lambda: sync.stats()["listener"]["reconnects"] == 1)
        await sync.wait_ready(5)
        assert await get("USD") == 1.1
        assert await get("USD") == 1.1
        assert owner.calls == 2  # hits again after recovery


class GatedTransport(MemoryTransport):
    """A memory transport whose reconnects wait until the test opens the gate."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = asyncio.Event()
        self.gate.set()
        self.subscribed = asyncio.Event()

    async def connect(self) -> None:
        await self.gate.wait()
        await super().connect()

    def subscribe(self, channel: str, on_ready: OnReady | None = None) -> AsyncIterator[bytes]:
        def ready(resumed: bool) -> None:
            self.subscribed.set()
            if on_ready is not None:
                on_ready(resumed)

        return super().subscribe(channel, ready)


async def test_while_listener_is_down_reads_go_to_owner_with_single_flight(unique: str) -> None:
    url = f"memory://{unique}"
    transport = GatedTransport(url)
    owner = Owner(USD=1.0)
    async with CacheSync(url, transport=transport, reconnect_initial=0.01) as sync:
        get = sync.cached("fx", ttl=3600)(owner.fetch)
        await get("USD")
        transport.gate.clear()
        transport.subscribed.clear()
        transport.bus.disconnect_all()
        await eventually(lambda: not sync.listener_up)
        owner.commit("USD", 1.1)
        assert await get("USD") == 1.1  # not the cached 1.0
        assert await get("USD") == 1.1
        assert owner.calls == 3  # every read went to the owner...
        owner.gate = asyncio.Event()
        readers = [asyncio.create_task(get("USD")) for _ in range(20)]
        await owner.started.wait()
        owner.gate.set()
        await asyncio.gather(*readers)
        assert owner.calls == 4  # ...but concurrent ones shared one fetch
        assert sync.stats()["namespaces"]["fx"]["bypassed"] >= 3
        transport.gate.set()
        await sync.wait_ready(5)
        owner.gate = None
        await get("USD")
        await get("USD")
        assert owner.calls == 5  # cached again


async def test_connect_failure_at_start_raises_a_clear_error() -> None:
    class Unreachable(MemoryTransport):
        async def connect(self) -> None:
            from cachesync.errors import TransportError

            raise TransportError("broker at memory://nowhere is down; start it")

    sync = CacheSync("memory://nowhere", transport=Unreachable("memory://nowhere"))
    from cachesync.errors import TransportError

    with pytest.raises(TransportError, match="start it"):
        await sync.start()


async def test_slow_subscriber_overflow_is_a_reconnect(unique: str) -> None:
    url = f"memory://{unique}?max_backlog=10"
    owner = Owner(USD=1.0)
    async with CacheSync(url, reconnect_initial=0.01) as sync:
        get = sync.cached("fx", ttl=3600)(owner.fetch)
        await get("USD")
        bus = bus_for(url)
        for seq in range(1, 50):  # published faster than the listener runs: it falls behind
            bus.publish("cachesync", event(seq))
        await eventually(lambda: sync.stats()["listener"]["reconnects"] == 1)
        await sync.wait_ready(5)
        await get("USD")
        assert owner.calls == 2
