"""Publish-to-applied latency and sustained apply rate per transport, against the raw client.

    .venv/bin/python -m benchmarks.latency [--full] [--transports redis,redis+stream,amqp]
        [--drain-rounds N]

For each transport (``redis://``, ``redis+stream://``, ``amqp://``) the consumers are measured
in turns (raw, ours, raw, ours, ...), each in a process of its own:

- **raw**: the broker's client alone, doing nothing with a message but noting it: redis-py's
  ``PubSub.listen()``, an ``XREAD COUNT 500 BLOCK`` loop (redis-py, RESP2), aiormq's
  ``basic_consume(no_ack=True)`` (what cachesync's AMQP transport uses) on an exclusive queue
  bound to the channel's fanout exchange;
  redis-py parses with hiredis (the ``bench`` and ``redis`` extras install it), as cachesync's
  Redis transports do, so both sides pay the same for parsing;
- **hand-rolled** (apply rate only): the same raw client, doing with each message what a
  hand-rolled invalidator would: ``json.loads`` it and pop its keys from a dict of ``keys``
  entries (or set them, when it carries a value);
- **ours**: :class:`~cachesync.CacheSync` on the same channel, with a namespace of
  ``keys`` entries; a message counts once ``CacheSync.handle_message`` has returned (the event
  is applied: the entry it names is invalidated, which is real work, as every event carries a
  newer version than the one held).

**Latency.** A publisher process (cachesync's :class:`~cachesync.Publisher`, so both consumers
get the same payloads, heartbeats included) sends upserts at 200 and then 1,000 events/s, each
carrying its send time (``time.monotonic_ns()`` read just before ``Publisher.changed``) as its
``version``. CLOCK_MONOTONIC is one clock for every process on Linux, so a consumer subtracts it
from the time it noted the message: the one-way publish-to-applied latency. Both consumers stay
subscribed, each on a channel of its own, and the publisher serves them phase by phase (raw at
200/s, ours at 200/s, raw at 1,000/s, ...), so only one of them has work at a time. Targets: ours
p50 <= raw p50 + 0.2 ms, ours p99 <= raw p99 + 1 ms, at each rate.

**Apply rate.** The consumer's event loop is held (blocked on purpose) while another process
floods the channel with pre-encoded upserts (pipelined PUBLISH or XADD; aio-pika without
confirms, and fewer of them: AMQP clients drain several times slower), so the backlog waits in
the broker and the socket and the flood never competes for a CPU; then the loop is released and
the rate is messages over the time to drain them. Target: ours >= 80% of raw's (the best round
of each), and, reported beside it, ours >= 80% of the hand-rolled invalidator's. The consumer's
CPU time per message during the drain is reported too: on a shared machine it varies far less
than the wall-clock rate (no verdict rests on it).

Everything talks to 127.0.0.1 only; every process started is stopped, also on Ctrl-C, and the
stream keys and exchanges created are deleted. A broker that is down is named with the command
that starts it, and its transports are skipped. Not a test: never run it in CI as one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from cachesync import CacheSync, Publisher

from . import env
from .common import pyplot, stop_processes
from .micro import encoded_events
from .stats import against_limit, bootstrap, percentile

SCHEMES = ("redis", "redis+stream", "amqp")
SIDES = ("raw", "ours")
"""The consumers of the latency sessions."""
DRAIN_SIDES = ("raw", "hand-rolled", "ours")
"""The consumers of the apply-rate sessions, in the order they take turns."""
BASELINES = {"raw": "raw (receive only)", "hand-rolled": "hand-rolled (json.loads + dict)"}
"""The apply rate of ours is compared with each of these."""
NS = "items"

P50_SLACK_MS = 0.2
"""Target: ours p50 <= raw p50 + this."""
P99_SLACK_MS = 1.0
"""Target: ours p99 <= raw p99 + this."""
RATE_RATIO = 0.8
"""Target: ours apply rate >= this x raw's."""

STREAM_BATCH = 500
"""Entries per XREAD of the raw stream consumer: the same as RedisStreamTransport's default."""

LOOPBACK = ("127.0.0.1", "localhost", "::1")

STOP_GRACE = 3.0
"""Seconds a child may take to end by itself once told to stop, before it is terminated."""

Pipe = multiprocessing.connection.Connection

PRELOAD = [
    "benchmarks.latency",
    "cachesync",
    "cachesync.transports.redis",
    "cachesync.transports.redis.stream",
    "cachesync.transports.amqp",
    "redis",
    "redis.asyncio",
    "aio_pika",
]
"""Imported once by the forkserver (when this module starts it), so a child starts in a fork."""


