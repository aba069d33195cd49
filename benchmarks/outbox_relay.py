"""Outbox relay: throughput from PostgreSQL to the broker, and commit-to-publish latency.

    .venv/bin/python -m benchmarks.outbox_relay [--dsn DSN] [--broker URL] [--events 20000]
        [--latency-n 300] [--batch-size 500] [--plot outbox_relay.png]

Throughput: ``--events`` rows are committed while no relay runs (a backlog, as after a broker
outage); then a relay starts and the rate is rows over the time from its start to the moment
a subscriber on the broker has received the last one. Target: >= 5,000 events/s. The time
to write that backlog in one transaction is shown too: it includes the commit-stamp trigger.

Latency: the relay is idle (its polling fallback set to 10 s, so only the LISTEN/NOTIFY
wake-up can be fast); one row is committed at a time, and the latency runs from the moment
the commit returns to the moment a subscriber (its own broker connection) has the event. The
writer and the subscriber share a child process; the relay runs alone in the parent.
Target: p50 <= 1 ms. The same with NOTIFY off and a 50 ms poll shows what the wake-up is
worth. Timings need a quiet machine: other processes on the CPUs inflate every figure.

Needs PostgreSQL and the broker (``docker compose up -d postgres redis``). Works in a fresh
schema that it drops afterwards. Prints a table; writes a plot when matplotlib is installed
and ``--plot`` is given. Not a test: never run it in CI as one.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from benchmarks.common import pyplot
from benchmarks.stats import percentile
from cachesync.events import ChangeEvent, Op
from cachesync.owner.outbox import Outbox, OutboxRelay
from cachesync.transports.base import from_url

DEFAULT_DSN = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
VALUE = {"code": "USD", "name": "US dollar", "rate": 1.0842, "version": 1}


class Subscriber:
    """Counts the change events on a channel and notes when each key arrived."""

    def __init__(self, broker: str, channel: str) -> None:
        self.transport = from_url(broker)
        self.channel = channel
        self.count = 0
        self.arrived: dict[str, float] = {}
        self.changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        await self.transport.connect()
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.transport.close()

    async def _run(self) -> None:
        async for payload in self.transport.subscribe(self.channel, lambda _: self._ready.set()):
            now = time.perf_counter()
            event = ChangeEvent.decode(payload)
            if event.op == Op.HEARTBEAT:
                continue
            self.count += 1
            self.arrived[event.keys[0]] = now
            self.changed.set()

    async def wait(self, predicate: Any, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def fresh_schema(dsn: str) -> AsyncIterator[tuple[AsyncEngine, str]]:
    schema = f"cs_bench_{uuid.uuid4().hex[:8]}"
    base = create_async_engine(dsn, pool_size=5)
    async with base.begin() as conn:
        await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    engine = base.execution_options(schema_translate_map={None: schema})
    try:
        await Outbox.create_table(engine)
        yield engine, schema
    finally:
        async with base.begin() as conn:
            await conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        await base.dispose()


async def throughput(dsn: str, broker: str, events: int, batch_size: int) -> dict[str, float]:
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    async with fresh_schema(dsn) as (engine, _), Subscriber(broker, channel) as sub:
        rows = [
            {
                "channel": channel,
                "ns": "currencies",
                "op": "upsert",
                "keys": [f"K{i}"],
                "version": 1,
                "value": VALUE,
                "attempts": 0,
            }
            for i in range(events)
        ]
        started = time.perf_counter()
        async with engine.begin() as conn:
            for start in range(0, events, 5000):
                await conn.execute(insert(Outbox.__table__), rows[start : start + 5000])
        inserted = time.perf_counter() - started  # the commit stamps included
        started = time.perf_counter()
        async with OutboxRelay(engine, broker, channel, batch_size=batch_size) as relay:
            await sub.wait(lambda: sub.count >= events, timeout=300)
            elapsed = time.perf_counter() - started
            await relay.wait_idle(30)
        return {
            "events": events,
            "seconds": elapsed,
            "rate": events / elapsed,
            "insert_rate": events / inserted,
        }


async def _write_and_watch(
    dsn: str, schema: str, broker: str, channel: str, n: int, gap: float
) -> list[float]:
    """The owner's writes and a consumer, in a process of their own (see latency())."""
    base = create_async_engine(dsn)
    engine = base.execution_options(schema_translate_map={None: schema})
    samples: list[float] = []
    try:
        async with Subscriber(broker, channel) as sub:
            for i in range(n + 20):  # the first 20 warm up connections and caches
                key = f"L{i}"
                async with AsyncSession(engine) as session, session.begin():
                    Outbox.add(session, "currencies", key, version=i, value=VALUE, channel=channel)
                committed = time.perf_counter()
                await sub.wait(lambda k=key: k in sub.arrived, timeout=10)
                if i >= 20:
                    samples.append(sub.arrived[key] - committed)
                # Commit at a random point of the relay's idle wait, not in lockstep with it.
                await asyncio.sleep(random.uniform(0.002, gap))
    finally:
        await base.dispose()
    return samples


