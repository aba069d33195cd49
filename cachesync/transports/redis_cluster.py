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
loses a slot (a failover, a resharding) sends ``sunsubscribe`` for its channels. Pub/sub keeps
no log, so events of that shard may have been missed. What happens then depends on the caller:

- with ``on_channels`` (the client passes it; see ``subscribe_many`` in
  :mod:`cachesync.transports.base`), only that node's channels are lost: the transport calls
  ``on_channels(names, False)``, reloads the slot map, subscribes to them again on their new
  owners (retrying with backoff while the failover is under way) and calls
  ``on_channels(names, True)`` once they are live. The readers of the other shards keep
  delivering all along. If they are not live again within ``resubscribe_timeout`` (a failover
  takes about twice the cluster's ``cluster-node-timeout``), or a node fails before the
  subscription was first live, the whole subscription ends as below;
- without it, the whole subscription ends with :class:`~cachesync.errors.ConnectionLost`, and
  the caller flushes everything. The next ``connect()`` reloads the slot map (the transport
  marks it stale) and ``subscribe`` lands on the new owners.

Silence is checked as for ``redis://`` (a PING after ``health_check_interval``).

Everything goes through redis-py's public API, on plain per-node clients with redis-py's
retries off: the slot map comes from ``CLUSTER SLOTS`` (asked of the nodes of the URL in turn),
``SPUBLISH`` goes to the primary that owns the channel's slot, and each subscription reads one
``PubSub`` per node. (redis-py's ``RedisCluster`` reloads its slot map by itself in the middle of
a command, which would hide a failover from the client, and leaves connections behind when a
command is cancelled during that reload.) A ``MOVED`` reply marks the map stale; the caller's
``connect()`` reloads it. Only ``PubSub.ssubscribe`` and ``spublish`` are needed (redis-py 5 and
later), not ``ClusterPubSub``.

URL options (query string; keyword arguments of the same name win):

``health_check_interval=5``, ``socket_timeout=<connect_timeout>``, ``client_name``
    As for ``redis+sentinel://``.
``resubscribe_timeout=60``
    How long the channels of a failed shard may take to be live again on their new owner
    (with ``on_channels``) before the whole subscription ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..backoff import Backoff
from ..errors import ConfigError, ConnectionLost, StateError, TransportError
from .base import (
    ConnectionState,
    Connector,
    OnChannels,
    OnReady,
    Transport,
    describe,
    duration_option,
    parse_options,
    text_option,
)
from .hosts import HostTurns, parse_node_url, try_each_host
from .redis_sentinel import FAILURES, REFUSALS, no_retry, pubsub_messages

try:
    import redis.exceptions as redis_errors
    from redis.asyncio import Redis
    from redis.crc import key_slot
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "redis+cluster:// needs redis-py: pip install 'cachesync[redis]'", name=exc.name
    ) from exc

__all__ = ["RedisClusterTransport"]

log = logging.getLogger("cachesync.transports.redis_cluster")