@dataclass(frozen=True)
class LatencySizes:
    """How much each part does. ``phases``: (events/s, events) measured per session."""

    phases: tuple[tuple[float, int], ...] = ((200.0, 50), (1000.0, 150))
    rounds: int = 4
    warmup: int = 50
    flood: int = 8_000
    amqp_flood: int = 4_000  # AMQP clients drain ~5x slower: as long a drain, fewer messages
    flood_rounds: int = 2
    keys: int = 10_000

    def flood_for(self, scheme: str) -> int:
        """Messages in one flood of ``scheme``."""
        return self.amqp_flood if scheme == "amqp" else self.flood

    def estimate(self, schemes: tuple[str, ...] = SCHEMES) -> float:
        """Seconds a run should take (for the short run's time budget); a little generous."""
        publishing = sum(n / rate for rate, n in self.phases) + self.warmup / 1000
        total = 0.0
        for scheme in schemes:
            # Starting the processes; about 0.02 s to collect each phase. An AMQP flood
            # publishes about 6,000 messages/s, a Redis one far more; then the drain.
            latency = 0.5 + 2 * self.rounds * (publishing + 0.02 * len(self.phases))
            flood = self.flood_for(scheme) / (4_500 if scheme == "amqp" else 40_000)
            total += latency + len(DRAIN_SIDES) * self.flood_rounds * (0.25 + flood)
        return total


SHORT = LatencySizes()
FULL = LatencySizes(
    phases=((200.0, 200), (1000.0, 1000)),
    rounds=10,
    flood=30_000,
    amqp_flood=15_000,
    flood_rounds=3,
)
TINY = LatencySizes(
    phases=((200.0, 10), (1000.0, 20)), rounds=1, warmup=5, flood=300, amqp_flood=300, keys=100
)
"""For the smoke test: exercises the code, measures nothing worth reading."""


# -- results ----------------------------------------------------------------------------------


@dataclass
class Latency:
    """Publish-to-applied latencies of one consumer at one rate, pooled over the rounds."""

    samples_ms: list[float] = field(default_factory=list)
    sent: int = 0
    seconds: float = 0.0  # spent publishing them

    @property
    def lost(self) -> int:
        """Events sent that the consumer did not report."""
        return self.sent - len(self.samples_ms)

    @property
    def achieved(self) -> float:
        """Events/s the publisher managed."""
        return self.sent / self.seconds if self.seconds else math.nan

    def pct(self, q: float) -> float:
        """Percentile ``q`` in ms."""
        return percentile(self.samples_ms, q)


@dataclass
class Check:
    """One target for one transport, and its verdict."""

    transport: str
    target: str
    raw: str
    ours: str
    limit: str
    verdict: str  # PASS | FAIL | not shown | n/a


@dataclass
class TransportResult:
    """Everything measured for one transport."""

    scheme: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    latency: dict[str, dict[float, Latency]] = field(default_factory=dict)
    drain: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # us of CPU per drained message
    notes: dict[str, str] = field(default_factory=dict)

    def at(self, side: str, rate: float) -> Latency:
        """The latencies of ``side`` at ``rate`` (created empty)."""
        return self.latency.setdefault(side, {}).setdefault(rate, Latency())

    def best_rate(self, side: str) -> float:
        """The best drain rate of ``side`` (events/s), NaN if none."""
        return max(self.drain.get(side) or [math.nan])

    def checks(self) -> list[Check]:
        """The verdict on every target."""
        url = f"{self.scheme}://"
        if self.status != "ok":
            return [Check(url, "all", "-", "-", "-", "n/a")]
        out = []
        for rate in sorted(self.latency.get("raw", {})):
            raw, ours = self.at("raw", rate), self.at("ours", rate)
            for q, slack in ((50, P50_SLACK_MS), (99, P99_SLACK_MS)):
                # 95% bootstrap intervals (each event its own cluster): PASS when ours is below
                # raw + slack with both intervals, FAIL when above, else "not shown".
                raw_ci = _interval(raw.samples_ms, q)
                our_ci = _interval(ours.samples_ms, q)
                limit_ci = (raw_ci[0] + slack, raw_ci[1] + slack)
                n = min(len(raw.samples_ms), len(ours.samples_ms))
                out.append(
                    Check(
                        url,
                        f"p{q} latency @ {rate:,.0f}/s <= raw + {slack:g} ms",
                        f"{raw.pct(q):.3f} ms [{raw_ci[0]:.3f}, {raw_ci[1]:.3f}]",
                        f"{ours.pct(q):.3f} ms [{our_ci[0]:.3f}, {our_ci[1]:.3f}]",
                        f"{raw.pct(q) + slack:.3f} ms",
                        against_limit(our_ci, limit_ci, n, q),
                    )
                )
        our_rate = self.best_rate("ours")
        for side, label in BASELINES.items():
            if not self.drain.get(side):
                continue
            base_rate = self.best_rate(side)
            ratio = our_rate / base_rate
            verdict = "n/a" if math.isnan(ratio) else ("PASS" if ratio >= RATE_RATIO else "FAIL")
            out.append(
                Check(
                    url,
                    f"apply rate >= {RATE_RATIO:.0%} of {label}",
                    f"{base_rate:,.0f}/s",
                    f"{our_rate:,.0f}/s ({ratio:.2f}x)",
                    f"{RATE_RATIO * base_rate:,.0f}/s",
                    verdict,
                )
            )
        return out


