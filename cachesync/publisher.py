"""The owner side: publish change events with sequence numbers and heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from .backoff import Backoff
from .errors import StateError, TransportError
from .events import ChangeEvent, Op
from .lifecycle import Service
from .signing import Signer
from .transports.base import Transport, from_url, redact_url

__all__ = ["Change", "Publisher", "PublisherState"]

log = logging.getLogger("cachesync.publisher")


class Change(NamedTuple):
    """One change to publish with :meth:`Publisher.send_many`."""

    op: Op
    ns: str
    keys: tuple[str, ...]
    version: int | None = None
    value: Any = None
    ts: float | None = None


def _check(change: Change) -> None:
    if change.op is not Op.HEARTBEAT and not change.ns:
        raise ValueError("ns must be a non-empty namespace name")
    for key in change.keys:
        if not isinstance(key, str):
            raise TypeError(f"event keys must be strings, got {type(key).__name__}")
    if change.op in (Op.UPSERT, Op.DELETE) and not change.keys:
        raise ValueError(f"a {change.op.value} event needs at least one key")


class PublisherState(dict[str, Any]):
    """What ``GET /cachesync/state`` reports: source, channel, last seq, heartbeat interval."""


class Publisher(Service):
    """Publishes :class:`ChangeEvent` s for one channel from inside the owner service.

    Every start draws a new ``source`` id and restarts ``seq`` at 0; each event takes the next
    ``seq``, so consumers can detect a lost event. A heartbeat carrying the last ``seq`` goes out
    every ``heartbeat_interval`` seconds (``None`` turns it off), so even a lost *last* event is
    noticed. Events are sent one at a time, in ``seq`` order. If the broker is unreachable,
    sending retries with backoff for up to ``publish_timeout`` seconds and then raises
    :class:`~cachesync.errors.TransportError`; the seq of an event that failed stays used, so
    consumers see a gap and flush rather than miss it. For changes that must never be lost, write
    them to the outbox (:mod:`cachesync.outbox`) instead.
    """

    def __init__(
        self,
        url: str = "memory://",
        channel: str = "cachesync",
        *,
        heartbeat_interval: float | None = 1.0,
        publish_timeout: float = 10.0,
        signing_key: bytes | str | None = None,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive, or None to turn it off")
        if publish_timeout <= 0:
            raise ValueError("publish_timeout must be positive")
        if not channel:
            raise ValueError("channel must be a non-empty string")
        self.url = url
        self.channel = channel
        self.heartbeat_interval = heartbeat_interval
        self.publish_timeout = publish_timeout
        self._transport = transport if transport is not None else from_url(url)
        self._signer = Signer([signing_key]) if signing_key is not None else None
        self._clock = clock
        self._lock = asyncio.Lock()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._running = False
        self.source = ""
        self.seq = 0
        # Where a transport spreads namespaces over channels (Transport.channel_for): the
        # last seq sent on each other channel, and a namespace each (named in its heartbeats).
        self._wire_seqs: dict[str, int] = {}
        self._wire_ns: dict[str, str] = {}
        self.published = 0
        self.publish_errors = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the broker, draw a new source id, start the heartbeat."""
        if self._running:
            raise StateError("this Publisher is already started")
        await self._transport.connect()
        self.source = uuid.uuid4().hex
        self.seq = 0
        self._wire_seqs.clear()
        self._running = True
        if self.heartbeat_interval is not None:
            self._heartbeat_task = asyncio.create_task(
                self._heartbeat_loop(self.heartbeat_interval), name="cachesync-heartbeat"
            )
        log.info(
            "publisher started",
            extra={"url": redact_url(self.url), "channel": self.channel, "source": self.source},
        )

    async def stop(self) -> None:
        """Stop the heartbeat and close the connection. Safe to call twice."""
        self._running = False
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._transport.close()

    # -- the API ---------------------------------------------------------------------------

    async def changed(
        self,
        ns: str,
        *keys: str,
        version: int | None = None,
        value: Any = None,
        ts: float | None = None,
    ) -> ChangeEvent:
        """Announce that ``keys`` of namespace ``ns`` changed.

        Without ``value`` consumers drop their entries (and fetch again on the next read); with
        ``value`` (one key only) consumers in refresh mode store it in place of a fetch.
        ``version`` is the owner's row version: consumers never let an older version replace a
        newer one. ``ts`` is the commit time (defaults to now).
        """
        if value is not None and len(keys) != 1:
            raise ValueError("an event that carries a value must name exactly one key")
        return await self.send(Op.UPSERT, ns, keys, version=version, value=value, ts=ts)

    async def deleted(
        self, ns: str, *keys: str, version: int | None = None, ts: float | None = None
    ) -> ChangeEvent:
        """Announce that ``keys`` of ``ns`` no longer exist."""
        return await self.send(Op.DELETE, ns, keys, version=version, ts=ts)

    async def flush(self, ns: str, ts: float | None = None) -> ChangeEvent:
        """Tell every consumer to drop all of namespace ``ns``."""
        return await self.send(Op.FLUSH, ns, (), ts=ts)

    async def send(
        self,
        op: Op,
        ns: str,
        keys: Iterable[str],
        *,
        version: int | None = None,
        value: Any = None,
        ts: float | None = None,
    ) -> ChangeEvent:
        """Publish one event with the next ``seq``; the building block of the methods above."""
        (event,) = await self.send_many([Change(op, ns, tuple(keys), version, value, ts)])
        return event

    async def send_many(self, changes: Sequence[Change]) -> list[ChangeEvent]:
        """Publish several events with consecutive ``seq`` s, in order, batching the broker
        round trips where the transport can (the outbox relay's path)."""
        if not self._running:
            raise StateError("Publisher is not started: use 'async with Publisher(...)'")
        for change in changes:
            _check(change)
        if not changes:
            return []
        async with self._lock:
            events = []
            for change in changes:
                seq = self._next_seq(change.ns)
                events.append(
                    ChangeEvent(
                        source=self.source,
                        seq=seq,
                        ns=change.ns,
                        op=change.op,
                        keys=tuple(change.keys),
                        version=change.version,
                        value=change.value,
                        ts=self._clock() if change.ts is None else change.ts,
                    )
                )
            await self._send(events)
        return events

    def state(self) -> PublisherState:
        """Source id, channel, last seq and heartbeat interval (for ``/cachesync/state``)."""
        return PublisherState(
            source=self.source,
            channel=self.channel,
            seq=self.seq,
            heartbeat_interval=self.heartbeat_interval,
        )

    # -- internals -------------------------------------------------------------------------

    def _next_seq(self, ns: str) -> int:
        wire = self._transport.channel_for(self.channel, ns)
        if wire == self.channel:
            self.seq += 1
            return self.seq
        seq = self._wire_seqs[wire] = self._wire_seqs.get(wire, 0) + 1
        self._wire_ns.setdefault(wire, ns)
        return seq

    async def _send(self, events: Sequence[ChangeEvent]) -> None:
        # Consecutive events for one channel go out together, in order.
        run: list[ChangeEvent] = []
        wire = self.channel
        for event in events:
            target = self._transport.channel_for(self.channel, event.ns) if event.ns else wire
            if run and target != wire:
                await self._send_to(wire, run)
                run = []
            wire = target
            run.append(event)
        if run:
            await self._send_to(wire, run)

    async def _send_to(self, channel: str, events: Sequence[ChangeEvent]) -> None:
        signer = self._signer
        payloads = [(signer.sign(e) if signer is not None else e).encode() for e in events]
        deadline = time.monotonic() + self.publish_timeout
        backoff = Backoff(initial=0.05, maximum=1.0)
        while True:
            try:
                if len(payloads) == 1:
                    await self._transport.publish(channel, payloads[0])
                else:
                    await self._transport.publish_many(channel, payloads)
                self.published += len(payloads)
                return
            except TransportError as exc:
                self.publish_errors += 1
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    raise TransportError(
                        f"could not publish to {redact_url(self.url)} within "
                        f"{self.publish_timeout:g}s: {exc}; is the broker running?"
                    ) from exc
                log.warning(
                    "publish failed, reconnecting",
                    extra={"url": redact_url(self.url), "error": str(exc), "retry_in": delay},
                )
                await asyncio.sleep(delay)
                with contextlib.suppress(TransportError):
                    await self._transport.close()
                    await self._transport.connect()

    def _heartbeats(self, interval: float) -> list[ChangeEvent]:
        """A heartbeat for every channel this publisher sends on, with its last seq."""
        now = self._clock()
        beats = []
        if self._transport.channel_for(self.channel, "") == self.channel or not self._wire_seqs:
            beats.append((self.seq, ""))
        beats += [(seq, self._wire_ns[wire]) for wire, seq in self._wire_seqs.items()]
        return [
            ChangeEvent(
                source=self.source,
                seq=seq,
                ns=ns,
                op=Op.HEARTBEAT,
                value={"interval": interval},
                ts=now,
            )
            for seq, ns in beats
        ]

    async def _heartbeat_loop(self, interval: float) -> None:
        # The first beat goes out at once, so consumers learn of a restarted owner (a new
        # source) right away rather than at its first change.
        while True:
            try:
                async with self._lock:
                    await self._send(self._heartbeats(interval))
            except TransportError as exc:
                log.warning("heartbeat not sent", extra={"error": str(exc)})
            await asyncio.sleep(interval)
