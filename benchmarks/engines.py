"""How the distributed engines behave when a node dies, and how Redis Cluster scales.

    python -m benchmarks.engines                 # failover and cluster throughput, ~2 minutes
    python -m benchmarks.engines --only failover --rounds 5
    python -m benchmarks.engines --only failover --engines amqp,amqp+stream

Failover: for each engine a deployment of its own is started on loopback ports (the test
harness in ``tests/clusters.py``): Redis with a replica and 3 sentinels, a Redis Cluster of 3
primaries and 3 replicas, a 3-node NATS JetStream cluster, a 3-node RabbitMQ cluster (for
``amqp://`` and ``amqp+stream://``). A publisher sends a numbered event every 5 ms, a reader
(reconnecting as ``CacheSync``'s listener does) reads them; the node that matters is SIGKILLed
(the master, the primary owning the channel's slot, the stream's leader, the node a plain AMQP
consumer and the publisher are connected to) and the time until the reader receives a newer
event is measured, ``--rounds`` times per engine (the node is restarted and the deployment
healthy again between rounds). ``--engines`` runs some of them; the rows of the others are kept
from the last run (and say so).

Cluster throughput: 3 publisher processes each publish as fast as they can to a namespace of
their own for ``--seconds``, and 3 reader processes each read one namespace; once with the 3
namespaces on 3 different shards, once with 3 namespaces that hash to one shard. Reported:
events/s received in total, and the ratio.

Fan-out: publish -> received p50/p99 against the number of subscriptions (1, 4, 16, 64 over
4 processes) at ``--rate`` events/s, for ``redis://``, ``redis+cluster://``, ``nats://`` and
``amqp+stream://``. The brokers' CPU is not measured (they share the machine's 2 CPUs with the
subscribers, which dominate).

Results go to ``benchmarks/results/ENGINES.md``, ``engines_failover.png`` and
``engines_fanout.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import pyplot  # noqa: E402
from cachesync.transports.base import Transport, from_url  # noqa: E402
from tests.clusters import (  # noqa: E402
    ProcessGroup,
    RabbitMQCluster,
    RedisClusterDeployment,
    SentinelDeployment,
    nats_cluster,
    rabbitmq_cluster,
    redis_cluster,
    sentinel_deployment,
)
from tests.engine_tools import Feeder, Reader  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

Failovers = list[tuple[float, bool]]
"""Of each round: seconds until events flowed again, and whether a loss was reported."""


# -- failover ----------------------------------------------------------------------------------


async def _one_failover(
    make: Callable[[], Transport],
    channel: str,
    kill: Callable[[], Awaitable[str]],
    restart: Callable[[str], Awaitable[None]],
) -> tuple[float, bool]:
    """Seconds from the kill until a newer event arrives; and whether a loss was reported."""
    reader = Reader(make(), channel)
    feeder = Feeder(make(), channel)
    victim = ""
    try:
        reader.start()
        await reader.wait(lambda: reader.readies, 20)
        feeder.start()
        await reader.wait(lambda: len(reader.numbers) >= 50, 20)
        killed_at = time.monotonic()
        victim = await kill()
        newest = max(reader.numbers)
        await reader.wait(lambda: max(reader.numbers) > newest + 20, 60)
        back = next(
            at
            for at, number in zip(reader.arrivals, reader.numbers, strict=True)
            if at > killed_at and number > newest
        )
        lost = any(not resumed for _, resumed in reader.readies[1:])
        return back - killed_at, lost
    finally:
        await feeder.stop()
        await reader.stop()
        if victim:
            await restart(victim)


async def failover_sentinel(rounds: int) -> list[tuple[float, bool]]:
    deployment: SentinelDeployment = sentinel_deployment()
    url = f"{deployment.url}?health_check_interval=1&socket_timeout=1"
    try:
        results = []
        for i in range(rounds):

            async def kill() -> str:
                victim = deployment.node_at(deployment.master_port())
                deployment.group.kill(victim)
                return victim

            async def restart(name: str) -> None:
                await asyncio.to_thread(deployment.restart, name)

            results.append(
                await _one_failover(
                    lambda: from_url(url, connect_timeout=5.0), f"bench-{i}", kill, restart
                )
            )
        return results
    finally:
        deployment.group.stop()


async def failover_cluster(rounds: int) -> list[tuple[float, bool]]:
    from redis.cluster import key_slot

    deployment: RedisClusterDeployment = redis_cluster()
    url = f"{deployment.url}?health_check_interval=1&socket_timeout=1"
    try:
        results = []
        for i in range(rounds):
            channel = f"bench-{i}{{fx}}"

            async def kill(channel: str = channel) -> str:
                slot = key_slot(channel.encode())
                port = next(p for p, (a, b) in deployment.primaries().items() if a <= slot <= b)
                victim = deployment.node_at(port)
                deployment.group.kill(victim)
                return victim

            async def restart(name: str) -> None:
                await asyncio.to_thread(deployment.restart, name)

            results.append(
                await _one_failover(
                    lambda: from_url(url, connect_timeout=5.0), channel, kill, restart
                )
            )
        return results
    finally:
        deployment.group.stop()


async def failover_nats(rounds: int) -> list[tuple[float, bool]]:
    from tests.test_nats import _restart, _stream_leader

    group: ProcessGroup = nats_cluster(3)
    url = "nats://" + ",".join(f"127.0.0.1:{n.port}" for n in group.nodes.values())
    options = "?replicas=3&health_check_interval=1&publish_timeout=1"
    try:
        await asyncio.sleep(2.0)  # the JetStream meta leader election
        results = []
        for i in range(rounds):
            channel = f"bench-{i}"

            async def kill(channel: str = channel) -> str:
                victim = await _stream_leader(url, channel)
                group.kill(victim)
                return victim

            async def restart(name: str) -> None:
                await asyncio.to_thread(_restart, group, name)

            results.append(
                await _one_failover(
                    lambda: from_url(url + options, connect_timeout=5.0), channel, kill, restart
                )
            )
        return results
    finally:
        group.stop()


async def failover_rabbitmq(rounds: int, scheme: str) -> list[tuple[float, bool]]:
    """``amqp``: the node a plain consumer and the publisher are connected to is killed.
    ``amqp+stream``: the stream's leader, which the reader and publisher are connected to."""
    from tests.test_rabbitmq_cluster import _declare_streams

    cluster: RabbitMQCluster = rabbitmq_cluster()
    names = list(cluster.group.nodes)
    try:
        results = []
        for i in range(rounds):
            channel = f"bench-{scheme}-{i}"
            node = names[i % len(names)]
            if scheme == "amqp+stream":
                await _declare_streams(cluster, node, [channel])
                leader = await asyncio.to_thread(cluster.queue_leader, f"{channel}.stream")
                assert leader == node, f"the stream declared on {node} is led by {leader}"
            others = [name for name in names if name != node]
            url = cluster.url(node, *others, scheme=scheme)

            async def kill(node: str = node) -> str:
                cluster.group.kill(node)
                return node

            async def restart(name: str) -> None:
                await asyncio.to_thread(cluster.restart, name)

            def make(url: str = url) -> Transport:
                return from_url(url, connect_timeout=5.0)

            results.append(await _one_failover(make, channel, kill, restart))
        return results
    finally:
        cluster.group.stop()


