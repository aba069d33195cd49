"""``redis+sentinel://s1:26379,s2:26379/mymaster``: Redis pub/sub on the master that Sentinel names.

The transport asks the sentinels (in turn, through redis-py's ``Sentinel``) which node is the
master of the service named in the URL path, and publishes and subscribes there. When the master
fails, Sentinel promotes a replica; the connections to the old master break, the subscription
ends with :class:`~cachesync.errors.ConnectionLost`, and the next ``connect()``/``subscribe()``
asks the sentinels again and lands on the new master. The events published in between are
lost (pub/sub keeps no log): ``on_ready`` always reports ``resumed=False``, and the client flushes.

A graceful failover (``SENTINEL FAILOVER``) leaves the old master up as a replica. redis-py
notices when a write is refused there (``READONLY``) and the publish fails; a subscription
there would still hear everything (replicas receive their master's ``PUBLISH``), but the
subscription checks, every ``health_check_interval``, that its node is still the master, and
ends if not.

Everything goes through redis-py's public API (``Sentinel.master_for``, ``PubSub``), with its
own retries off: a failure is reported, never papered over by a silent reconnect that would
hide lost events.

URL: ``redis+sentinel://[[user]:password@]s1:26379,s2:26379/<service>[/<db>]?options``. The
password is the master's; ``sentinel_password`` (option) is the sentinels', if they need one.

URL options (query string; keyword arguments of the same name win):

``health_check_interval=5``
    Seconds of silence before a subscription PINGs (and checks the master's role); twice this
    without any reply ends it.
``socket_timeout=<connect_timeout>``
    Longest wait for one publish, and for one sentinel's answer.
``client_name``
    Names every connection (``CLIENT LIST``).
``sentinel_password``
    The sentinels' password.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

from ..errors import ConfigError, ConnectionLost, StateError, TransportError
from .base import (
    ConnectionState,
    Connector,
    OnReady,
    Transport,
    describe,
    duration_option,
    parse_options,
    text_option,
)
from .hosts import parse_node_url

try:
    import redis.exceptions as redis_errors
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel
    from redis.backoff import NoBackoff
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "redis+sentinel:// needs redis-py: pip install 'cachesync[redis]'", name=exc.name
    ) from exc

__all__ = ["FAILURES", "REFUSALS", "RedisSentinelTransport", "no_retry", "pubsub_messages"]

log = logging.getLogger("cachesync.transports.redis_sentinel")

DEFAULT_HEALTH_CHECK_INTERVAL: Final = 5.0
_OPTIONS: Final = (
    duration_option("health_check_interval", DEFAULT_HEALTH_CHECK_INTERVAL),
    duration_option("socket_timeout", None),
    text_option("client_name"),
    text_option("sentinel_password"),
)

# What "the server or the socket failed" looks like from redis-py (TimeoutError is an OSError).
FAILURES: Final = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)

# Answers from a reachable server that retrying will not change: bad credentials, no ACL
# permission. (Both are ConnectionErrors in redis-py: test for them first.)
REFUSALS: Final = (
    redis_errors.AuthenticationError,
    redis_errors.AuthorizationError,
    redis_errors.NoPermissionError,
)


def no_retry() -> Retry:
    """A redis-py retry policy that never retries nor reconnects: errors reach the caller."""
    return Retry(NoBackoff(), 0, supported_errors=())


async def pubsub_messages(
    pubsub: PubSub,
    interval: float,
    what: str,
    alive: Callable[[], bool],
    check: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The messages of ``pubsub`` (every kind, pongs included), ending with ConnectionLost
    when the connection breaks or stays silent for ``2 * interval`` (a PING is sent after
    ``interval``), or once ``alive()`` is false (the transport was closed: redis-py would
    otherwise reconnect on the next read). ``check()``, if given, is awaited whenever the
    connection was idle."""
    loop = asyncio.get_running_loop()
    heard = loop.time()
    pinged = False
    while True:
        if not alive():
            raise ConnectionLost(f"{what} ended: the transport was closed")
        try:
            message = await pubsub.get_message(timeout=interval)
        except FAILURES as exc:
            raise ConnectionLost(f"{what} broke: {type(exc).__name__}: {exc}") from exc
        now = loop.time()
        if message is not None:
            heard, pinged = now, False
            yield message
            continue
        if now - heard < interval:
            continue
        if pinged:
            raise ConnectionLost(f"{what}: no reply for {now - heard:.1f}s; the network stalled")
        try:
            async with asyncio.timeout(interval):
                await pubsub.ping()
                if check is not None:
                    await check()
        except (*FAILURES, redis_errors.ResponseError) as exc:
            raise ConnectionLost(f"{what} broke: {type(exc).__name__}: {exc}") from exc
        pinged = True