def _write_and_watch_process(*args: Any) -> list[float]:
    return asyncio.run(_write_and_watch(*args))


async def latency(dsn: str, broker: str, n: int, *, listen: bool) -> list[float]:
    """Commit-to-receive latency with the relay idle between commits.

    The writer and the subscriber run in a child process, the relay alone in this one, as in
    production (owner request handlers, relay and consumers do not share an event loop);
    sharing one loop would add the writer's and the subscriber's work to the relay's latency.
    """
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    poll = 10.0 if listen else 0.05
    async with (
        fresh_schema(dsn) as (engine, schema),
        OutboxRelay(engine, broker, channel, poll_interval=poll, listen=listen) as relay,
    ):
        await relay.wait_idle(10)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            gap = 0.01 if listen else poll
            args = (dsn, schema, broker, channel, n, gap)
            return await asyncio.get_running_loop().run_in_executor(
                pool, _write_and_watch_process, *args
            )


def _plot(path: str, notify: list[float], polling: list[float]) -> None:
    try:
        plt = pyplot()
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'cachesync[bench]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([x * 1000 for x in notify], bins=50, alpha=0.7, label="LISTEN/NOTIFY")
    ax.hist([x * 1000 for x in polling], bins=50, alpha=0.7, label="polling every 50 ms")
    ax.set_xlabel("commit to publish (ms)")
    ax.set_ylabel("samples")
    ax.set_title("cachesync outbox relay: commit-to-publish latency (PostgreSQL)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


async def main(
    dsn: str, broker: str, events: int, latency_n: int, batch_size: int, plot: str | None
) -> None:
    rate = await throughput(dsn, broker, events, batch_size)
    # The latency runs cross processes; a memory:// bus lives in one (it still shows the
    # relay's own ceiling in the throughput run, with no broker round trip).
    cross_process = not broker.startswith("memory://")
    notify = await latency(dsn, broker, latency_n, listen=True) if cross_process else []
    polling = (
        await latency(dsn, broker, max(50, latency_n // 4), listen=False) if cross_process else []
    )
    print(f"outbox relay, PostgreSQL -> {broker}")
    print(f"{'measure':<44}{'value':>14}{'target':>12}")
    print(f"{'backlog drain (events/s)':<44}{rate['rate']:>14,.0f}{'>= 5,000':>12}")
    print(f"{'  events / seconds':<44}{rate['events']:>8,.0f} / {rate['seconds']:.2f}")
    print(f"{'backlog written in one transaction (rows/s)':<44}{rate['insert_rate']:>14,.0f}")
    if not cross_process:
        print("(no latency figures: memory:// cannot reach the writer's process)")
        return
    for name, samples, target in (
        ("commit->publish, NOTIFY, idle", notify, "<= 1 ms"),
        ("commit->publish, 50 ms polling, idle", polling, ""),
    ):
        ms = [x * 1000 for x in samples]
        print(f"{name + ' p50 (ms)':<44}{statistics.median(ms):>14.3f}{target:>12}")
        print(f"{name + ' p95 (ms)':<44}{percentile(ms, 95):>14.3f}")
        print(f"{name + ' p99 (ms)':<44}{percentile(ms, 99):>14.3f}")
    if plot:
        _plot(plot, notify, polling)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--broker", default=DEFAULT_BROKER)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--latency-n", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    asyncio.run(
        main(args.dsn, args.broker, args.events, args.latency_n, args.batch_size, args.plot)
    )
