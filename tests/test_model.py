"""Random interleavings of reads, fetches, owner commits and (reordered) event deliveries,
checked against a model of the owner.

Each fetch reads the owner's value when it starts and returns it only when the test completes
it, so a fetch can race any number of commits and events. Events may be delivered late and out
of order, carry the new value or not. The checks:

- a read returns a version at least as new as every event applied before it began (1, 2);
- a cached entry served as fresh is never older than the newest version applied by an event
  for its key (2, 4);
- once every fetch has completed and every event has been delivered, reads return the owner's
  current version.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cachesync import CacheSync, ChangeEvent, Op
from cachesync.cache import TOMBSTONE

KEYS = ["a", "b", "c"]

op = st.one_of(
    st.tuples(st.just("read"), st.sampled_from(KEYS)),
    st.tuples(st.just("complete"), st.integers(0, 20)),
    st.tuples(st.just("commit"), st.sampled_from(KEYS), st.booleans()),
    st.tuples(st.just("deliver"), st.integers(0, 20)),
)


@dataclass
class Model:
    versions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEYS, 1))
    applied: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEYS, 0))
    pending_fetches: list[asyncio.Future[None]] = field(default_factory=list)
    undelivered: list[tuple[str, int, bytes]] = field(default_factory=list)
    seq: int = 0


async def settle() -> None:
    for _ in range(4):
        await asyncio.sleep(0)


async def run(ops: list[tuple[object, ...]], mode: str, bus: str) -> None:
    model = Model()
    async with CacheSync(f"memory://{bus}") as sync:

        async def fetch(key: str) -> tuple[str, int]:
            value = (key, model.versions[key])
            gate = asyncio.get_running_loop().create_future()
            model.pending_fetches.append(gate)
            await gate
            return value

        get = sync.cached("ns", ttl=3600, mode=mode, version_of=lambda v: v[1], from_event=tuple)(
            fetch
        )
        cache = sync.namespace("ns")
        reads: list[tuple[asyncio.Task[tuple[str, int]], str, int]] = []

        sync.handle_message(ChangeEvent(source="owner", seq=0, op=Op.HEARTBEAT, ts=0.0).encode())
        for step in ops:
            kind = step[0]
            if kind == "read":
                key = str(step[1])
                task = asyncio.create_task(get(key))
                reads.append((task, key, model.applied[key]))
            elif kind == "complete" and model.pending_fetches:
                index = int(step[1]) % len(model.pending_fetches)  # type: ignore[call-overload]
                model.pending_fetches.pop(index).set_result(None)
            elif kind == "commit":
                key, carry = str(step[1]), bool(step[2])
                model.versions[key] += 1
                version = model.versions[key]
                model.seq += 1
                payload = ChangeEvent(
                    source="owner",
                    seq=model.seq,
                    ns="ns",
                    op=Op.UPSERT,
                    keys=(key,),
                    version=version,
                    value=[key, version] if carry else None,
                    ts=0.0,
                ).encode()
                model.undelivered.append((key, version, payload))
            elif kind == "deliver" and model.undelivered:
                index = int(step[1]) % len(model.undelivered)  # type: ignore[call-overload]
                key, version, payload = model.undelivered.pop(index)
                sync.handle_message(payload)
                model.applied[key] = max(model.applied[key], version)
            await settle()
            for key in KEYS:
                entry = cache.get_fresh(key)
                if entry is not None:
                    assert entry.version is not None and entry.version >= model.applied[key]

        while model.pending_fetches or model.undelivered:
            if model.undelivered:
                key, version, payload = model.undelivered.pop(0)
                sync.handle_message(payload)
                model.applied[key] = max(model.applied[key], version)
            for gate in model.pending_fetches:
                gate.set_result(None)
            model.pending_fetches.clear()
            await settle()
        for task, key, required in reads:
            _, got = await task
            assert got >= required, f"read of {key} returned v{got} after v{required} applied"

        for key in KEYS:
            final = asyncio.create_task(get(key))
            await settle()
            for gate in model.pending_fetches:
                gate.set_result(None)
            model.pending_fetches.clear()
            assert (await final)[1] == model.versions[key]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["invalidate", "refresh"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=40))
def test_random_interleavings_keep_the_guarantees(mode: str, ops: list[tuple[object, ...]]) -> None:
    asyncio.run(run(ops, mode, bus=f"model-{mode}"))


# -- threads, replays and gaps ----------------------------------------------------------------
#
# A state machine drives one client by hand: the owner commits (events carry the value or not,
# a version or not), events are delivered in order, dropped (a gap the next delivery or
# heartbeat reveals) or delivered again (a duplicate or a replay of a lost one), and a new
# owner instance may take over (a new source, whose first heartbeat flushes); reads come
# from the event loop, from a second thread, and from a thread whose fetch is held open while
# any of the above happens (a handshake of threading.Events, no sleeps). The checks: a read
# never returns a version older than what the events applied before it began require (a lost
# event counts from the delivery or heartbeat that reveals its loss), nothing served is older,
# and every re-delivery is counted as a duplicate and applied never.


@dataclass
class Sent:
    source: str
    seq: int
    key: str
    version: int
    payload: bytes


class SlowRead:
    """A read from another thread whose fetch, if it makes one, waits for ``release()``."""

    def __init__(self, get: Callable[[str], tuple[str, int]], key: str, required: int) -> None:
        self.key = key
        self.required = required
        self.signal = threading.Event()  # the fetch has read the owner, or the read is done
        self.gate = threading.Event()
        self.result: tuple[str, int] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(get,), name="model-slow-read")

    def _run(self, get: Callable[[str], tuple[str, int]]) -> None:
        try:
            self.result = get(self.key)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            self.error = exc
        finally:
            self.signal.set()

    def release(self) -> tuple[str, int]:
        self.gate.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the slow read never finished"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class ThreadsAndReplays(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.sync = CacheSync(f"memory://model-threads-{uuid.uuid4().hex[:8]}")
        self.versions = dict.fromkeys(KEYS, 1)
        self.lock = threading.Lock()
        self.seq = 0
        self.pending: list[Sent] = []  # published, not delivered yet (in order)
        self.sent: list[Sent] = []  # every event published so far
        self.source = "owner-0"
        self.handled: dict[str, int] = {self.source: 0}  # the highest seq delivered, by source
        self.required = dict.fromkeys(KEYS, 1)
        self.replays = 0
        self.slow: SlowRead | None = None

        def fetch(key: str) -> tuple[str, int]:
            with self.lock:
                value = (key, self.versions[key])
            slow = self.slow
            if slow is not None and threading.current_thread() is slow.thread:
                slow.signal.set()
                assert slow.gate.wait(10), "the slow read was never released"
            return value

        async def fetch_async(key: str) -> tuple[str, int]:
            with self.lock:
                return (key, self.versions[key])

        def version(row: tuple[str, int]) -> int:
            return row[1]

        self.get = self.sync.cached("ns", version_of=version)(fetch)
        self.get_refresh = self.sync.cached(
            "ns", mode="refresh", version_of=version, from_event=tuple
        )(fetch_async)
        self.loop.run_until_complete(self.sync.start())
        self.sync.handle_message(
            ChangeEvent(source=self.source, seq=0, op=Op.HEARTBEAT, ts=0.0).encode()
        )

    def teardown(self) -> None:
        if self.slow is not None:
            self.slow.gate.set()
            self.slow.thread.join(10)
        self.loop.run_until_complete(self.sync.stop())
        self.loop.close()

    # -- the owner and the wire ----------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS), carry=st.booleans(), versioned=st.booleans())
    def commit(self, key: str, carry: bool, versioned: bool) -> None:
        with self.lock:
            self.versions[key] += 1
            version = self.versions[key]
        self.seq += 1
        payload = ChangeEvent(
            source=self.source,
            seq=self.seq,
            ns="ns",
            op=Op.UPSERT,
            keys=(key,),
            version=version if versioned else None,
            value=[key, version] if carry else None,
            ts=0.0,
        ).encode()
        sent = Sent(self.source, self.seq, key, version, payload)
        self.pending.append(sent)
        self.sent.append(sent)

    def _handled_up_to(self, seq: int) -> None:
        handled = self.handled[self.source]
        for sent in self.sent:
            if sent.source == self.source and handled < sent.seq <= seq:
                self.required[sent.key] = max(self.required[sent.key], sent.version)
        self.handled[self.source] = max(handled, seq)

    @precondition(lambda self: self.pending)
    @rule()
    def deliver(self) -> None:
        sent = self.pending.pop(0)
        self.sync.handle_message(sent.payload)
        self._handled_up_to(sent.seq)

    @precondition(lambda self: self.pending)
    @rule()
    def drop(self) -> None:
        self.pending.pop(0)  # lost on the way: the next delivery or heartbeat reveals it

    @precondition(lambda self: not self.pending)
    @rule()
    def heartbeat(self) -> None:
        self.sync.handle_message(
            ChangeEvent(source=self.source, seq=self.seq, op=Op.HEARTBEAT, ts=0.0).encode()
        )
        self._handled_up_to(self.seq)

    @rule()
    def restart_the_owner(self) -> None:
        """A new owner instance (a new source, seqs from 0) takes over; what the old one had
        not sent yet is lost. Its first heartbeat flushes: every commit so far is required."""
        self.pending.clear()
        self.source = f"owner-{len(self.handled)}"
        self.handled[self.source] = 0
        self.seq = 0
        self.sync.handle_message(
            ChangeEvent(source=self.source, seq=0, op=Op.HEARTBEAT, ts=0.0).encode()
        )
        with self.lock:
            self.required = dict(self.versions)

    def _replayable(self) -> list[Sent]:
        return [sent for sent in self.sent if sent.seq <= self.handled[sent.source]]

    @precondition(lambda self: self._replayable())
    @rule(index=st.integers(0, 100))
    def replay(self, index: int) -> None:
        old = self._replayable()
        self.sync.handle_message(old[index % len(old)].payload)  # delivered or lost before
        self.replays += 1

    # -- reads ---------------------------------------------------------------------------------

    def _check(self, key: str, required: int, got: object) -> None:
        assert isinstance(got, tuple) and got[0] == key, f"read of {key} returned {got!r}"
        assert got[1] >= required, f"read of {key} began after v{required}, returned v{got[1]}"

    @rule(key=st.sampled_from(KEYS))
    def read_on_the_loop(self, key: str) -> None:
        required = self.required[key]
        self._check(key, required, self.loop.run_until_complete(self.get_refresh(key)))

    @precondition(lambda self: self.slow is None)
    @rule(key=st.sampled_from(KEYS))
    def read_from_a_thread(self, key: str) -> None:
        required = self.required[key]
        result: list[tuple[str, int]] = []
        thread = threading.Thread(target=lambda: result.append(self.get(key)))
        thread.start()
        thread.join(10)
        assert result, "the read from a thread did not finish"
        self._check(key, required, result[0])

    @precondition(lambda self: self.slow is None)
    @rule(key=st.sampled_from(KEYS))
    def begin_slow_read(self, key: str) -> None:
        self.slow = SlowRead(self.get, key, self.required[key])
        self.slow.thread.start()
        assert self.slow.signal.wait(10), "the slow read neither fetched nor finished"

    @precondition(lambda self: self.slow is not None)
    @rule()
    def finish_slow_read(self) -> None:
        slow, self.slow = self.slow, None
        assert slow is not None
        self._check(slow.key, slow.required, slow.release())

    # -- after every step ----------------------------------------------------------------------

    @invariant()
    def nothing_served_is_older_than_applied(self) -> None:
        for cache in self.sync.caches("ns"):
            for key in KEYS:
                entry = cache.get_fresh(key)
                if entry is not None:
                    assert entry.value is not TOMBSTONE
                    assert entry.value[1] >= self.required[key], (key, entry, self.required)

    @invariant()
    def every_replay_is_a_duplicate(self) -> None:
        listener = self.sync.stats()["listener"]
        assert listener["duplicates"] == self.replays
        assert listener["listener_up"] and listener["apply_failures"] == 0


ThreadsAndReplays.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_threads_replays_and_gaps = pytest.mark.timeout(60)(ThreadsAndReplays.TestCase)
