"""Concurrency stress: reader threads and tasks against a listener under fire.

Reader threads call plain cached functions, asyncio tasks call async ones (four functions in
one namespace, two in refresh mode, one with a short TTL and stale-while-revalidate), while an
owner commits changes (versions grow per key) and publishes upserts (with and without values),
deletes and flushes, and an adversary drops events (gaps), re-sends captured ones (duplicates)
and cuts the consumer's connection (reconnects). Checked, for every read:

- a read that *starts* after the listener applied an event never returns a version older than
  the one that event (or any earlier event of the source, lost or not) committed;
- a read never returns an internal marker, nor another function's value;

and at the end: the listener is up, every key converges to the owner's version, and the
counters show that each adversary struck.

``CACHESYNC_STRESS_SECONDS`` (default 20) is the total time, split between the memory bus,
Redis pub/sub and Redis streams (which replay what a cut connection missed);
``CACHESYNC_STRESS_SEED`` replays the owner's and adversary's choices of a failing run (thread
timing cannot be replayed). The seed is printed at the start and named in every failure.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from cachesync import CacheSync, ChangeEvent, Publisher, Transport, from_url
from cachesync.cache import TOMBSTONE, Entry
from cachesync.transports.base import OnReady
from cachesync.transports.memory import bus_for

from .helpers import eventually
from .test_transport_contract import kill_redis_clients

SECONDS = float(os.environ.get("CACHESYNC_STRESS_SECONDS", "20"))
SEED = os.environ.get("CACHESYNC_STRESS_SEED")
KEYS = [f"k{i}" for i in range(12)]
NS = "items"
THREADS = 3
TASKS = 4

pytestmark = pytest.mark.timeout(60 + SECONDS)


class Adversary(Transport):
    """The publisher's transport: delivers through ``inner``, but can drop the next payload
    and keeps the ones it sent, so they can be sent again."""

    def __init__(self, inner: Transport, rng: random.Random) -> None:
        super().__init__(inner.url)
        self.inner = inner
        self.rng = rng
        self.drop_next = False
        self.dropped = 0
        self.sent: list[bytes] = []
        self.resent = 0

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def publish(self, channel: str, payload: bytes) -> None:
        if self.drop_next and ChangeEvent.decode(payload).op != "heartbeat":
            self.drop_next = False
            self.dropped += 1
            return
        self.sent.append(payload)
        del self.sent[:-200]
        await self.inner.publish(channel, payload)

    async def publish_many(self, channel: str, payloads: Sequence[bytes]) -> None:
        for payload in payloads:
            await self.publish(channel, payload)

    async def resend(self, channel: str, count: int) -> None:
        for payload in self.rng.sample(self.sent, min(count, len(self.sent))):
            self.resent += 1
            await self.inner.publish(channel, payload)

    def subscribe(self, channel: str, on_ready: OnReady | None = None) -> AsyncIterator[bytes]:
        return self.inner.subscribe(channel, on_ready)


@dataclass
class World:
    """The owner's data and what the listener has applied of its log."""

    seed: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    versions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEYS, 1))
    alive: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(KEYS, True))
    # seq -> {key: version committed before that event went out}
    log: dict[int, dict[str, int]] = field(default_factory=dict)
    # What reads must at least return: the versions of every event up to the highest seq the
    # listener handled (a lost one included: its loss must have been noticed by then).
    required: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEYS, 1))
    handled: int = 0
    reads: int = 0
    violations: list[str] = field(default_factory=list)

    def commit(self, key: str, *, delete: bool = False) -> int:
        with self.lock:
            self.versions[key] += 1
            self.alive[key] = not delete
            return self.versions[key]

    def row(self, tag: str, key: str) -> tuple[str, str, int, bool]:
        with self.lock:
            return (tag, key, self.versions[key], self.alive[key])

    def applied_up_to(self, seq: int) -> None:
        while self.handled < seq:
            self.handled += 1
            for key, version in self.log.pop(self.handled, {}).items():
                if version > self.required[key]:
                    self.required[key] = version

    def check(self, tag: str, key: str, required: int, got: object) -> None:
        self.reads += 1
        if got is TOMBSTONE or isinstance(got, Entry):
            self.violations.append(f"{tag}({key}) returned an internal marker {got!r}")
        elif not (isinstance(got, tuple) and got[:2] == (tag, key)):
            self.violations.append(f"{tag}({key}) returned another function's value {got!r}")
        elif got[2] < required:
            self.violations.append(
                f"{tag}({key}) began after v{required} was applied and returned v{got[2]}"
            )
        if len(self.violations) > 20:
            del self.violations[20:]