def _interval(samples: list[float], q: float) -> tuple[float, float]:
    found = bootstrap([np.array([x]) for x in samples], [q], reps=200)
    return found[q]


# -- the consumers (child processes) ----------------------------------------------------------

_VERSION = re.compile(rb'"version":(\d+)')


class Recorder:
    """Notes each message and the time it was received (or applied); nothing else on the hot
    path, so raw and ours pay the same for being measured."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.times: list[int] = []
        self.target = -1
        self.done: asyncio.Future[None] | None = None

    def hit(self, payload: bytes) -> None:
        """Record one message (the consumer calls this)."""
        self.times.append(time.monotonic_ns())
        self.payloads.append(payload)
        if len(self.times) == self.target and self.done is not None:
            self.done.set_result(None)

    def arm(self, n: int) -> asyncio.Future[None]:
        """A future done once ``n`` more messages have been recorded."""
        self.done = asyncio.get_running_loop().create_future()
        self.target = len(self.times) + n
        return self.done

    def take_latencies(self) -> list[int]:
        """Latency in ns of every event recorded since the last call (heartbeats and other
        messages without a version are left out), and forget them."""
        out = []
        for payload, received in zip(self.payloads, self.times, strict=True):
            match = _VERSION.search(payload)
            if match is not None:
                out.append(received - int(match.group(1)))
        self.payloads.clear()
        self.times.clear()
        return out

    def count_versioned(self) -> int:
        """Events recorded so far that carry a version."""
        return sum(1 for p in self.payloads if b'"version":' in p)


class HandRolled:
    """A hand-rolled invalidator on a raw client: ``json.loads`` each message, pop its keys
    from a dict (or set them, when it carries a value), then note it as the raw side does."""

    def __init__(self, keys: int, hit: Callable[[bytes], None]) -> None:
        self.store: dict[str, Any] = {f"k{i}": f"v{i}" for i in range(keys)}
        self.hit = hit

    def __call__(self, payload: bytes) -> None:
        """Apply one message, then record it."""
        event = json.loads(payload)
        value = event.get("value")
        store = self.store
        for key in event.get("keys", ()):
            if value is None:
                store.pop(key, None)
            else:
                store[key] = value
        self.hit(payload)


class _TimedSync(CacheSync):
    """CacheSync that records each message after applying it."""

    recorder: Recorder

    def handle_message(self, payload: bytes) -> None:
        """Apply the message as CacheSync does, then note the time."""
        super().handle_message(payload)
        self.recorder.hit(payload)


Hit = Callable[[bytes], None]


async def _raw_pubsub(url: str, channel: str, hit: Hit, ready: Callable[[], None]) -> None:
    """redis-py pub/sub as its documentation shows it: ``PubSub.listen()``."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)
        async for message in pubsub.listen():
            kind = message["type"]
            if kind == "message":
                hit(message["data"])
            elif kind == "subscribe":
                ready()
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


