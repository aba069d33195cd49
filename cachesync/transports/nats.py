"""``nats://h1:4222,h2:4222``: NATS JetStream, a stream per channel, with replay.

Each channel is a JetStream stream of the same name (characters a stream name cannot hold are
replaced, with a short hash added) capturing the one subject of that name. The transport creates
the stream when it first needs it (``max_age``, ``max_msgs`` and ``replicas`` from the URL); a
stream that already exists is used as it is. A publish waits for JetStream's acknowledgement,
so a message that was not stored raises :class:`~cachesync.errors.TransportError`.

A subscription is an ephemeral push consumer that starts at a stream sequence, so after a lost
connection the next ``subscribe()`` on the same transport object picks up after the last
message it yielded. Messages of one stream carry consecutive sequences, so a missing one is
seen at once.

When ``on_ready(resumed)`` is called
    First ``subscribe()`` of a channel on this object: once the consumer exists, with
    ``resumed=False``; older messages are not replayed.

    A later one (after ``ConnectionLost``, or ``close()`` and ``connect()``): with nothing new
    since the last message yielded, ``on_ready(True)`` at once; with messages added since and
    all still stored, they are yielded first and ``on_ready(True)`` follows the last of them
    (the end of the stream when the subscription started); when retention (``max_age``,
    ``max_msgs``) or a purge dropped some of them, or the stream was recreated, the backlog is
    skipped and ``on_ready(False)`` is called at once.

    A subscription that has called ``on_ready`` and then sees a sequence jump (it fell behind
    retention, or the client dropped messages for a slow consumer) raises ``ConnectionLost``;
    the next ``subscribe()`` reports ``resumed=False``.

Failure. The connection never reconnects by itself (nats-py's reconnect would hide the time
it was away): a lost or stalled connection (``health_check_interval``: PINGs, two unanswered
close it) closes the client and ends every subscription with ``ConnectionLost``. ``connect()``
tries the nodes in turn, starting after the one used last, each with an equal share of the time
left (a node that never answers cannot use up ``connect_timeout``), backing off between rounds
over them, until ``connect_timeout``; a refused password fails at once. A
subscription that hears nothing for ``health_check_interval`` asks whether its consumer still
exists (a node restart or a lost stream leader can drop it) and ends if not.

URL options (query string; keyword arguments of the same name win):

``max_age=1d``, ``max_msgs=100000``, ``replicas=1``
    For streams this transport creates: how long and how many messages a stream keeps (the
    longest outage a subscriber can bridge without a flush), and on how many nodes.
``health_check_interval=5``
    Seconds between PINGs, and of silence before a subscription checks its consumer.
``publish_timeout=<connect_timeout>``
    Longest wait for JetStream to acknowledge one publish.
``name``
    The connection name the server shows (``connz``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ..errors import ConfigError, ConnectionLost, StateError, TransportError
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
from .inbox import Inbox

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StreamConfig
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "nats:// needs nats-py: pip install 'cachesync[nats]'", name=exc.name
    ) from exc

__all__ = ["NatsTransport", "stream_name"]

log = logging.getLogger("cachesync.transports.nats")

DEFAULT_MAX_AGE: Final = 86400.0
DEFAULT_MAX_MSGS: Final = 100_000
DEFAULT_HEALTH_CHECK_INTERVAL: Final = 5.0
# Messages a subscription holds for its iterator; past that, nats-py's own pending queue
# holds them (bounded by its limits: a message dropped past them ends the subscription).
INBOX_SIZE: Final = 1024
_OPTIONS: Final = (
    duration_option("max_age", DEFAULT_MAX_AGE),
    int_option("max_msgs", DEFAULT_MAX_MSGS),
    int_option("replicas", 1),
    duration_option("health_check_interval", DEFAULT_HEALTH_CHECK_INTERVAL),
    duration_option("publish_timeout", None),
    text_option("name"),
)
T = TypeVar("T")
_NAME_OK = re.compile(r"^[A-Za-z0-9_-]+$")

# What a broken or refused connection looks like from nats-py.
_FAILURES = (nats.errors.Error, OSError, TimeoutError, ConnectionError)


def _is_refusal(exc: BaseException) -> bool:
    """Whether the server refused the credentials (nats-py reports that as a plain error)."""
    return isinstance(exc, nats.errors.AuthorizationError) or (
        isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()
    )


def stream_name(channel: str) -> str:
    """The JetStream stream (and subject) that carries ``channel``."""
    if not channel:
        raise ValueError("channel must not be empty")
    if _NAME_OK.match(channel):
        return channel
    digest = hashlib.blake2b(channel.encode(), digest_size=4).hexdigest()
    return re.sub(r"[^A-Za-z0-9_-]", "_", channel) + "-" + digest


def _dropped(position: int, first: int, last: int) -> bool:
    """Whether a message after ``position`` is gone from a stream holding ``first..last``
    (a stream recreated since, with fewer messages than ``position``, counts as dropped)."""
    return last < position or (last > position and first > position + 1)


@dataclass
class _Cursor:
    """The stream sequence of the last message the subscriptions of one channel yielded."""

    seq: int
    lost: bool = False


class NatsTransport(Transport):
    """Transport over NATS JetStream: pub/sub with replay after a lost connection.

    See the module docstring for when ``on_ready`` is called, and the URL options.
    """

    def __init__(
        self,
        url: str = "nats://localhost:4222",
        *,
        connect_timeout: float = 10.0,
        health_check_interval: float | None = None,
        publish_timeout: float | None = None,
        max_age: float | str | None = None,
        max_msgs: int | None = None,
        replicas: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(url, connect_timeout=connect_timeout)
        parsed = parse_node_url(url, default_port=4222)
        if parsed.scheme != "nats":
            raise ConfigError(f"not a nats:// URL: {self.safe_url!r}")
        self._servers = [f"{parsed.scheme}://{host}:{port}" for host, port in parsed.hosts]
        self._user = parsed.username
        self._password = parsed.password
        opts, _ = parse_options(url, _OPTIONS)
        self.health_check_interval = health_check_interval or opts["health_check_interval"]
        self.publish_timeout = publish_timeout or opts["publish_timeout"] or connect_timeout
        if isinstance(max_age, str):
            max_age = float(_OPTIONS[0].read("nats", max_age))
        self.max_age: float = max_age or opts["max_age"]
        self.max_msgs = max_msgs or opts["max_msgs"]
        self.replicas = replicas or opts["replicas"]
        self.name = name or opts["name"]
        for attr in ("health_check_interval", "publish_timeout", "max_age"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"{attr} must be positive")
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connector = Connector(repr(self), connect_timeout)
        self._connect_lock = asyncio.Lock()
        self._turns = HostTurns()
        self._lost: asyncio.Future[None] | None = None  # done once the connection closed
        self._streams: set[str] = set()
        self._cursors: dict[str, _Cursor] = {}
        # nats-py subscription -> what ends it once nats-py dropped messages for it.
        self._fell_behind: dict[Any, Callable[[], None]] = {}

    # -- connection ----------------------------------------------------------------------

    @property
    def connected_server(self) -> str | None:
        """``host:port`` of the node this transport is connected to, if it is."""
        nc = self._nc
        if nc is None or not nc.is_connected or nc.connected_url is None:
            return None
        return f"{nc.connected_url.hostname}:{nc.connected_url.port}"

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, self.url)

    @property
    def state(self) -> ConnectionState:
        """Where the transport is in its lifecycle."""
        return self._connector.state

    async def connect(self) -> None:
        """Connect to one of the nodes (in turn, from the one after the last used, each with an
        equal share of the time left), retrying until ``connect_timeout``; then raise
        TransportError. Refused credentials fail at once."""
        async with self._connect_lock:
            if self._nc is not None and self._nc.is_connected:
                self._connector.state = ConnectionState.OPEN
                return
            await self._drop()

            def refused(exc: BaseException) -> TransportError | None:
                if not _is_refusal(exc):
                    return None
                return TransportError(
                    f"NATS at {self.safe_url} refused the connection ({self._describe(exc)}); "
                    "check the user and password"
                )

            def gave_up(exc: BaseException) -> TransportError:
                return TransportError(
                    f"NATS at {self.safe_url} unreachable within {self.connect_timeout:g}s "
                    f"({self._describe(exc)}); is nats-server running with JetStream (-js)?"
                )

            async def attempt() -> tuple[Client, asyncio.Future[None]]:
                return await try_each_host(
                    self._servers,
                    self._turns,
                    self._connect_to,
                    deadline=self._connector.deadline,
                    failures=_FAILURES,
                    connector=self._connector,
                    url=self.url,
                    refused=_is_refusal,
                )

            async def discard(opened: tuple[Client, asyncio.Future[None]]) -> None:
                await self._close_client(opened[0])

            nc, lost = await self._connector.open(
                attempt, retryable=_FAILURES, refused=refused, gave_up=gave_up, discard=discard
            )
            self._nc, self._lost = nc, lost
            self._js = nc.jetstream(timeout=self.publish_timeout)

    async def _connect_to(self, server: str, share: float) -> tuple[Client, asyncio.Future[None]]:
        """A client connected to ``server``, and a future done once its connection closed."""
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_closed() -> None:
            if not lost.done():
                lost.set_result(None)

        # nats.connect(), unrolled: with the client in hand, an attempt cancelled at the end of
        # its share (a node that accepts but never answers) can be closed.
        nc = Client()
        try:
            await nc.connect(
                servers=[server],
                user=self._user,
                password=self._password,
                name=self.name,
                allow_reconnect=False,
                # Without these nats-py retries a refused node forever.
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=max(1, int(share + 0.999)),
                ping_interval=int(max(1.0, self.health_check_interval)),
                max_outstanding_pings=2,
                error_cb=self._on_error,
                closed_cb=on_closed,
            )
        except BaseException:
            await self._close_client(nc)
            raise
        return nc, lost

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # Past its pending limits nats-py drops what arrives for a subscription: end it
            # now. With nothing published after the dropped ones, no sequence gap would show.
            fell_behind = self._fell_behind.get(exc.sub)
            if fell_behind is not None:
                fell_behind()
                return
        log.debug("nats client error", extra={"url": self.safe_url, "error": self._describe(exc)})

    async def _close_client(self, nc: Client) -> None:
        if nc.is_closed:
            return
        try:
            await asyncio.wait_for(nc.close(), self.connect_timeout)
        except _FAILURES:
            pass

    async def _drop(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            await self._close_client(nc)

    async def close(self) -> None:
        """Close the connection; every subscription ends with ConnectionLost. Idempotent.

        It does not wait for a connect() in flight: that one gives up and closes what it
        opened."""
        self._connector.close()
        await self._drop()

    def _open(self) -> tuple[Client, JetStreamContext]:
        self._connector.check_usable()
        if self._nc is None or self._js is None or not self._nc.is_connected:
            raise TransportError(f"the connection to {self.safe_url} was lost; call connect()")
        return self._nc, self._js

    async def _unless_lost(
        self, work: Coroutine[Any, Any, T], lost: asyncio.Future[None] | None = None
    ) -> T:
        """Run ``work``, but fail at once when the connection closes (``lost``, by default
        the current one's): nats-py lets a request on a dead connection wait for its whole
        timeout."""
        if lost is None:
            lost = self._lost
        if lost is None:
            return await work
        task = asyncio.ensure_future(work)
        waiting: set[asyncio.Future[Any]] = {task, lost}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise nats.errors.ConnectionClosedError
        return task.result()

    # -- streams -------------------------------------------------------------------------

    async def _ensure_stream(self, js: JetStreamContext, name: str) -> None:
        if name in self._streams:
            return
        try:
            await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            config = StreamConfig(
                name=name,
                subjects=[name],
                max_age=self.max_age,
                max_msgs=self.max_msgs,
                num_replicas=self.replicas,
                discard=DiscardPolicy.OLD,
            )
            try:
                await js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await js.stream_info(name)  # created meanwhile by someone else
        self._streams.add(name)

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, channel: str, payload: bytes) -> None:
        """Append ``payload`` to the channel's stream; return once JetStream has stored it."""
        nc, js = self._open()
        name = stream_name(channel)
        if len(payload) > nc.max_payload:
            raise TransportError(
                f"a {len(payload)}-byte message is over the server's max_payload "
                f"({nc.max_payload}) on {self.safe_url}; raise max_payload in nats-server.conf"
            )

        async def attempt() -> None:
            for attempt in (1, 2):
                await self._ensure_stream(js, name)
                try:
                    # No expected-stream header: a header would push a message of exactly
                    # max_payload bytes over the limit, and the subject maps to one stream.
                    await js.publish(name, payload, timeout=self.publish_timeout)
                    return
                except nats.js.errors.NoStreamResponseError:
                    # The stream was deleted since we saw it: create it again, once.
                    self._streams.discard(name)
                    if attempt == 2:
                        raise

        try:
            await self._unless_lost(attempt())
        except (*_FAILURES, nats.js.errors.Error) as exc:
            raise TransportError(
                f"could not publish to {channel!r} on {self.safe_url}: {self._describe(exc)}"
            ) from exc

    # -- subscribing ---------------------------------------------------------------------

    async def subscribe(
        self, channel: str, on_ready: OnReady | None = None
    ) -> AsyncIterator[bytes]:
        """Yield the payloads appended to the channel's stream; replay after a reconnect.

        See the module docstring for when ``on_ready`` is called. Raises ConnectionLost when
        the connection breaks, stalls or closes, when the consumer vanishes, or when messages
        this subscription had not read yet were dropped; it never reconnects by itself.
        """
        try:
            nc, js = self._open()
        except StateError as exc:
            raise TransportError(str(exc)) from None
        name = stream_name(channel)
        what = f"subscription to {channel!r} on {self.safe_url}"

        def report(resumed: bool) -> None:
            if on_ready is not None:
                on_ready(resumed)

        # What nats-py delivers waits here for the iterator (nats-py waits while it is full);
        # the subscription ends once the connection closes.
        inbox: Inbox[Msg] = Inbox(INBOX_SIZE)

        def closed(_: object) -> None:
            inbox.cut("the connection closed")

        lost = self._lost
        if lost is not None:
            lost.add_done_callback(closed)
        sub: Any = None
        consumer: str | None = None
        try:
            try:
                # Requests that fail at once when the connection closes.
                await self._unless_lost(self._ensure_stream(js, name), lost)
                state = (await self._unless_lost(js.stream_info(name), lost)).state
                first, last = state.first_seq, state.last_seq
                cursor = self._cursors.get(channel)
                # What to report once the consumer is live: a bool now, or None for "after
                # the backlog up to `last`".
                verdict: bool | None
                if cursor is None:
                    cursor = self._cursors[channel] = _Cursor(last)
                    verdict = False
                elif cursor.lost or _dropped(cursor.seq, first, last):
                    log.info(
                        "cannot replay the stream: messages were dropped; going on from its end",
                        extra={"channel": channel, "url": self.safe_url},
                    )
                    cursor.seq, cursor.lost = last, False
                    verdict = False
                elif last == cursor.seq:
                    verdict = True
                else:
                    verdict = None
                subject = nc.new_inbox()
                # A callback, not next_msg(): nats-py's next_msg() starts a task and a timer
                # for every message, several times what the rest of reading one costs.
                sub = await nc.subscribe(subject, cb=inbox.put)

                def fell_behind() -> None:
                    cursor.lost = True
                    inbox.cut(
                        "it fell behind: the client dropped messages it had not read "
                        "(a slow consumer)"
                    )

                self._fell_behind[sub] = fell_behind
                info = await self._unless_lost(
                    js.add_consumer(
                        name,
                        ConsumerConfig(
                            deliver_subject=subject,
                            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                            opt_start_seq=cursor.seq + 1,
                            ack_policy=AckPolicy.NONE,
                            filter_subject=name,
                            mem_storage=True,
                            num_replicas=1,
                            inactive_threshold=max(5.0, 3 * self.health_check_interval),
                        ),
                    ),
                    lost,
                )
                consumer = info.name
            except _FAILURES as exc:
                raise ConnectionLost(f"{what} failed: {self._describe(exc)}") from exc
            except nats.js.errors.Error as exc:
                raise TransportError(f"{what} was refused: {self._describe(exc)}") from exc
            if verdict is not None:
                report(verdict)
            buffer = inbox.buffer
            while True:
                while buffer:
                    msg = buffer.popleft()
                    if not msg.reply:
                        continue  # a status message (none are asked for); not a stream message
                    seq = msg.metadata.sequence.stream
                    if seq <= cursor.seq:
                        continue  # delivered twice
                    if seq != cursor.seq + 1:
                        if verdict is None:
                            # The backlog has a hole: flush instead of replaying the rest.
                            verdict = False
                            report(False)
                        else:
                            cursor.lost = True
                            raise ConnectionLost(
                                f"{what} fell behind: messages {cursor.seq + 1}..{seq - 1} "
                                f"were dropped before it read them (max_msgs={self.max_msgs}, "
                                f"max_age={self.max_age:g}s, or a slow consumer)"
                            )
                    cursor.seq = seq
                    yield msg.data
                    if verdict is None and cursor.seq >= last:
                        verdict = True
                        report(True)
                try:
                    async with asyncio.timeout(self.health_check_interval):
                        await inbox.refill(what)
                except TimeoutError:
                    await self._check_consumer(js, name, consumer, what, lost)
        finally:
            if lost is not None:
                lost.remove_done_callback(closed)
            if sub is not None:
                self._fell_behind.pop(sub, None)
                await self._cleanup(js, sub, name, consumer)

    async def _check_consumer(
        self,
        js: JetStreamContext,
        stream: str,
        consumer: str | None,
        what: str,
        lost: asyncio.Future[None] | None,
    ) -> None:
        if consumer is None:
            return
        try:
            await self._unless_lost(
                js.consumer_info(stream, consumer, timeout=self.health_check_interval), lost
            )
        except nats.js.errors.NotFoundError:
            raise ConnectionLost(
                f"{what}: its consumer is gone (a node restarted or the stream moved)"
            ) from None
        except (*_FAILURES, nats.js.errors.Error) as exc:
            raise ConnectionLost(f"{what} stalled: {self._describe(exc)}") from exc

    async def _cleanup(
        self, js: JetStreamContext, sub: Any, stream: str, consumer: str | None
    ) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return
        try:
            async with asyncio.timeout(1.0):
                await sub.unsubscribe()
                if consumer is not None:
                    await js.delete_consumer(stream, consumer)
        except (*_FAILURES, nats.js.errors.Error):
            pass  # an ephemeral consumer without interest goes away by itself
