"""Raw redis-py against cachesync's Redis transports: publish-to-receive latency and consumer rate.

    .venv/bin/python -m benchmarks.transport_throughput [--url URL] [--latency-n 2000]
        [--rate-n 50000] [--rounds 3] [--plot transport_throughput.png]

Latency: one message in flight at a time, publisher and subscriber on separate connections (as
in production: different processes), measured from just before ``publish`` to the moment the
payload reaches the consumer (raw redis-py's ``get_message``/``xread`` return, or our iterator's
``yield``).

Consumer rate: a separate process floods the channel (pipelined PUBLISH or XADD) while the
consumer's event loop is held, so the backlog waits in Redis and the socket; then the consumer
drains it, and the rate is messages over drain time. Raw pub/sub is redis-py's ``PubSub`` read
two ways (``listen()`` and a ``get_message(timeout=None)`` loop); raw streams are an
``XREAD COUNT 1000`` loop.

Needs Redis on the URL (``docker compose up -d redis``). Prints a table; writes a plot when
matplotlib is installed and ``--plot`` is given. Not a test: never run it in CI as one.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import redis
import redis.asyncio as aioredis

from cachesync.transports.base import Transport
from cachesync.transports.redis import RedisPubSubTransport, RedisStreamTransport

from .transport_common import percentile
from .transport_common import plot as plot_figures

DEFAULT_URL = "redis://127.0.0.1:6379/0"
PAYLOAD = b'{"v":1,"source":"bench","seq":1,"ns":"currencies","op":"upsert","keys":["USD"]}'
WARMUP = 100


def _name() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


# -- the receivers under test: each yields payloads after calling ready() once live ----------

Receiver = Callable[[str, str, Callable[[], None]], AsyncIterator[bytes]]


async def _raw_listen(url: str, channel: str, ready: Callable[[], None]) -> AsyncIterator[bytes]:
    client = aioredis.Redis.from_url(url, socket_timeout=None)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(channel)
        await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        ready()
        async for message in pubsub.listen():
            if message["type"] == "message":
                yield message["data"]
    finally:
        await pubsub.aclose()
        await client.aclose()


async def _raw_get_message(
    url: str, channel: str, ready: Callable[[], None]
) -> AsyncIterator[bytes]:
    client = aioredis.Redis.from_url(url, socket_timeout=None)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(channel)
        await pubsub.get_message(timeout=1.0)
        ready()
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is not None and message["type"] == "message":
                yield message["data"]
    finally:
        await pubsub.aclose()
        await client.aclose()


async def _raw_xread(url: str, channel: str, ready: Callable[[], None]) -> AsyncIterator[bytes]:
    # RESP2: one reply shape to unpack. No socket_timeout: with it, redis-py sends through
    # asyncio.wait_for, which on Python 3.11 can swallow the cancellation that ends this.
    client = aioredis.Redis.from_url(url, protocol=2, socket_timeout=None)
    try:
        info = await client.xinfo_stream(channel) if await client.exists(channel) else None
        last = info["last-generated-id"] if info else b"0-0"
        ready()
        while True:
            reply = await client.xread({channel: last}, count=1000, block=1000)
            for _key, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    yield fields[b"d"]
    finally:
        await client.aclose()


def _ours(cls: type[Transport], scheme: str) -> Receiver:
    async def receive(url: str, channel: str, ready: Callable[[], None]) -> AsyncIterator[bytes]:
        async with cls(url.replace("redis://", scheme, 1)) as transport:
            async for payload in transport.subscribe(channel, lambda _resumed: ready()):
                yield payload

    return receive


PUBSUB: dict[str, Receiver] = {
    "raw PubSub.listen()": _raw_listen,
    "raw PubSub.get_message()": _raw_get_message,
    "RedisPubSubTransport": _ours(RedisPubSubTransport, "redis://"),
}
STREAMS: dict[str, Receiver] = {
    "raw XREAD COUNT 1000": _raw_xread,
    "RedisStreamTransport": _ours(RedisStreamTransport, "redis+stream://"),
}


# -- latency ---------------------------------------------------------------------------------


async def _publish(client: aioredis.Redis, stream: bool, channel: str, payload: bytes) -> None:
    if stream:
        await client.xadd(channel, {"d": payload}, maxlen=100_000, approximate=True)
    else:
        await client.publish(channel, payload)


async def _latency(url: str, receive: Receiver, stream: bool, n: int) -> list[float]:
    channel = _name()
    publisher = aioredis.Redis.from_url(url, socket_timeout=None)
    ready = asyncio.Event()
    received: asyncio.Queue[float] = asyncio.Queue()

    async def consume() -> None:
        async for _payload in receive(url, channel, ready.set):
            received.put_nowait(time.perf_counter())

    consumer = asyncio.create_task(consume())
    try:
        await ready.wait()
        samples: list[float] = []
        for i in range(n + WARMUP):
            start = time.perf_counter()
            await _publish(publisher, stream, channel, PAYLOAD)
            got = await received.get()
            if i >= WARMUP:
                samples.append(got - start)
        return samples
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        if stream:
            await publisher.delete(channel)
        await publisher.aclose()


# -- consumer rate ---------------------------------------------------------------------------


def _flood(url: str, channel: str, n: int, stream: bool) -> None:
    """In a separate process: publish ``n`` messages as fast as possible, then one "end"."""
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        if stream:
            pipe.xadd(channel, {"d": PAYLOAD}, maxlen=n + 10, approximate=True)
        else:
            pipe.publish(channel, PAYLOAD)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    if stream:
        client.xadd(channel, {"d": b"end"})
    else:
        client.publish(channel, b"end")
    client.close()


async def _consume_rate(url: str, receive: Receiver, stream: bool, n: int) -> tuple[float, int]:
    """Flood from another process with this loop held, then time how fast this one drains it.

    Blocking the loop while the producer runs is the point: the messages wait in Redis and the
    socket, the producer never competes with the consumer for a CPU, and the rate measured after
    the loop resumes is the consumer's ceiling.
    """
    channel = _name()
    ready = asyncio.Event()
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    count = 0
    start = 0.0

    async def consume() -> None:
        nonlocal count
        async for payload in receive(url, channel, ready.set):
            if payload == b"end":
                done.set_result(time.perf_counter() - start)
                return
            count += 1

    consumer = asyncio.create_task(consume())
    try:
        await ready.wait()
        process = multiprocessing.get_context("spawn").Process(
            target=_flood, args=(url, channel, n, stream)
        )
        process.start()
        process.join(120)  # blocking the loop is the point: see the docstring
        start = time.perf_counter()
        elapsed = await asyncio.wait_for(done, timeout=120)
        return count / elapsed, count
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        if stream:
            cleanup = aioredis.Redis.from_url(url)
            await cleanup.delete(channel)
            await cleanup.aclose()


# -- main ------------------------------------------------------------------------------------


async def main(url: str, latency_n: int, rate_n: int, rounds: int, plot: str | None) -> None:
    """Run every measurement and print the table (and plot it, if asked)."""
    print(f"Redis at {url}; latency n={latency_n}, consumer flood n={rate_n}, {rounds} rounds\n")
    groups = [(False, PUBSUB), (True, STREAMS)]
    # Rounds alternate raw and ours so that load from elsewhere on the machine hits both alike.
    latency: dict[str, list[float]] = {}
    for _ in range(rounds):
        for stream, receivers in groups:
            for label, receive in receivers.items():
                samples = await _latency(url, receive, stream, max(1, latency_n // rounds))
                latency.setdefault(label, []).extend(samples)
    print(f"{'publish -> received':<28} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for label, samples in latency.items():
        ms = [s * 1000 for s in samples]
        print(
            f"{label:<28} {statistics.median(ms):8.3f} {percentile(ms, 99):8.3f} "
            f"{statistics.fmean(ms):8.3f}"
        )

    print(f"\n{f'consumer rate (best of {rounds})':<28} {'msg/s':>10} {'median':>10}")
    consume: dict[str, list[float]] = {}
    runs: dict[str, Callable[[], Awaitable[tuple[float, int]]]] = {}
    for stream, receivers in groups:
        for label, receive in receivers.items():
            runs[label] = lambda r=receive, s=stream: _consume_rate(url, r, s, rate_n)  # type: ignore[misc]
    for _ in range(rounds):
        for label, run in runs.items():
            rate, count = await run()
            if count != rate_n:
                print(f"  ({label}: received {count} of {rate_n})")
            consume.setdefault(label, []).append(rate)
    for label, rates in consume.items():
        print(f"{label:<28} {max(rates):10.0f} {statistics.median(rates):10.0f}")

    if plot:
        plot_figures(plot, latency, {k: max(v) for k, v in consume.items()})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--latency-n", type=int, default=2000)
    parser.add_argument("--rate-n", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.latency_n, args.rate_n, args.rounds, args.plot))