async def _raw_xread(url: str, channel: str, hit: Hit, ready: Callable[[], None]) -> None:
    """A redis-py ``XREAD COUNT 500 BLOCK 1000`` loop from the end of the stream."""
    import redis.asyncio as aioredis
    import redis.exceptions

    # RESP2: one reply shape. No socket_timeout (see cachesync.transports.redis.connection).
    client = aioredis.Redis.from_url(url, protocol=2)
    try:
        try:
            last = (await client.xinfo_stream(channel))["last-generated-id"]
        except redis.exceptions.ResponseError:  # no such key yet
            last = b"0-0"
        ready()
        while True:
            reply: Any = await client.xread({channel: last}, count=STREAM_BATCH, block=1000)
            for _key, entries in reply:
                for _id, fields in entries:
                    hit(fields[b"d"])
                last = entries[-1][0]
    finally:
        await client.aclose()


async def _raw_amqp(url: str, channel: str, hit: Hit, ready: Callable[[], None]) -> None:
    """aiormq, the client cachesync's AMQP transport consumes with: an exclusive queue bound to
    the channel's fanout exchange, ``basic_consume(no_ack=True)`` (the same level as ours)."""
    import aiormq
    import aiormq.abc

    connection = await aiormq.connect(url)
    try:
        ch = await connection.channel()
        await ch.exchange_declare(exchange=channel, exchange_type="fanout", durable=False)
        declared = await ch.queue_declare("", exclusive=True, auto_delete=True)
        queue = declared.queue
        if queue is None:
            raise RuntimeError("the broker named no queue")
        await ch.queue_bind(queue, channel)

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            hit(message.body)

        await ch.basic_consume(queue, on_message, no_ack=True)
        ready()
        await asyncio.Future()  # until cancelled
    finally:
        await connection.close()


RawConsumer = Callable[[str, str, Hit, Callable[[], None]], Coroutine[Any, Any, None]]
RAW: dict[str, RawConsumer] = {"redis": _raw_pubsub, "redis+stream": _raw_xread, "amqp": _raw_amqp}


@dataclass(frozen=True)
class Job:
    """What a child process is to do."""

    scheme: str
    side: str  # raw | hand-rolled | ours
    url: str  # ours: the cachesync URL; otherwise the broker's own URL
    channel: str
    keys: int


def raw_url(scheme: str, url: str) -> str:
    """The broker client's URL for cachesync's ``url`` of ``scheme``."""
    return url.replace("redis+stream://", "redis://", 1) if scheme == "redis+stream" else url


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _recv(pipe: Pipe) -> Any:
    """The next command from the parent without blocking the loop; None at EOF."""
    loop = asyncio.get_running_loop()
    while not pipe.poll():
        readable = loop.create_future()
        loop.add_reader(pipe.fileno(), _set_once, readable)
        try:
            await readable
        finally:
            loop.remove_reader(pipe.fileno())
    try:
        return pipe.recv()
    except EOFError:
        return None


async def _collect(recorder: Recorder, n: int, timeout: float = 3.0) -> list[int]:
    """Wait (bounded) until ``n`` versioned events have arrived, then take their latencies."""
    deadline = time.monotonic() + timeout
    while recorder.count_versioned() < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return recorder.take_latencies()


async def _drain(recorder: Recorder, pipe: Pipe, n: int) -> tuple[float, float]:
    """Hold the loop until the parent says the flood is in, then time draining ``n`` messages:
    messages/s (wall clock), and this process's CPU time per message in microseconds (what
    the drain cost, whatever else shared the CPUs meanwhile)."""
    done = recorder.arm(n)
    pipe.send(("held", None))
    if pipe.recv() != ("drain",):  # blocking the loop is the point: see the module docstring
        raise RuntimeError("expected the drain command")
    start = time.monotonic_ns()
    cpu = time.process_time()
    async with asyncio.timeout(120):
        await done
    cpu = time.process_time() - cpu
    return n / ((recorder.times[recorder.target - 1] - start) / 1e9), cpu / n * 1e6


async def _serve(pipe: Pipe, recorder: Recorder, stats: Callable[[], str]) -> None:
    """Answer the parent's commands until it says stop (or goes away)."""
    # What this process inherited from the forkserver and built while starting is long-lived:
    # out of the collector's way, as in a service that has run for a while (both sides alike).
    gc.collect()
    gc.freeze()
    pipe.send(("ready", None))
    while True:
        command = await _recv(pipe)
        if command is None or command[0] == "stop":
            return
        if command[0] == "collect":
            pipe.send(("samples", await _collect(recorder, command[1])))
        elif command[0] == "hold":
            rate, cpu = await _drain(recorder, pipe, command[1])
            recorder.take_latencies()
            pipe.send(("rate", (rate, cpu, stats())))


