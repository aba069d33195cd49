"""A transport that subscribes again to part of its channels by itself (``on_channels`` of
``Transport.subscribe_many``, as ``redis+cluster://`` does when one shard fails over): the
client flushes the namespaces of exactly those channels, keeps reads away from them until they
are live again, and leaves the others alone. Driven step by step with a fake transport."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence

import pytest

from cachesync import CacheSync, Publisher
from cachesync.errors import ConnectionLost
from cachesync.transports.base import OnChannels, OnReady, Transport

from .helpers import FakeClock, Owner, eventually

pytestmark = pytest.mark.timeout(20)


class ShardedFake(Transport):
    """A channel per namespace on one in-process queue. ``part(channels, live)`` breaks or
    restores the part of the subscription those channels are on: what is published on a broken
    channel is lost, as on a failed shard."""

    def __init__(self) -> None:
        super().__init__("fake://shards")
        self.queue: asyncio.Queue[bytes | Exception] = asyncio.Queue()
        self.broken: set[str] = set()
        self.on_channels: OnChannels | None = None
        self.subscriptions = 0

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def publish(self, channel: str, payload: bytes) -> None:
        if channel not in self.broken:
            self.queue.put_nowait(payload)

    def channel_for(self, channel: str, namespace: str) -> str:
        return f"{channel}{{{namespace}}}" if namespace else channel

    def subscribe(self, channel: str, on_ready: OnReady | None = None) -> AsyncIterator[bytes]:
        return self.subscribe_many([channel], on_ready)

    async def subscribe_many(
        self,
        channels: Sequence[str],
        on_ready: OnReady | None = None,
        on_channels: OnChannels | None = None,
    ) -> AsyncIterator[bytes]:
        self.subscriptions += 1
        self.on_channels = on_channels
        if on_ready is not None:
            on_ready(False)
        while True:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item

    def part(self, channels: list[str], live: bool) -> None:
        assert self.on_channels is not None, "the client passes on_channels"
        if live:
            self.broken -= set(channels)
        else:
            self.broken |= set(channels)
        self.on_channels(channels, live)


def _flushes(sync: CacheSync) -> dict[str, int]:
    return {ns: counters["flushes"] for ns, counters in sync.stats()["namespaces"].items()}


async def test_a_lost_part_flushes_its_namespaces_only() -> None:
    transport = ShardedFake()
    clock = FakeClock()
    sync = CacheSync(
        "fake://shards", channel="c", transport=transport, clock=clock, heartbeat_timeout=5.0
    )
    owners = {"a": Owner(k=1), "b": Owner(k=1)}
    get = {ns: sync.cached(ns, ttl=3600)(owner.fetch) for ns, owner in owners.items()}
    publisher = Publisher(
        "fake://shards", channel="c", transport=transport, heartbeat_interval=None
    )
    async with sync, publisher:
        applied = 0

        async def change(ns: str, value: int) -> None:
            nonlocal applied
            version = owners[ns].commit("k", value)
            await publisher.changed(ns, "k", version=version)
            if f"c{{{ns}}}" not in transport.broken:
                applied += 1
                await eventually(lambda: sync.stats()["listener"]["messages"] == applied)

        for ns in owners:
            await change(ns, 2)
            assert await get[ns]("k") == 2
        before = _flushes(sync)
        calls = {ns: owner.calls for ns, owner in owners.items()}

        transport.part(["c{a}"], live=False)
        # a's reads go to the owner; b's are served from its cache, its events still applied.
        assert await get["a"]("k") == 2 and owners["a"].calls == calls["a"] + 1
        assert await get["b"]("k") == 2 and owners["b"].calls == calls["b"]
        # A function cached under a meanwhile is not trusted either.
        late = sync.cached("a", ttl=3600)(owners["a"].fetch)
        assert not late.cache.trusted
        await change("a", 3)  # lost: a's channel is down (its seq is taken all the same)
        await change("b", 3)
        assert await get["b"]("k") == 3
        # The source of a's channel is not expected to speak while it is down: its silence
        # is no loss elsewhere.
        clock.advance(3.0)
        await change("b", 4)
        clock.advance(3.0)
        assert sync.check_sources() == 0

        transport.part(["c{a}"], live=True)
        after = _flushes(sync)
        assert after["a"] == before["a"] + 2  # two functions cache under a now, one flush each
        assert after["b"] == before["b"]
        assert await get["a"]("k") == 3 and late.cache.trusted
        # The next event on a's channel comes after a seq that never arrived (it may have
        # been lost after a's channel was back, too): a gap, that flushes a only.
        await change("a", 4)
        assert await get["a"]("k") == 4
        assert _flushes(sync)["a"] == after["a"] + 2
        await change("b", 5)
        assert await get["b"]("k") == 5
        assert _flushes(sync)["b"] == before["b"]
        listener = sync.stats()["listener"]
        assert listener["gaps"] == 1 and listener["source_changes"] == 0
        # From there on a's source is followed as before.
        await change("a", 5)
        assert _flushes(sync)["a"] == after["a"] + 2
        assert listener["reconnects"] == 0 and listener["partial_reconnects"] == 1
        assert sync.listener_up and transport.subscriptions == 1
        # Cached again: reads of both are hits.
        assert await get["a"]("k") == 5
        hits = sync.stats()["namespaces"]["a"]["hits"]
        assert await get["a"]("k") == 5
        assert sync.stats()["namespaces"]["a"]["hits"] == hits + 1
        assert sync.explain("a", "k")["last_flush"]["cause"] == "gap"


async def test_a_full_reconnect_clears_what_was_down() -> None:
    transport = ShardedFake()
    sync = CacheSync("fake://shards", channel="c", transport=transport, reconnect_initial=0.01)
    owner = Owner(k=1)
    get = sync.cached("a", ttl=3600)(owner.fetch)
    async with sync:
        transport.part(["c{a}"], live=False)
        assert not get.cache.trusted
        # The transport gives up and ends the whole subscription; the listener subscribes
        # anew, and every channel is live (and flushed) again.
        transport.queue.put_nowait(ConnectionLost("gave up"))
        await eventually(lambda: transport.subscriptions == 2 and sync.listener_up)
        assert get.cache.trusted


async def _two_namespaces(
    transport: ShardedFake, clock: FakeClock, **options: object
) -> tuple[CacheSync, Publisher, dict[str, Owner], dict[str, object]]:
    sync = CacheSync(
        "fake://shards", channel="c", transport=transport, clock=clock, heartbeat_timeout=5.0
    )
    owners = {"a": Owner(k=1), "b": Owner(k=1)}
    get = {ns: sync.cached(ns, ttl=3600, **options)(owner.fetch) for ns, owner in owners.items()}
    publisher = Publisher(
        "fake://shards", channel="c", transport=transport, heartbeat_interval=None
    )
    return sync, publisher, owners, get


async def test_a_replayed_event_on_a_channel_back_is_a_duplicate() -> None:
    # A captured event sent again after its channel was lost and back must not put its old
    # value back (an event is applied at most once), nor restart its source's seqs.
    transport = ShardedFake()
    sync, publisher, owners, get = await _two_namespaces(transport, FakeClock(), mode="refresh")
    async with sync, publisher:
        assert await get["a"]("k") == 1  # type: ignore[operator]
        first = await publisher.changed("a", "k", value=5)
        await publisher.changed("a", "k", value=2)
        await publisher.changed("b", "k", value=2)
        await eventually(lambda: sync.stats()["listener"]["messages"] == 3)
        assert await get["a"]("k") == 2  # type: ignore[operator]
        transport.part(["c{a}"], live=False)
        transport.part(["c{a}"], live=True)
        owners["a"].values["k"] = 2
        assert await get["a"]("k") == 2  # type: ignore[operator]
        flushes = _flushes(sync)
        transport.queue.put_nowait(first.encode())
        await eventually(lambda: sync.stats()["listener"]["messages"] == 4)
        assert sync.stats()["listener"]["duplicates"] == 1
        assert await get["a"]("k") == 2  # type: ignore[operator]
        # The next event of the source is no gap: nothing is flushed, here or elsewhere.
        await publisher.changed("a", "k", value=3)
        await eventually(lambda: sync.stats()["listener"]["messages"] == 5)
        assert await get["a"]("k") == 3  # type: ignore[operator]
        assert _flushes(sync) == flushes


async def test_a_replayed_event_while_a_channel_is_down_costs_no_other_channel() -> None:
    transport = ShardedFake()
    sync, publisher, owners, get = await _two_namespaces(transport, FakeClock())
    async with sync, publisher:
        first = await publisher.changed("a", "k", version=2)
        await publisher.changed("a", "k", version=3)
        await publisher.changed("b", "k", version=2)
        await eventually(lambda: sync.stats()["listener"]["messages"] == 3)
        assert await get["b"]("k") == 1  # type: ignore[operator]
        transport.part(["c{a}"], live=False)
        transport.queue.put_nowait(first.encode())  # replayed while a is down
        await eventually(lambda: sync.stats()["listener"]["messages"] == 4)
        transport.part(["c{a}"], live=True)
        flushes = _flushes(sync)
        await publisher.changed("a", "k", version=4)  # seq 3: no gap
        await eventually(lambda: sync.stats()["listener"]["messages"] == 5)
        assert _flushes(sync) == flushes
        assert sync.stats()["listener"]["duplicates"] == 1


async def test_a_source_silent_once_its_channel_is_back_is_a_loss() -> None:
    # Silence is not safety: a source set aside while its channel was down, and never heard
    # again once the channel is back, is missed like any other, and its namespace is not
    # served from then on.
    transport = ShardedFake()
    clock = FakeClock()
    sync, publisher, owners, get = await _two_namespaces(transport, clock)
    async with sync, publisher:
        await publisher.changed("a", "k", version=2)
        await publisher.changed("b", "k", version=2)
        await eventually(lambda: sync.stats()["listener"]["messages"] == 2)
        transport.part(["c{a}"], live=False)
        transport.part(["c{a}"], live=True)
        assert await get["a"]("k") == 1  # type: ignore[operator]
        # b's channel is heard all along; a's never again.
        for version in (3, 4, 5):
            clock.advance(2.0)
            await publisher.changed("b", "k", version=version)
        await eventually(lambda: sync.stats()["listener"]["messages"] == 5)
        assert sync.check_sources() == 1
        assert sync.stats()["listener"]["heartbeat_misses"] == 1
        assert not get["a"].cache.trusted  # type: ignore[attr-defined]
        assert get["b"].cache.trusted  # type: ignore[attr-defined]


async def test_a_late_event_of_a_channel_down_does_not_make_its_source_expected() -> None:
    # An event of a lost channel still on its way when the loss is reported (the old
    # connection's last one): its source must not be missed while the channel is down.
    transport = ShardedFake()
    clock = FakeClock()
    sync, publisher, owners, get = await _two_namespaces(transport, clock)
    async with sync, publisher:
        await publisher.changed("a", "k", version=2)
        await publisher.changed("b", "k", version=2)
        await eventually(lambda: sync.stats()["listener"]["messages"] == 2)
        await publisher.changed("a", "k", version=3)  # queued, not read yet
        transport.part(["c{a}"], live=False)
        await eventually(lambda: sync.stats()["listener"]["messages"] == 3)
        assert not get["a"].cache.trusted  # type: ignore[attr-defined]
        flushes = _flushes(sync)
        for version in (3, 4, 5):
            clock.advance(2.0)
            await publisher.changed("b", "k", version=version)
        await eventually(lambda: sync.stats()["listener"]["messages"] == 6)
        assert sync.check_sources() == 0
        assert _flushes(sync) == flushes
        assert get["b"].cache.trusted  # type: ignore[attr-defined]


class StuckShards(ShardedFake):
    """Publishing to the channels in ``stuck`` hangs (a shard failing over, its connection
    unanswered); the others go through, and when each did is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck: set[str] = set()
        self.sent: dict[str, list[float]] = {}

    async def publish(self, channel: str, payload: bytes) -> None:
        if channel in self.stuck:
            await asyncio.Event().wait()
        self.sent.setdefault(channel, []).append(asyncio.get_running_loop().time())
        await super().publish(channel, payload)


