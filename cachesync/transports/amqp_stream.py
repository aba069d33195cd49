"""``amqp+stream://h1:5672,h2:5673/?stream=stream&max_age=1h``: RabbitMQ stream queues, with replay.

Publishing goes to the same fanout exchange as ``amqp://`` (named after the channel, so both
kinds of consumer can share one publisher). A durable stream queue named
``<channel>.<stream>`` is bound to it (declared by both sides, so either may start first): the
broker keeps every message for ``max_age`` (and at most ``max_length_bytes``), and a consumer
reads it from an offset (``x-stream-offset``), with ``basic.qos`` and acknowledgements as
streams require.

The transport resumes by itself, from the offset after the last message it yielded (aio-pika's
robust queue would re-consume at the offset of the first ``consume`` instead). To know when the
backlog is done, a resuming subscription appends a marker of its own to the stream (through the
default exchange, so ``amqp://`` queues never see it; every ``amqp+stream://`` consumer skips
markers): when it reads its marker it has caught up.

When ``on_ready(resumed)`` is called
    First ``subscribe()`` of a channel on this object: once the consumer is attached at the
    stream's end (``next``), with ``resumed=False``.

    A later one (after ``ConnectionLost``, or ``close()`` and ``connect()``), once a message was
    read: with every message after it still in the stream, they are yielded first, then
    ``on_ready(True)``; when retention dropped some (the first offset delivered is past the one
    asked for), ``on_ready(False)`` at once and reading goes on from there. Before any message
    was read there is no position: ``on_ready(False)``, from the end.

    A subscription that has called ``on_ready`` and then sees an offset jump raises
    ``ConnectionLost``; the next ``subscribe()`` reports ``resumed=False``.

Connections. One plain (non-robust) aio-pika connection per transport object, to the hosts of
the URL in turn (starting after the one used last, each with an equal share of the time left,
backing off between rounds over them), until ``connect_timeout``; refused credentials or vhost
access fail at once. A lost connection
ends every subscription with :class:`~cachesync.errors.ConnectionLost` and makes ``publish``
raise :class:`~cachesync.errors.TransportError`; the caller calls ``connect()`` again.

URL options (query string; keyword arguments of the same name win):

``stream=stream``
    The stream queue of channel ``C`` is ``C.<stream>``.
``max_age=1D``, ``max_length_bytes``, ``max_segment_size_bytes``
    The stream's retention (``x-max-age`` in RabbitMQ's units ``Y M D h m s``), for streams
    this transport declares; they must match an existing stream's.
``prefetch=1000``
    ``basic.qos`` prefetch count: how many unacknowledged messages the broker sends ahead.
``name``
    The connection name (``rabbitmqctl list_connections client_properties``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

from ..errors import ConfigError, ConnectionLost, StateError, TransportError
from .amqp import is_refusal
from .base import (
    ConnectionState,
    Connector,
    OnReady,
    Transport,
    describe,
    duration_option,
    int_option,
    parse_options,
    text_option,
)
from .hosts import HostTurns, parse_node_url, try_each_host

try:
    import aio_pika
    import aio_pika.exceptions
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "amqp+stream:// needs aio-pika: pip install 'cachesync[rabbitmq]'", name=exc.name
    ) from exc

__all__ = ["AmqpStreamTransport", "MARKER_HEADER"]

log = logging.getLogger("cachesync.transports.amqp_stream")

MARKER_HEADER: Final = "x-cachesync-marker"
_OPTIONS: Final = (
    text_option("stream", "stream"),
    text_option("max_age", "1D"),  # RabbitMQ's own format: checked below
    int_option("max_length_bytes", 0, minimum=0),
    int_option("max_segment_size_bytes", 0, minimum=0),
    int_option("prefetch", 1000),
    text_option("name"),
    int_option("heartbeat", 10),
    duration_option("publish_timeout", None),
)
_AGE = re.compile(r"^\d+[YMDhms]$")
# What "the broker or the socket failed" looks like, as in amqp.py: aio-pika's own list, which
# has RuntimeError for aiormq's ChannelInvalidStateError ("Channel closed by RPC timeout").
_FAILURES: tuple[type[BaseException], ...] = (
    *aio_pika.exceptions.CONNECTION_EXCEPTIONS,
    aio_pika.exceptions.AMQPError,
    TimeoutError,
    asyncio.IncompleteReadError,
)


@dataclass
class _Cursor:
    offset: int | None  # of the last message yielded; None before the first
    lost: bool = False


class AmqpStreamTransport(Transport):
    """RabbitMQ stream queues: pub/sub with replay from an offset after a lost connection.

    See the module docstring for when ``on_ready`` is called, and the URL options.
    """

    def __init__(
        self,
        url: str = "amqp+stream://guest:guest@localhost:5672/",
        *,
        connect_timeout: float = 10.0,
        publish_timeout: float | None = None,
        stream: str | None = None,
        max_age: str | None = None,
        max_length_bytes: int | None = None,
        max_segment_size_bytes: int | None = None,
        prefetch: int | None = None,
        connection_name: str | None = None,
    ) -> None:
        super().__init__(url, connect_timeout=connect_timeout)
        tls = url[:13].lower() == "amqps+stream:"
        parsed = parse_node_url(url, default_port=5671 if tls else 5672)
        if parsed.scheme not in ("amqp+stream", "amqps+stream"):
            raise ConfigError(f"not an amqp+stream:// URL: {self.safe_url!r}")
        opts, _ = parse_options(url, _OPTIONS)
        self._hosts = list(parsed.hosts)
        self._ssl = parsed.scheme == "amqps+stream"
        self._login = parsed.username or "guest"
        self._password = parsed.password if parsed.password is not None else "guest"
        self._vhost = unquote(parsed.path[1:]) if len(parsed.path) > 1 else "/"
        self.stream = stream or opts["stream"]
        self.max_age = max_age or opts["max_age"]
        if not _AGE.match(self.max_age):
            raise ConfigError(
                f"max_age={self.max_age!r} in {self.safe_url!r}: write e.g. 1D, 12h, 30m (units "
                "Y M D h m s, as RabbitMQ's x-max-age)"
            )
        self.max_length_bytes = max_length_bytes or opts["max_length_bytes"] or None
        self.max_segment_size_bytes = (
            max_segment_size_bytes or opts["max_segment_size_bytes"] or None
        )
        self.prefetch = prefetch or opts["prefetch"]
        self.publish_timeout = publish_timeout or opts["publish_timeout"] or connect_timeout
        self.connection_name = connection_name or opts["name"]
        self._heartbeat = opts["heartbeat"]
        self._connection: Any = None
        self._channel: Any = None  # the publisher's
        self._exchanges: dict[str, Any] = {}
        self._turns = HostTurns()
        self._connector = Connector(repr(self), connect_timeout)
        self._connect_lock = asyncio.Lock()
        self._cursors: dict[str, _Cursor] = {}

    def queue_name(self, channel: str) -> str:
        """The stream queue that keeps the messages of ``channel``."""
        return f"{channel}.{self.stream}"

    def _arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": "stream", "x-max-age": self.max_age}
        if self.max_length_bytes:
            args["x-max-length-bytes"] = self.max_length_bytes
        if self.max_segment_size_bytes:
            args["x-stream-max-segment-size-bytes"] = self.max_segment_size_bytes
        return args

    # -- connection ----------------------------------------------------------------------

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, self.url)

    @property
    def _alive(self) -> bool:
        conn = self._connection
        return conn is not None and not conn.is_closed

    @property
    def state(self) -> ConnectionState:
        """Where the transport is in its lifecycle."""
        return self._connector.state

    async def connect(self) -> None:
        """Connect to the hosts in turn (from the one after the last used, each with an equal
        share of the time left) until ``connect_timeout``; then raise TransportError. Refused
        credentials or vhost access fail at once."""
        async with self._connect_lock:
            if self._alive and self._channel is not None and not self._channel.is_closed:
                self._connector.state = ConnectionState.OPEN
                return
            await self._drop()

            def refused(exc: BaseException) -> TransportError | None:
                if not is_refusal(exc):
                    return None
                return TransportError(
                    f"RabbitMQ at {self.safe_url} refused the connection "
                    f"({self._describe(exc)}); check the user, password and vhost"
                )

            def gave_up(exc: BaseException) -> TransportError:
                return TransportError(
                    f"RabbitMQ at {self.safe_url} unreachable within {self.connect_timeout:g}s "
                    f"({self._describe(exc)}); is it running (docker compose up -d rabbitmq)?"
                )

            async def attempt() -> tuple[Any, Any]:
                # The connector's backoff comes between rounds over the hosts, not between hosts.
                return await try_each_host(
                    self._hosts,
                    self._turns,
                    self._connect_to,
                    deadline=self._connector.deadline,
                    failures=_FAILURES,
                    connector=self._connector,
                    url=self.url,
                    refused=is_refusal,
                    label=lambda host: f"{host[0]}:{host[1]}",
                )

            async def discard(opened: tuple[Any, Any]) -> None:
                await self._close_connection(opened[0])

            connection, channel = await self._connector.open(
                attempt, retryable=_FAILURES, refused=refused, gave_up=gave_up, discard=discard
            )
            self._connection, self._channel = connection, channel
            self._exchanges.clear()

    async def _connect_to(self, host: tuple[str, int], share: float) -> tuple[Any, Any]:
        """A connection to ``host`` and the publisher's channel on it."""
        properties: Any = {"connection_name": self.connection_name} if self.connection_name else {}
        # aio_pika.connect(), unrolled: with the connection in hand, an attempt cancelled at
        # the end of its share (a node that accepts but never answers) can be closed.
        url = aio_pika.connection.make_url(
            host=host[0],
            port=host[1],
            login=self._login,
            password=self._password,
            virtualhost=self._vhost,
            ssl=self._ssl,
            heartbeat=self._heartbeat,
        )
        connection = aio_pika.Connection(url, client_properties=properties)
        try:
            await connection.connect(timeout=self.connect_timeout)
            channel = await connection.channel(publisher_confirms=True)
        except BaseException:
            await self._close_connection(connection)
            raise
        return connection, channel

    async def _close_connection(self, connection: Any) -> None:
        if connection.is_closed:
            return
        with contextlib.suppress(*_FAILURES):
            async with asyncio.timeout(self.connect_timeout):
                await connection.close()

    async def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._exchanges.clear()
        if connection is not None:
            await self._close_connection(connection)

    async def close(self) -> None:
        """Close the connection; subscriptions end with ConnectionLost. Idempotent.

        It does not wait for a connect() in flight: that one gives up and closes what it
        opened."""
        self._connector.close()
        await self._drop()

    def _open(self) -> Any:
        self._connector.check_usable()
        if not self._alive or self._channel is None or self._channel.is_closed:
            raise TransportError(f"the connection to {self.safe_url} was lost; call connect()")
        return self._connection

    async def _declare(self, channel: Any, name: str) -> tuple[Any, Any]:
        """The fanout exchange ``name`` and its stream queue, bound."""
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=False)
        queue = await channel.declare_queue(
            self.queue_name(name), durable=True, arguments=self._arguments()
        )
        await queue.bind(exchange)
        return exchange, queue

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, channel: str, payload: bytes) -> None:
        """Publish to the channel's fanout exchange; return once the broker confirmed it."""
        self._open()
        try:
            async with asyncio.timeout(self.publish_timeout):
                exchange = self._exchanges.get(channel)
                if exchange is None:
                    exchange, _ = await self._declare(self._channel, channel)
                    self._exchanges[channel] = exchange
                await exchange.publish(aio_pika.Message(payload), routing_key="")
        except _FAILURES as exc:
            raise TransportError(
                f"could not publish to {channel!r} on {self.safe_url}: {self._describe(exc)}"
            ) from exc

    # -- subscribing ---------------------------------------------------------------------

    async def subscribe(
        self, channel: str, on_ready: OnReady | None = None
    ) -> AsyncIterator[bytes]:
        """Yield the messages of the channel's stream from where the last subscription of this
        object stopped; see the module docstring for ``on_ready``."""
        try:
            connection = self._open()
        except StateError as exc:
            raise TransportError(str(exc)) from None
        what = f"stream subscription to {channel!r} on {self.safe_url}"
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        sub_channel: Any = None

        def report(resumed: bool) -> None:
            if on_ready is not None:
                on_ready(resumed)

        def on_close(*_: Any) -> None:
            inbox.put_nowait(None)

        async def on_message(message: Any) -> None:
            inbox.put_nowait(message)

        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    sub_channel = await connection.channel(publisher_confirms=False)
                    sub_channel.close_callbacks.add(on_close)
                    await sub_channel.set_qos(prefetch_count=self.prefetch)
                    _, queue = await self._declare(sub_channel, channel)
                    cursor = self._cursors.setdefault(channel, _Cursor(None))
                    marker: str | None = None
                    if cursor.offset is None or cursor.lost:
                        cursor.offset, cursor.lost = None, False
                        start: Any = "next"
                    else:
                        start = cursor.offset + 1
                        marker = uuid.uuid4().hex
                    await queue.consume(on_message, arguments={"x-stream-offset": start})
                    if marker is not None:
                        await sub_channel.default_exchange.publish(
                            aio_pika.Message(b"", headers={MARKER_HEADER: marker}),
                            routing_key=self.queue_name(channel),
                        )
            except _FAILURES as exc:
                raise ConnectionLost(f"{what} failed: {self._describe(exc)}") from exc
            if marker is None:
                report(False)
            catching_up = marker is not None
            while True:
                message = await inbox.get()
                if message is None:
                    raise ConnectionLost(f"{what} ended: the channel or connection closed")
                headers = message.headers or {}
                offset = headers.get("x-stream-offset")
                try:
                    await message.ack()
                except _FAILURES as exc:
                    raise ConnectionLost(f"{what} ended: {self._describe(exc)}") from exc
                if not isinstance(offset, int):
                    continue
                if cursor.offset is not None:
                    if offset <= cursor.offset:
                        continue  # delivery starts at a chunk's first message
                    if offset != cursor.offset + 1:
                        if catching_up:
                            log.info(
                                "cannot replay the stream: retention dropped messages",
                                extra={"channel": channel, "url": self.safe_url},
                            )
                            catching_up = False
                            report(False)
                        else:
                            cursor.lost = True
                            raise ConnectionLost(
                                f"{what} fell behind: offsets {cursor.offset + 1}..{offset - 1} "
                                f"were dropped by retention (max_age={self.max_age})"
                            )
                cursor.offset = offset
                found = headers.get(MARKER_HEADER)
                if found is not None:
                    if catching_up and _text(found) == marker:
                        catching_up = False
                        report(True)
                    continue
                yield message.body
        finally:
            if sub_channel is not None and not sub_channel.is_closed:
                with contextlib.suppress(*_FAILURES):
                    async with asyncio.timeout(1.0):
                        await sub_channel.close()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