def _ours_stats(sync: CacheSync) -> str:
    stats = sync.stats()
    listener, ns = stats["listener"], stats["namespaces"][NS]
    return (
        f"{ns['invalidations']:,} invalidations; gaps {listener['gaps']}, "
        f"bad events {listener['bad_events']}"
    )


async def _consume_ours(job: Job, pipe: Pipe) -> None:
    """CacheSync with a namespace of ``job.keys`` entries, each message noted once applied."""
    recorder = Recorder()
    sync = _TimedSync(job.url, job.channel)
    sync.recorder = recorder

    @sync.cached(NS, ttl=3600, maxsize=job.keys * 2)
    async def fetch(key: str) -> str:
        return key

    async with sync:
        for i in range(job.keys):  # the namespace holds entries: each event has work to do
            fetch.prime(f"k{i}", f"v{i}", version=1)
        await _serve(pipe, recorder, lambda: _ours_stats(sync))


async def _consume_raw(job: Job, pipe: Pipe) -> None:
    """The raw client of ``job.scheme``, each message noted as it arrives (applied first by
    :class:`HandRolled` on the hand-rolled side)."""
    recorder = Recorder()
    ready = asyncio.Event()
    hit = HandRolled(job.keys, recorder.hit) if job.side == "hand-rolled" else recorder.hit
    task = asyncio.create_task(RAW[job.scheme](job.url, job.channel, hit, ready.set))
    try:
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait([task, waiter], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()  # raises what went wrong
        if not ready.is_set():
            raise TimeoutError("the raw consumer did not subscribe within 10 s")
        await _serve(pipe, recorder, lambda: "")
    finally:
        task.cancel()
        # Bounded: a client that does not end promptly is left to the parent, which stops
        # this process.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.gather(task, return_exceptions=True)


def _child(run: Callable[[], Coroutine[Any, Any, None]], pipe: Pipe) -> None:
    """Run a child's coroutine; report a failure to the parent in one line. Ctrl-C is left to
    the parent, which stops this process itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(run())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            pipe.send(("error", traceback.format_exception_only(type(exc), exc)[-1].strip()))
    finally:
        pipe.close()


def consumer_main(job: Job, pipe: Pipe) -> None:
    """Process entry: one consumer, raw, hand-rolled or ours."""
    consume = _consume_ours if job.side == "ours" else _consume_raw
    _child(lambda: consume(job, pipe), pipe)


# -- the publishers (child processes) ---------------------------------------------------------


async def _paced(publisher: Publisher, rate: float, n: int, first_key: int, keys: int) -> float:
    """Send ``n`` upserts at ``rate``/s, each with its send time as version; the seconds it took."""
    interval = 1e9 / rate
    start = time.monotonic_ns()
    for i in range(n):
        wait = start + i * interval - time.monotonic_ns()
        if wait > 0:
            await asyncio.sleep(wait / 1e9)
        sent = time.monotonic_ns()
        await publisher.changed(NS, f"k{(first_key + i) % keys}", version=sent)
    return (time.monotonic_ns() - start) / 1e9


async def _publish(url: str, channels: dict[str, str], keys: int, pipe: Pipe) -> None:
    async with contextlib.AsyncExitStack() as stack:
        publishers = {
            side: await stack.enter_async_context(Publisher(url, channel, heartbeat_interval=1.0))
            for side, channel in channels.items()
        }
        pipe.send(("ready", None))
        first_key = 0
        while (command := await _recv(pipe)) is not None and command[0] == "phase":
            _, side, rate, n = command
            seconds = await _paced(publishers[side], rate, n, first_key, keys)
            first_key += n
            pipe.send(("sent", seconds))


def publisher_main(url: str, channels: dict[str, str], keys: int, pipe: Pipe) -> None:
    """Process entry: one cachesync Publisher per consumer's channel, sending paced upserts
    on command."""
    _child(lambda: _publish(url, channels, keys, pipe), pipe)


def flood_main(job: Job, n: int) -> None:
    """Process entry: publish ``n`` pre-encoded upserts as fast as the raw client can."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    payloads = encoded_events(uuid.uuid4().hex, 1, n, job.keys)
    if job.scheme == "amqp":
        asyncio.run(_flood_amqp(job.url, job.channel, payloads))
        return
    import redis

    client = redis.Redis.from_url(job.url)
    try:
        for start in range(0, n, 1000):
            pipe = client.pipeline(transaction=False)
            for payload in payloads[start : start + 1000]:
                if job.scheme == "redis+stream":
                    pipe.xadd(job.channel, {"d": payload}, maxlen=100_000, approximate=True)
                else:
                    pipe.publish(job.channel, payload)
            pipe.execute()
    finally:
        client.close()


async def _flood_amqp(url: str, channel: str, payloads: list[bytes]) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        ch = await connection.channel(publisher_confirms=False)
        await ch.declare_exchange(channel, aio_pika.ExchangeType.FANOUT, durable=False)
        # aiormq's basic_publish: aio-pika's Exchange.publish is 3x slower, and the flood's
        # speed only costs time here (the consumer is held while it runs).
        underlay = await ch.get_underlay_channel()
        for payload in payloads:
            await underlay.basic_publish(payload, exchange=channel, routing_key="", mandatory=False)
    finally:
        await connection.close()


# -- the parent: sessions, rounds, cleanup ----------------------------------------------------


class SessionFailed(Exception):
    """A child failed or did not answer; the message says which and why."""


def _expect(pipe: Pipe, kind: str, timeout: float, who: str) -> Any:
    if not pipe.poll(timeout):
        raise SessionFailed(f"the {who} sent nothing within {timeout:g} s (waiting for {kind!r})")
    try:
        got, payload = pipe.recv()
    except EOFError:
        raise SessionFailed(f"the {who} exited before {kind!r}") from None
    if got == "error":
        raise SessionFailed(f"the {who} failed: {payload}")
    if got != kind:
        raise SessionFailed(f"the {who} sent {got!r}, expected {kind!r}")
    return payload


class Bench:
    """Runs the sessions of one invocation and remembers what to clean up."""

    def __init__(self, sizes: LatencySizes, say: Callable[[str], None]) -> None:
        self.sizes = sizes
        self.say = say
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)  # no effect if the forkserver already runs
        self.channels: dict[str, list[str]] = {}  # scheme -> channels used

    def _spawn(
        self,
        target: Callable[..., None],
        args: tuple[Any, ...],
        name: str,
        pipes: dict[str, Pipe],
        who: str,
    ) -> BaseProcess:
        """Start ``target(*args, pipe)`` in a child; the parent's end goes to ``pipes[who]``."""
        parent, child = self.ctx.Pipe()
        pipes[who] = parent
        proc = self.ctx.Process(target=target, args=(*args, child), name=name, daemon=True)
        proc.start()
        child.close()
        return proc

    def _job(self, scheme: str, side: str, url: str) -> Job:
        channel = f"cachesync-latency-{uuid.uuid4().hex[:8]}"
        self.channels.setdefault(scheme, []).append(channel)
        url = url if side == "ours" else raw_url(scheme, url)
        return Job(scheme, side, url, channel, self.sizes.keys)

    def latency_sessions(self, result: TransportResult, url: str) -> None:
        """Both consumers, each on a channel of its own, and one publisher process with a
        Publisher per channel; then the phases, raw and ours in turn (only the consumer whose
        channel is published to has work; the other one idles)."""
        jobs = {side: self._job(result.scheme, side, url) for side in SIDES}
        procs: list[BaseProcess] = []
        pipes: dict[str, Pipe] = {}
        grace = 0.0
        try:
            for side, job in jobs.items():
                procs.append(self._spawn(consumer_main, (job,), f"latency-{side}", pipes, side))
            channels = {side: job.channel for side, job in jobs.items()}
            args = (url, channels, self.sizes.keys)
            procs.append(self._spawn(publisher_main, args, "latency-publisher", pipes, "publisher"))
            for who, pipe in pipes.items():
                _expect(pipe, "ready", 30, who)
            for side in SIDES:
                self._phase(pipes, side, 1000.0, self.sizes.warmup)  # not measured
            # Raw and ours alternate phase by phase, so load from elsewhere hits both alike.
            for i in range(self.sizes.rounds):
                self.say(f"  {result.scheme}:// latency, round {i + 1}/{self.sizes.rounds}")
                for rate, n in self.sizes.phases:
                    for side in SIDES:
                        samples, seconds = self._phase(pipes, side, rate, n)
                        into = result.at(side, rate)
                        into.samples_ms += [ns / 1e6 for ns in samples]
                        into.sent += n
                        into.seconds += seconds
            grace = STOP_GRACE
        finally:
            stop_processes(procs, list(pipes.values()), grace)

    def _phase(
        self, pipes: dict[str, Pipe], side: str, rate: float, n: int
    ) -> tuple[list[int], float]:
        """Publish ``n`` events at ``rate`` to ``side``'s channel; its latencies (ns) and the
        seconds the publishing took."""
        pipes["publisher"].send(("phase", side, rate, n))
        seconds = _expect(pipes["publisher"], "sent", n / rate * 5 + 10, "publisher")
        pipes[side].send(("collect", n))
        return _expect(pipes[side], "samples", 15, side), seconds

    def drain_session(self, result: TransportResult, side: str, url: str) -> None:
        """Hold a consumer, flood its channel from another process, time the drain."""
        job = self._job(result.scheme, side, url)
        procs: list[BaseProcess] = []
        pipes: dict[str, Pipe] = {}
        grace = 0.0
        try:
            procs.append(self._spawn(consumer_main, (job,), f"drain-{side}", pipes, side))
            _expect(pipes[side], "ready", 30, side)
            n = self.sizes.flood_for(result.scheme)
            pipes[side].send(("hold", n))
            _expect(pipes[side], "held", 10, side)
            flood_job = Job(job.scheme, "raw", raw_url(job.scheme, url), job.channel, job.keys)
            flood = self.ctx.Process(
                target=flood_main, args=(flood_job, n), name="flood", daemon=True
            )
            procs.append(flood)
            flood.start()
            flood.join(120)
            if flood.exitcode != 0:
                raise SessionFailed(f"the flood process failed (exit code {flood.exitcode})")
            pipes[side].send(("drain",))
            rate, cpu, notes = _expect(pipes[side], "rate", 150, side)
            result.drain.setdefault(side, []).append(rate)
            result.cpu.setdefault(side, []).append(cpu)
            if notes:
                result.notes[side] = notes
            grace = STOP_GRACE
        finally:
            stop_processes(procs, list(pipes.values()), grace)

    def cleanup(self, redis_url: str, amqp_url: str) -> None:
        """Delete the stream keys and exchanges the sessions created (bounded, best effort)."""
        streams = self.channels.get("redis+stream", [])
        exchanges = self.channels.get("amqp", [])
        if streams:
            with contextlib.suppress(Exception):
                import redis

                client = redis.Redis.from_url(redis_url, socket_timeout=5)
                client.delete(*streams)
                client.close()
        if exchanges:
            with contextlib.suppress(Exception):
                asyncio.run(_delete_exchanges(amqp_url, exchanges))
        self.channels.clear()


