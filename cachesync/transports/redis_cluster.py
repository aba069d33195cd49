"""``redis+cluster://h1:7000,h2:7001``: sharded pub/sub on a Redis Cluster (Redis 7+).

Publishing is ``SPUBLISH`` (never ``PUBLISH``, which every node of the cluster forwards to
every other node over the cluster bus). A sharded channel lives on the shard that owns its
slot, so each namespace gets a channel of its own, ``<channel>{<namespace>}``: the hash tag
spreads namespaces over the shards, and a consumer subscribes only to the channels of the
namespaces it caches (:meth:`RedisClusterTransport.channel_for`; the client and the publisher
use it, the transport knows nothing of caches).

A subscription opens one connection per primary that owns one of its channels, sends
``SSUBSCRIBE`` there, and reads each connection in a task of its own, so a quiet shard never
delays a busy one (redis-py's ``ClusterPubSub.get_sharded_message`` polls the nodes in turn,
which delays a message by up to its timeout). ``on_ready(False)`` once every node confirmed.

Failure. When a node fails, the cluster promotes a replica and moves the slots; a node that
loses a slot (a failover, a resharding) sends ``sunsubscribe`` for its channels. Either ends
the whole subscription with :class:`~cachesync.errors.ConnectionLost`: pub/sub keeps no log,
so events of that shard may have been missed and the client flushes. The next ``connect()``
reloads the slot map (the transport marks it stale) and ``subscribe`` lands on the new owners.
Silence is checked as for ``redis://`` (a PING after ``health_check_interval``).

Everything goes through redis-py's public API (``RedisCluster`` for the slot map and
``SPUBLISH``; one ``PubSub`` per node), with its retries off for subscriptions.

URL options (query string; keyword arguments of the same name win):

``health_check_interval=5``, ``socket_timeout=<connect_timeout>``, ``client_name``
    As for ``redis+sentinel://``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

from ..backoff import Backoff
from ..errors import ConfigError, ConnectionLost, StateError, TransportError
from .base import OnReady, Transport
from .hosts import float_option, parse_node_url
from .redis_sentinel import FAILURES, no_retry, pubsub_messages

try:
    import redis.exceptions as redis_errors
    from redis.asyncio import Redis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "redis+cluster:// needs redis-py: pip install 'cachesync[redis]'", name=exc.name
    ) from exc

__all__ = ["RedisClusterTransport"]

log = logging.getLogger("cachesync.transports.redis_cluster")

DEFAULT_HEALTH_CHECK_INTERVAL: Final = 5.0
_OPTIONS: Final = frozenset({"health_check_interval", "socket_timeout", "client_name"})
_READY: Final = object()
# What redis-py raises when a node or the cluster fails (RedisClusterException is no RedisError).
_ERRORS: Final = (*FAILURES, redis_errors.RedisError, redis_errors.RedisClusterException)


class RedisClusterTransport(Transport):
    """Sharded pub/sub on a Redis Cluster: a channel per namespace, spread over the shards.

    Live only, like ``redis://``: ``on_ready`` reports ``resumed=False`` every time.
    """

    def __init__(
        self,
        url: str = "redis+cluster://localhost:7000",
        *,
        connect_timeout: float = 10.0,
        health_check_interval: float | None = None,
        socket_timeout: float | None = None,
        client_name: str | None = None,
    ) -> None:
        super().__init__(url, connect_timeout=connect_timeout)
        parsed = parse_node_url(url, default_port=6379, known_options=_OPTIONS)
        if parsed.scheme not in ("redis+cluster", "rediss+cluster"):
            raise ConfigError(f"not a redis+cluster:// URL: {self.safe_url!r}")
        if parsed.path.strip("/") not in ("", "0"):
            raise ConfigError(f"a Redis Cluster has database 0 only: {self.safe_url!r}")
        opts = parsed.options
        self.health_check_interval = health_check_interval or float_option(
            opts, "health_check_interval", DEFAULT_HEALTH_CHECK_INTERVAL
        )
        self.socket_timeout = socket_timeout or float_option(
            opts, "socket_timeout", connect_timeout
        )
        self.client_name = client_name or opts.get("client_name") or None
        self._nodes = list(parsed.hosts)
        self._password = parsed.password
        self._options: dict[str, Any] = {
            "username": parsed.username,
            "password": parsed.password,
            "client_name": self.client_name,
            "socket_connect_timeout": min(connect_timeout, self.socket_timeout),
            "socket_keepalive": True,
            "ssl": parsed.scheme == "rediss+cluster",
        }
        self._cluster: RedisCluster | None = None
        self._stale = False  # the slot map may be out of date: reload it on connect()
        self._opened = False
        self._closed = False
        self._generation = 0
        self._subscribers: set[Redis] = set()  # one client per node a subscription reads

    def channel_for(self, channel: str, namespace: str) -> str:
        """``<channel>{<namespace>}``: one sharded channel per namespace, on the shard of its
        hash tag."""
        if not namespace:
            return channel
        return f"{channel}{{{namespace}}}"

    # -- connection ----------------------------------------------------------------------

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return text.replace(self._password, "***") if self._password else text

    async def connect(self) -> None:
        """Load the slot map from the first node that answers, retrying until
        ``connect_timeout``. After a lost subscription or publish, load it again."""
        self._opened, self._closed = True, False
        if self._cluster is not None and not self._stale:
            return
        await self._drop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        backoff = Backoff(initial=0.05, maximum=0.5)
        while True:
            cluster = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self._nodes],
                require_full_coverage=False,
                socket_timeout=None,
                **self._options,
            )
            try:
                async with asyncio.timeout(max(0.05, deadline - loop.time())):
                    await cluster.initialize()
                self._cluster, self._stale = cluster, False
                return
            except _ERRORS as exc:
                await cluster.aclose()
                if loop.time() + 0.01 >= deadline:
                    raise TransportError(
                        f"no node of the Redis Cluster at {self.safe_url} answered within "
                        f"{self.connect_timeout:g}s ({self._describe(exc)}); is it running?"
                    ) from exc
                await asyncio.sleep(min(backoff.next_delay(), max(0.0, deadline - loop.time())))

    async def _drop(self) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            try:
                await cluster.aclose()
            except _ERRORS:
                pass

    async def close(self) -> None:
        """Close every connection; subscriptions end with ConnectionLost. Idempotent."""
        self._closed = True
        self._generation += 1
        # Breaks the subscriptions' reads at once (they check the generation between reads).
        for client in list(self._subscribers):
            await client.connection_pool.disconnect()
        await self._drop()

    def _open(self) -> RedisCluster:
        if self._closed or not self._opened:
            raise StateError(f"{self!r} is not connected: call connect() first")
        if self._cluster is None:
            raise TransportError(f"the Redis Cluster at {self.safe_url} is not reachable")
        return self._cluster

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, channel: str, payload: bytes) -> None:
        """``SPUBLISH`` on the shard that owns ``channel``."""
        cluster = self._open()
        try:
            async with asyncio.timeout(self.socket_timeout):
                await cluster.spublish(channel, payload)
        except _ERRORS as exc:
            self._stale = True
            raise TransportError(
                f"could not publish to {channel!r} on {self.safe_url}: {self._describe(exc)}"
            ) from exc

    async def publish_many(self, channel: str, payloads: Sequence[bytes]) -> None:
        """Several ``SPUBLISH`` to one channel (one shard) in one round trip, in order."""
        if len(payloads) == 1:
            await self.publish(channel, payloads[0])
            return
        cluster = self._open()
        try:
            async with asyncio.timeout(self.socket_timeout):
                async with cluster.pipeline() as pipe:
                    for payload in payloads:
                        pipe.spublish(channel, payload)
                    await pipe.execute()
        except _ERRORS as exc:
            self._stale = True
            raise TransportError(
                f"could not publish to {channel!r} on {self.safe_url}: {self._describe(exc)}"
            ) from exc

    # -- subscribing ---------------------------------------------------------------------

    def subscribe(self, channel: str, on_ready: OnReady | None = None) -> AsyncIterator[bytes]:
        """``subscribe_many([channel])``."""
        return self.subscribe_many([channel], on_ready)

    async def subscribe_many(
        self, channels: Sequence[str], on_ready: OnReady | None = None
    ) -> AsyncIterator[bytes]:
        """Yield the messages of ``channels``, read from each owning primary at once.

        ``on_ready(False)`` once every node confirmed its ``SSUBSCRIBE``. Ends with
        ConnectionLost when any node's connection breaks or stalls, when a node gives up a
        channel (``sunsubscribe``: the slot moved), or on ``close()``.
        """
        try:
            cluster = self._open()
        except StateError as exc:
            raise TransportError(str(exc)) from None
        what = f"subscription to {len(channels)} channel(s) on {self.safe_url}"
        generation = self._generation
        by_node: dict[tuple[str, int], list[str]] = {}
        for channel in dict.fromkeys(channels):
            node = cluster.get_node_from_key(channel)
            if node is None:
                self._stale = True
                raise ConnectionLost(f"{what}: no node owns {channel!r}; the cluster is down")
            by_node.setdefault((node.host, int(node.port)), []).append(channel)
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=10_000)
        confirmations = len(by_node)

        def alive() -> bool:
            return self._generation == generation and not self._closed

        async def read(address: tuple[str, int], names: list[str]) -> None:
            host, port = address
            where = f"{what} (node {host}:{port})"
            client = Redis(host=host, port=port, retry=no_retry(), **self._options)
            pubsub = client.pubsub()
            self._subscribers.add(client)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    for name in names:  # one slot per SSUBSCRIBE
                        await pubsub.ssubscribe(name)
                pending = set(names)
                async for message in pubsub_messages(
                    pubsub, self.health_check_interval, where, alive
                ):
                    kind = message["type"]
                    if kind == "smessage":
                        await queue.put(message["data"])
                    elif kind == "ssubscribe":
                        pending.discard(_text(message["channel"]))
                        if not pending:
                            await queue.put(_READY)
                    elif kind == "sunsubscribe":
                        raise ConnectionLost(
                            f"{where}: the node gave up {_text(message['channel'])!r} "
                            "(its slot moved: a failover or a resharding)"
                        )
            except _ERRORS as exc:
                raise ConnectionLost(f"{where} failed: {self._describe(exc)}") from exc
            finally:
                self._subscribers.discard(client)
                try:
                    async with asyncio.timeout(1.0):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
                        await client.aclose()
                except _ERRORS:
                    pass

        async def guarded(address: tuple[str, int], names: list[str]) -> None:
            try:
                await read(address, names)
            except Exception as exc:  # handed to the iterating task, which raises it
                self._stale = True
                await queue.put(exc)

        readers = [asyncio.create_task(guarded(a, n)) for a, n in by_node.items()]
        try:
            while True:
                item = await queue.get()
                if type(item) is bytes:
                    yield item
                elif item is _READY:
                    confirmations -= 1
                    if confirmations == 0 and on_ready is not None:
                        on_ready(False)
                elif isinstance(item, BaseException):
                    raise item
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
