"""``redis://`` and ``rediss://``: Redis pub/sub.

Publishing is ``PUBLISH`` on the transport's command connection (see
:mod:`cachesync.transports.redis.connection`). Each subscription opens a connection of its own,
sends ``SUBSCRIBE``, and calls ``on_ready(False)`` as soon as Redis has confirmed it: from that
moment every message published on the channel reaches the subscription. Pub/sub keeps no log,
so ``resumed`` is always false: whatever was published while a subscription was down is gone,
and the consumer flushes.

The receive loop reads one reply at a time with redis-py's ``read_response`` (hiredis parses
whole socket reads, so a burst costs one socket read, not one per message). redis-py's
``PubSub`` object is not used: it reconnects and resubscribes on its own after an error, which
would hide the events lost meanwhile, and builds a dict per message.

Failure. A closed or reset socket, a protocol error, or silence ends the subscription with
:class:`~cachesync.errors.ConnectionLost`. Silence is watched by a timer, not by a timeout
around every read (that would cost more than the read): when nothing has arrived for
``health_check_interval`` seconds the timer sends a PING, and when nothing arrives for another
interval either, the network or the server has stalled and the connection is dropped. The
iterator never reconnects: the caller calls ``connect()`` and ``subscribe()`` again.

Oversized messages (over ``max_payload``) are dropped and counted. redis-py offers no way to
skip a reply without reading it, so each is read once (linearly) and then dropped; Redis's own
``client-output-buffer-limit pubsub`` bounds what can pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from ...errors import ConnectionLost, TransportError
from ..base import OnReady
from .connection import FAILURES, FAILURES_OR_TIMEOUT, REFUSALS, RedisTransportBase, disconnect

# Publishes every ARGV from the second on on the channel ARGV[1], in order: publish_many's
# batches. The channel is not declared as a key: an ACL that grants the channel but not a key of
# that name must not refuse the script, nor a cluster node send it to the key's slot (MOVED).
_PUBLISH_ALL = (
    b"local channel = ARGV[1] "
    b"for i = 2, #ARGV do redis.call('PUBLISH', channel, ARGV[i]) end return #ARGV - 1"
)

try:
    from redis.asyncio.connection import AbstractConnection
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "redis:// needs redis-py: pip install 'cachesync[redis]'", name=exc.name
    ) from exc

__all__ = ["RedisPubSubTransport"]

# A read ended by the silence watch dropping the connection may also fail inside redis-py's
# parser, whose state the drop reset (an AttributeError on its cleared reader).
_READ_FAILURES: tuple[type[BaseException], ...] = (*FAILURES, AttributeError)

_NO_LIMIT = float("inf")


class RedisPubSubTransport(RedisTransportBase):
    """Transport over Redis pub/sub (``redis://`` and ``rediss://``).

    At-most-once, like the memory bus: a subscription gets every message published on its
    channel while it is live, nothing from before, and ends with
    :class:`~cachesync.errors.ConnectionLost` when its connection breaks, stalls, or the
    transport is closed. (Redis itself also cuts a subscriber that falls too far behind, by its
    ``client-output-buffer-limit pubsub``; that arrives here as a lost connection.)
    See :mod:`cachesync.transports.redis.connection` for the URL options.
    """

    def _command(self, channel: str, payload: bytes) -> tuple[bytes, ...]:
        return (b"PUBLISH", channel.encode(), payload)

    def _batch_script(self, channel: bytes) -> tuple[bytes, ...] | None:
        return _PUBLISH_ALL, b"0", channel

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
        conn = self._new_connection()
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await conn.connect()  # type: ignore[no-untyped-call]
                    await conn.send_packed_command(conn.pack_command(b"SUBSCRIBE", name), False)
                    while True:
                        reply = await conn.read_response()
                        if isinstance(reply, list) and reply[:2] == [b"subscribe", name]:
                            break
            except REFUSALS as exc:
                raise self._refused(what, exc) from exc
            except FAILURES_OR_TIMEOUT as exc:
                raise self._lost(conn, what, exc) from exc
            if self._closing(conn):
                raise self._lost(conn, what, None)
            if on_ready is not None:
                on_ready(False)

            # Silence is watched by a timer, not by a timeout around every read: that would
            # cost more than the read itself (a timer handle per message).
            watch = (
                _SilenceWatch(conn, self.health_check_interval)
                if self.health_check_interval
                else None
            )
            read = conn.read_response
            limit = self.max_payload if self.max_payload is not None else _NO_LIMIT
            try:
                while True:
                    try:
                        reply = await read()
                    except REFUSALS as exc:
                        raise TransportError(
                            f"Redis error on the {what}: {self._describe(exc)}"
                        ) from exc
                    except _READ_FAILURES as exc:
                        if watch is not None and watch.stalled:
                            raise ConnectionLost(
                                f"{what} on {self.safe_url}: no reply to PING within "
                                f"{self.health_check_interval:g}s; the network or server stalled"
                            ) from None
                        raise self._lost(conn, what, exc) from exc
                    if watch is not None:
                        watch.received += 1
                    if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                        payload = reply[2]
                        if not isinstance(payload, bytes):
                            continue
                        if len(payload) > limit and self.too_big(
                            len(payload), f"a message on {channel!r}"
                        ):
                            continue
                        yield payload
                    # Anything else: a PING reply, a late (un)subscribe confirmation.
            finally:
                if watch is not None:
                    await watch.stop()
        finally:
            await self._release_connection(conn)


class _SilenceWatch:
    """Every ``interval`` seconds: if nothing arrived since the last look, send a PING; if
    nothing arrived after the PING either, mark the link stalled and drop the connection, which
    ends the read in progress. The receive loop counts what arrives in ``received``."""

    def __init__(self, conn: AbstractConnection, interval: float) -> None:
        self.received = 0
        self.stalled = False
        self._conn = conn
        self._interval = interval
        self._seen = 0
        self._pinged = False
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handle = self._loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        if self.received != self._seen:
            self._seen = self.received
            self._pinged = False
        elif not self._pinged:
            # Silence may be a quiet channel or a dead link; a PING tells them apart.
            self._pinged = True
            self._spawn(self._ping())
        else:
            self.stalled = True
            self._spawn(disconnect(self._conn))
            return
        self._handle = self._loop.call_later(self._interval, self._tick)

    async def _ping(self) -> None:
        conn = self._conn
        with contextlib.suppress(Exception):
            await conn.send_packed_command(conn.pack_command(b"PING"), False)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop watching (the subscription ended); the PING or drop in flight is awaited."""
        self._handle.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
