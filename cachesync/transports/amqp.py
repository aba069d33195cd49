"""``amqp://`` and ``amqps://``: RabbitMQ through aio-pika.

Each channel name is a fanout exchange (``durable=False``, declared by both sides, so either may
start first). Each subscription declares its own exclusive, auto-delete, server-named queue and
binds it to the exchange: every subscriber gets every message published while it is live, and
nothing published while it is not (at-most-once, like Redis pub/sub).

Connections. One :class:`aio_pika.RobustConnection` per transport object carries both the
publisher and the subscriptions. Its automatic reconnect is what the publisher wants: after a
broker restart or a dropped socket, ``publish`` works again without anyone calling
``connect()``. Subscriptions must *not* resume silently, because the events sent while the
connection was down are gone with the old exclusive queue and the consumer has to flush. So
the publisher uses a plain, non-robust :class:`aio_pika.Channel` opened on the robust
connection, and each subscription a channel of aiormq's own, opened on the aiormq connection
underneath it (``transport.connection``): the robust connection never restores either (it only
restores channels made by its own ``channel()``), so no zombie queue or consumer reappears
after a reconnect. A broken connection closes those channels, watchers on the channel's and the
connection's ``closing`` cut the subscription, and the iterator raises
:class:`~cachesync.errors.ConnectionLost`. The caller then calls ``connect()`` (a no-op
if aio-pika has already reconnected, otherwise a fresh connection) and ``subscribe()`` again,
which declares a new queue and calls ``on_ready(False)``.

A cluster. ``amqp://user:password@h1:5672,h2:5673/vhost`` names several nodes: ``connect()``
tries them in turn, starting after the one used last, each attempt bounded by an equal share of
the time left (a node that does not answer cannot use up ``connect_timeout``, one that refuses
at once leaves its share to the next), and backs off only after a round over all of them.
aio-pika's own reconnect stays with the node it connected to; when that node dies, the
subscriptions end with ``ConnectionLost``, and the caller's ``connect()`` replaces the
connection with one to the next node (so does the :class:`~cachesync.Publisher` after a failed
publish). The fanout exchanges are the cluster's, but a subscription's exclusive queue lives on
its subscriber's node and dies with it: the subscription on the next node declares a new queue
and reports ``on_ready(False)``.

Backlog, bounded at the broker and in the client. Each subscription's queue is declared with
``x-max-length=max_backlog`` and ``x-overflow=drop-head``: when a consumer stalls, the broker
drops the oldest messages rather than grow without bound, and the consumer notices the loss as
a sequence gap (and flushes) once it reads again. Consumption uses acknowledgements with a
``basic.qos`` prefetch of ``prefetch`` messages, so the broker never pushes more than that
ahead of the consumer (aiormq starts one task per delivery: the prefetch bounds those too).
A message is acknowledged only once the consumer has applied it (the iterator is resumed
after the consumer handled the payload), or dropped it and counted it. Acks are sent in
batches (``multiple``): one per quarter of the prefetch applied, and one within ``ACK_DELAY``
(5 ms) of the buffer running dry, from one timer rather than a timeout per wait. Deliveries
are taken through aiormq's ``basic_consume`` rather than aio-pika's ``Queue.consume``, which
skips building an ``IncomingMessage`` and one extra task per message; the channel's frame
buffer holds ``FRAME_BUFFER`` (100) frames rather than aiormq's 10, so the consumer wakes up
once per few dozen deliveries rather than every three or so.
A message over ``max_payload`` is dropped and counted (``oversized``) when the iterator reaches
it: aiormq hands over whole bodies only, so it cannot be skipped sooner.

Measured with an AMQP-only script (now part of ``python -m benchmarks.latency``) on a local
broker (2 CPUs, shared): publish-to-receive p50/p99 0.63/8.7 ms with confirms and 0.56/8.9 ms
without (raw aio-pika: 0.70/7.9 and 0.50/8.0); consumer ceiling about 6k msg/s with acks and a
prefetch of 1000 (raw aio-pika no-ack 7.1k, with acks and a prefetch of 100 3.6k).

URL options (query string; keyword arguments of the same meaning win):

``confirm=1``
    Publisher confirms (default on). ``publish`` returns once the broker has taken the message,
    which the outbox relay needs before it marks a row as sent. ``confirm=0`` returns as soon
    as the frame is written: about 3.5x the sequential publish rate, the same
    publish-to-received latency (the broker routes before it confirms), but a message in flight
    when the connection drops is lost without an error (consumers still see the sequence gap).
``max_backlog=100000``
    Most messages a subscription's queue holds at the broker (``x-max-length``, dropping the
    oldest); also the most a subscriber may have received but not consumed before it is cut.
``prefetch=1000``
    ``basic.qos`` prefetch: deliveries in flight to one subscriber (at most ``max_backlog``).
``name=…``, ``heartbeat=…``, ``reconnect_interval=…``, TLS options
    Passed to aio-pika unchanged. ``name`` sets the connection name shown by the management UI
    and ``rabbitmqctl list_connections client_properties`` (``connection_name=`` does the same
    as a keyword). ``reconnect_interval`` defaults to 1 second here (aio-pika's default is 5).

Every broker round trip (channel open, declare, bind, consume, publish confirm, close) is bounded
by ``connect_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from ..errors import ConfigError, ConnectionLost, StateError, TransportError
from .base import (
    ConnectionState,
    Connector,
    OnReady,
    Transport,
    bool_option,
    describe,
    int_option,
    parse_options,
    redact_url,
    secret_key,
)
from .hosts import HostTurns, parse_node_url, try_each_host
from .inbox import Inbox

try:
    import aio_pika
    import aio_pika.exceptions
    import aiormq.exceptions
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    # from_url turns this into "pip install 'cachesync[rabbitmq]'" using exc.name.
    raise ImportError(
        "amqp:// needs aio-pika: pip install 'cachesync[rabbitmq]'", name=exc.name
    ) from exc

if TYPE_CHECKING:
    from aio_pika.abc import (
        AbstractChannel,
        AbstractConnection,
        AbstractExchange,
        AbstractRobustConnection,
    )
    from aiormq.abc import AbstractChannel as UnderlayChannel
    from aiormq.abc import DeliveredMessage

__all__ = ["AmqpTransport", "DEFAULT_MAX_BACKLOG", "is_refusal"]

log = logging.getLogger("cachesync.transports.amqp")

DEFAULT_MAX_BACKLOG = 100_000
DEFAULT_PREFETCH = 1000
DEFAULT_RECONNECT_INTERVAL = 1.0
ACK_DELAY = 0.005
"""Seconds after a subscription's buffer ran dry within which what it applied is acknowledged."""
FRAME_BUFFER = 100
"""Frames aiormq's reader queues for a subscription's channel before it stops reading the socket
(aiormq's default, 10, made the consumer wake up every three messages or so)."""