DEFAULT_HEALTH_CHECK_INTERVAL: Final = 5.0
DEFAULT_RESUBSCRIBE_TIMEOUT: Final = 60.0
_OPTIONS: Final = (
    duration_option("health_check_interval", DEFAULT_HEALTH_CHECK_INTERVAL),
    duration_option("resubscribe_timeout", DEFAULT_RESUBSCRIBE_TIMEOUT),
    duration_option("socket_timeout", None),
    text_option("client_name"),
)
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
        resubscribe_timeout: float | None = None,
    ) -> None:
        super().__init__(url, connect_timeout=connect_timeout)
        parsed = parse_node_url(url, default_port=6379)
        if parsed.scheme not in ("redis+cluster", "rediss+cluster"):
            raise ConfigError(f"not a redis+cluster:// URL: {self.safe_url!r}")
        if parsed.path.strip("/") not in ("", "0"):
            raise ConfigError(f"a Redis Cluster has database 0 only: {self.safe_url!r}")
        opts, _ = parse_options(
            url, _OPTIONS, keywords={"resubscribe_timeout": resubscribe_timeout}
        )
        self.health_check_interval = health_check_interval or opts["health_check_interval"]
        self.resubscribe_timeout: float = opts["resubscribe_timeout"]
        self.socket_timeout = socket_timeout or opts["socket_timeout"] or connect_timeout
        self.client_name = client_name or opts["client_name"]
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
        # (first slot, last slot, (host, port) of the primary), from CLUSTER SLOTS
        self._slots: list[tuple[int, int, tuple[str, int]]] = []
        self._publishers: dict[tuple[str, int], Redis] = {}  # a client per primary
        self._stale = False  # the slot map may be out of date: reload it on connect()
        self._connector = Connector(repr(self), connect_timeout, maximum=0.5)
        self._connect_lock = asyncio.Lock()
        self._turns = HostTurns()
        self._subscribers: set[Redis] = set()  # one client per node a subscription reads

    def channel_for(self, channel: str, namespace: str) -> str:
        """``<channel>{<namespace>}``: one sharded channel per namespace, on the shard of its
        hash tag."""
        if not namespace:
            return channel
        return f"{channel}{{{namespace}}}"

    # -- connection ----------------------------------------------------------------------

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, self.url)

    @property
    def state(self) -> ConnectionState:
        """Where the transport is in its lifecycle."""
        return self._connector.state

    async def connect(self) -> None:
        """Load the slot map from the first node that answers (in turn, from the one after the
        last used, each with an equal share of the time left), retrying until
        ``connect_timeout``. After a lost subscription or publish, load it again. Refused
        credentials fail at once."""
        async with self._connect_lock:
            if self._slots and not self._stale:
                self._connector.state = ConnectionState.OPEN
                return

            def refused(exc: BaseException) -> TransportError | None:
                if not isinstance(exc, REFUSALS):
                    return None
                return TransportError(
                    f"the Redis Cluster at {self.safe_url} refused the connection "
                    f"({self._describe(exc)}); check the user and password"
                )

            async def attempt() -> list[tuple[int, int, tuple[str, int]]]:
                return await self._load_slots(self._connector.deadline)

            # A stale map stays in use meanwhile: the shards that did not move go on
            # publishing while it is loaded again (one that failed over holds back no other).
            slots = await self._connector.open(
                attempt, retryable=_ERRORS, refused=refused, gave_up=self._unreachable
            )
            self._slots, self._stale = slots, False
            primaries = {address for _, _, address in slots}
            for address in [a for a in self._publishers if a not in primaries]:
                await _close_client(self._publishers.pop(address))

    def _unreachable(self, exc: BaseException) -> TransportError:
        return TransportError(
            f"no node of the Redis Cluster at {self.safe_url} answered within "
            f"{self.connect_timeout:g}s ({self._describe(exc)}); is it running?"
        )

    async def _load_slots(self, deadline: float) -> list[tuple[int, int, tuple[str, int]]]:
        """The slot map, from one round over the nodes of the URL (each with an equal share of
        the time left until ``deadline``, loop time); the last node's error if none answered."""
        return await try_each_host(
            self._nodes,
            self._turns,
            self._ask_slots,
            deadline=deadline,
            failures=_ERRORS,
            connector=self._connector,
            url=self.url,
            refused=lambda exc: isinstance(exc, REFUSALS),
            label=lambda node: f"{node[0]}:{node[1]}",
        )

    async def _ask_slots(
        self, node: tuple[str, int], share: float
    ) -> list[tuple[int, int, tuple[str, int]]]:
        host, port = node
        client = self._client(host, port)
        try:
            reply = await client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        finally:
            await _close_client(client)
        slots = _slot_map(reply, host)
        if not slots:
            raise redis_errors.ConnectionError(f"{host}:{port} serves no slots yet")
        return slots

    def _client(self, host: str, port: int) -> Redis:
        return Redis(host=host, port=port, retry=no_retry(), **self._options)

    def _owner(self, channel: str) -> tuple[str, int] | None:
        slot = key_slot(channel.encode())
        for first, last, address in self._slots:
            if first <= slot <= last:
                return address
        return None

    async def _drop(self) -> None:
        self._slots = []
        publishers, self._publishers = self._publishers, {}
        for client in publishers.values():
            await _close_client(client)

    async def close(self) -> None:
        """Close every connection; subscriptions end with ConnectionLost. Idempotent."""
        self._connector.close()
        # Breaks the subscriptions' reads at once (they check the epoch between reads).
        for client in list(self._subscribers):
            await client.connection_pool.disconnect()
        await self._drop()

    def _open(self) -> None:
        self._connector.check_usable()
        if not self._slots:
            raise TransportError(f"the Redis Cluster at {self.safe_url} is not reachable")

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, channel: str, payload: bytes) -> None:
        """``SPUBLISH`` on the primary that owns ``channel``'s slot."""
        await self.publish_many(channel, (payload,))

    async def publish_many(self, channel: str, payloads: Sequence[bytes]) -> None:
        """Several ``SPUBLISH`` to one channel (one shard) in one round trip, in order."""
        self._open()
        address = self._owner(channel)
        try:
            if address is None:
                raise redis_errors.ConnectionError(f"no node serves the slot of {channel!r}")
            async with asyncio.timeout(self.socket_timeout):
                for attempt in (1, 2):
                    client = self._publishers.get(address)
                    if client is None:
                        client = self._publishers[address] = self._client(*address)
                    try:
                        await _spublish(client, channel, payloads)
                        return
                    except redis_errors.ConnectionError:
                        # A connection the server closed while it sat idle (a timeout, a
                        # CLIENT KILL) is replaced once; a node that is gone fails again.
                        # (Another publish to that node at the same time, such as a
                        # heartbeat to another channel, may have replaced it already.)
                        if self._publishers.get(address) is client:
                            del self._publishers[address]
                        await _close_client(client)
                        if attempt == 2:
                            raise
        except _ERRORS as exc:
            # A MOVED reply, or a node gone: the slot map is out of date.
            self._stale = True
            raise TransportError(
                f"could not publish to {channel!r} on {self.safe_url}: {self._describe(exc)}"
            ) from exc

    # -- subscribing ---------------------------------------------------------------------

    def subscribe(self, channel: str, on_ready: OnReady | None = None) -> AsyncIterator[bytes]:
        """``subscribe_many([channel])``."""
        return self.subscribe_many([channel], on_ready)

    def _by_owner(self, channels: Sequence[str], what: str) -> dict[tuple[str, int], list[str]]:
        """``channels`` grouped by the primary that owns their slot (ConnectionLost if a slot
        has no owner in the map)."""
        by_node: dict[tuple[str, int], list[str]] = {}
        for channel in dict.fromkeys(channels):
            address = self._owner(channel)
            if address is None:
                self._stale = True
                raise ConnectionLost(f"{what}: no node serves {channel!r}; the cluster is down")
            by_node.setdefault(address, []).append(channel)
        return by_node

    async def subscribe_many(
        self,
        channels: Sequence[str],
        on_ready: OnReady | None = None,
        on_channels: OnChannels | None = None,
    ) -> AsyncIterator[bytes]:
        """Yield the messages of ``channels``, read from each owning primary at once.

        ``on_ready(False)`` once every node confirmed its ``SSUBSCRIBE``. Ends with
        ConnectionLost on ``close()``, and when a node's connection breaks or stalls or the node
        gives up a channel (``sunsubscribe``: the slot moved) -- unless ``on_channels`` is
        given: then only that node's channels are subscribed again, reported through
        ``on_channels`` (see the module docstring).
        """
        try:
            self._open()
        except StateError as exc:
            raise TransportError(str(exc)) from None
        what = f"subscription to {len(channels)} channel(s) on {self.safe_url}"
        epoch = self._connector.epoch
        by_node = self._by_owner(channels, what)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=10_000)
        tasks: set[asyncio.Task[None]] = set()
        clients: set[Redis] = set()  # those of this subscription's readers
        confirmations = len(by_node)
        ready = ended = False

        def alive() -> bool:
            return not self._connector.closed_since(epoch) and not ended

        # redis-py may lose a cancellation (see the end): a reader or a retry may go on after
        # the subscription ended. It then starts nothing, and hands nothing to a queue that
        # nobody reads any more (a full one would block it for good).
        def spawn(work: Coroutine[Any, Any, None]) -> None:
            if ended:
                work.close()
                return
            task = asyncio.create_task(work)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def hand(item: object) -> None:
            if not ended:
                await queue.put(item)

        async def read(
            address: tuple[str, int], names: list[str], live: Callable[[], Awaitable[None]]
        ) -> None:
            host, port = address
            where = f"{what} (node {host}:{port})"
            client = self._client(host, port)
            pubsub = client.pubsub()
            self._subscribers.add(client)
            clients.add(client)
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
                        await hand(message["data"])
                    elif kind == "ssubscribe":
                        pending.discard(_text(message["channel"]))
                        if not pending:
                            await live()
                    elif kind == "sunsubscribe":
                        raise ConnectionLost(
                            f"{where}: the node gave up {_text(message['channel'])!r} "
                            "(its slot moved: a failover or a resharding)"
                        )
            except _ERRORS as exc:
                raise ConnectionLost(f"{where} failed: {self._describe(exc)}") from exc
            finally:
                self._subscribers.discard(client)
                clients.discard(client)
                try:
                    async with asyncio.timeout(1.0):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
                except _ERRORS:
                    pass
                await _close_client(client)

        async def guarded(
            address: tuple[str, int], names: list[str], retry: _Retry | None = None
        ) -> None:
            was_live = False

            async def live() -> None:
                nonlocal was_live
                was_live = True
                await hand(_READY if retry is None else _Live(names))

            try:
                await read(address, names, live)
            except Exception as exc:  # handed to the iterating task, which decides
                self._stale = True
                await hand(_Broken(names, exc, None if was_live else retry))

        async def again(names: list[str], retry: _Retry) -> None:
            """Subscribe to ``names`` again on their owners in a fresh slot map."""
            first = retry.backoff.attempt == 0
            delay = retry.backoff.next_delay()
            if not first:  # the slot map named a node that failed again: the failover is on
                await asyncio.sleep(max(0.0, min(delay, retry.deadline - loop.time())))
            try:
                # One round over the nodes; the backoff between rounds is the retry's.
                deadline = min(retry.deadline, loop.time() + self.connect_timeout)
                self._slots = await self._load_slots(deadline)
                self._stale = False
                groups = self._by_owner(names, what)
            except (*_ERRORS, TransportError) as exc:
                if not isinstance(exc, TransportError):
                    exc = TransportError(f"no node answered: {self._describe(exc)}")
                await hand(_Broken(names, exc, retry))
                return
            for address, group in groups.items():
                spawn(guarded(address, group, retry))

        for address, names in by_node.items():
            spawn(guarded(address, names))
        try:
            while True:
                item = await queue.get()
                if type(item) is bytes:
                    yield item
                elif item is _READY:
                    confirmations -= 1
                    if confirmations == 0:
                        ready = True
                        if on_ready is not None:
                            on_ready(False)
                elif isinstance(item, _Live) and on_channels is not None:
                    on_channels(item.names, True)
                elif isinstance(item, _Broken):
                    if on_channels is None or not ready or not alive():
                        raise item.error
                    retry = item.retry
                    if retry is None:  # live until now: lost from here on
                        log.warning("%s; subscribing to them again", item.error)
                        on_channels(item.names, False)
                        backoff = Backoff(initial=0.05, maximum=0.5)
                        retry = _Retry(backoff, loop.time() + self.resubscribe_timeout)
                    elif loop.time() >= retry.deadline:
                        raise ConnectionLost(
                            f"{what}: {len(item.names)} channel(s) not live again within "
                            f"{self.resubscribe_timeout:g}s ({item.error})"
                        ) from item.error
                    spawn(again(item.names, retry))
                elif isinstance(item, BaseException):
                    raise item
        finally:
            # Cancelled readers were seen reading on (redis-py 8.1, Python 3.11: the
            # cancellation got lost in the read): they also stop at their next read, and
            # closing their connections ends the one in progress.
            ended = True
            running = list(tasks)
            for task in running:
                task.cancel()
            for client in list(clients):
                await client.connection_pool.disconnect()
            await asyncio.gather(*running, return_exceptions=True)


