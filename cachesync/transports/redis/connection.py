"""What the Redis transports share: URL options, connections, ``connect()``, publishing.

Every connection is a redis-py :class:`~redis.asyncio.connection.Connection`, used through its
public methods only (``connect``, ``send_packed_command``, ``read_response``, ``disconnect``).
redis-py opens and authenticates it (TLS, AUTH, SELECT and CLIENT SETNAME as the URL says,
speaking RESP2) and parses replies with hiredis, its C parser, when it is installed (the
``redis`` extra installs it): a reply costs one linear parse however large it is.

No pool and no retry wrapper: a transport keeps one connection for its commands (publishing,
one command at a time) and opens one per subscription. redis-py's own retries are off, so that
a broken connection surfaces as an error and a subscriber learns that events may be lost.

Timeouts. Every round trip is bounded here with ``asyncio.timeout`` (``socket_timeout``,
default ``connect_timeout``), never by redis-py's own ``socket_timeout``: with it set, redis-py
sends through ``asyncio.wait_for``, which on Python 3.11 can swallow a cancellation that arrives
as the send completes. A publish that fails or times out drops its connection (a late reply
must never be taken for the next command's); the next publish opens a new one, so publishing
comes back by itself when Redis does, without anyone calling ``connect()``.

URL options (query string; keyword arguments of the same name win):

``health_check_interval=15``
    Seconds of silence before a subscription checks the connection (a PING, or for streams
    the bound of a blocking read); twice this without any reply ends it. 0 turns it off.
``socket_timeout=<connect_timeout>``
    Longest wait for one publish.
Anything else (``client_name``, ``socket_connect_timeout``, ``ssl_cert_reqs``, ...)
    Passed to redis-py unchanged. ``client_name`` names every connection (``CLIENT LIST``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

from ...errors import ConfigError, ConnectionLost, TransportError
from ..base import (
    ConnectionState,
    Connector,
    Option,
    Transport,
    cut_userinfo,
    describe,
    float_option,
)
from ..base import parse_options as _parse_options

try:
    import redis.exceptions as redis_errors
    from redis.asyncio.connection import AbstractConnection, Connection, parse_url
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    # from_url turns this into "pip install 'cachesync[redis]'" using exc.name.
    raise ImportError(
        "redis:// needs redis-py: pip install 'cachesync[redis]'", name=exc.name
    ) from exc

__all__ = ["DEFAULT_HEALTH_CHECK_INTERVAL", "RedisTransportBase"]

log = logging.getLogger("cachesync.transports.redis")

DEFAULT_HEALTH_CHECK_INTERVAL: Final = 15.0

REDIS_HINT: Final = "is redis-server running? Start it with `docker compose up -d redis`"

# What "the server or the socket failed" looks like. redis-py's AuthenticationError is a
# ConnectionError too, so callers test for refusals first. TimeoutError is an OSError.
FAILURES: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.InvalidResponse,
    OSError,
    EOFError,
)

FAILURES_OR_TIMEOUT: tuple[type[BaseException], ...] = (*FAILURES, TimeoutError)

# Answers from a reachable server that retrying will not change: bad credentials, no ACL
# permission, a database that does not exist, a command refused.
REFUSALS: tuple[type[BaseException], ...] = (
    redis_errors.AuthenticationError,
    redis_errors.AuthorizationError,
    redis_errors.ResponseError,
)

# A connection the server closed or reset: worth one retry on a new one.
_BROKEN: tuple[type[BaseException], ...] = (ConnectionError, EOFError, redis_errors.ConnectionError)

# Keys of redis-py's parse_url() that configure a pool, not a connection.
_POOL_ONLY_OPTIONS = frozenset({"connection_class", "max_connections", "timeout"})

# TCP keepalive for every connection: a backstop for a peer that vanished without a FIN, mostly
# for an idle publishing connection (subscriptions check their connection on their own).
_KEEPALIVE: dict[int, int] = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}


class RedisTransportBase(Transport):
    """What the pub/sub and the stream transports share: URL handling, connections,
    ``connect()`` with retries, publishing, ``close()``, and error translation.

    Not a transport by itself; see :class:`~cachesync.transports.redis.RedisPubSubTransport`
    and :class:`~cachesync.transports.redis.RedisStreamTransport`.
    """

    #: URL schemes this class accepts, mapped to the scheme redis-py understands.
    schemes: Mapping[str, str] = {"redis": "redis", "rediss": "rediss"}
    #: Query options this module reads; everything else goes to redis-py.
    options: tuple[Option[Any], ...] = (
        float_option(
            "health_check_interval", DEFAULT_HEALTH_CHECK_INTERVAL, zero_means="turns it off"
        ),
        float_option("socket_timeout", None, positive=True),
    )

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        connect_timeout: float = 10.0,
        health_check_interval: float | None = None,
        socket_timeout: float | None = None,
        **keywords: Any,
    ) -> None:
        """``keywords``: the options a subclass declares in ``options`` (a keyword wins over
        the URL's query option of the same name)."""
        super().__init__(url, connect_timeout=connect_timeout)
        keywords = {
            **keywords,
            "health_check_interval": health_check_interval,
            "socket_timeout": socket_timeout,
        }
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            # urllib's message would quote the first part of a password cut short as the port.
            why = (
                "its password holds an unencoded '/', '?' or '#': percent-encode it"
                if cut_userinfo(url) is not None
                else str(exc)
            )
            raise ConfigError(f"malformed Redis URL {self.safe_url!r}: {why}") from None
        scheme = parts.scheme.lower()
        if scheme not in self.schemes:
            wanted = " or ".join(f"{s}://" for s in self.schemes)
            raise ConfigError(f"{type(self).__name__} needs a {wanted} URL, not {self.safe_url!r}")
        unknown = set(keywords) - {option.name for option in self.options}
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected options: {sorted(unknown)}")
        self._scheme = scheme
        self._tls = self.schemes[scheme] == "rediss"
        values, passed = _parse_options(url, self.options, passthrough=True, keywords=keywords)
        self._values = values
        # The URL redis-py sees: its own scheme, without the options only we understand.
        self._redis_url = urlunsplit(
            parts._replace(scheme=self.schemes[scheme], query=urlencode(passed))
        )
        self.health_check_interval: float = values["health_check_interval"]
        self.socket_timeout: float = values["socket_timeout"] or connect_timeout

        # Checked now, so that a URL option redis-py does not know fails here, as a ConfigError,
        # and not on the first connection.
        self._connection_class, self._connection_kwargs = self._connection_options()

        self._connector = Connector(repr(self), connect_timeout)
        # The connection that publishes (and PINGs in connect()); opened on first use, and
        # again after a failure. One command at a time, under the lock.
        self._command_conn: AbstractConnection | None = None
        self._command_lock = asyncio.Lock()
        self._scripts = True  # False once the server refused a batch script
        # Connections owned by live subscriptions: close() shuts them to end the iterators.
        self._subscriber_connections: set[AbstractConnection] = set()
        self._closing_connections: set[AbstractConnection] = set()

    # -- configuration -----------------------------------------------------------------------

    def _connection_options(self) -> tuple[type[AbstractConnection], dict[str, Any]]:
        """The class and keyword arguments of a single, pool-less connection for this URL."""
        try:
            options: dict[str, Any] = dict(parse_url(self._redis_url))
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL {self.safe_url!r}: {self._describe(exc)}") from None
        cls: type[AbstractConnection] = options.pop("connection_class", Connection)
        for key in _POOL_ONLY_OPTIONS:
            options.pop(key, None)
        options.setdefault("socket_connect_timeout", min(self.connect_timeout, 5.0))
        options.update(
            # Bounded by the callers (see "Timeouts" in the module docstring).
            socket_timeout=None,
            socket_keepalive=True,
            socket_keepalive_options=_KEEPALIVE,
            # Errors must surface, never be retried behind our back.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            # Payloads are bytes, whatever the URL says.
            decode_responses=False,
            protocol=2,
        )
        try:
            cls(**options)
        except TypeError as exc:
            raise ConfigError(
                f"unknown option in Redis URL {self.safe_url!r}: {self._describe(exc)}"
            ) from None
        return cls, options

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, self.url)

    def _failure_hint(self, exc: BaseException) -> str:
        """What to do about a connection that failed with ``exc``."""
        if self._tls and isinstance(exc, ssl.SSLError | TimeoutError | redis_errors.TimeoutError):
            return (
                "no TLS handshake with the server: is this port serving TLS? "
                f"{self._scheme}:// needs TLS on the server; use "
                f"{self._scheme.replace('rediss', 'redis')}:// for a plain port"
            )
        return REDIS_HINT

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """Where the transport is in its lifecycle."""
        return self._connector.state

    @property
    def connected(self) -> bool:
        """Whether ``connect()`` succeeded and ``close()`` has not been called since."""
        return self._connector.state is ConnectionState.OPEN

    async def connect(self) -> None:
        """Make sure the server answers: PING it on the command connection.

        Failed attempts are retried with backoff until ``connect_timeout``; then
        :class:`~cachesync.errors.TransportError` names the redacted URL and says what to
        start. Refused credentials or permissions fail at once. Calling it again (after
        ``ConnectionLost``, a failed ``connect()``, or ``close()``) is how a caller waits for
        the server to come back, however long it was gone.
        """

        def refused(exc: BaseException) -> TransportError | None:
            if not isinstance(exc, REFUSALS):
                return None
            return TransportError(
                f"Redis at {self.safe_url} refused the connection ({self._describe(exc)}); "
                "check the user, password and database"
            )

        def gave_up(exc: BaseException) -> TransportError:
            return TransportError(
                f"cannot connect to Redis at {self.safe_url} within "
                f"{self.connect_timeout:g}s ({self._describe(exc)}); {self._failure_hint(exc)}"
            )

        async def discard(_result: object) -> None:
            # close() ran meanwhile, but the PING may have opened a connection again.
            await self._drop_command_connection()

        await self._connector.open(
            lambda: self._call([(b"PING",)]),
            retryable=FAILURES,
            refused=refused,
            gave_up=gave_up,
            discard=discard,
        )

    async def close(self) -> None:
        """Close every connection; live subscriptions end with ConnectionLost.

        Safe to call twice; ``connect()`` may open the transport again afterwards.
        """
        self._connector.close()
        for conn in list(self._subscriber_connections):
            self._closing_connections.add(conn)
            await disconnect(conn)
        await self._drop_command_connection()

    # -- publishing --------------------------------------------------------------------------

    def _command(self, channel: str, payload: bytes) -> tuple[bytes, ...]:
        """The command (its arguments) that publishes ``payload`` on ``channel``; each transport
        says which."""
        raise NotImplementedError

    def _batch_script(self, channel: bytes) -> tuple[bytes, ...] | None:
        """The arguments of an ``EVAL`` that publishes the messages appended to them on
        ``channel``, in order, as ``_command`` would one by one (the script, the number of
        keys, the keys, the leading arguments); None if there is none."""
        return None

    async def publish(self, channel: str, payload: bytes) -> None:
        """Publish one message; raises TransportError when Redis cannot be reached (the next
        publish tries a new connection)."""
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        await self._publish(channel, [self._command(channel, bytes(payload))])

    async def publish_many(self, channel: str, payloads: Sequence[bytes]) -> None:
        """Publish the messages in order, in one pipelined round trip.

        Several messages go out as a few ``EVAL`` s of the transport's batch script (up to
        ``SCRIPT_BATCH`` messages or ``SCRIPT_BATCH_BYTES`` each, so the server serves other
        clients in between): one command per batch instead of one per message, which costs
        the client about a tenth of the CPU. A server that refuses scripts (an ACL without
        ``EVAL``, a managed service that disables them) gets one command per message from
        then on.
        """
        if not payloads:
            return
        script = None
        if self._scripts and len(payloads) > 1:
            script = self._batch_script(channel.encode())
        if script is None:
            await self._publish(channel, [self._command(channel, bytes(p)) for p in payloads])
            return
        head = (b"EVAL", *script)
        commands = [(*head, *chunk) for chunk in _chunks(payloads)]
        try:
            await self._publish(channel, commands)
            return
        except TransportError as exc:
            refusal = exc.__cause__
            if not isinstance(refusal, redis_errors.ResponseError) or not _no_scripts(refusal):
                raise
        # One command per message. If these are refused too, the refusal was not about scripts
        # (a NOPERM on the key, writes disabled while a save fails): the next batch tries the
        # script again.
        await self._publish(channel, [self._command(channel, bytes(p)) for p in payloads])
        log.info(
            "Redis at %s does not run scripts (%s): publishing one command per message",
            self.safe_url,
            refusal,
        )
        self._scripts = False

    async def _publish(self, channel: str, commands: list[tuple[bytes, ...]]) -> None:
        self._connector.check_usable()
        try:
            async with asyncio.timeout(self.socket_timeout):
                await self._call(commands)
        except (*FAILURES, *REFUSALS) as exc:
            raise self._publish_failed(channel, exc) from exc

    async def _call(self, commands: list[tuple[bytes, ...]]) -> list[object]:
        """Send ``commands`` pipelined on the command connection; their replies.

        An error reply raises ``ResponseError`` once all replies are read, so the connection
        stays in step. A connection the server closed while it sat idle (a restart, ``CLIENT
        KILL``) is replaced once, transparently; any failure, a timeout or a cancellation drops
        it, so a late reply can never be taken for the next command's.
        """
        async with self._command_lock:
            epoch = self._connector.epoch
            for attempt in (1, 2):
                conn = self._command_conn
                reused = conn is not None
                if conn is None:
                    conn = self._connection_class(**self._connection_kwargs)
                    self._command_conn = conn
                try:
                    if not reused:
                        await conn.connect()  # type: ignore[no-untyped-call]
                    await conn.send_packed_command(conn.pack_commands(commands), False)
                    replies, error = await read_replies(conn, len(commands))
                except BaseException as exc:
                    await self._drop_command_connection()
                    closed = self._connector.closed_since(epoch)  # no new connection then
                    if reused and attempt == 1 and isinstance(exc, _BROKEN) and not closed:
                        log.debug("Redis closed the idle connection; reconnecting")
                        continue
                    raise
                break
        if error is not None:
            raise error
        return replies

    async def _drop_command_connection(self) -> None:
        conn, self._command_conn = self._command_conn, None
        if conn is not None:
            await disconnect(conn)

    def _publish_failed(self, channel: str, exc: BaseException) -> TransportError:
        if isinstance(exc, REFUSALS):
            return TransportError(
                f"Redis at {self.safe_url} refused to publish to {channel!r}: {self._describe(exc)}"
            )
        return TransportError(
            f"publishing to {channel!r} on {self.safe_url} failed ({self._describe(exc)}); "
            f"{self._failure_hint(exc)}"
        )

    # -- subscriber connections ----------------------------------------------------------------

    def _new_connection(self) -> AbstractConnection:
        """A connection of its own for one subscription; registered so close() ends it."""
        if self._connector.state is not ConnectionState.OPEN:
            raise ConnectionLost(f"{self!r} is not connected: call connect() first")
        conn = self._connection_class(**self._connection_kwargs)
        self._subscriber_connections.add(conn)
        return conn

    async def _release_connection(self, conn: AbstractConnection) -> None:
        self._subscriber_connections.discard(conn)
        self._closing_connections.discard(conn)
        await disconnect(conn)

    def _closing(self, conn: AbstractConnection) -> bool:
        return conn in self._closing_connections or self._connector.state in (
            ConnectionState.CLOSED,
            ConnectionState.NEW,
        )

    def _lost(
        self, conn: AbstractConnection, what: str, exc: BaseException | None
    ) -> ConnectionLost:
        """The ConnectionLost to raise for ``conn``: "closed" when close() ended it."""
        if self._closing(conn):
            return ConnectionLost(f"{what} on {self!r} ended: the transport was closed")
        detail = f" ({self._describe(exc)})" if exc is not None else ""
        return ConnectionLost(f"{what} on {self.safe_url} lost its connection{detail}")

    def _refused(self, what: str, exc: BaseException) -> TransportError:
        return TransportError(f"Redis at {self.safe_url} refused the {what}: {self._describe(exc)}")