# Options this module reads from the query string; everything else goes to aio-pika.
_OPTIONS = (
    bool_option("confirm", True),
    int_option("max_backlog", DEFAULT_MAX_BACKLOG),
    int_option("prefetch", DEFAULT_PREFETCH),
)

_BROKER_HINT = "start it with `docker compose up -d rabbitmq`"

# What "the broker or the socket failed" looks like from aio-pika/aiormq. TimeoutError is an
# OSError subclass since Python 3.11, so bounded operations land here too.
_FAILURES: tuple[type[BaseException], ...] = (
    *aio_pika.exceptions.CONNECTION_EXCEPTIONS,
    ConnectionError,
)

# Answers from a reachable broker that retrying will not change.
_REFUSALS = (
    aio_pika.exceptions.ProbableAuthenticationError,
    aio_pika.exceptions.AuthenticationError,
    aiormq.exceptions.ConnectionNotAllowed,
)


def _netlocs(url: str, netloc: str, scheme: str) -> list[str]:
    """The network location of each host of ``url``: the URL's own when it names one host (or
    none: aio-pika's default), ``user:password@host:port`` for each of ``h1:p1,h2:p2``."""
    hostlist = netloc.rpartition("@")[2]
    if not hostlist:
        return [netloc]
    # Checks the ports of a single host too (a bad one would be a bare ValueError at connect).
    nodes = parse_node_url(url, default_port=5671 if scheme == "amqps" else 5672)
    if "," not in hostlist:
        return [netloc]
    userinfo, at, _ = netloc.rpartition("@")
    hosts = [(f"[{host}]" if ":" in host else host, port) for host, port in nodes.hosts]
    return [f"{userinfo}{at}{host}:{port}" for host, port in hosts]


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is a reachable broker's answer that retrying will not change: bad
    credentials, or a vhost the user may not open."""
    # aiormq reports a vhost the user may not open (or that does not exist) as an unexpected
    # Connection.Close during the handshake, with no exception type of its own.
    return isinstance(exc, _REFUSALS) or (
        isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc)
    )


def _cancelling() -> bool:
    """Whether the running task is being cancelled: a CancelledError it meets otherwise is
    aiormq failing a future of a channel or connection that closed."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _Subscription(Inbox[tuple[int, bytes]]):
    """The receiving end of one subscribe() call: an inbox the consumer callback fills with
    ``(delivery tag, body)``, and the timer that says when what was applied is acknowledged."""

    __slots__ = ("connection", "ack_due", "ack_timer")

    def __init__(self, max_backlog: int, connection: AbstractConnection) -> None:
        super().__init__(max_backlog)
        self.connection = connection
        self.ack_due = False
        self.ack_timer: asyncio.TimerHandle | None = None

    async def on_delivery(self, message: DeliveredMessage) -> None:
        # aiormq starts one task per delivery, in delivery order, and this body never awaits,
        # so payloads enter the buffer in the order the broker sent them. Consuming through
        # aiormq's basic_consume rather than aio-pika's Queue.consume skips an IncomingMessage
        # and a second task per message: about 1.5x the consumer rate (benchmarks/).
        tag = message.delivery_tag
        if tag is not None:
            self.deliver((tag, message.body))

    def arm_ack_timer(self) -> None:
        """Make sure the iterator is woken within ACK_DELAY to acknowledge what it applied.

        One timer per ACK_DELAY at most, not one per wait: while deliveries come a few at a
        time, a timeout armed and cancelled at each wait cost more than the rest of the
        hand-off."""
        if self.ack_timer is None:
            self.ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._ack_now)

    def _ack_now(self) -> None:
        self.ack_timer = None
        self.ack_due = True
        self.wakeup.set()

    def acked(self) -> None:
        """What was applied has just been acknowledged: no ack is due until more is."""
        self.ack_due = False
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None