async def stress(
    consumer_url: str,
    publisher_url: str,
    channel: str,
    seconds: float,
    reconnect: Callable[[], Awaitable[bool]],
) -> None:
    seed = int(SEED) if SEED is not None else random.randrange(2**32)
    print(f"stress seed: {seed} (replay with CACHESYNC_STRESS_SEED={seed})")
    rng = random.Random(seed)
    world = World(seed)
    sync = CacheSync(
        consumer_url,
        channel=channel,
        reconnect_initial=0.01,
        reconnect_max=0.1,
        connect_timeout=10.0,
        # Heartbeats still reveal a lost last event; a loop starved by the reader threads
        # must not also make the watchdog restart the connection.
        heartbeat_timeout=5.0,
    )

    def fetch_sync(key: str) -> tuple[str, str, int, bool]:
        return world.row("sync", key)

    def fetch_swr(key: str) -> tuple[str, str, int, bool]:
        return world.row("swr", key)

    async def fetch_async(key: str) -> tuple[str, str, int, bool]:
        row = world.row("async", key)
        await asyncio.sleep(0)  # the owner may commit while the response is on its way
        return row

    async def fetch_refresh(key: str) -> tuple[str, str, int, bool]:
        row = world.row("refresh", key)
        await asyncio.sleep(0)
        return row

    def version(row: tuple[str, str, int, bool]) -> int:
        return row[2]

    get_sync = sync.cached(NS, version_of=version)(fetch_sync)
    # Read from threads too, refreshed by events, and revalidated in the background.
    get_swr = sync.cached(
        NS,
        ttl=0.05,
        stale_while_revalidate=0.05,
        mode="refresh",
        version_of=version,
        from_event=lambda value: ("swr", value[0], value[1], value[2]),
    )(fetch_swr)
    get_async = sync.cached(NS, version_of=version)(fetch_async)
    get_refresh = sync.cached(
        NS,
        mode="refresh",
        version_of=version,
        from_event=lambda value: ("refresh", value[0], value[1], value[2]),
    )(fetch_refresh)

    # The listener calls handle_message for every message: note what it applied once it returns.
    handle = sync.handle_message
    progress = asyncio.Event()

    def handle_and_note(payload: bytes) -> None:
        handle(payload)
        event = ChangeEvent.decode(payload)
        if event.source == pub.source and event.seq > world.handled:
            world.applied_up_to(event.seq)
            progress.set()

    sync.handle_message = handle_and_note  # type: ignore[method-assign]

    stop = threading.Event()
    thread_errors: list[BaseException] = []

    def thread_reader(index: int) -> None:
        local = random.Random(seed + index)
        try:
            while not stop.is_set():
                key = local.choice(KEYS)
                fn, tag = (get_sync, "sync") if local.random() < 0.7 else (get_swr, "swr")
                required = world.required[key]
                world.check(tag, key, required, fn(key))
                if local.random() < 0.05:
                    time.sleep(0.0005)  # let the event loop in now and then
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            thread_errors.append(exc)

    async def task_reader(index: int) -> None:
        local = random.Random(seed + 100 + index)
        while not stop.is_set():
            key = local.choice(KEYS)
            fn, tag = (get_async, "async") if local.random() < 0.5 else (get_refresh, "refresh")
            required = world.required[key]
            world.check(tag, key, required, await fn(key))
            await asyncio.sleep(0 if local.random() < 0.8 else 0.001)

    inner = from_url(publisher_url)
    adversary = Adversary(inner, rng)
    pub = Publisher(publisher_url, channel=channel, heartbeat_interval=0.2, transport=adversary)
    counts = dict.fromkeys(["upsert", "value", "delete", "flush", "gap", "dup", "reconnect"], 0)

    Send = Callable[[], Awaitable[ChangeEvent]]

    def commit(kind: str, key: str) -> tuple[dict[str, int], Send]:
        """The owner commits now; the event goes out when the returned function is called
        (later, for a burst: an outbox relay's lag)."""
        if kind == "flush":
            return {k: world.commit(k) for k in KEYS}, lambda: pub.flush(NS)
        if kind == "delete":
            v = world.commit(key, delete=True)
            return {key: v}, lambda: pub.deleted(NS, key, version=v)
        v = world.commit(key)
        value = list(world.row("refresh", key)[1:]) if kind == "value" else None
        # Some values go out without a version: then only seqs keep a replay out.
        version = v if value is None or rng.random() < 0.8 else None
        return {key: v}, lambda: pub.changed(NS, key, version=version, value=value)

    async def publish(commits: list[tuple[dict[str, int], Send]]) -> None:
        for effect, send in commits:
            seq = pub.seq + 1  # this task is the only one that takes seqs
            world.log[seq] = effect
            assert (await send()).seq == seq

    def reconnected(before: int) -> bool:
        return sync.listener_up and sync.stats()["listener"]["reconnects"] > before

    async with pub:
        await sync.start()
        try:
            threads = [
                threading.Thread(target=thread_reader, args=(i,), name=f"stress-reader-{i}")
                for i in range(THREADS)
            ]
            for thread in threads:
                thread.start()
            tasks = [asyncio.create_task(task_reader(i)) for i in range(TASKS)]
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                roll = rng.random()
                key = rng.choice(KEYS)
                if roll < 0.35:
                    kind = "upsert"
                elif roll < 0.70:
                    kind = "value"
                elif roll < 0.85:
                    kind = "delete"
                elif roll < 0.88:
                    kind = "flush"
                elif roll < 0.93:
                    counts["gap"] += 1
                    adversary.drop_next = True
                    kind = "upsert"
                elif roll < 0.985:
                    counts["dup"] += 1
                    await adversary.resend(channel, rng.randint(1, 5))
                    continue
                else:
                    await sync.wait_ready(10)
                    before = sync.stats()["listener"]["reconnects"]
                    if await reconnect():
                        counts["reconnect"] += 1
                        await eventually(lambda b=before: reconnected(b), timeout=10)
                    continue
                counts[kind] += 1
                commits = [commit(kind, key)]
                if rng.random() < 0.3:
                    # A burst: the key changes again before the first event goes out, and
                    # reads may fetch the newest version before the older events arrive.
                    for _ in range(rng.randint(1, 3)):
                        again = rng.choice(("upsert", "value"))
                        counts[again] += 1
                        commits.append(commit(again, key))
                    await asyncio.sleep(0.001)
                await publish(commits)
                await asyncio.sleep(rng.choice((0, 0, 0.001, 0.003)))
            # Every key changes once more, with nothing lost: all must converge.
            await publish([commit("upsert", key) for key in KEYS])
            target = pub.seq
            async with asyncio.timeout(10):
                while world.handled < target:
                    progress.clear()
                    await progress.wait()
            stop.set()
            await asyncio.gather(*tasks)
            for thread in threads:
                await asyncio.to_thread(thread.join, 10)
            listener = sync.stats()["listener"]
            namespace = sync.stats()["namespaces"][NS]
            print(
                f"stress seed {seed}: {world.reads} reads, {listener['messages']} messages, "
                f"published {counts}, listener {listener}"
            )
            where = f"(seed {seed}; replay with CACHESYNC_STRESS_SEED={seed})"
            assert not thread_errors, f"{thread_errors!r} {where}"
            assert world.violations == [], f"{world.violations} {where}"
            assert sync.listener_up, where
            assert listener["listener_up"] and listener["apply_failures"] == 0, where
            assert listener["bad_events"] == 0, where
            assert world.reads > 1000, where
            assert namespace["hits"] > 100, where
            if counts["gap"]:
                assert listener["gaps"] >= 1, where
            if counts["dup"]:
                assert listener["duplicates"] >= 1, where
            if counts["reconnect"]:
                assert listener["reconnects"] >= 1, where
                if consumer_url.startswith("redis+stream"):
                    assert listener["replays"] >= 1, where
            for key in KEYS:
                current = world.versions[key]
                for tag, fn in (("sync", get_sync), ("swr", get_swr)):
                    got = await asyncio.to_thread(fn, key)
                    assert got == world.row(tag, key), f"{tag}({key}) {got} {where}"
                for tag, afn in (("async", get_async), ("refresh", get_refresh)):
                    got = await afn(key)
                    assert got[2] == current, f"{tag}({key}) {got} {where}"
        finally:
            stop.set()
            await sync.stop()


async def test_stress_memory(unique: str) -> None:
    url = f"memory://{unique}"

    async def reconnect() -> bool:
        bus_for(url).disconnect_all()
        return True

    await stress(url, url, unique, SECONDS * 0.4, reconnect)


@pytest.mark.redis
@pytest.mark.parametrize("scheme", ["redis", "redis+stream"])
async def test_stress_redis(redis_url: str, unique: str, scheme: str) -> None:
    """Pub/sub loses what is published while the connection is cut; a stream replays it."""
    import redis.asyncio as aioredis

    tag = f"cachesync-stress-{unique}"
    url = redis_url.replace("redis://", f"{scheme}://", 1)

    async def reconnect() -> bool:
        return await kill_redis_clients(redis_url, tag) >= 1

    try:
        await stress(f"{url}?client_name={tag}", url, unique, SECONDS * 0.3, reconnect)
    finally:
        admin = aioredis.Redis.from_url(redis_url)
        try:
            await admin.delete(unique)  # the stream, if any
        finally:
            await admin.aclose()