async def _delete_exchanges(url: str, names: list[str]) -> None:
    import aio_pika

    async with asyncio.timeout(10):
        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            for name in names:
                await channel.exchange_delete(name)
        finally:
            await connection.close()


def transport_url(scheme: str, redis_url: str, amqp_url: str) -> str:
    """cachesync's URL of ``scheme`` on the given servers."""
    if scheme == "amqp":
        return amqp_url
    return f"{scheme}://{redis_url.split('://', 1)[1]}"


def _blocker(scheme: str, redis_url: str, amqp_url: str, up: dict[str, bool]) -> str | None:
    """Why ``scheme`` cannot be measured here, or None."""
    service = "rabbitmq" if scheme == "amqp" else "redis"
    url = amqp_url if scheme == "amqp" else redis_url
    if urlsplit(url).hostname not in LOOPBACK:
        return f"the {service} URL is not on 127.0.0.1: this benchmark only talks to loopback"
    if not up.get(service):
        svc = env.services(redis_url, amqp_url)[service]
        return f"{service} is down (start it: `{svc.how_to_start}`)"
    return None


def run_all(
    sizes: LatencySizes,
    redis_url: str,
    amqp_url: str,
    up: dict[str, bool],
    schemes: tuple[str, ...] = SCHEMES,
    say: Callable[[str], None] = lambda _: None,
    results: list[TransportResult] | None = None,
) -> list[TransportResult]:
    """Measure every transport in ``schemes``; ``up`` says which servers answer.

    Each transport's result is appended to ``results`` (a new list if None) as soon as it
    starts, so a caller that catches Ctrl-C still has what was measured. Ctrl-C stops every
    process, deletes the stream keys and exchanges created, and propagates KeyboardInterrupt.
    """
    bench = Bench(sizes, say)
    results = [] if results is None else results
    try:
        for scheme in schemes:
            result = TransportResult(scheme)
            results.append(result)
            blocker = _blocker(scheme, redis_url, amqp_url, up)
            if blocker is not None:
                result.status, result.reason = "skipped", blocker
                say(f"  {scheme}://: skipped: {blocker}")
                continue
            url = transport_url(scheme, redis_url, amqp_url)
            try:
                _measure(bench, result, url)
            except SessionFailed as exc:
                result.status, result.reason = "failed", str(exc)
                say(f"  {scheme}://: failed: {exc}")
            except KeyboardInterrupt:
                result.status, result.reason = "failed", "interrupted (Ctrl-C) while running"
                raise
    finally:
        bench.cleanup(redis_url, amqp_url)
    return results