class AmqpTransport(Transport):
    """Transport over RabbitMQ: a fanout exchange per channel, a private queue per subscription.

    ``connect()`` opens one robust aio-pika connection, retrying with backoff until
    ``connect_timeout``. ``publish`` raises :class:`~cachesync.errors.TransportError` while the
    broker is unreachable and works again once aio-pika has reconnected. A subscription raises
    :class:`~cachesync.errors.ConnectionLost` when its connection breaks and never resumes on its
    own. See the module docstring for the URL options.
    """

    def __init__(
        self,
        url: str = "amqp://guest:guest@localhost/",
        *,
        connect_timeout: float = 10.0,
        connection_name: str | None = None,
        publisher_confirms: bool | None = None,
        max_backlog: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        super().__init__(url, connect_timeout=connect_timeout)
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigError(f"malformed AMQP URL {self.safe_url!r}: {exc}") from None
        if parts.scheme.lower() not in ("amqp", "amqps"):
            raise ConfigError(
                f"AmqpTransport needs an amqp:// or amqps:// URL, not {self.safe_url!r}"
            )
        values, passed = parse_options(
            url,
            _OPTIONS,
            passthrough=True,
            keywords={
                "confirm": publisher_confirms,
                "max_backlog": max_backlog,
                "prefetch": prefetch,
            },
        )
        if any(secret_key(key) for key, _ in passed):
            # aio-pika would not use it, and would log it with the URL.
            raise ConfigError(
                f"{self.safe_url!r}: amqp:// takes the password in the user-info "
                "(amqp://user:password@host/), not as a query option"
            )
        if not any(key == "reconnect_interval" for key, _ in passed):
            passed.append(("reconnect_interval", f"{DEFAULT_RECONNECT_INTERVAL:g}"))
        # The URLs aio-pika sees: ours minus the options only this module understands, one per
        # host of a host list (connect() tries them in turn, from the one after the last used).
        query = urlencode(passed)
        self._broker_urls = [
            urlunsplit(parts._replace(netloc=netloc, query=query))
            for netloc in _netlocs(url, parts.netloc, parts.scheme.lower())
        ]
        self._turns = HostTurns()
        self.publisher_confirms: bool = values["confirm"]
        self.max_backlog: int = values["max_backlog"]
        self.prefetch: int = min(values["prefetch"], self.max_backlog)

        url_name = dict(passed).get("name")
        # An explicit name (keyword, then URL) wins; the default still tells operators which
        # process holds the connection.
        self.connection_name = connection_name or url_name or f"cachesync-{os.getpid()}"

        self.reconnects = 0
        """How many times aio-pika restored the connection by itself (not counting connect())."""
        self._connection: AbstractRobustConnection | None = None
        # NEW and CLOSED make publish a lifecycle error (StateError); after a connect() attempt,
        # a missing connection is a broker problem (TransportError).
        self._connector = Connector(repr(self), connect_timeout)
        self._connect_lock = asyncio.Lock()
        self._publish_lock = asyncio.Lock()
        self._pub_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._subscriptions: set[_Subscription] = set()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (false while aio-pika is reconnecting)."""
        conn = self._connection
        return (
            conn is not None
            and not conn.is_closed
            and conn.connected.is_set()
            and conn.transport is not None
            and not conn.transport.connection.is_closed
        )

    @property
    def state(self) -> ConnectionState:
        """Where the transport is in its lifecycle."""
        return self._connector.state

    async def connect(self) -> None:
        """Open the connection, or make sure it is open.

        A no-op while the connection is up (including after aio-pika reconnected by itself).
        A connection that is down is closed and replaced. Failed attempts are retried with
        backoff until ``connect_timeout``, then :class:`~cachesync.errors.TransportError` names
        the redacted URL and says what to start. Refused credentials or vhost access fail at
        once: retrying cannot fix them.
        """
        async with self._connect_lock:
            if self.connected:
                self._connector.state = ConnectionState.OPEN
                return
            if self._connection is not None:
                await self._drop_connection("the connection was replaced")
            conn = await self._open_connection()
            conn.close_callbacks.add(self._on_connection_close)
            conn.reconnect_callbacks.add(self._on_reconnect)
            self._connection = conn

    async def _open_connection(self) -> AbstractRobustConnection:
        def refused(exc: BaseException) -> TransportError | None:
            if is_refusal(exc):
                return TransportError(
                    f"RabbitMQ at {self.safe_url} refused the connection "
                    f"({describe(exc, self.url)}); check the user, password and vhost"
                )
            return None

        def gave_up(exc: BaseException) -> TransportError:
            return TransportError(
                f"cannot connect to RabbitMQ at {self.safe_url} within "
                f"{self.connect_timeout:g}s ({describe(exc, self.url)}); "
                f"is the broker running? {_BROKER_HINT}"
            )

        async def attempt() -> AbstractRobustConnection:
            # One round over the hosts, from the one after the last used: the connector's
            # backoff comes between rounds, not between hosts (a dozen dead nodes would sleep
            # the deadline away).
            return await try_each_host(
                self._broker_urls,
                self._turns,
                self._connect_to,
                deadline=self._connector.deadline,
                failures=_FAILURES,
                connector=self._connector,
                url=self.url,
                refused=is_refusal,
                label=redact_url,
            )

        return await self._connector.open(
            attempt,
            retryable=_FAILURES,
            refused=refused,
            gave_up=gave_up,
            discard=self._close_quietly,
        )

    async def _connect_to(self, url: str, timeout: float) -> AbstractRobustConnection:
        # aio_pika.connect_robust(), unrolled: with the object in hand, a failed or cancelled
        # attempt can be closed, so its reconnect task never outlives this call. aio-pika keeps
        # the timeout given to connect() for its own reconnects to this node: the whole
        # connect_timeout, as for every broker round trip; this attempt gets ``timeout``.
        conn = aio_pika.RobustConnection(
            aio_pika.connection.make_url(url),
            client_properties={"connection_name": self.connection_name},
        )
        try:
            async with asyncio.timeout(timeout):
                await conn.connect(timeout=self.connect_timeout)
        except BaseException:
            await self._close_quietly(conn)
            raise
        return conn

    def _on_connection_close(self, conn: Any, exc: BaseException | None) -> None:
        # The channel close callbacks normally cut the subscriptions first; this catches a
        # subscription still setting up its channel when the socket dies.
        self._cut_subscriptions(conn, f"connection closed ({exc!r})")

    def _on_reconnect(self, conn: Any) -> None:
        # Nothing to restore: subscriptions already ended with ConnectionLost, and the
        # publisher opens a new channel on its next publish.
        self.reconnects += 1
        log.info("AMQP connection restored", extra={"url": self.safe_url})

    def _cut_subscriptions(self, conn: Any, reason: str) -> None:
        for sub in list(self._subscriptions):
            if conn is None or sub.connection is conn:
                sub.cut(reason)

    async def close(self) -> None:
        """Close the connection and end every subscription (they raise ConnectionLost).

        Safe to call twice; ``connect()`` may open the transport again afterwards.
        """
        # No lock: close() must not wait behind a connect() that is still retrying; the
        # connector makes that connect() throw away whatever it opens.
        self._connector.close()
        await self._drop_connection("the transport was closed")

    async def _drop_connection(self, reason: str) -> None:
        conn, self._connection = self._connection, None
        self._pub_channel = None
        self._exchanges.clear()
        self._cut_subscriptions(None, reason)
        if conn is not None:
            await self._close_quietly(conn)

    async def _close_quietly(self, conn: AbstractRobustConnection) -> None:
        # Closing can block on a stalled socket (it waits for Close-Ok); the connection is being
        # thrown away, so bound the wait and ignore what a dead socket reports.
        try:
            async with asyncio.timeout(min(self.connect_timeout, 5.0)):
                await conn.close()
                # aio-pika runs the close callbacks in a task that finishes one loop turn after
                # close() returns; let it, so nothing of this connection outlives close().
                await asyncio.sleep(0)
        except Exception as exc:
            log.debug("closing the AMQP connection failed: %r", exc)

    def _live_connection(self) -> AbstractRobustConnection:
        conn = self._connection
        self._connector.check_usable()
        if conn is None or not self.connected:
            raise TransportError(
                f"not connected to RabbitMQ at {self.safe_url}; {_BROKER_HINT} if it is down"
            )
        return conn

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, channel: str, payload: bytes) -> None:
        """Send ``payload`` to every live subscription of ``channel``.

        With publisher confirms (the default) this returns once the broker has accepted the
        message. Raises :class:`~cachesync.errors.TransportError` when the broker is
        unreachable or refuses; publishing works again once the connection is back.
        """
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        pub = self._pub_channel
        exchange = self._exchanges.get(channel)
        if exchange is None or pub is None or pub.is_closed:
            exchange = await self._declare_for_publish(channel)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await exchange.publish(
                    aio_pika.Message(bytes(payload)), routing_key="", mandatory=False
                )
        except _FAILURES as exc:
            raise TransportError(
                f"publishing to {channel!r} on {self.safe_url} failed: {describe(exc, self.url)}"
            ) from exc

    async def _declare_for_publish(self, channel: str) -> AbstractExchange:
        async with self._publish_lock:
            conn = self._live_connection()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    pub = self._pub_channel
                    if pub is None or pub.is_closed:
                        # Exchanges declared on the old channel are known to the broker, but the
                        # objects are bound to the dead channel: declare again.
                        self._exchanges.clear()
                        pub = aio_pika.Channel(conn, publisher_confirms=self.publisher_confirms)
                        await pub.initialize()
                        self._pub_channel = pub
                    # _exchanges only ever holds exchanges declared on the current channel.
                    exchange = self._exchanges.get(channel)
                    if exchange is None:
                        exchange = await pub.declare_exchange(
                            channel, aio_pika.ExchangeType.FANOUT, durable=False
                        )
                        self._exchanges[channel] = exchange
                    return exchange
            except _FAILURES as exc:
                raise TransportError(
                    f"cannot declare exchange {channel!r} on {self.safe_url}: "
                    f"{describe(exc, self.url)}"
                ) from exc

    # -- subscribing -----------------------------------------------------------------------

    async def subscribe(
        self, channel: str, on_ready: OnReady | None = None
    ) -> AsyncIterator[bytes]:
        """Yield the payloads published on ``channel`` while this subscription is live.

        Declares a fresh exclusive queue bound to the channel's exchange, then calls
        ``on_ready(False)`` (a new queue never holds earlier events) before the first payload.
        Raises :class:`~cachesync.errors.ConnectionLost` when the connection breaks, the transport
        is closed, the queue is deleted, or the subscriber falls ``max_backlog`` behind.
        """
        try:
            conn = self._live_connection()
        except (TransportError, StateError) as exc:
            raise ConnectionLost(str(exc)) from exc
        sub = _Subscription(self.max_backlog, conn)
        self._subscriptions.add(sub)
        watchers: list[asyncio.Future[Any]] = []
        sub_channel: UnderlayChannel | None = None
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    sub_channel = await self._open_channel(conn, sub, watchers)
                    consumer_tag = await self._start_consumer(sub_channel, channel, sub)
            except _FAILURES as exc:
                # A channel-level refusal on a live connection (access refused, an exchange of
                # another type under this name) is the broker saying no; anything else means
                # the connection went away under us.
                refused = isinstance(exc, aio_pika.exceptions.AMQPChannelError)
                if sub.lost or not refused or not self.connected:
                    raise ConnectionLost(
                        f"subscribing to {channel!r} on {self.safe_url} failed: {exc!r}"
                    ) from exc
                raise TransportError(
                    f"RabbitMQ at {self.safe_url} refused the subscription to {channel!r}: {exc!r}"
                ) from exc

            def on_cancel(frame: Any) -> None:
                # The broker cancels the consumer when the queue is deleted under it.
                if getattr(frame, "consumer_tag", None) == consumer_tag:
                    sub.cut("the broker cancelled the consumer (queue deleted?)")

            sub_channel.on_consumer_cancel_callbacks.add(on_cancel)
            what = f"subscription to {channel!r} on {self!r}"
            if sub.lost:
                raise ConnectionLost(f"{what}: {sub.reason}")
            if on_ready is not None:
                on_ready(False)
            buffer = sub.buffer
            # A message is acknowledged once applied (the iterator is resumed after the
            # consumer handled it) or dropped and counted. Acks go out in batches
            # (multiple=True): one per quarter of the prefetch applied, and one within
            # ACK_DELAY of the buffer running dry (not each time it does: deliveries arrive a
            # few at a time, and an ack each time cost a socket write per few messages).
            ack_every = max(1, self.prefetch // 4)
            unacked = 0
            applied = 0
            limit = self.max_payload
            while True:
                while buffer:
                    delivery_tag, body = buffer.popleft()
                    if (
                        limit is None
                        or len(body) <= limit
                        or not self.too_big(len(body), f"a message on {channel!r}")
                    ):
                        yield body
                    applied = delivery_tag
                    unacked += 1
                    if unacked >= ack_every:
                        await self._ack(sub_channel, applied, sub)
                        unacked = 0
                if unacked:
                    if sub.ack_due:
                        await self._ack(sub_channel, applied, sub)
                        unacked = 0
                    else:
                        sub.arm_ack_timer()
                await sub.refill(what)
        finally:
            self._subscriptions.discard(sub)
            sub.cut("the subscription ended")
            sub.acked()
            for watcher in watchers:  # detach them from the channel and the connection
                watcher.cancel()
            # A subscription that ends while its connection lives on (the consumer stopped
            # iterating, fell max_backlog behind, or setup failed half-way) must not leave its
            # queue behind: closing the channel cancels the consumer, and auto-delete drops the
            # queue. On a lost or closing connection the broker drops both by itself.
            if (
                sub_channel is not None
                and not sub_channel.is_closed
                and not conn.is_closed
                and not conn.close_called
            ):
                await self._close_channel(sub_channel)

    async def _open_channel(
        self,
        conn: AbstractConnection,
        sub: _Subscription,
        watchers: list[asyncio.Future[Any]],
    ) -> UnderlayChannel:
        """A channel of aiormq's own on ``conn``: the robust connection neither knows nor
        restores it (see the module docstring), and its frame buffer holds FRAME_BUFFER frames.
        Its closing, or its connection's, cuts ``sub``; the watchers that do it are appended to
        ``watchers`` (cancel them to detach them)."""
        transport = conn.transport
        if transport is None:
            raise aiormq.exceptions.ChannelInvalidStateError("the connection is down")
        underlay = transport.connection

        def watch(closing: asyncio.Future[Any], what: str) -> None:
            def on_closed(done: asyncio.Future[Any]) -> None:
                exc = None if done.cancelled() else done.exception()
                sub.cut(f"{what} closed ({exc!r})")

            closing.add_done_callback(on_closed)
            watchers.append(closing)

        watch(underlay.closing, "connection")
        sub_channel = await underlay.channel(
            publisher_confirms=False, frame_buffer_size=FRAME_BUFFER
        )
        watch(sub_channel.closing, "channel")
        return sub_channel

    async def _start_consumer(
        self, sub_channel: UnderlayChannel, channel: str, sub: _Subscription
    ) -> str | None:
        """Declare the exchange, a bounded exclusive queue bound to it, and consume that queue
        into ``sub`` under the prefetch; the consumer tag."""
        await sub_channel.basic_qos(prefetch_count=self.prefetch)
        await sub_channel.exchange_declare(channel, exchange_type="fanout", durable=False)
        declared = await sub_channel.queue_declare(
            "",
            exclusive=True,
            auto_delete=True,
            # Bounded at the broker: a stalled consumer loses the oldest messages (a sequence
            # gap it detects) instead of growing broker memory.
            arguments={"x-max-length": self.max_backlog, "x-overflow": "drop-head"},
        )
        queue = declared.queue
        if queue is None:  # pragma: no cover - the broker always names a server-named queue
            raise aiormq.exceptions.AMQPChannelError("the broker named no queue")
        await sub_channel.queue_bind(queue, channel)
        consume_ok = await sub_channel.basic_consume(queue, sub.on_delivery, no_ack=False)
        return consume_ok.consumer_tag

    async def _ack(self, sub_channel: UnderlayChannel, tag: int, sub: _Subscription) -> None:
        sub.acked()
        try:
            await sub_channel.basic_ack(tag, multiple=True)
        except _FAILURES as exc:
            sub.cut(f"acknowledging failed ({describe(exc, self.url)})")
        except asyncio.CancelledError:
            if _cancelling():
                raise
            # aiormq fails what a closing channel still waits for (the ack's write) with
            # CancelledError: the channel went away, the consumer was not cancelled.
            sub.cut("acknowledging failed (the channel closed)")

    async def _close_channel(self, channel: UnderlayChannel) -> None:
        try:
            async with asyncio.timeout(min(self.connect_timeout, 5.0)):
                await channel.close()
        except _FAILURES as exc:
            log.debug("closing an AMQP channel failed: %r", exc)
        except asyncio.CancelledError:
            if _cancelling():
                raise
            log.debug("closing an AMQP channel failed: its connection closed first")
