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
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachesync import CacheSync, ChangeEvent, Op

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
