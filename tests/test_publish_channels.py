"""A publisher whose transport spreads namespaces over channels (``redis+cluster://``: a channel
per namespace, on the shard of its hash tag): a channel that hangs, as a shard does while it
fails over, holds back neither the changes nor the heartbeats of the other channels; batches
over several channels, sent concurrently, keep every channel's seqs consecutive and in order."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachesync import Publisher
from cachesync.errors import TransportError
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

    async def more_beats(self, channel: str, count: int) -> None:
        """Wait until ``count`` more heartbeats than now went out on ``channel``."""
        beats = self.beats(channel)
        while self.beats(channel) < beats + count:
            await asyncio.sleep(0.01)

    def changes(self, channel: str) -> list[tuple[int, int | None]]:
        """``(seq, version)`` of each change sent on ``channel`` (heartbeats left out)."""
        return [(e.seq, e.version) for e in self.sent[channel] if e.op != Op.HEARTBEAT]


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
            await shards.more_beats("c{b}", 2)
        assert not hung.done()
        shards.release("c{a}")
        await hung
        await publisher.changed("a", "k", version=3)
    assert shards.changes("c{a}") == [(1, 1), (2, 2), (3, 3)]
    assert shards.changes("c{b}") == [(1, 1), (2, 2)]


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


async def test_a_batch_over_a_hung_channel_holds_back_no_other_channels_changes() -> None:
    # The change feeds and the outbox relay send batches over many namespaces: one channel of
    # the batch that hangs must not hold back, for up to publish_timeout, the changes and
    # heartbeats of the batch's other channels.
    shards = Shards()
    async with Publisher(
        "fake://shards", channel="c", transport=shards, heartbeat_interval=0.02
    ) as publisher:
        await publisher.changed("a", "k", version=1)
        await publisher.changed("b", "k", version=1)
        shards.stall("c{a}")
        batch = asyncio.create_task(
            publisher.send_batch(
                [Change(Op.UPSERT, "a", ("k",), version=2), Change(Op.UPSERT, "b", ("k",), 2)]
            )
        )
        await shards.waiting["c{a}"].wait()
        try:
            async with asyncio.timeout(2.0):
                await publisher.changed("b", "k", version=3)
                await shards.more_beats("c{b}", 2)
            assert not batch.done()
        finally:
            shards.release("c{a}")
            await batch
        await publisher.changed("a", "k", version=3)
    assert shards.changes("c{a}") == [(1, 1), (2, 2), (3, 3)]
    assert shards.changes("c{b}") == [(1, 1), (2, 2), (3, 3)]


async def test_a_batch_waiting_for_a_hung_channel_holds_back_no_other_channels_changes() -> None:
    # A batch over a and b that waits for b (a change to b hangs) must not sit on a's lock
    # meanwhile: a's changes and heartbeats go on.
    shards = Shards()
    async with Publisher(
        "fake://shards", channel="c", transport=shards, heartbeat_interval=0.02
    ) as publisher:
        await publisher.changed("a", "k", version=1)
        await publisher.changed("b", "k", version=1)
        shards.stall("c{b}")
        hung = asyncio.create_task(publisher.changed("b", "k", version=2))
        await shards.waiting["c{b}"].wait()
        batch = asyncio.create_task(
            publisher.send_many(
                [Change(Op.UPSERT, "a", ("k",), version=2), Change(Op.UPSERT, "b", ("k",), 3)]
            )
        )
        try:
            async with asyncio.timeout(2.0):
                while [e.version for e in shards.sent["c{a}"] if e.op != Op.HEARTBEAT] != [1, 2]:
                    await asyncio.sleep(0.01)  # a's part of the batch goes out at once
                await publisher.changed("a", "k", version=3)
                await shards.more_beats("c{a}", 2)
            assert not hung.done() and not batch.done()
        finally:
            shards.release("c{b}")
            await hung
            await batch
    assert shards.changes("c{a}") == [(1, 1), (2, 2), (3, 3)]
    assert shards.changes("c{b}") == [(1, 1), (2, 2), (3, 3)]


class Deaf(Shards):
    """A channel in ``stalled`` hangs every publish until released, cancelled or not (a
    client library that lost the cancellation of a timeout)."""

    async def publish(self, channel: str, payload: bytes) -> None:
        gate = self.stalled.get(channel)
        if gate is not None:
            self.waiting[channel].set()
            cancelled = False
            for _ in range(1000):
                try:
                    await gate.wait()
                    break
                except asyncio.CancelledError:
                    cancelled = True
            if cancelled:
                raise asyncio.CancelledError
        await super().publish(channel, payload)


async def test_a_heartbeat_stuck_on_one_channel_holds_back_no_other_channels_beats() -> None:
    shards = Deaf()
    async with Publisher(
        "fake://shards", channel="c", transport=shards, heartbeat_interval=0.02
    ) as publisher:
        await publisher.changed("a", "k", version=1)
        await publisher.changed("b", "k", version=1)
        shards.stall("c{a}")
        await shards.waiting["c{a}"].wait()  # a heartbeat to a hangs, past its timeout
        try:
            async with asyncio.timeout(2.0):
                await shards.more_beats("c{b}", 3)
        finally:
            shards.release("c{a}")


async def test_invalid_batches_leave_no_lock_behind() -> None:
    shards = Shards()
    async with Publisher(
        "fake://shards", channel="c", transport=shards, heartbeat_interval=None
    ) as publisher:
        await publisher.changed("a", "k")
        for n in range(100):
            with pytest.raises(ValueError, match="not a valid event"):
                # A namespace name longer than any event may carry: on a channel of its own.
                await publisher.send_many([Change(Op.UPSERT, f"{n}" + "n" * 300, ("k",))])
        assert len(publisher._locks) <= 2  # noqa: SLF001 - the base channel's and a's


class Flaky(Shards):
    """A channel per namespace; each publish (of one payload or several, all or none) yields a
    few times and may fail, as ``rng`` decides."""

    def __init__(self, rng: random.Random, failing: float, spread: bool = True) -> None:
        super().__init__()
        self.rng = rng
        self.failing = failing
        self.spread = spread

    def channel_for(self, channel: str, namespace: str) -> str:
        return super().channel_for(channel, namespace) if self.spread else channel

    async def publish(self, channel: str, payload: bytes) -> None:
        await self.publish_many(channel, [payload])

    async def publish_many(self, channel: str, payloads: Sequence[bytes]) -> None:
        for _ in range(self.rng.randint(0, 3)):
            await asyncio.sleep(0)
        if self.rng.random() < self.failing:
            raise TransportError(f"{channel} failed")
        self.sent[channel].extend(ChangeEvent.decode(payload) for payload in payloads)


operations = st.lists(
    st.tuples(
        st.sampled_from(["send_many", "send_batch", "beat"]),
        st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4),
        st.none() | st.integers(min_value=0, max_value=6),  # cancelled after that many yields
        st.integers(min_value=0, max_value=2),  # yields before the next one starts
    ),
    min_size=1,
    max_size=12,
)


@pytest.mark.timeout(120)
@settings(max_examples=80, deadline=None)
@given(
    ops=operations,
    failing=st.sampled_from([0.0, 0.0, 0.2]),
    spread=st.booleans(),
    rng=st.randoms(use_true_random=False),
)
def test_any_interleaving_keeps_each_channels_seqs_in_order_and_beats_behind_them(
    ops: list[tuple[str, list[str], int | None, int]],
    failing: float,
    spread: bool,
    rng: random.Random,
) -> None:
    """Batches over any channels, heartbeats, failures and cancellations, in any interleaving:
    on each channel the changes sent carry increasing seqs (a seq is missing only where a
    publish failed or a caller was cancelled), and no heartbeat goes out before a change whose
    seq it names. On a transport with one channel for every namespace, as on one that
    spreads them."""
    shards = Flaky(rng, failing, spread)
    publisher = Publisher(
        "fake://shards", channel="c", transport=shards, heartbeat_interval=None,
        publish_timeout=0.01,
    )  # fmt: skip

    returned: list[ChangeEvent] = []

    async def one(kind: str, namespaces: list[str], n: int) -> None:
        if kind == "beat":
            ns = namespaces[0]
            wire = shards.channel_for("c", ns)
            await publisher._beat(wire, ns if spread else "", 1.0)  # noqa: SLF001
            return
        changes = [Change(Op.UPSERT, ns, (f"k{n}",), version=n) for ns in namespaces]
        if kind == "send_many":
            returned.extend(await publisher.send_many(changes))
        else:
            await publisher.send_batch(changes)

    async def scenario() -> bool:
        interrupted = False
        async with publisher:
            tasks = []
            cancels = []
            for n, (kind, namespaces, cancel_after, pause) in enumerate(ops):
                task = asyncio.create_task(one(kind, namespaces, n))
                tasks.append(task)
                if cancel_after is not None:
                    cancels.append((cancel_after, task))
                for _ in range(pause):
                    await asyncio.sleep(0)
            for step in range(7):
                for after, task in cancels:
                    if after == step and task.cancel():
                        interrupted = True
                await asyncio.sleep(0)
            async with asyncio.timeout(10.0):
                results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, TransportError | TimeoutError):
                interrupted = True
            elif isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError
            ):
                raise result
        return interrupted

    interrupted = asyncio.run(scenario())
    for event in returned:  # what send_many returns is what went out
        assert event in shards.sent[shards.channel_for("c", event.ns)]
    for wire, events in shards.sent.items():
        seqs = [e.seq for e in events if e.op != Op.HEARTBEAT]
        assert seqs == sorted(set(seqs)), f"{wire}: seqs out of order or repeated: {seqs}"
        if not interrupted:
            assert seqs == list(range(1, len(seqs) + 1)), f"{wire}: a gap: {seqs}"
        for position, event in enumerate(events):
            if event.op == Op.HEARTBEAT:
                later = [e.seq for e in events[position:] if e.op != Op.HEARTBEAT]
                assert all(seq > event.seq for seq in later), (
                    f"{wire}: a heartbeat with seq {event.seq} before the change it names"
                )


async def test_stop_cancelled_while_a_heartbeat_hangs_is_cancelled_and_closes() -> None:
    # stop() waits for the heartbeat to end; a caller that gives up on it (a shutdown with a
    # deadline) must see its cancellation, not have it swallowed, and the connection closes
    # still.
    shards = Deaf()
    closed = asyncio.Event()

    async def close() -> None:
        closed.set()

    shards.close = close  # type: ignore[method-assign]
    publisher = Publisher("fake://shards", channel="c", transport=shards, heartbeat_interval=0.02)
    await publisher.start()
    heartbeat = publisher._heartbeat_task  # noqa: SLF001
    assert heartbeat is not None
    try:
        await publisher.changed("a", "k", version=1)
        shards.stall("c{a}")
        await shards.waiting["c{a}"].wait()  # a beat to a hangs, deaf to its cancellation
        stopping = asyncio.create_task(publisher.stop())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not stopping.done()  # waiting for the heartbeat to end
        stopping.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        shards.release("c{a}")  # the beat ends at last, and so does the heartbeat
        async with asyncio.timeout(2.0):
            with pytest.raises(asyncio.CancelledError):
                await stopping
            await closed.wait()
        assert stopping.cancelled()
    finally:
        if "c{a}" in shards.stalled:
            shards.release("c{a}")
        async with asyncio.timeout(2.0):
            await asyncio.gather(heartbeat, return_exceptions=True)
