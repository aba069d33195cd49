"""``redis://`` and ``rediss://``: Redis pub/sub, on connections that redis-py opens.

Publishing is ``PUBLISH`` on one connection the transport keeps for its commands. Each
subscription opens a connection of its own, sends ``SUBSCRIBE``, and calls ``on_ready(False)``
as soon as Redis has confirmed it: from that moment every message published on the channel
reaches the subscription. Pub/sub keeps no log, so ``resumed`` is always false: whatever was
published while a subscription was down is gone, and the consumer flushes.

redis-py opens and authenticates every connection (TLS, AUTH, SELECT and CLIENT SETNAME as the
URL says, speaking RESP2); this module then writes commands and reads replies on the socket
itself, parsing whole buffers. redis-py's per-command path (pool checkout, retry wrapper, a
read per RESP line) costs more than a round trip to a local Redis. A publishing connection the
server closed while it sat idle is replaced once, transparently.

The receive loop. redis-py's ``PubSub`` spends several awaits per message (one per RESP line),
goes through a retry wrapper and builds a dict per message; worse for us, it reconnects and
resubscribes on its own after an error, which would hide the events lost meanwhile. So this
module reads the subscription's socket itself: it takes whatever bytes have arrived and cuts
every complete ``message`` frame out of them in a tight loop (for one channel the frame prefix
is a constant), so a burst of messages costs one await, not five per message.
``benchmarks/transport_throughput.py`` compares it with plain redis-py pub/sub.

Timeouts. Every round trip is bounded here with ``asyncio.timeout`` (``socket_timeout``,
default ``connect_timeout``), never by redis-py's own ``socket_timeout``: with it set, redis-py
sends through ``asyncio.wait_for``, which on Python 3.11 can swallow a cancellation that arrives
as the send completes, and a cancelled listener or publisher task would then run on.

Failure. A closed or reset socket, a protocol error, or silence ends the subscription with
:class:`~cachesync.errors.ConnectionLost`. Silence: when nothing has arrived for
``health_check_interval`` seconds the loop sends a PING, and when nothing arrives for another
interval either, the network or the server has stalled. TCP keepalive is on as a backstop. The
iterator never reconnects: the caller calls ``connect()`` and ``subscribe()`` again.

URL options (query string; keyword arguments of the same name win):

``health_check_interval=15``
    Seconds of silence before the subscription sends a PING; twice this without any reply ends
    it.
``socket_timeout=<connect_timeout>``
    Longest wait for one publish (or one PING in ``connect()``, which retries within
    ``connect_timeout``).
Anything else (``client_name``, ``socket_connect_timeout``, ``ssl_cert_reqs``, ...)
    Passed to redis-py unchanged. ``client_name`` names every connection (``CLIENT LIST``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..backoff import Backoff
from ..errors import ConfigError, ConnectionLost, StateError, TransportError
from .base import OnReady, Transport

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

__all__ = ["RedisPubSubTransport", "DEFAULT_HEALTH_CHECK_INTERVAL"]

log = logging.getLogger("cachesync.transports.redis")

DEFAULT_HEALTH_CHECK_INTERVAL: Final = 15.0

_REDIS_HINT = "is redis-server running? Start it with `docker compose up -d redis`"

# What "the server or the socket failed" looks like. redis-py's AuthenticationError is a
# ConnectionError too, so callers test for refusals first. TimeoutError is an OSError.
_FAILURES: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    OSError,
    EOFError,
)

# Also a broken connection, for the code that reads RESP itself: bytes that do not parse.
_READ_FAILURES: tuple[type[BaseException], ...] = (
    *_FAILURES,
    ValueError,
    asyncio.IncompleteReadError,
)

# Answers from a reachable server that retrying will not change: bad credentials, no ACL
# permission, a database that does not exist.
_REFUSALS: tuple[type[BaseException], ...] = (
    redis_errors.AuthenticationError,
    redis_errors.AuthorizationError,
    redis_errors.ResponseError,
)

# A connection the server closed or reset: worth one retry on a new one.
_BROKEN: tuple[type[BaseException], ...] = (
    ConnectionError,
    EOFError,
    asyncio.IncompleteReadError,
    redis_errors.ConnectionError,
)

_PUBLISH_FAILURES: tuple[type[BaseException], ...] = (*_READ_FAILURES, *_REFUSALS)

# Keys of redis-py's parse_url() that configure a pool, not a connection.
_POOL_ONLY_OPTIONS = frozenset({"connection_class", "max_connections", "timeout"})

# TCP keepalive for every connection: a backstop for a peer that vanished without a FIN, mostly
# for an idle publishing connection (subscriptions also PING on their own).
_KEEPALIVE: dict[int, int] = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}

_READ_SIZE = 1 << 18
_PING = b"*1\r\n$4\r\nPING\r\n"


def _parse_positive_float(scheme: str, name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{scheme}:// option {name}={value!r} must be a number") from None
    if number < 0:
        raise ConfigError(f"{scheme}:// option {name}={value!r} must not be negative")
    return number


class RedisTransportBase(Transport):
    """What the pub/sub and the stream transports share: URL handling, the publishing connection,
    ``connect()`` with retries, ``close()``, and error translation.

    Not a transport by itself; see :class:`RedisPubSubTransport` and
    :class:`~cachesync.transports.redis_stream.RedisStreamTransport`.
    """

    #: URL schemes this class accepts, mapped to the scheme redis-py understands.
    schemes: Mapping[str, str] = {"redis": "redis", "rediss": "rediss"}
    #: Query options this module reads; everything else goes to redis-py.
    own_options: frozenset[str] = frozenset({"health_check_interval", "socket_timeout"})

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        connect_timeout: float = 10.0,
        health_check_interval: float | None = None,
        socket_timeout: float | None = None,
    ) -> None:
        super().__init__(url, connect_timeout=connect_timeout)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ConfigError(f"malformed Redis URL {self.safe_url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in self.schemes:
            wanted = " or ".join(f"{s}://" for s in self.schemes)
            raise ConfigError(f"{type(self).__name__} needs a {wanted} URL, not {self.safe_url!r}")
        self._scheme = scheme
        query = parse_qsl(parts.query, keep_blank_values=True)
        self._options = {key: value for key, value in query if key in self.own_options}
        passed = [(key, value) for key, value in query if key not in self.own_options]
        # The URL redis-py sees: its own scheme, without the options only we understand.
        self._redis_url = urlunsplit(
            parts._replace(scheme=self.schemes[scheme], query=urlencode(passed))
        )
        self._password = parts.password

        if health_check_interval is None:
            health_check_interval = self._float_option(
                "health_check_interval", DEFAULT_HEALTH_CHECK_INTERVAL
            )
        if health_check_interval < 0:
            raise ValueError("health_check_interval must not be negative (0 turns it off)")
        self.health_check_interval = health_check_interval
        if socket_timeout is None:
            socket_timeout = self._float_option("socket_timeout", connect_timeout)
        if socket_timeout <= 0:
            raise ValueError("socket_timeout must be positive")
        self.socket_timeout = socket_timeout

        # Checked now, so that a URL option redis-py does not know fails here, as a ConfigError,
        # and not on the first connection.
        self._connection_class, self._connection_kwargs = self._connection_options()

        # The connection that publishes (and PINGs in connect()); opened on first use, and
        # again after a failure. One command at a time, under the lock.
        self._command_conn: AbstractConnection | None = None
        self._command_lock = asyncio.Lock()
        # "new" and "closed" make publish a lifecycle error (StateError); "open" after connect().
        self._state = "new"
        self._epoch = 0  # bumped by close(), so a connect() in flight knows it lost the race
        self._connect_lock = asyncio.Lock()
        # Connections owned by live subscriptions: close() shuts them to end the iterators.
        self._subscriber_connections: set[AbstractConnection] = set()
        self._closing_connections: set[AbstractConnection] = set()

    # -- configuration -----------------------------------------------------------------------

    def _float_option(self, name: str, default: float) -> float:
        value = self._options.get(name)
        if value is None:
            return default
        return _parse_positive_float(self._scheme, name, value)

    def _connection_options(self) -> tuple[type[AbstractConnection], dict[str, Any]]:
        """The class and keyword arguments of a single, pool-less connection for this URL."""
        try:
            options: dict[str, Any] = dict(parse_url(self._redis_url))
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL {self.safe_url!r}: {exc}") from None
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
        )
        try:
            cls(**options)
        except TypeError as exc:
            raise ConfigError(f"unknown option in Redis URL {self.safe_url!r}: {exc}") from None
        return cls, options

    def _scrub(self, text: str) -> str:
        """``text`` with the URL's password blanked out, in case an error message quoted it."""
        if self._password:
            return text.replace(self._password, "***")
        return text

    def _describe(self, exc: BaseException) -> str:
        return self._scrub(f"{type(exc).__name__}: {exc}")

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether ``connect()`` succeeded and ``close()`` has not been called since."""
        return self._state == "open"

    async def connect(self) -> None:
        """Make sure the server answers: create the client if needed and PING it.

        Failed attempts are retried with :class:`~cachesync.backoff.Backoff` until
        ``connect_timeout``; then :class:`~cachesync.errors.TransportError` names the redacted
        URL and says what to start. Refused credentials or permissions fail at once. Calling it
        again (after ``ConnectionLost``, or after ``close()``) is how a caller waits for the
        server to come back.
        """
        async with self._connect_lock:
            epoch = self._epoch
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.connect_timeout
            backoff = Backoff(initial=0.05, maximum=1.0)
            while True:
                try:
                    async with asyncio.timeout(max(deadline - loop.time(), 0.001)):
                        await self._call(_PING, 1)
                except _REFUSALS as exc:
                    raise TransportError(
                        f"Redis at {self.safe_url} refused the connection "
                        f"({self._describe(exc)}); check the user, password and database"
                    ) from exc
                except _FAILURES as exc:
                    delay = backoff.next_delay()
                    if loop.time() + delay >= deadline:
                        raise TransportError(
                            f"cannot connect to Redis at {self.safe_url} within "
                            f"{self.connect_timeout:g}s ({self._describe(exc)}); {_REDIS_HINT}"
                        ) from exc
                    log.debug("Redis connect failed, retrying", extra={"url": self.safe_url})
                    await asyncio.sleep(delay)
                    if self._epoch != epoch:
                        raise TransportError(f"{self!r} was closed while connecting") from exc
                    continue
                if self._epoch != epoch:
                    # close() ran meanwhile, but the PING may have opened a connection again:
                    # close that one too.
                    await self._drop_command_connection()
                    raise TransportError(f"{self!r} was closed while connecting")
                self._state = "open"
                return

    async def close(self) -> None:
        """Close every connection; live subscriptions end with ConnectionLost.

        Safe to call twice; ``connect()`` may open the transport again afterwards.
        """
        self._epoch += 1
        if self._state != "new":
            self._state = "closed"
        for conn in list(self._subscriber_connections):
            self._closing_connections.add(conn)
            await _disconnect(conn)
        await self._drop_command_connection()

    def _command(self, channel: str, payload: bytes) -> tuple[bytes, ...]:
        """The command (its arguments) that publishes ``payload`` on ``channel``; each transport
        says which."""
        raise NotImplementedError

    async def publish(self, channel: str, payload: bytes) -> None:
        """Publish one message; raises TransportError when Redis cannot be reached."""
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        await self._publish(channel, _pack(*self._command(channel, bytes(payload))), 1)

    async def publish_many(self, channel: str, payloads: Sequence[bytes]) -> None:
        """Publish the messages in order, in one pipelined round trip."""
        if payloads:
            frames = b"".join(_pack(*self._command(channel, bytes(p))) for p in payloads)
            await self._publish(channel, frames, len(payloads))

    async def _publish(self, channel: str, frames: bytes, count: int) -> None:
        if self._state != "open":
            raise StateError(f"{self!r} is not connected: call connect() first")
        try:
            async with asyncio.timeout(self.socket_timeout):
                await self._call(frames, count)
        except _PUBLISH_FAILURES as exc:
            raise self._publish_failed(channel, exc) from exc

    async def _call(self, frames: bytes, count: int) -> list[object]:
        """Send ``frames`` (``count`` commands) on the command connection; their replies.

        The bytes go straight to the socket and the replies are parsed from whole buffers:
        redis-py's pool checkout, retry wrapper and per-line reads cost more than the round
        trip on a local network. An error reply raises ``ResponseError`` once all replies are
        read. A connection the server closed while it sat idle (a restart, ``CLIENT KILL``)
        is replaced once, transparently; any failure, a timeout or a cancellation drops it,
        so a late reply can never be taken for the next command's.
        """
        async with self._command_lock:
            epoch = self._epoch
            for attempt in (1, 2):
                conn = self._command_conn
                reused = conn is not None
                if conn is None:
                    conn = self._connection_class(**{**self._connection_kwargs, "protocol": 2})
                    self._command_conn = conn
                try:
                    if not reused:
                        await open_connection(conn)
                    reader, writer = _streams(conn)
                    writer.write(frames)
                    replies = await _read_replies(reader, count)
                except BaseException as exc:
                    await self._drop_command_connection()
                    closed = self._epoch != epoch  # close() ended it: no new connection
                    if reused and attempt == 1 and isinstance(exc, _BROKEN) and not closed:
                        log.debug("Redis closed the idle connection; reconnecting")
                        continue
                    raise
                break
        for reply in replies:
            if isinstance(reply, _RespError):
                raise redis_errors.ResponseError(str(reply))
        return replies

    async def _drop_command_connection(self) -> None:
        conn, self._command_conn = self._command_conn, None
        if conn is not None:
            await _disconnect(conn)

    def _publish_failed(self, channel: str, exc: BaseException) -> TransportError:
        if isinstance(exc, _REFUSALS):
            return TransportError(
                f"Redis at {self.safe_url} refused to publish to {channel!r}: {self._describe(exc)}"
            )
        return TransportError(
            f"publishing to {channel!r} on {self.safe_url} failed ({self._describe(exc)}); "
            f"{_REDIS_HINT}"
        )

    # -- subscriber connections ----------------------------------------------------------------

    def _new_connection(self, **overrides: Any) -> AbstractConnection:
        """A connection of its own for one subscription; registered so close() ends it."""
        if self._state != "open":
            raise ConnectionLost(f"{self!r} is not connected: call connect() first")
        conn = self._connection_class(**{**self._connection_kwargs, **overrides})
        self._subscriber_connections.add(conn)
        return conn

    async def _release_connection(self, conn: AbstractConnection) -> None:
        self._subscriber_connections.discard(conn)
        self._closing_connections.discard(conn)
        await _disconnect(conn)

    def _lost(
        self, conn: AbstractConnection, what: str, exc: BaseException | None
    ) -> ConnectionLost:
        """The ConnectionLost to raise for ``conn``: "closed" when close() ended it."""
        if conn in self._closing_connections or self._state == "closed":
            return ConnectionLost(f"{what} on {self!r} ended: the transport was closed")
        detail = f" ({self._describe(exc)})" if exc is not None else ""
        return ConnectionLost(f"{what} on {self.safe_url} lost its connection{detail}")


async def open_connection(conn: AbstractConnection) -> None:
    """Connect and run the handshake (TLS, AUTH, SELECT, CLIENT SETNAME) the URL asks for."""
    await conn.connect()  # type: ignore[no-untyped-call]


async def _disconnect(conn: AbstractConnection) -> None:
    # nowait: the socket is being thrown away; waiting for a clean close could hang on a
    # stalled network.
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=True)


def _streams(conn: AbstractConnection) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The connected socket's streams. redis-py keeps them private; they have been named
    ``_reader`` and ``_writer`` since redis.asyncio began (4.2), so failing loudly is enough."""
    reader = getattr(conn, "_reader", None)
    writer = getattr(conn, "_writer", None)
    if not isinstance(reader, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
        raise TransportError(
            "this redis-py version does not expose its connection streams as expected; "
            "install a supported one: pip install 'cachesync[redis]'"
        )
    return reader, writer


# -- a minimal RESP2 reader, for the few frames a subscribed connection receives -------------


class _Incomplete(Exception):
    """The buffer ends inside a frame; read more."""


_INCOMPLETE = _Incomplete()


class _RespError(str):
    """An error reply (``-ERR ...``)."""


def _line_end(buf: bytes, pos: int) -> int:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _INCOMPLETE
    return end


def _parse_frame(buf: bytes, pos: int) -> tuple[object, int]:
    """The RESP2 value starting at ``buf[pos]`` and the offset after it.

    Raises ``_Incomplete`` when the buffer ends inside it and ``ValueError`` for bytes that are
    not RESP2.
    """
    if pos >= len(buf):
        raise _INCOMPLETE
    kind = buf[pos : pos + 1]
    end = _line_end(buf, pos + 1)
    head = buf[pos + 1 : end]
    pos = end + 2
    if kind == b"+":
        return head, pos
    if kind == b"-":
        return _RespError(head.decode("utf-8", "replace")), pos
    if kind == b":":
        return int(head), pos
    if kind == b"$":
        size = int(head)
        if size < 0:
            return None, pos
        if pos + size + 2 > len(buf):
            raise _INCOMPLETE
        return buf[pos : pos + size], pos + size + 2
    if kind == b"*":
        count = int(head)
        items: list[object] = []
        for _ in range(max(count, 0)):
            item, pos = _parse_frame(buf, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"not a RESP2 frame: {buf[pos - len(head) - 3 : pos][:40]!r}")


async def _read_replies(reader: asyncio.StreamReader, count: int) -> list[object]:
    """The next ``count`` RESP2 replies, read straight off the socket.

    redis-py's parser costs several awaits and line reads per reply (per entry of an ``XREAD``
    reply); this one parses whole buffers, as the subscription loop does. Only replies to
    commands this module sent are pending on the connection, so the bytes read are exactly
    theirs.
    """
    buffer = b""
    replies: list[object] = []
    while True:
        chunk = await reader.read(_READ_SIZE)
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        buffer += chunk
        pos = 0
        replies.clear()
        try:
            while len(replies) < count:
                reply, pos = _parse_frame(buffer, pos)
                replies.append(reply)
        except _Incomplete:
            continue
        if pos != len(buffer):
            raise ValueError("unexpected bytes after the replies on a Redis connection")
        return replies


def _pack(*args: bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


class RedisPubSubTransport(RedisTransportBase):
    """Transport over Redis pub/sub (``redis://`` and ``rediss://``).

    At-most-once, like the memory bus: a subscription gets every message published on its
    channel while it is live, nothing from before, and ends with
    :class:`~cachesync.errors.ConnectionLost` when its connection breaks, stalls, or the
    transport is closed. (Redis itself also cuts a subscriber that falls too far behind, by its
    ``client-output-buffer-limit pubsub``; that arrives here as a lost connection.)
    See the module docstring for URL options.
    """

    def _command(self, channel: str, payload: bytes) -> tuple[bytes, ...]:
        return (b"PUBLISH", channel.encode(), payload)

    async def subscribe(
        self, channel: str, on_ready: OnReady | None = None
    ) -> AsyncIterator[bytes]:
        """Yield the payloads published on ``channel`` while this subscription is live.

        ``on_ready(False)`` is called once Redis has confirmed the SUBSCRIBE, before the first
        payload: anything published after that call is delivered. Raises ConnectionLost when the
        connection breaks, stays silent for twice ``health_check_interval``, or the transport is
        closed; it never reconnects by itself.
        """
        name = channel.encode()
        what = f"subscription to {channel!r}"
        conn = self._new_connection(protocol=2)
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await open_connection(conn)
                    reader, writer = _streams(conn)
                    writer.write(_pack(b"SUBSCRIBE", name))
                    buf = await _read_confirmation(reader, name)
            except _REFUSALS as exc:
                raise TransportError(
                    f"Redis at {self.safe_url} refused the {what}: {self._describe(exc)}"
                ) from exc
            except _READ_FAILURES as exc:
                raise self._lost(conn, what, exc) from exc
            if conn in self._closing_connections:
                raise self._lost(conn, what, None)
            if on_ready is not None:
                on_ready(False)

            # The hot loop. Every message frame for this channel starts with the same bytes;
            # after them come the payload length, CRLF, the payload and CRLF.
            prefix = b"*3\r\n$7\r\nmessage\r\n$%d\r\n%b\r\n$" % (len(name), name)
            skip = len(prefix)
            idle = self.health_check_interval or None
            pos = 0
            ping_sent = False
            while True:
                size = len(buf)
                missing = 0
                while pos < size:
                    if buf.startswith(prefix, pos):
                        eol = buf.find(b"\r\n", pos + skip)
                        if eol < 0:
                            break
                        start = eol + 2
                        end = start + int(buf[pos + skip : eol])
                        if end + 2 > size:
                            missing = end + 2 - size
                            break
                        pos = end + 2
                        yield buf[start:end]
                    else:
                        # Anything else: a PING reply, a late (un)subscribe confirmation, an
                        # error. Rare, so the general parser is fine here.
                        try:
                            frame, pos = _parse_frame(buf, pos)
                        except _Incomplete:
                            break
                        except ValueError as exc:
                            raise self._lost(conn, what, exc) from exc
                        if isinstance(frame, _RespError):
                            raise TransportError(f"Redis error on the {what}: {frame}")
                buf = buf[pos:] if pos < size else b""
                pos = 0
                try:
                    async with asyncio.timeout(idle):
                        if missing > _READ_SIZE:
                            # A large payload: wait for all of it at once rather than
                            # growing the buffer chunk by chunk.
                            data = await reader.readexactly(missing)
                        else:
                            data = await reader.read(_READ_SIZE)
                except TimeoutError:
                    if ping_sent:
                        raise ConnectionLost(
                            f"{what} on {self.safe_url}: no reply to PING within "
                            f"{self.health_check_interval:g}s; the network or server stalled"
                        ) from None
                    # Silence may be a quiet channel or a dead link; a PING tells them apart.
                    writer.write(_PING)
                    ping_sent = True
                    continue
                except _READ_FAILURES as exc:
                    raise self._lost(conn, what, exc) from exc
                if not data:
                    raise self._lost(conn, what, None)
                ping_sent = False
                buf = buf + data if buf else data
        finally:
            await self._release_connection(conn)


async def _read_confirmation(reader: asyncio.StreamReader, name: bytes) -> bytes:
    """Read up to the ``subscribe`` confirmation; return the bytes that followed it."""
    buf = b""
    while True:
        data = await reader.read(_READ_SIZE)
        if not data:
            raise redis_errors.ConnectionError("Redis closed the connection while subscribing")
        buf += data
        pos = 0
        while True:
            try:
                frame, end = _parse_frame(buf, pos)
            except _Incomplete:
                break
            if isinstance(frame, _RespError):
                raise redis_errors.ResponseError(str(frame))
            pos = end
            if isinstance(frame, list) and frame[:2] == [b"subscribe", name]:
                return buf[pos:]
        buf = buf[pos:]
