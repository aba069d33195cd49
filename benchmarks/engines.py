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
events/s received in total, the ratio, and the CPU (percent of one core) of the readers, the
publishers and the cluster's nodes over the run, which says what limits it.

Fan-out: publish -> received p50/p99 against the number of subscriptions (``--subscriptions``,
spread over ``--processes`` processes, one connection each) and the event rate (``--rates``),
for ``redis://``, ``redis+cluster://``, ``nats://`` and ``amqp+stream://`` (``--engines``).
Each subscription is a bare transport subscription (no client: no decoding, no cache). With each
point: the CPU, in percent of one core over the publishing, of the broker (``procstat``: the
PIDs of the servers started here; for the machine's own servers the Redis ``INFO server``
process_id, or the ``beam.smp`` / ``nats-server`` listening on the port), of the subscribing
processes together, and of the publisher; and what the subscribing processes spend per
delivery.

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
from benchmarks.procstat import CpuMeter, broker_pids  # noqa: E402
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


def _publish_flat_out(url: str, channel: str, seconds: float, ready: Any, out: Any) -> None:
    async def run() -> None:
        transport = from_url(url, connect_timeout=5.0)
        await transport.connect()
        ready.put(True)  # started: the CPU is measured from here
        sent = 0
        batch = [b"x" * 100] * 50
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await transport.publish_many(channel, batch)
            sent += len(batch)
        await transport.close()
        out.put(("sent", sent, ""))

    asyncio.run(run())


def _read_for(url: str, channel: str, ready: Any, out: Any, stop: Any) -> None:
    """Read ``channel`` until told to stop (the publishers are done), then 1 s more for what
    is in flight; report how many arrived, and what ended the subscription if it broke."""

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
        while stop.empty() and not task.done():
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        broke = type(task.exception()).__name__ if task.done() and task.exception() else ""
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await transport.close()
        out.put(("read", count, broke))

    asyncio.run(run())


@dataclass
class Throughput:
    """One layout's run: events/s, and CPU in percent of one core over the run."""

    received: float
    sent: float
    readers_cpu: float
    publishers_cpu: float
    nodes_cpu: float
    busiest_node_cpu: float
    broken: list[str]
    """What ended the subscriptions that broke (a reader too slow for the broker)."""
    load: float = float("nan")
    """The machine's 1-minute load average after the run (other work included)."""
    clients_waited: float = float("nan")
    """Percent of the run the readers and publishers (summed) spent waiting for a CPU."""


def _throughput(url: str, channels: list[str], seconds: float, nodes: list[int]) -> Throughput:
    """Events/s received and sent in total, and the CPU of readers, publishers and ``nodes``."""
    context = multiprocessing.get_context("spawn")
    ready, out, stop = context.Queue(), context.Queue(), context.Queue()
    readers = [
        context.Process(target=_read_for, args=(url, ch, ready, out, stop)) for ch in channels
    ]
    for process in readers:
        process.start()
    for _ in readers:
        ready.get(timeout=30)
    writers = [
        context.Process(target=_publish_flat_out, args=(url, ch, seconds, ready, out))
        for ch in channels
    ]
    for process in writers:
        process.start()
    for _ in writers:
        ready.get(timeout=30)
    meters = [
        CpuMeter([p.pid for p in readers if p.pid is not None]),
        CpuMeter(nodes),
        CpuMeter([p.pid for p in writers if p.pid is not None]),
    ]
    per_node = [CpuMeter([pid]) for pid in nodes]
    for meter in meters + per_node:
        meter.start()
    busiest = waited = float("nan")
    totals = {"sent": 0, "read": 0}
    cpu: list[float] = []
    broke: list[str] = []
    for _ in writers:
        kind, count, _error = out.get(timeout=seconds + 60)
        totals[kind] += count
        if not cpu:  # the publishing is over: the CPU of its span
            cpu = [meter.stop() for meter in meters]
            busiest = max(meter.stop() for meter in per_node)
            waited = meters[0].waited + meters[2].waited
    for _ in readers:
        stop.put(True)
    for _ in readers:
        kind, count, error = out.get(timeout=60)
        totals[kind] += count
        broke += [error] if error else []
    for process in readers + writers:
        process.join(10)
    return Throughput(
        totals["read"] / seconds,
        totals["sent"] / seconds,
        readers_cpu=cpu[0],
        publishers_cpu=cpu[2],
        nodes_cpu=cpu[1],
        busiest_node_cpu=busiest,
        broken=broke,
        load=os.getloadavg()[0],
        clients_waited=waited,
    )