@dataclass(slots=True)
class _Retry:
    """Subscribing again to channels of a broken node: the backoff, and the deadline (loop
    time) past which the whole subscription ends."""

    backoff: Backoff
    deadline: float


@dataclass(frozen=True, slots=True)
class _Live:
    """Channels subscribed again are live."""

    names: list[str]


@dataclass(frozen=True, slots=True)
class _Broken:
    """A node's reader ended with ``error``; ``retry`` while its channels were not live again
    since an earlier break."""

    names: list[str]
    error: BaseException
    retry: _Retry | None


async def _spublish(client: Redis, channel: str, payloads: Sequence[bytes]) -> None:
    if len(payloads) == 1:
        await client.spublish(channel, payloads[0])
        return
    async with client.pipeline(transaction=False) as pipe:
        for payload in payloads:
            pipe.spublish(channel, payload)
        await pipe.execute()


async def _close_client(client: Redis) -> None:
    """Close ``client`` and every connection of its pool, even in use."""
    try:
        async with asyncio.timeout(1.0):
            await client.aclose()
            await client.connection_pool.disconnect()
    except _ERRORS:
        pass


def _slot_map(reply: object, asked: str) -> list[tuple[int, int, tuple[str, int]]]:
    """``(first, last, (host, port))`` of each slot range's primary in a ``CLUSTER SLOTS``
    reply (a node that does not know its own address names it ``""``: the one ``asked``)."""
    slots = []
    for entry in reply if isinstance(reply, list) else []:
        first, last, primary = entry[0], entry[1], entry[2]
        host = _text(primary[0]) or asked
        slots.append((int(first), int(last), (host if host != "?" else asked, int(primary[1]))))
    return slots


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