async def test_heartbeats_to_a_failing_shard_do_not_delay_the_others() -> None:
    # Consumers miss a source after 3 heartbeat intervals: the beats of the healthy channels
    # must keep coming within that, however many channels the failing shard has, and a change
    # waits for the heartbeats for an interval at most.
    interval = 0.3
    transport = StuckShards()
    publisher = Publisher(
        "fake://shards", channel="c", transport=transport, heartbeat_interval=interval
    )
    stuck = [f"s{i}" for i in range(6)]
    async with publisher:
        for ns in [*stuck, "ok"]:  # the failing shard's channels come first
            await publisher.changed(ns, "k")
        transport.stuck = {f"c{{{ns}}}" for ns in stuck}
        loop = asyncio.get_running_loop()
        began = loop.time()
        beats = transport.sent.setdefault("c{ok}", [])
        await eventually(lambda: len([t for t in beats if t > began]) >= 3, timeout=15)
        heard = [began] + [t for t in beats if t > began]
        gaps = [later - earlier for earlier, later in zip(heard, heard[1:], strict=False)]
        assert max(gaps) < 3 * interval, gaps
        start = loop.time()
        await publisher.changed("ok", "k")
        assert loop.time() - start < 3 * interval


async def test_fills_begun_before_or_while_a_channel_is_down_are_not_stored() -> None:
    transport = ShardedFake()
    sync, publisher, owners, get = await _two_namespaces(transport, FakeClock())
    owner = owners["a"]
    async with sync, publisher:
        owner.gate = asyncio.Event()
        before = asyncio.create_task(get["a"]("k"))  # reads 1 now, answers later
        await owner.started.wait()
        transport.part(["c{a}"], live=False)
        await publisher.changed("a", "k", version=owner.commit("k", 2))  # lost
        owner.started.clear()
        during = asyncio.create_task(get["a"]("k"))  # reads 2 now, answers later
        await owner.started.wait()
        await publisher.changed("a", "k", version=owner.commit("k", 3))  # lost
        transport.part(["c{a}"], live=True)
        owner.gate.set()
        assert (await before, await during) == (1, 2)
        owner.gate = None
        assert await get["a"]("k") == 3  # type: ignore[operator]
        assert await get["a"]("k") == 3  # type: ignore[operator]