def cluster_throughput(seconds: float, rounds: int) -> dict[str, list[Throughput]]:
    """Both layouts ``rounds`` times, in turn."""
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
        nodes = [n.process.pid for n in deployment.group.nodes.values() if n.process is not None]
        layouts = {"3 namespaces on 3 shards": spread, "3 namespaces on 1 shard": same}
        runs: dict[str, list[Throughput]] = {name: [] for name in layouts}
        for _ in range(rounds):
            for name, channels in layouts.items():
                runs[name].append(_throughput(deployment.url, channels, seconds, nodes))
                print(name, runs[name][-1])
        return runs
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


@dataclass
class FanoutPoint:
    """One point of the fan-out curve: latencies in ms, CPU in percent of one core over the
    publishing, and the subscribing processes' CPU microseconds per delivery."""

    engine: str
    subscriptions: int
    rate: float
    p50: float
    p99: float
    deliveries: int
    broker_cpu: float
    consumers_cpu: float
    publisher_cpu: float
    seconds: float = 1.0
    load: float = float("nan")
    """The machine's 1-minute load average after the point (other work included)."""
    consumers_waited: float = float("nan")
    """Percent of the time the subscribing processes (summed) waited for a CPU."""

    @property
    def us_per_delivery(self) -> float:
        """The subscribing processes' CPU microseconds per delivery."""
        if not self.deliveries:
            return float("nan")
        return self.consumers_cpu / 100 / (self.deliveries / self.seconds) * 1e6


def _fanout_point(
    url: str,
    channel: str,
    subscriptions: int,
    rate: float,
    seconds: float,
    processes: int,
    broker: list[int],
) -> tuple[float, float, int, list[float]]:
    """Publish -> received for ``subscriptions`` at ``rate``/s: (p50 ms, p99 ms, deliveries,
    [broker, consumers, publisher CPU %, consumers waiting for a CPU %])."""
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
        return _drive_fanout(url, channel, rate, seconds, workers, ready, out, stop, broker)
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
    broker: list[int],
) -> tuple[float, float, int, list[float]]:
    for _ in workers:
        ready.get(timeout=60)
    meters = [
        CpuMeter(broker),
        CpuMeter([p.pid for p in workers if p.pid is not None]),
        CpuMeter([os.getpid()]),
    ]

    async def publish() -> list[float]:
        transport = from_url(url, connect_timeout=10.0)
        await transport.connect()
        interval = 1.0 / rate
        for meter in meters:
            meter.start()
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await transport.publish(channel, b"%.6f" % time.time())
        cpu = [meter.stop() for meter in meters]
        await transport.close()
        return [*cpu, meters[1].waited]

    cpu = asyncio.run(publish())
    stop.put(True)
    latencies: list[float] = []
    for _ in workers:
        latencies += out.get(timeout=60)
    for process in workers:
        process.join(10)
    latencies.sort()
    if not latencies:
        return float("nan"), float("nan"), 0, cpu
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return p50, p99, len(latencies), cpu


ENGINES = {
    "redis": ("redis:// (one node)", "redis://127.0.0.1:6379/0"),
    "cluster": ("redis+cluster://", ""),  # the deployment started here
    "nats": ("nats:// (JetStream)", "nats://127.0.0.1:4222"),
    "stream": ("amqp+stream://", "amqp+stream://guest:guest@127.0.0.1:5672/"),
}


SATURATED_MS = 1000.0
"""A p99 past this: the engine is saturated here, and not run with more subscriptions."""