def _measure(bench: Bench, result: TransportResult, url: str) -> None:
    sizes, say = bench.sizes, bench.say
    bench.latency_sessions(result, url)
    # Rounds alternate the sides, so load from elsewhere on the machine hits them alike.
    for i in range(sizes.flood_rounds):
        say(f"  {result.scheme}:// apply rate, round {i + 1}/{sizes.flood_rounds}")
        for side in DRAIN_SIDES:
            bench.drain_session(result, side, url)
    for check in result.checks():
        say(f"    {check.verdict}: {check.target}: raw {check.raw}, ours {check.ours}")


def plot(results: list[TransportResult], path: Path) -> Path | None:
    """Box plots of the latencies, one panel per transport, raw and ours side by side at each
    rate (whiskers at p1 and p99); None when nothing was measured. Needs matplotlib."""
    measured = [r for r in results if r.status == "ok" and r.latency]
    if not measured:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(measured), figsize=(4.5 * len(measured), 4), squeeze=False)
    for ax, result in zip(axes[0], measured, strict=True):
        rates = sorted(result.latency.get("raw", {}))
        data = [result.at(side, rate).samples_ms for rate in rates for side in SIDES]
        labels = [f"{side}\n{rate:,.0f}/s" for rate in rates for side in SIDES]
        ax.boxplot(data, whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
        ax.set_title(f"{result.scheme}://")
        ax.set_ylabel("publish -> applied (ms)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.latency``: print the tables; 0 when done, 130 when interrupted."""
    from .report import apply_rate_table, latency_detail_table, latency_table
    from .strategies import AMQP_URL, REDIS_URL

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more events and rounds")
    parser.add_argument("--transports", default=",".join(SCHEMES), help="comma-separated")
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--amqp-url", default=AMQP_URL)
    parser.add_argument("--plot", help="write the latency box plots to this PNG (matplotlib)")
    parser.add_argument(
        "--rates",
        help="update-rate sweep: comma-separated events/s (2 s of events each, at least 20), "
        "2 rounds, one burst drain; e.g. 5,50,500,2000,5000,10000",
    )
    parser.add_argument(
        "--drain-rounds",
        type=int,
        help="apply-rate rounds of each side (short run: 2, --full: 3); more on a busy machine",
    )
    parser.add_argument("--markdown", help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    schemes = tuple(s.strip() for s in args.transports.split(",") if s.strip())
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        parser.error(f"unknown transport {', '.join(unknown)}; known: {', '.join(SCHEMES)}")
    svcs = env.services(args.redis_url, args.amqp_url)
    local = {name: svc for name, svc in svcs.items() if svc.host in LOOPBACK}
    up = {name: env.reachable(svc) for name, svc in local.items()}
    for name, ok in up.items():
        if not ok:
            print(env.down_message(svcs[name], "its transports"), file=sys.stderr)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    sizes = FULL if args.full else SHORT
    if args.rates:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
        phases = tuple((rate, max(20, int(rate * 2))) for rate in rates)
        sizes = LatencySizes(phases=phases, rounds=2, flood_rounds=1)
    if args.drain_rounds is not None:
        if args.drain_rounds < 1:
            parser.error("--drain-rounds must be at least 1")
        sizes = dataclasses.replace(sizes, flood_rounds=args.drain_rounds)
    try:
        results = run_all(sizes, args.redis_url, args.amqp_url, up, schemes, say)
    except KeyboardInterrupt:
        print("\nInterrupted: every process started was stopped.", file=sys.stderr)
        return 130
    text = latency_table(results)
    if any(r.latency or r.drain for r in results):
        text += f"\n\n{latency_detail_table(results)}\n\n{apply_rate_table(results)}"
    print(text)
    if args.markdown:
        command = " ".join(["python -m benchmarks.latency", *(argv or sys.argv[1:])])
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        Path(args.markdown).write_text(
            f"# Transport latency\n\nCommand: `{command}` (load average at the end: {load})."
            f"\n\n{text}\n"
        )
    if args.plot:
        try:
            print(f"\nplot written to {plot(results, Path(args.plot))}")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