class RedisSentinelTransport(Transport):
    """Redis pub/sub that follows the master through Sentinel failovers.

    Live only, like ``redis://``: ``on_ready`` reports ``resumed=False`` every time.
    """

    def __init__(
        self,
        url: str = "redis+sentinel://localhost:26379/mymaster",
        *,
        connect_timeout: float = 10.0,
        health_check_interval: float | None = None,
        socket_timeout: float | None = None,
        client_name: str | None = None,
    ) -> None:
        super().__init__(url, connect_timeout=connect_timeout)
        parsed = parse_node_url(url, default_port=26379)
        if parsed.scheme not in ("redis+sentinel", "rediss+sentinel"):
            raise ConfigError(f"not a redis+sentinel:// URL: {self.safe_url!r}")
        service, _, db_text = parsed.path.strip("/").partition("/")
        if not service:
            raise ConfigError(
                f"no service name in {self.safe_url!r}; write redis+sentinel://host:26379/mymaster"
            )
        try:
            self.db = int(db_text) if db_text else 0
        except ValueError:
            raise ConfigError(f"database {db_text!r} in {self.safe_url!r} is no number") from None
        self.service = service
        opts, _ = parse_options(url, _OPTIONS)
        self.health_check_interval = health_check_interval or opts["health_check_interval"]
        self.socket_timeout = socket_timeout or opts["socket_timeout"] or connect_timeout
        self.client_name = client_name or opts["client_name"]
        self._sentinels = list(parsed.hosts)
        self._sentinel_password = opts["sentinel_password"]
        self._redis_options: dict[str, Any] = {
            "username": parsed.username,
            "password": parsed.password,
            "db": self.db,
            "client_name": self.client_name,
            "socket_connect_timeout": min(connect_timeout, self.socket_timeout),
            "socket_keepalive": True,
            "retry": no_retry(),
            "ssl": parsed.scheme == "rediss+sentinel",
        }
        self._sentinel: Sentinel | None = None
        self._master: Redis | None = None
        self._connector = Connector(repr(self), connect_timeout, maximum=0.5)

    # -- connection ----------------------------------------------------------------------

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, self.url)

    def _client(self) -> Redis:
        if self._master is None:
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                self._sentinels,
                sentinel_kwargs={
                    "socket_connect_timeout": min(1.0, self.connect_timeout),
                    "socket_timeout": min(1.0, self.socket_timeout),
                    "password": self._sentinel_password,
                    "retry": no_retry(),
                },
            )
            self._master = self._sentinel.master_for(self.service, **self._redis_options)
        return self._master

    async def master_address(self) -> tuple[str, int]:
        """The master's ``(host, port)`` as the sentinels name it now."""
        self._client()
        assert self._sentinel is not None
        try:
            async with asyncio.timeout(self.connect_timeout):
                host, port = await self._sentinel.discover_master(self.service)
        except (*FAILURES, redis_errors.RedisError) as exc:
            raise TransportError(
                f"no sentinel of {self.safe_url} named a master: {self._describe(exc)}"
            ) from exc
        return str(host), int(port)

    @property
    def state(self) -> ConnectionState:
        """Where the transport is in its lifecycle."""
        return self._connector.state

    async def connect(self) -> None:
        """Find the master through the sentinels and PING it, retrying until
        ``connect_timeout`` (a failover in progress names no reachable master for a while).
        Refused credentials fail at once."""
        client = self._client()

        def refused(exc: BaseException) -> TransportError | None:
            if not isinstance(exc, REFUSALS):
                return None
            return TransportError(
                f"the master of {self.service!r} at {self.safe_url} refused the connection "
                f"({self._describe(exc)}); check the user, password and database"
            )

        def gave_up(exc: BaseException) -> TransportError:
            return TransportError(
                f"no master of {self.service!r} reachable through the sentinels at "
                f"{self.safe_url} within {self.connect_timeout:g}s "
                f"({self._describe(exc)}); are the sentinels running?"
            )

        async def attempt() -> None:
            try:
                await client.ping()
            except BaseException:
                # A connection to a dead master stays in the pool otherwise.
                await client.connection_pool.disconnect()
                raise

        async def discard(_: None) -> None:
            await client.connection_pool.disconnect()

        await self._connector.open(
            attempt,
            retryable=(*FAILURES, redis_errors.RedisError),
            refused=refused,
            gave_up=gave_up,
            discard=discard,
        )

    async def close(self) -> None:
        """Close every connection; subscriptions end with ConnectionLost. Idempotent.

        It does not wait for a connect() in flight: that one gives up."""
        self._connector.close()
        master, self._master = self._master, None
        sentinel, self._sentinel = self._sentinel, None
        if master is not None:
            await master.aclose()
            await master.connection_pool.disconnect()
        if sentinel is not None:
            for client in sentinel.sentinels:
                await client.aclose()

    def _open(self) -> Redis:
        self._connector.check_usable()
        return self._client()

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, channel: str, payload: bytes) -> None:
        """``PUBLISH`` on the master; TransportError if it cannot be reached (or is not one)."""
        await self.publish_many(channel, (payload,))

    async def publish_many(self, channel: str, payloads: Sequence[bytes]) -> None:
        """Several ``PUBLISH`` in one round trip, in order."""
        client = self._open()
        try:
            async with asyncio.timeout(self.socket_timeout):
                if len(payloads) == 1:
                    await client.publish(channel, payloads[0])
                    return
                async with client.pipeline(transaction=False) as pipe:
                    for payload in payloads:
                        pipe.publish(channel, payload)
                    await pipe.execute()
        except (*FAILURES, redis_errors.RedisError) as exc:
            # The next connection asks the sentinels again.
            await client.connection_pool.disconnect()
            raise TransportError(
                f"could not publish to {channel!r} on {self.safe_url}: {self._describe(exc)}"
            ) from exc

    # -- subscribing ---------------------------------------------------------------------

    async def subscribe(
        self, channel: str, on_ready: OnReady | None = None
    ) -> AsyncIterator[bytes]:
        """Yield the messages published on ``channel`` on the current master.

        ``on_ready(False)`` once Redis confirmed the subscription. Ends with ConnectionLost
        when the connection breaks or stalls, when the node stops being the master, or on
        ``close()``; it never reconnects by itself.
        """
        try:
            client = self._open()
        except StateError as exc:
            raise TransportError(str(exc)) from None
        what = f"subscription to {channel!r} on {self.safe_url}"
        pubsub = client.pubsub()
        target = channel.encode()
        epoch = self._connector.epoch
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await pubsub.subscribe(channel)
            except (*FAILURES, redis_errors.RedisError) as exc:
                raise ConnectionLost(f"{what} failed: {self._describe(exc)}") from exc
            ready = False

            async def still_master() -> None:
                conn = pubsub.connection
                if conn is None:
                    raise redis_errors.ConnectionError("the subscription connection is gone")
                host, port = await self.master_address()
                if (str(conn.host), int(conn.port)) != (host, port):
                    raise redis_errors.ConnectionError(
                        f"{conn.host}:{conn.port} is no longer the master ({host}:{port} is)"
                    )

            def alive() -> bool:
                return not self._connector.closed_since(epoch)

            async for message in pubsub_messages(
                pubsub, self.health_check_interval, what, alive, still_master
            ):
                kind = message["type"]
                if kind == "message" and message["channel"] == target:
                    yield message["data"]
                elif kind == "subscribe" and not ready:
                    ready = True
                    if on_ready is not None:
                        on_ready(False)
        finally:
            try:
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            except (*FAILURES, redis_errors.RedisError):
                pass