def fanout(
    engines: list[str],
    counts: list[int],
    rates: list[float],
    seconds: float,
    processes: int,
    rounds: int,
) -> list[FanoutPoint]:
    """Every point ``rounds`` times, the subscription counts taken in turn in each round (so
    that the machine's other work weighs on all alike)."""
    deployment = redis_cluster() if "cluster" in engines else None
    try:
        points: list[FanoutPoint] = []
        for key in engines:
            name, url = ENGINES[key]
            if deployment is not None and key == "cluster":
                url = deployment.url
                broker = [
                    n.process.pid for n in deployment.group.nodes.values() if n.process is not None
                ]
            else:
                broker = broker_pids(url)
            channel = f"bench-fanout-{os.getpid()}" + ("{fx}" if key == "cluster" else "")
            for rate, round_ in ((r, i) for r in rates for i in range(rounds)):
                for count in counts:
                    if any(
                        p.engine == name
                        and p.rate == rate
                        and p.subscriptions < count
                        and not p.p99 <= SATURATED_MS
                        for p in points
                    ):
                        continue  # saturated with fewer subscriptions already
                    try:
                        p50, p99, n, cpu = _fanout_point(
                            url, channel, count, rate, seconds, processes, broker
                        )
                    except Exception as exc:  # a point that did not complete is shown as such
                        print(f"{name} x{count}: did not complete ({type(exc).__name__})")
                        p50, p99, n, cpu = float("nan"), float("nan"), 0, [float("nan")] * 4
                    point = FanoutPoint(
                        name, count, rate, p50, p99, n, *cpu[:3], seconds=seconds,
                        load=os.getloadavg()[0], consumers_waited=cpu[3],
                    )  # fmt: skip
                    points.append(point)
                    print(
                        f"round {round_ + 1}: {name} x{count} at {rate:g}/s: "
                        f"p50 {p50:.2f} ms p99 {p99:.2f} ms "
                        f"({n} deliveries); CPU % broker {cpu[0]:.0f} consumers {cpu[1]:.0f} "
                        f"publisher {cpu[2]:.0f}; {point.us_per_delivery:.1f} us/delivery; "
                        f"load {point.load:.1f}"
                    )
        return points
    finally:
        if deployment is not None:
            deployment.group.stop()


def _medians(points: list[FanoutPoint]) -> list[tuple[FanoutPoint, list[FanoutPoint]]]:
    """Per (engine, rate, subscriptions), in order: the point of median values, and the
    rounds it summarises."""
    groups: dict[tuple[str, float, int], list[FanoutPoint]] = {}
    for point in points:
        groups.setdefault((point.engine, point.rate, point.subscriptions), []).append(point)
    summary = []
    for (engine, rate, count), runs in groups.items():  # in the order first run

        def med(values: list[float]) -> float:
            return statistics.median(values) if values else float("nan")

        done = [r for r in runs if r.deliveries]
        median = FanoutPoint(
            engine, count, rate,
            med([r.p50 for r in done]), med([r.p99 for r in done]),
            int(med([r.deliveries for r in runs])),
            med([r.broker_cpu for r in done]), med([r.consumers_cpu for r in done]),
            med([r.publisher_cpu for r in done]), runs[0].seconds,
            med([r.load for r in runs]), med([r.consumers_waited for r in done]),
        )  # fmt: skip
        summary.append((median, runs))
    return summary


def _fanout_reading(points: list[FanoutPoint], target: int = 64) -> list[str]:
    """What the figures say about the target (``target`` subscriptions within 2x the p99 of
    one), per engine and rate, with the CPU that explains it."""
    capacity = 100 * (os.cpu_count() or 1)
    medians = [median for median, _ in _medians(points)]
    lines = []
    for one in (m for m in medians if m.subscriptions == 1):
        many = next(
            (
                m
                for m in medians
                if (m.engine, m.rate, m.subscriptions) == (one.engine, one.rate, target)
            ),
            None,
        )
        if many is None or not many.deliveries:
            lines.append(
                f"- {one.engine} at {one.rate:,.0f}/s: {target} subscriptions not measured "
                "(saturated with fewer, or did not complete)."
            )
            continue
        used = many.broker_cpu + many.consumers_cpu + many.publisher_cpu
        lines.append(
            f"- {one.engine} at {one.rate:,.0f}/s: p99 {many.p99:.1f} ms with {target} "
            f"subscriptions against {one.p99:.1f} ms with one ({many.p99 / one.p99:.1f}x; "
            f"target 2x). With {target}: subscribers {many.consumers_cpu:.0f}% of a core "
            f"({many.us_per_delivery:.1f} us per delivery), broker {many.broker_cpu:.0f}%, "
            f"publisher {many.publisher_cpu:.0f}%: {used:.0f}% of the machine's {capacity}%, "
            f"while the subscribers waited for a CPU {many.consumers_waited:.0f}% of the time "
            f"(load average {many.load:.1f})."
        )
    return lines