async def test_two_shards_lost_at_once_and_back_one_after_the_other() -> None:
    transport = ShardedFake()
    clock = FakeClock()
    sync = CacheSync(
        "fake://shards", channel="c", transport=transport, clock=clock, heartbeat_timeout=5.0
    )
    owners = {ns: Owner(k=1) for ns in "abc"}
    get = {ns: sync.cached(ns, ttl=3600)(owner.fetch) for ns, owner in owners.items()}
    publisher = Publisher(
        "fake://shards", channel="c", transport=transport, heartbeat_interval=None
    )
    stop = threading.Event()
    # What a read may not go below: the value of the last change applied, or of the last
    # one committed when a lost channel was back (flushed).
    floor = dict.fromkeys(owners, 2)
    served: list[tuple[str, int, int]] = []  # (ns, value read, floor when the read began)

    def read_in_a_thread(ns: str) -> None:
        cache = get[ns].cache  # type: ignore[attr-defined]
        for _ in range(100_000):
            if stop.is_set():
                return
            least = floor[ns]
            entry = cache.get_fresh("k")
            if entry is not None:
                served.append((ns, entry.value, least))

    async with sync, publisher:
        messages = 0

        async def change(ns: str, value: int) -> None:
            nonlocal messages
            await publisher.changed(ns, "k", version=owners[ns].commit("k", value))
            if f"c{{{ns}}}" not in transport.broken:
                messages += 1
                await eventually(lambda: sync.stats()["listener"]["messages"] == messages)
                floor[ns] = value

        def back(ns: str) -> None:
            transport.part([f"c{{{ns}}}"], live=True)
            floor[ns] = owners[ns].values["k"]

        for ns in owners:
            await change(ns, 2)
            assert await get[ns]("k") == 2  # type: ignore[operator]
        threads = [threading.Thread(target=read_in_a_thread, args=(ns,)) for ns in owners]
        for thread in threads:
            thread.start()
        try:
            before = _flushes(sync)
            transport.part(["c{a}"], live=False)
            transport.part(["c{b}"], live=False)
            await change("a", 3)
            await change("b", 3)
            await change("c", 3)
            transport.part(["c{a}"], live=False)  # failing again while subscribing again
            clock.advance(6.0)
            assert sync.check_sources() == 1  # c's: silent meanwhile, the others not expected
            await change("c", 4)
            back("b")
            assert not get["a"].cache.trusted  # type: ignore[attr-defined]
            assert await get["b"]("k") == 3  # type: ignore[operator]
            assert await get["a"]("k") == 3  # type: ignore[operator]
            back("a")
            for ns in owners:
                await change(ns, 5)
                assert await get[ns]("k") == 5  # type: ignore[operator]
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        listener = sync.stats()["listener"]
        assert listener["partial_reconnects"] == 2 and listener["reconnects"] == 0
        assert listener["heartbeat_misses"] == 1
        # Never a value from before a change applied, or lost, before the read began.
        assert served and all(value >= least for _, value, least in served)
        after = _flushes(sync)
        assert after["a"] > before["a"] and after["b"] > before["b"]


async def test_sources_of_a_channel_down_are_expected_again_after_a_full_reconnect() -> None:
    transport = ShardedFake()
    clock = FakeClock()
    sync, publisher, owners, get = await _two_namespaces(transport, clock)
    async with sync, publisher:
        await publisher.changed("a", "k", version=2)
        await publisher.changed("b", "k", version=2)
        await eventually(lambda: sync.stats()["listener"]["messages"] == 2)
        transport.part(["c{a}"], live=False)
        for version in (3, 4, 5):
            clock.advance(2.0)
            await publisher.changed("b", "k", version=version)
        await eventually(lambda: sync.stats()["listener"]["messages"] == 5)
        # The transport gives up on a; the whole subscription starts over.
        transport.queue.put_nowait(ConnectionLost("gave up"))
        await eventually(lambda: transport.subscriptions == 2 and sync.listener_up)
        assert sync.check_sources() == 0  # a's source: expected from now on, not missed at once
        clock.advance(6.0)
        assert sync.check_sources() == 2  # neither heard since
        assert sync.stats()["listener"]["heartbeat_misses"] == 2