# -- Redis Cluster throughput ------------------------------------------------------------------


def _publish_flat_out(url: str, channel: str, seconds: float, out: Any) -> None:
    async def run() -> None:
        transport = from_url(url, connect_timeout=5.0)
        await transport.connect()
        sent = 0
        batch = [b"x" * 100] * 50
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await transport.publish_many(channel, batch)
            sent += len(batch)
        await transport.close()
        out.put(("sent", sent))

    asyncio.run(run())


def _read_for(url: str, channel: str, seconds: float, ready: Any, out: Any) -> None:
    async def run() -> None:
        transport = from_url(url, connect_timeout=5.0)
        await transport.connect()
        count = 0
        started = asyncio.Event()

        async def consume() -> None:
            nonlocal count
            async for _ in transport.subscribe(channel, lambda resumed: started.set()):
                count += 1

        task = asyncio.create_task(consume())
        await started.wait()
        ready.put(True)
        await asyncio.sleep(seconds + 1.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await transport.close()
        out.put(("read", count))

    asyncio.run(run())


def _throughput(url: str, channels: list[str], seconds: float) -> tuple[float, float]:
    """(events/s received in total, events/s sent in total)."""
    context = multiprocessing.get_context("spawn")
    ready, out = context.Queue(), context.Queue()
    readers = [
        context.Process(target=_read_for, args=(url, ch, seconds, ready, out)) for ch in channels
    ]
    for process in readers:
        process.start()
    for _ in readers:
        ready.get(timeout=30)
    writers = [
        context.Process(target=_publish_flat_out, args=(url, ch, seconds, out)) for ch in channels
    ]
    for process in writers:
        process.start()
    totals = {"sent": 0, "read": 0}
    for _ in range(len(readers) + len(writers)):
        kind, count = out.get(timeout=seconds + 60)
        totals[kind] += count
    for process in readers + writers:
        process.join(10)
    return totals["read"] / seconds, totals["sent"] / seconds


def cluster_throughput(seconds: float) -> dict[str, tuple[float, float]]:
    from redis.cluster import key_slot

    deployment = redis_cluster()
    try:
        primaries = deployment.primaries()

        def shard(channel: str) -> int:
            slot = key_slot(channel.encode())
            return next(p for p, (a, b) in primaries.items() if a <= slot <= b)

        candidates = [f"bench{{ns{i}}}" for i in range(200)]
        spread: list[str] = []
        for channel in candidates:
            if shard(channel) not in {shard(c) for c in spread}:
                spread.append(channel)
            if len(spread) == 3:
                break
        same = [c for c in candidates if shard(c) == shard(candidates[0])][:3]
        return {
            "3 namespaces on 3 shards": _throughput(deployment.url, spread, seconds),
            "3 namespaces on 1 shard": _throughput(deployment.url, same, seconds),
        }
    finally:
        deployment.group.stop()


# -- fan-out ---------------------------------------------------------------------------------


def _fanout_worker(url: str, channel: str, count: int, ready: Any, out: Any, stop: Any) -> None:
    """``count`` subscriptions, each on a connection of its own; reports every latency."""

    async def run() -> None:
        transports = [from_url(url, connect_timeout=10.0) for _ in range(count)]
        latencies: list[float] = []
        live = 0
        all_live = asyncio.Event()

        def on_ready(resumed: bool) -> None:
            nonlocal live
            live += 1
            if live == count:
                all_live.set()

        async def consume(transport: Transport) -> None:
            async for payload in transport.subscribe(channel, on_ready):
                latencies.append(time.time() - float(payload))

        for transport in transports:
            await transport.connect()
        tasks = [asyncio.create_task(consume(t)) for t in transports]
        await all_live.wait()
        ready.put(True)
        while stop.empty():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the last messages in flight
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for transport in transports:
            await transport.close()
        out.put(latencies)

    asyncio.run(run())


def _fanout_point(
    url: str, channel: str, subscriptions: int, rate: float, seconds: float, processes: int = 4
) -> tuple[float, float, int]:
    """(p50 ms, p99 ms, deliveries) publish -> received for ``subscriptions`` at ``rate``/s."""
    context = multiprocessing.get_context("spawn")
    ready, out, stop = context.Queue(), context.Queue(), context.Queue()
    base, extra = divmod(subscriptions, processes)
    shares = [base + (i < extra) for i in range(processes)]
    workers = [
        context.Process(target=_fanout_worker, args=(url, channel, n, ready, out, stop))
        for n in shares
        if n
    ]
    for process in workers:
        process.start()
    try:
        return _drive_fanout(url, channel, rate, seconds, workers, ready, out, stop)
    finally:
        for process in workers:  # only the processes started here
            if process.is_alive():
                process.terminate()
            process.join(10)


def _drive_fanout(
    url: str,
    channel: str,
    rate: float,
    seconds: float,
    workers: list[Any],
    ready: Any,
    out: Any,
    stop: Any,
) -> tuple[float, float, int]:
    for _ in workers:
        ready.get(timeout=60)

    async def publish() -> None:
        transport = from_url(url, connect_timeout=10.0)
        await transport.connect()
        interval = 1.0 / rate
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await transport.publish(channel, b"%.6f" % time.time())
        await transport.close()

    asyncio.run(publish())
    stop.put(True)
    latencies: list[float] = []
    for _ in workers:
        latencies += out.get(timeout=60)
    for process in workers:
        process.join(10)
    latencies.sort()
    if not latencies:
        return float("nan"), float("nan"), 0
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return p50, p99, len(latencies)


def fanout(
    counts: list[int], rate: float, seconds: float
) -> dict[str, list[tuple[int, float, float, int]]]:
    deployment = redis_cluster()
    try:
        urls = {
            "redis:// (one node)": "redis://127.0.0.1:6379/0",
            "redis+cluster://": deployment.url,
            "nats:// (JetStream)": "nats://127.0.0.1:4222",
            "amqp+stream://": "amqp+stream://guest:guest@127.0.0.1:5672/",
        }
        curves: dict[str, list[tuple[int, float, float, int]]] = {}
        for name, url in urls.items():
            channel = f"bench-fanout-{os.getpid()}"
            if "cluster" in name:
                channel += "{fx}"
            for count in counts:
                try:
                    p50, p99, n = _fanout_point(url, channel, count, rate, seconds)
                except Exception as exc:  # a point that did not complete is shown as such
                    print(f"{name} x{count}: did not complete ({type(exc).__name__})")
                    p50, p99, n = float("nan"), float("nan"), 0
                curves.setdefault(name, []).append((count, p50, p99, n))
                print(f"{name} x{count}: p50 {p50:.2f} ms p99 {p99:.2f} ms ({n} deliveries)")
        return curves
    finally:
        deployment.group.stop()


def _plot_fanout(curves: dict[str, list[tuple[int, float, float, int]]], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, points in curves.items():
        xs = [p[0] for p in points]
        line = ax.plot(xs, [p[2] for p in points], marker="o", label=f"{name} p99")[0]
        ax.plot(xs, [p[1] for p in points], marker=".", ls="--", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("subscriptions (4 processes)")
    ax.set_ylabel("publish -> received, ms (dashed: p50)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- report ------------------------------------------------------------------------------------


def _plot(rows: list[FailoverRow], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.4))
    for i, row in enumerate(rows):
        if row.times:
            ax.scatter([i] * len(row.times), row.times, color="tab:blue", alpha=0.7)
        ax.scatter([i], [row.maximum], color="tab:blue", marker="x")
        ax.hlines(row.median, i - 0.25, i + 0.25, color="tab:red")
    ax.set_xticks(range(len(rows)), [row.engine.replace(" (", "\n(") for row in rows], fontsize=7)
    ax.set_ylabel("seconds until events flow again")
    ax.set_title("Failover: a node killed while events flow (red: median, x: max)", fontsize=9)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class FailoverRow:
    """One engine's line of the failover table."""

    engine: str
    killed: str
    median: float
    maximum: float
    rounds: int
    lost: int
    times: list[float]  # each round's; empty for a row from before they were listed
    measured: str

    def markdown(self) -> str:
        each = ", ".join(f"{t:.2f}" for t in self.times) or "-"
        return (
            f"| {self.engine} | {self.killed} | {self.median:.2f} | {self.maximum:.2f} | "
            f"{self.rounds} | {self.lost} of {self.rounds} | {each} | {self.measured} |"
        )


FAILOVER_HEADER = [
    "| engine | killed | events flow again after (s): median | max | rounds "
    "| reported as a loss | each round (s) | measured |",
    "|---|---|---|---|---|---|---|---|",
]


def _earlier_rows(path: Path) -> dict[str, FailoverRow]:
    """The failover rows of the last report, by engine (to keep those not run this time)."""
    if not path.exists():
        return {}
    text = path.read_text()
    header = re.search(r"on .*?, (\d{4}-\d\d-\d\d \d\d:\d\d UTC)\.", text)
    when = header.group(1) if header else "?"
    section = text.partition("\n## Failover\n")[2].partition("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 6 or cells[0] in ("engine", "---") or not cells[2][:1].isdigit():
            continue
        times = (
            [float(t) for t in cells[6].split(",")] if len(cells) > 6 and cells[6] != "-" else []
        )
        rows[cells[0]] = FailoverRow(
            engine=cells[0],
            killed=cells[1],
            median=float(cells[2]),
            maximum=float(cells[3]),
            rounds=int(cells[4]),
            lost=int(cells[5].split()[0]),
            times=times,
            measured=cells[7] if len(cells) > 7 else when,
        )
    return rows


def _write(lines: list[str], only: str | None) -> None:
    path = RESULTS / "ENGINES.md"
    text = "\n".join(lines)
    if only is not None and path.exists():
        # Keep the section of a part that was not run this time, saying which run it is from.
        earlier = path.read_text()
        header = earlier.split("\n## ")[0].strip().splitlines()[2:]
        note = f"_From an earlier run: {' '.join(header)}_"
        for part in earlier.split("\n## ")[1:]:
            title, _, body = part.partition("\n")
            if text.count("\n## " + title):
                continue
            if "_From an earlier run" not in body:
                body = f"\n{note}\n{body}"
            text += f"\n## {title}\n{body}"
    path.write_text(text)


FAILOVER_ENGINES: dict[str, tuple[str, str, Callable[[int], Coroutine[Any, Any, Failovers]]]] = {
    # --engines name: (row, what is killed, the run)
    "redis+sentinel": ("redis+sentinel", "the master", failover_sentinel),
    "redis+cluster": ("redis+cluster", "the primary of the channel's slot", failover_cluster),
    "nats": ("nats (stream leader)", "the stream's leader (R3)", failover_nats),
    "amqp": (
        "amqp (consumer's node)",
        "the node of the consumer and the publisher (3-node cluster)",
        lambda rounds: failover_rabbitmq(rounds, "amqp"),
    ),
    "amqp+stream": (
        "amqp+stream (stream leader)",
        "the stream's leader (3 replicas), the node of the consumer and the publisher",
        lambda rounds: failover_rabbitmq(rounds, "amqp+stream"),
    ),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["failover", "throughput", "fanout"])
    parser.add_argument(
        "--engines",
        help=f"failover of these only, comma-separated (of {','.join(FAILOVER_ENGINES)}); "
        "the other rows are kept from the last report",
    )
    parser.add_argument("--subscriptions", default="1,4,16,64")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    lines = [
        "# Engines: failover and Redis Cluster throughput",
        "",
        f"`python -m benchmarks.engines {' '.join(argv or sys.argv[1:])}`".replace(" `", "`"),
        f"on {platform.node()} ({os.cpu_count()} CPUs, shared), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
    ]
    if args.only in (None, "failover"):
        chosen = args.engines.split(",") if args.engines else list(FAILOVER_ENGINES)
        unknown = set(chosen) - set(FAILOVER_ENGINES)
        if unknown:
            parser.error(
                f"--engines: unknown {sorted(unknown)}; choose from {list(FAILOVER_ENGINES)}"
            )
        now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        rows = _earlier_rows(RESULTS / "ENGINES.md")
        for key in chosen:
            engine, killed, run = FAILOVER_ENGINES[key]
            results = asyncio.run(run(args.rounds))
            times = [t for t, _ in results]
            lost = sum(1 for _, loss in results if loss)
            rows[engine] = FailoverRow(
                engine, killed, statistics.median(times), max(times), len(times), lost, times, now
            )
            print(engine, [f"{t:.2f}" for t in times], f"lost {lost}/{len(times)}")
        order = [engine for engine, _, _ in FAILOVER_ENGINES.values()]
        table = [rows[e] for e in order if e in rows] + [
            row for engine, row in rows.items() if engine not in order
        ]
        lines += ["## Failover", "", *FAILOVER_HEADER, *(row.markdown() for row in table), ""]
        RESULTS.mkdir(parents=True, exist_ok=True)
        _plot(table, RESULTS / "engines_failover.png")
        lines += ["![failover](engines_failover.png)", ""]
        _write(lines, args.only)
    if args.only in (None, "throughput"):
        figures = cluster_throughput(args.seconds)
        lines += [
            "## Redis Cluster: namespaces over shards",
            "",
            "| layout | events/s received (3 readers) | events/s sent (3 publishers) |",
            "|---|---|---|",
        ]
        for name, (received, sent) in figures.items():
            lines.append(f"| {name} | {received:,.0f} | {sent:,.0f} |")
            print(name, f"received {received:,.0f}/s sent {sent:,.0f}/s")
        spread, same = (figures[k][0] for k in figures)
        lines += ["", f"Ratio spread / one shard: {spread / same:.2f}x.", ""]
        _write(lines, args.only)
    if args.only in (None, "fanout"):
        counts = [int(c) for c in args.subscriptions.split(",")]
        curves = fanout(counts, args.rate, args.seconds)
        lines += [
            "## Fan-out",
            "",
            f"Publish -> received at {args.rate:,.0f} events/s for {args.seconds:g} s, the "
            "subscriptions spread over 4 processes (one connection each) on the same 2 CPUs "
            "as the brokers.",
            "",
            "| engine | subscriptions | p50 ms | p99 ms | deliveries |",
            "|---|---|---|---|---|",
        ]
        for name, points in curves.items():
            for count, p50, p99, n in points:
                lines.append(f"| {name} | {count} | {p50:.2f} | {p99:.2f} | {n:,} |")
        lines.append("")
        _plot_fanout(curves, RESULTS / "engines_fanout.png")
        lines += ["![fan-out](engines_fanout.png)", ""]
    _write(lines, args.only)
    print(f"wrote {RESULTS / 'ENGINES.md'}")


if __name__ == "__main__":
    main()