def _throughput_limit(runs: list[Throughput]) -> str:
    """What limited the throughput, from the CPU figures."""
    capacity = 100 * (os.cpu_count() or 1)
    used = statistics.median(r.readers_cpu + r.publishers_cpu + r.nodes_cpu for r in runs)
    busiest = max(r.busiest_node_cpu for r in runs)
    load = statistics.median(r.load for r in runs)
    waited = statistics.median(r.clients_waited for r in runs)
    text = (
        f"Readers, publishers and nodes together used {used:.0f}% of the machine's "
        f"{capacity}% (median over the runs), while the readers and publishers spent "
        f"{waited:.0f}% (of one core's time, summed) runnable but waiting for a CPU; the "
        f"busiest node used at most {busiest:.0f}% of one core; load average {load:.1f} (other "
        "work included). "
    )
    if busiest < 50:
        text += (
            "No node was near a core's worth of work, so the shards were not the limit: the "
            "client processes were, each round trip waiting its turn for a CPU"
            + (
                " on a machine whose load average exceeds its CPUs"
                if load > (os.cpu_count() or 1)
                else ""
            )
            + ". Spreading namespaces over shards can only show its effect where a node is "
            "the bottleneck: with a core per node and per client process."
        )
    else:
        text += "A node was busy: the shard count matters here."
    return text


