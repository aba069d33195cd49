"""A publisher whose transport spreads namespaces over channels (``redis+cluster://``: a channel
per namespace, on the shard of its hash tag): a channel that hangs, as a shard does while it
fails over, holds back neither the changes nor the heartbeats of the other channels; batches
over several channels, sent concurrently, keep every channel's seqs consecutive and in order."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import AsyncIterator

import pytest

from cachesync import Publisher
from cachesync.events import ChangeEvent, Op
from cachesync.publisher import Change
from cachesync.transports.base import OnReady, Transport

pytestmark = pytest.mark.timeout(20)


class Shards(Transport):
    """A channel per namespace; what is published is recorded per channel. A channel in
    ``stalled`` hangs every publish until it is released (``release(channel)``)."""

    def __init__(self) -> None:
        super().__init__("fake://shards")
        self.sent: dict[str, list[ChangeEvent]] = defaultdict(list)
        self.stalled: dict[str, asyncio.Event] = {}
        self.waiting: dict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def channel_for(self, channel: str, namespace: str) -> str:
        return f"{channel}{{{namespace}}}" if namespace else channel

    async def publish(self, channel: str, payload: bytes) -> None:
        gate = self.stalled.get(channel)
        if gate is not None:
            self.waiting[channel].set()
            await gate.wait()
        await asyncio.sleep(0)  # a real send yields: let concurrent batches interleave
        self.sent[channel].append(ChangeEvent.decode(payload))

    def stall(self, channel: str) -> None:
        self.stalled[channel] = asyncio.Event()

    def release(self, channel: str) -> None:
        self.stalled.pop(channel).set()

    def subscribe(self, channel: str, on_ready: OnReady | None = None) -> AsyncIterator[bytes]:
        raise NotImplementedError("publishing only")

    def beats(self, channel: str) -> int:
        return sum(1 for event in self.sent[channel] if event.op == Op.HEARTBEAT)


async def test_a_hung_channel_holds_back_no_other_channels_changes_or_heartbeats() -> None:
    shards = Shards()
    async with Publisher(
        "fake://shards", channel="c", transport=shards, heartbeat_interval=0.02
    ) as publisher:
        await publisher.changed("a", "k", version=1)
        await publisher.changed("b", "k", version=1)
        shards.stall("c{a}")
        hung = asyncio.create_task(publisher.changed("a", "k", version=2))
        await shards.waiting["c{a}"].wait()
        # While a's channel hangs (for up to publish_timeout, 10 s), b's changes go out at once...
        async with asyncio.timeout(2.0):
            await publisher.changed("b", "k", version=2)
            # ... and so do its heartbeats: consumers of b must not take it for dead.
            beats = shards.beats("c{b}")
            while shards.beats("c{b}") < beats + 2:
                await asyncio.sleep(0.01)
        assert not hung.done()
        shards.release("c{a}")
        await hung
        await publisher.changed("a", "k", version=3)
    changes = {
        wire: [(e.seq, e.version) for e in events if e.op != Op.HEARTBEAT]
        for wire, events in shards.sent.items()
    }
    assert changes["c{a}"] == [(1, 1), (2, 2), (3, 3)]
    assert changes["c{b}"] == [(1, 1), (2, 2)]


async def test_concurrent_batches_keep_each_channels_seqs_consecutive_and_in_order() -> None:
    shards = Shards()
    rng = random.Random(7)
    namespaces = ["a", "b", "c", "d"]
    async with Publisher(
        "fake://shards", channel="c", transport=shards, heartbeat_interval=0.005
    ) as publisher:

        async def batch(n: int) -> None:
            picked = rng.sample(namespaces, rng.randint(1, len(namespaces)))
            await publisher.send_many(
                [Change(Op.UPSERT, ns, (f"k{n}",), version=n) for ns in picked]
            )

        async with asyncio.timeout(10.0):
            await asyncio.gather(*(batch(n) for n in range(200)))
    for wire, events in shards.sent.items():
        # Heartbeats repeat the last seq; changes count up from 1 with no gap or reordering.
        seqs = [e.seq for e in events if e.op != Op.HEARTBEAT]
        assert seqs == list(range(1, len(seqs) + 1)), wire
        last = 0
        for event in events:
            if event.op == Op.HEARTBEAT:
                assert event.seq == last, f"{wire}: a heartbeat past the seq sent"
            last = max(last, event.seq)