SCRIPT_BATCH = 128
"""Messages per ``EVAL`` of a batch script at most."""
SCRIPT_BATCH_BYTES = 1 << 20
"""Bytes of messages per ``EVAL`` at most (a single larger message goes alone)."""


def _chunks(payloads: Sequence[bytes]) -> list[list[bytes]]:
    chunks: list[list[bytes]] = []
    chunk: list[bytes] = []
    size = 0
    for payload in payloads:
        data = bytes(payload)
        if chunk and (len(chunk) >= SCRIPT_BATCH or size + len(data) > SCRIPT_BATCH_BYTES):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(data)
        size += len(data)
    if chunk:
        chunks.append(chunk)
    return chunks


def _no_scripts(exc: redis_errors.ResponseError) -> bool:
    """Whether the error says the server does not run scripts for us (not a failure of the
    script itself, which would fail one command per message the same way)."""
    if isinstance(exc, redis_errors.NoPermissionError):
        return True  # the ACL refuses EVAL (or the key: then publishing fails again)
    text = str(exc).lower()
    return text.startswith("unknown command") or "disabled" in text


async def read_replies(
    conn: AbstractConnection, count: int
) -> tuple[list[object], redis_errors.ResponseError | None]:
    """The next ``count`` replies on ``conn``, and the first error reply among them (read on
    past it, so that the connection stays in step)."""
    replies: list[object] = []
    error: redis_errors.ResponseError | None = None
    for _ in range(count):
        try:
            replies.append(await conn.read_response(disconnect_on_error=True))
        except redis_errors.ResponseError as exc:
            error = error or exc
            replies.append(exc)
    return replies, error


async def disconnect(conn: AbstractConnection) -> None:
    """Throw ``conn`` away. nowait: waiting for a clean close could hang on a stalled network."""
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=True)
