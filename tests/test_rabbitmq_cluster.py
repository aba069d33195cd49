"""amqp:// and amqp+stream:// on a RabbitMQ cluster the tests start themselves (3 nodes of their
own: ``rabbitmq_cluster`` in ``tests/clusters.py``; the machine's RabbitMQ is not touched). A
node that a consumer and a publisher are connected to is killed (SIGKILL) while events flow and
readers read.

Why 3 nodes and not 2: a stream queue's leader is elected by a majority of its replicas (and the
stream coordinator, a Raft group over the nodes, needs a majority too). With 2 nodes, killing the
leader leaves 1 of 2: no new leader until the killed node is back, so a test would measure a
node restart, not a failover. With 3, the 2 left elect a new leader: a real failover. The nodes
start once per test run, the second and third in parallel once the first is up (about 18 s on
this project's 2-core machine); each test then costs its own run (about 3 s) and the restart of
the node it killed (about 6 s, waited for by the next test).

One kill per test, watched two ways at once:

- a raw reader and feeder (``engine_tools``) on the victim's connection: events flow again
  within ``FAILOVER``, and the transport reported what happened (a stream replays from its
  offset on another node with nothing missing; a plain queue reports the loss);
- a ``CacheSync`` whose readers read all along against an owner committing every 20 ms
  (``run_scenario``): no read older than the bound, the loss flushed and counted (or the gap
  replayed), the listener alive and caching again afterwards.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from cachesync import CacheSync
from cachesync.transports.base import from_url

from .clusters import RabbitMQCluster
from .engine_tools import Feeder, Reader, in_order_without_gaps
from .test_faults import Reads, VersionedOwner, assert_coherent, run_scenario
from .test_transport_contract import Subscriber

pytest.importorskip("aio_pika")

# The cluster's start (once per run) counts against the first test that uses it.
pytestmark = pytest.mark.timeout(100)

FAILOVER = 10.0
"""Seconds from the kill until events flow again that a test accepts (measured: under 1 s;
``python -m benchmarks.engines --only failover --engines amqp,amqp+stream``)."""

BOUND = 0.5

# The kill is noticed as the end of the connection, or first as missed heartbeats: on this
# loaded machine the owner's heartbeats can arrive later than the 0.3 s timeout (seen once in
# four runs, the previous test's victim having just rejoined), and the watchdog then restarts
# the listener's connection itself, which it counts as heartbeat misses, not as a reconnect.
_NOTICED = "neither a reconnect nor a missed heartbeat was counted"


@dataclass
class Outcome:
    reader: Reader
    back: float  # seconds from the kill until the reader received an event newer than before
    sync: CacheSync
    owner: VersionedOwner
    reads: Reads


async def _kill_while_events_flow(
    cluster: RabbitMQCluster, victim: str, channel: str, *, scheme: str
) -> Outcome:
    """A raw reader and feeder, and a CacheSync consumer, connected to ``victim`` first; the
    owner publishes through the other nodes. ``victim`` is killed in the middle."""
    others = [name for name in cluster.group.nodes if name != victim]
    on_victim = cluster.url(victim, *others, scheme=scheme)
    raw = f"{channel}-raw"
    reader = Reader(from_url(on_victim, connect_timeout=5.0), raw)
    feeder = Feeder(from_url(on_victim, connect_timeout=5.0), raw)
    killed_at, newest = 0.0, -1

    async def kill() -> None:
        nonlocal killed_at, newest
        newest = max(reader.numbers)
        killed_at = time.monotonic()
        cluster.group.kill(victim)

    try:
        reader.start()
        await reader.wait(lambda: reader.readies, 10)
        feeder.start()
        await reader.wait(lambda: len(reader.numbers) >= 50, 10)
        sync, owner, reads = await run_scenario(
            on_victim, cluster.url(*others, scheme=scheme), channel, kill, bound=BOUND
        )
        target = feeder.sent + 100
        try:
            await reader.wait(lambda: max(reader.numbers) >= target, FAILOVER)
        except TimeoutError:
            raise AssertionError(
                f"sent {feeder.sent} ({feeder.failures} failures), read up to "
                f"{max(reader.numbers)}, losses {reader.losses}, readies {reader.readies}"
            ) from None
        back = next(
            at
            for at, number in zip(reader.arrivals, reader.numbers, strict=True)
            if at > killed_at and number > newest
        )
        print(f"{scheme}: events flow again {back - killed_at:.2f}s after the kill of {victim}")
        return Outcome(reader, back - killed_at, sync, owner, reads)
    finally:
        await feeder.stop()
        await reader.stop()


async def _declare_streams(cluster: RabbitMQCluster, node: str, channels: list[str]) -> None:
    """Declare the channels' stream queues from ``node``: they are led from there (RabbitMQ
    places a new queue's leader on the node of the connection declaring it)."""
    transport = from_url(cluster.url(node, scheme="amqp+stream"), connect_timeout=5.0)
    async with transport:
        for channel in channels:
            sub = Subscriber(transport, channel)
            try:
                await sub.live()
            finally:
                await sub.stop()


