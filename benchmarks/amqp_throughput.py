"""Raw aio-pika against cachesync's AmqpTransport: publish-to-receive latency and consumer rate.

    .venv/bin/python -m benchmarks.amqp_throughput [--url URL] [--latency-n 2000]
        [--rate-n 20000] [--plot amqp_throughput.png]

Latency: one message in flight at a time, publisher and subscriber on separate connections (as
in production: different processes), measured from just before ``publish`` to the moment the
payload reaches the consumer (the raw callback, or our iterator's ``yield``). Run with and
without publisher confirms; confirms delay the publisher, not the delivery.

Sequential publish rate: ``await publish(...)`` in a loop, confirms on and off.

Consumer rate: a separate process floods the channel's exchange without confirms while the
consumer's event loop is held, so the backlog waits in the broker; then the consumer (raw
aio-pika with ``no_ack``, raw with manual acks and a prefetch of 100, and our subscription
iterator) drains it, and the rate is messages over drain time.

Needs RabbitMQ on the URL (``docker compose up -d rabbitmq``). Prints a table; writes a plot
when matplotlib is installed and ``--plot`` is given. Not a test: never run it in CI as one.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika

from cachesync.transports.amqp import AmqpTransport

from .transport_common import percentile
from .transport_common import plot as plot_figures

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
PAYLOAD = b'{"v":1,"source":"bench","seq":1,"ns":"currencies","op":"upsert","keys":["USD"]}'
WARMUP = 100


# -- latency ---------------------------------------------------------------------------------


async def _latency_raw(url: str, n: int, confirms: bool) -> list[float]:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    pub_conn = await aio_pika.connect_robust(url)
    sub_conn = await aio_pika.connect_robust(url)
    try:
        sub_ch = await sub_conn.channel(publisher_confirms=False)
        ex = await sub_ch.declare_exchange(name, aio_pika.ExchangeType.FANOUT)
        queue = await sub_ch.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(ex)
        waiter: asyncio.Future[float] | None = None

        async def on_message(message: Any) -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(time.perf_counter())

        await queue.consume(on_message, no_ack=True)
        pub_ch = await pub_conn.channel(publisher_confirms=confirms)
        pub_ex = await pub_ch.declare_exchange(name, aio_pika.ExchangeType.FANOUT)
        loop = asyncio.get_running_loop()
        samples: list[float] = []
        for i in range(n + WARMUP):
            waiter = loop.create_future()
            start = time.perf_counter()
            await pub_ex.publish(aio_pika.Message(PAYLOAD), routing_key="", mandatory=False)
            received = await waiter
            if i >= WARMUP:
                samples.append(received - start)
        return samples
    finally:
        await pub_conn.close()
        await sub_conn.close()


async def _latency_ours(url: str, n: int, confirms: bool) -> list[float]:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    pub = AmqpTransport(url, publisher_confirms=confirms, connection_name="bench-pub")
    sub = AmqpTransport(url, connection_name="bench-sub")
    await pub.connect()
    await sub.connect()
    try:
        ready = asyncio.Event()
        received: asyncio.Queue[float] = asyncio.Queue()

        async def consume() -> None:
            async for _payload in sub.subscribe(name, lambda _resumed: ready.set()):
                received.put_nowait(time.perf_counter())

        consumer = asyncio.create_task(consume())
        try:
            await ready.wait()
            samples: list[float] = []
            for i in range(n + WARMUP):
                start = time.perf_counter()
                await pub.publish(name, PAYLOAD)
                got = await received.get()
                if i >= WARMUP:
                    samples.append(got - start)
            return samples
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
    finally:
        await pub.close()
        await sub.close()


# -- sequential publish rate -----------------------------------------------------------------


async def _publish_rate_raw(url: str, n: int, confirms: bool) -> float:
    conn = await aio_pika.connect_robust(url)
    try:
        ch = await conn.channel(publisher_confirms=confirms)
        ex = await ch.declare_exchange(
            f"bench-{uuid.uuid4().hex[:8]}", aio_pika.ExchangeType.FANOUT
        )
        start = time.perf_counter()
        for _ in range(n):
            await ex.publish(aio_pika.Message(PAYLOAD), routing_key="", mandatory=False)
        return n / (time.perf_counter() - start)
    finally:
        await conn.close()


async def _publish_rate_ours(url: str, n: int, confirms: bool) -> float:
    async with AmqpTransport(url, publisher_confirms=confirms) as pub:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        await pub.publish(name, PAYLOAD)
        start = time.perf_counter()
        for _ in range(n):
            await pub.publish(name, PAYLOAD)
        return n / (time.perf_counter() - start)


# -- consumer rate ---------------------------------------------------------------------------


def _flood(url: str, name: str, n: int) -> None:
    """In a separate process: publish ``n`` messages as fast as possible, then one "end"."""

    async def run() -> None:
        conn = await aio_pika.connect_robust(url)
        try:
            ch = await conn.channel(publisher_confirms=False)
            ex = await ch.declare_exchange(name, aio_pika.ExchangeType.FANOUT)
            for _ in range(n):
                await ex.publish(aio_pika.Message(PAYLOAD), routing_key="", mandatory=False)
            await ex.publish(aio_pika.Message(b"end"), routing_key="", mandatory=False)
        finally:
            await conn.close()

    asyncio.run(run())


async def _run_flood(url: str, name: str, n: int, counter: _Counter) -> float:
    """Flood the exchange from another process, then time how fast this one drains it.

    The event loop is blocked on purpose while the producer runs, so the messages queue up in
    the broker and the socket; the producer never competes with the consumer for a CPU, and
    the rate measured after the loop resumes is the consumer's ceiling.
    """
    process = multiprocessing.get_context("spawn").Process(target=_flood, args=(url, name, n))
    process.start()
    process.join(120)  # blocking the loop is the point: see the docstring
    counter.start = time.perf_counter()
    return await asyncio.wait_for(counter.done, timeout=120)


class _Counter:
    def __init__(self) -> None:
        self.count = 0
        self.start = 0.0
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def hit(self, body: bytes) -> None:
        if body == b"end":
            if not self.done.done():
                elapsed = time.perf_counter() - self.start
                self.done.set_result(self.count / elapsed if elapsed > 0 else 0.0)
            return
        self.count += 1


async def _consume_rate_raw(url: str, n: int, ack: bool, prefetch: int = 100) -> float:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    conn = await aio_pika.connect_robust(url)
    try:
        ch = await conn.channel(publisher_confirms=False)
        if ack:
            await ch.set_qos(prefetch_count=prefetch)
        ex = await ch.declare_exchange(name, aio_pika.ExchangeType.FANOUT)
        queue = await ch.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(ex)
        counter = _Counter()

        async def on_message(message: Any) -> None:
            counter.hit(message.body)
            if ack:
                await message.ack()

        await queue.consume(on_message, no_ack=not ack)
        rate = await _run_flood(url, name, n, counter)
        if counter.count != n:
            print(f"  (raw {'ack' if ack else 'no_ack'}: received {counter.count} of {n})")
        return rate
    finally:
        await conn.close()


async def _consume_rate_ours(url: str, n: int) -> float:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    async with AmqpTransport(url) as sub:
        ready = asyncio.Event()
        counter = _Counter()

        async def consume() -> None:
            async for payload in sub.subscribe(name, lambda _resumed: ready.set()):
                counter.hit(payload)

        consumer = asyncio.create_task(consume())
        try:
            await ready.wait()
            rate = await _run_flood(url, name, n, counter)
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
        if counter.count != n:
            print(f"  (ours: received {counter.count} of {n})")
        return rate


# -- main ------------------------------------------------------------------------------------


async def main(url: str, latency_n: int, rate_n: int, plot: str | None) -> None:
    """Run every measurement and print the table (and plot it, if asked)."""
    print(f"RabbitMQ at {url}; latency n={latency_n}, consumer flood n={rate_n}\n")
    # Rounds alternate raw and ours so that load from elsewhere on the machine hits both alike.
    rounds = 5
    latency: dict[str, list[float]] = {}
    for _ in range(rounds):
        for confirms in (True, False):
            tag = "confirm" if confirms else "no confirm"
            for label, measure in (
                ("raw aio-pika", _latency_raw),
                ("AmqpTransport", _latency_ours),
            ):
                samples = await measure(url, max(1, latency_n // rounds), confirms)
                latency.setdefault(f"{label}, {tag}", []).extend(samples)

    print(f"{'publish -> received':<28} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for label, samples in latency.items():
        ms = [s * 1000 for s in samples]
        print(
            f"{label:<28} {statistics.median(ms):8.3f} {percentile(ms, 99):8.3f} "
            f"{statistics.fmean(ms):8.3f}"
        )

    publish_n = max(1000, latency_n)
    print(f"\n{'sequential publish':<28} {'msg/s':>10}")
    publish: dict[str, float] = {}
    for confirms in (True, False):
        tag = "confirm" if confirms else "no confirm"
        publish[f"raw aio-pika, {tag}"] = await _publish_rate_raw(url, publish_n, confirms)
        publish[f"AmqpTransport, {tag}"] = await _publish_rate_ours(url, publish_n, confirms)
    for label, rate in publish.items():
        print(f"{label:<28} {rate:10.0f}")

    print(f"\n{'consumer rate (best of 3)':<28} {'msg/s':>10}")
    consume: dict[str, float] = {}
    variants: dict[str, Callable[[], Awaitable[float]]] = {
        "raw aio-pika, ack+prefetch": lambda: _consume_rate_raw(url, rate_n, ack=True),
        "raw aio-pika, no_ack": lambda: _consume_rate_raw(url, rate_n, ack=False),
        "AmqpTransport (no_ack)": lambda: _consume_rate_ours(url, rate_n),
    }
    for _ in range(3):
        for name, run in variants.items():
            consume[name] = max(consume.get(name, 0.0), await run())
    for label, rate in consume.items():
        print(f"{label:<28} {rate:10.0f}")

    if plot:
        plot_figures(plot, latency, consume)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--latency-n", type=int, default=2000)
    parser.add_argument("--rate-n", type=int, default=20000)
    parser.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.latency_n, args.rate_n, args.plot))