def _plot_fanout(points: list[FanoutPoint], path: Path, processes: int) -> None:
    plt = pyplot()

    fig, (ax, cpu_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    curves: dict[str, list[tuple[FanoutPoint, list[FanoutPoint]]]] = {}
    rates = {p.rate for p in points}
    for median, runs in _medians(points):
        label = median.engine + (f" {median.rate:g}/s" if len(rates) > 1 else "")
        curves.setdefault(label, []).append((median, runs))
    for label, summary in curves.items():
        curve = [median for median, _ in summary]
        xs = [p.subscriptions for p in curve]
        lows = [p.p99 - min(r.p99 for r in runs) for p, runs in summary]
        highs = [max(r.p99 for r in runs) - p.p99 for p, runs in summary]
        line = ax.errorbar(
            xs, [p.p99 for p in curve], yerr=[lows, highs], marker="o", capsize=2,
            label=f"{label} p99",
        )[0]  # fmt: skip
        ax.plot(xs, [p.p50 for p in curve], marker=".", ls="--", color=line.get_color())
        cpu_ax.plot(xs, [p.broker_cpu for p in curve], marker="o", color=line.get_color())
        cpu_ax.plot(
            xs, [p.consumers_cpu for p in curve], marker=".", ls="--", color=line.get_color()
        )
    for axis in (ax, cpu_ax):
        axis.set_xscale("log", base=2)
        axis.set_xlabel(f"subscriptions ({processes} processes)")
    ax.set_yscale("log")
    ax.set_ylabel("publish -> received, ms\n(median of rounds, bars: range; dashed: p50)")
    ax.legend(fontsize=7)
    cpu_ax.set_ylabel("% of one core: broker (dashed: subscribers)")
    cpu_ax.axhline(100 * (os.cpu_count() or 1), color="grey", lw=0.8, ls=":")
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
            if "_From an earlier run" not in body and "Measured with" not in body:
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
        help=f"comma-separated: failover of {','.join(FAILOVER_ENGINES)}, fan-out of "
        f"{','.join(ENGINES)} (default: all); failover rows not run are kept from the last report",
    )
    parser.add_argument("--subscriptions", default="1,4,16,64", help="fan-out points")
    parser.add_argument("--rates", default="1000", help="fan-out events/s, comma-separated")
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 2,
        help="subscribing processes (default: one per CPU)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    command = f"`python -m benchmarks.engines {' '.join(argv or sys.argv[1:])}`"
    # Each section says how and when it was measured: a run of one part keeps the others.
    measured = (
        f"Measured with {command.replace(' `', '`')} on {platform.node()} "
        f"({os.cpu_count()} CPUs, shared), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )
    chosen = args.engines.split(",") if args.engines else None
    unknown = set(chosen or ()) - set(FAILOVER_ENGINES) - set(ENGINES)
    if unknown:
        parser.error(
            f"--engines: unknown {sorted(unknown)}; choose from "
            f"{sorted(set(FAILOVER_ENGINES) | set(ENGINES))}"
        )
    lines = ["# Engines: failover, Redis Cluster throughput, fan-out", ""]
    if args.only in (None, "failover"):
        now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        rows = _earlier_rows(RESULTS / "ENGINES.md")
        for key in [k for k in FAILOVER_ENGINES if chosen is None or k in chosen]:
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
        figures = cluster_throughput(args.seconds, args.rounds)
        lines += [
            "## Redis Cluster: namespaces over shards",
            "",
            measured,
            "",
            f"{args.rounds} rounds of {args.seconds:g} s, the layouts in turn; medians (range). "
            "CPU in percent of one core over the publishing (the machine has "
            f"{os.cpu_count()} cores, {100 * (os.cpu_count() or 1)}% in all, shared with "
            "other work).",
            "",
            "| layout | events/s received (3 readers) | events/s sent (3 publishers) "
            "| readers CPU % | publishers CPU % | cluster nodes CPU % (busiest node) "
            "| readers and publishers waiting for a CPU % | subscriptions broken |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, runs in figures.items():

            def med(values: list[float]) -> float:
                return statistics.median(values)

            received = [r.received for r in runs]
            lines.append(
                f"| {name} | {med(received):,.0f} ({min(received):,.0f}-{max(received):,.0f}) "
                f"| {med([r.sent for r in runs]):,.0f} | {med([r.readers_cpu for r in runs]):.0f} "
                f"| {med([r.publishers_cpu for r in runs]):.0f} "
                f"| {med([r.nodes_cpu for r in runs]):.0f} "
                f"({med([r.busiest_node_cpu for r in runs]):.0f}) "
                f"| {med([r.clients_waited for r in runs]):.0f} "
                f"| {sum(len(r.broken) for r in runs)} |"
            )
        spread_runs, same_runs = figures.values()
        ratios = [a.received / b.received for a, b in zip(spread_runs, same_runs, strict=True)]
        lines += [
            "",
            f"Ratio spread / one shard, round by round: {statistics.median(ratios):.2f}x "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}).",
            "",
            _throughput_limit([r for runs in figures.values() for r in runs]),
            "",
        ]
        _write(lines, args.only)
    if args.only in (None, "fanout"):
        counts = [int(c) for c in args.subscriptions.split(",")]
        rates = [float(r) for r in args.rates.split(",")]
        engines = [k for k in ENGINES if chosen is None or k in chosen]
        points = fanout(engines, counts, rates, args.seconds, args.processes, args.rounds)
        lines += [
            "## Fan-out",
            "",
            measured,
            "",
            f"Publish -> received for {args.seconds:g} s per point, {args.rounds} rounds (the "
            "subscription counts in turn in each round; medians, p99 with its range over the "
            "rounds; an engine whose p99 passed 1 s is not run with more subscriptions), the "
            "subscriptions spread "
            f"over {args.processes} processes (one connection each) on the same "
            f"{os.cpu_count()} CPUs as the brokers. CPU in percent of one core over the "
            "publishing: the broker's, the subscribing processes' together, the publisher's; "
            "the subscribing processes' CPU per delivery; and how long they were runnable but "
            "waiting for a CPU (percent of the time, summed over them: the machine's other "
            "work holding them back).",
            "",
            "| engine | events/s | subscriptions | p50 ms | p99 ms (range) | deliveries "
            "| broker CPU % | subscribers CPU % | publisher CPU % | us CPU / delivery "
            "| subscribers waiting for a CPU % | load avg |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for point, runs in _medians(points):
            low, high = min(r.p99 for r in runs), max(r.p99 for r in runs)
            lines.append(
                f"| {point.engine} | {point.rate:,.0f} | {point.subscriptions} "
                f"| {point.p50:.2f} | {point.p99:.2f} ({low:.2f}-{high:.2f}) "
                f"| {point.deliveries:,} | {point.broker_cpu:.0f} | {point.consumers_cpu:.0f} "
                f"| {point.publisher_cpu:.0f} | {point.us_per_delivery:.1f} "
                f"| {point.consumers_waited:.0f} | {point.load:.1f} |"
            )
        lines += ["", *_fanout_reading(points), ""]
        _plot_fanout(points, RESULTS / "engines_fanout.png", args.processes)
        lines += ["![fan-out](engines_fanout.png)", ""]
    _write(lines, args.only)
    print(f"wrote {RESULTS / 'ENGINES.md'}")


if __name__ == "__main__":
    main()