async def test_a_killed_stream_leader_fails_over_and_consumers_replay(
    rabbitmq_nodes: RabbitMQCluster, unique: str
) -> None:
    cluster = rabbitmq_nodes
    await asyncio.to_thread(cluster.wait_healthy)
    channel = f"cachesync-rmq-{unique}"
    node = next(iter(cluster.group.nodes))
    await _declare_streams(cluster, node, [channel, f"{channel}-raw"])
    leaders = {
        await asyncio.to_thread(cluster.queue_leader, f"{name}.stream")
        for name in (channel, f"{channel}-raw")
    }
    assert leaders == {node}, f"the streams declared on {node} are led by {leaders}"
    victim = node
    try:
        outcome = await _kill_while_events_flow(cluster, victim, channel, scheme="amqp+stream")
        reader = outcome.reader
        # The reader lost its node, connected to another one and resumed from its offset: every
        # event arrived, in order (the stream's replicas kept them), and each reconnect was
        # reported as complete. The feeder, on the killed node too, kept publishing.
        assert reader.losses and len(reader.readies) >= 2
        assert all(resumed for _, resumed in reader.readies[1:])
        assert in_order_without_gaps(reader.numbers)
        assert outcome.back < FAILOVER
        # A new leader, elected by the two nodes left: a failover, not a restart.
        new_leader = await asyncio.to_thread(cluster.queue_leader, f"{channel}.stream")
        assert new_leader != victim
        assert_coherent(outcome.sync, outcome.owner, outcome.reads, BOUND)
        listener = outcome.sync.stats()["listener"]
        assert listener["reconnects"] + listener["heartbeat_misses"] >= 1, _NOTICED
        assert listener["replays"] >= 1
        assert listener["apply_failures"] == 0
    finally:
        cluster.restart(victim, wait=False)


async def test_a_killed_node_of_a_plain_consumer_is_a_counted_loss(
    rabbitmq_nodes: RabbitMQCluster, unique: str
) -> None:
    cluster = rabbitmq_nodes
    await asyncio.to_thread(cluster.wait_healthy)
    channel = f"cachesync-rmq-{unique}"
    victim = list(cluster.group.nodes)[1]
    try:
        outcome = await _kill_while_events_flow(cluster, victim, channel, scheme="amqp")
        reader = outcome.reader
        # The subscription's exclusive queue died with its node: the reader was told, and its
        # subscription on the next node reported nothing as resumed (pub/sub keeps no log).
        assert reader.losses and len(reader.readies) >= 2
        assert not any(resumed for _, resumed in reader.readies)
        assert outcome.back < FAILOVER
        assert_coherent(outcome.sync, outcome.owner, outcome.reads, BOUND)
        stats = outcome.sync.stats()
        listener = stats["listener"]
        assert listener["reconnects"] + listener["heartbeat_misses"] >= 1, _NOTICED
        assert listener["apply_failures"] == 0
        # The loss was detected and the namespace flushed (counted), not served stale.
        assert stats["namespaces"]["fx"]["flushes"] >= 1
    finally:
        cluster.restart(victim, wait=False)
