"""The owner side: publish change events with sequence numbers and heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar

from .backoff import Backoff
from .errors import StateError, TransportError
from .events import (
    DEFAULT_CHANNEL,
    MAX_NS_LENGTH,
    READABLE_SCHEMAS,
    SCHEMA_VERSION,
    ChangeEvent,
    Op,
    encode_fields,
)
from .lifecycle import Service
from .runner import INHERITED, LoopThread
from .signing import Signer
from .transports.base import Transport, from_url, redact_url, scrub

__all__ = ["BlockingPublisher", "Change", "Publisher", "PublisherState"]

T = TypeVar("T")

log = logging.getLogger("cachesync.publisher")


class Change(NamedTuple):
    """One change to publish with :meth:`Publisher.send_many`."""

    op: Op
    ns: str
    keys: tuple[str, ...]
    version: int | None = None
    value: Any = None
    ts: float | None = None
    tags: tuple[str, ...] = ()


def _check(change: Change) -> None:
    if change.op is not Op.HEARTBEAT and not change.ns:
        raise ValueError("ns must be a non-empty namespace name")
    for key in (*change.keys, *change.tags):
        if not isinstance(key, str):
            raise TypeError(f"event keys and tags must be strings, got {type(key).__name__}")
    if change.op in (Op.UPSERT, Op.DELETE) and not change.keys and not change.tags:
        raise ValueError(f"a {change.op.value} event needs at least one key or tag")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return " ".join(lines[:3]) if lines else type(exc).__name__


class _Turn:
    """A channel's lock, and how many hold it or wait for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


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
    them to the outbox (:mod:`cachesync.owner.outbox`) instead.

    ``schema_version`` is the event schema written (default: the current one). During a
    rolling deploy, write the previous one (``schema_version=1``) until every consumer runs a
    version that reads the current one: consumers read both. Schema 1 has no ``tags``, so a
    change that names tags goes out as a flush of its namespace (coarser, never stale).
    """

    def __init__(
        self,
        url: str = "memory://",
        channel: str = DEFAULT_CHANNEL,
        *,
        heartbeat_interval: float | None = 1.0,
        publish_timeout: float = 10.0,
        signing_key: bytes | str | None = None,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
        schema_version: int = SCHEMA_VERSION,
    ) -> None:
        if schema_version not in READABLE_SCHEMAS:
            raise ValueError(
                f"schema_version must be one of {list(READABLE_SCHEMAS)}, got {schema_version!r}"
            )
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
        self.schema_version = schema_version
        # One lock per channel sent on: a seq is taken and sent in order under its channel's
        # lock, so a channel that hangs (its shard failing over) holds back no other's changes
        # or heartbeats.
        self._locks: dict[str, _Turn] = {}
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
        """Stop the heartbeat and close the connection. Safe to call twice; never raises what
        the heartbeat or the broker failed with (that was logged when it happened)."""
        self._running = False
        task, self._heartbeat_task = self._heartbeat_task, None
        current = asyncio.current_task()
        cancelling = current.cancelling() if current is not None else 0
        cancelled = False
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                # The heartbeat's own end, or stop() itself cancelled while it waited (a
                # shutdown with a deadline): that one is passed on, once the connection closed.
                cancelled = current is not None and current.cancelling() > cancelling
            except Exception:
                pass
        try:
            await self._transport.close()
        except Exception as exc:
            log.warning("closing the publisher's connection failed", extra={"error": str(exc)})
        if cancelled:
            raise asyncio.CancelledError

    # -- the API ---------------------------------------------------------------------------

    async def changed(
        self,
        ns: str,
        *keys: str,
        version: int | None = None,
        value: Any = None,
        ts: float | None = None,
        tags: Iterable[str] = (),
    ) -> ChangeEvent:
        """Announce that ``keys`` of namespace ``ns`` changed.

        Without ``value`` consumers drop their entries (and fetch again on the next read); with
        ``value`` (one key only) consumers in refresh mode store it in place of a fetch.
        ``version`` is the owner's row version: consumers never let an older version replace a
        newer one. ``ts`` is the commit time (defaults to now). ``tags`` drop, in every
        consumer, every entry of ``ns`` that was filled with one of those tags (see
        ``cached(tags=...)``); keys may then be left out.
        """
        if value is not None and len(keys) != 1:
            raise ValueError("an event that carries a value must name exactly one key")
        if isinstance(tags, str):
            raise TypeError("tags must be a list of strings, not one str: pass [tag]")
        return await self.send(
            Op.UPSERT, ns, keys, version=version, value=value, ts=ts, tags=tuple(tags)
        )

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
        tags: tuple[str, ...] = (),
    ) -> ChangeEvent:
        """Publish one event with the next ``seq``; the building block of the methods above."""
        (event,) = await self.send_many([Change(op, ns, tuple(keys), version, value, ts, tags)])
        return event

    async def send_many(self, changes: Sequence[Change]) -> list[ChangeEvent]:
        """Publish several events with consecutive ``seq`` s, in order, batching the broker
        round trips where the transport can."""
        events: list[ChangeEvent] = []
        await self._send_changes(changes, events)
        return events

    async def send_batch(self, changes: Sequence[Change]) -> int:
        """As :meth:`send_many`, without building the event objects: the path of the change
        feeds and the outbox relay, where a batch holds thousands of changes. The bytes sent
        are the same; a change that is not a valid event raises the same ValueError, and
        nothing is published. Returns how many events went out."""
        await self._send_changes(changes, None)
        return len(changes)

    async def _send_changes(
        self, changes: Sequence[Change], events: list[ChangeEvent] | None
    ) -> None:
        """Publish ``changes``; ``events``, when given, gets the models of what was sent."""
        if not self._running:
            raise StateError("Publisher is not started: use 'async with Publisher(...)'")
        for change in changes:
            _check(change)
        if not changes:
            return
        wires = [self._transport.channel_for(self.channel, change.ns) for change in changes]
        # Every event is built and encoded before any seq is taken or any lock waited for: a
        # change that cannot go out must not leave a gap that makes every consumer flush.
        # Seqs run per channel (a transport may spread namespaces over channels: see
        # Transport.channel_for); they are taken only once every event is valid.
        bases: dict[str, int] = {}  # each channel's last seq when the batch was built
        by_wire: dict[str, list[int]] = {}  # each channel's changes (offsets), in order
        payloads: list[bytes] = []
        for offset, (change, wire) in enumerate(zip(changes, wires, strict=True)):
            offsets = by_wire.get(wire)
            if offsets is None:
                offsets = by_wire[wire] = []
                bases[wire] = self._last_seq(wire)
            try:
                seq = bases[wire] + len(offsets) + 1
                payload, event = self._build(seq, change, events is not None)
            except (ValueError, TypeError) as exc:
                if events is not None:
                    events.clear()
                raise ValueError(
                    f"change {offset} of {len(changes)} ({change.op} {change.ns!r}) is not "
                    f"a valid event: {_first_line(exc)}; nothing was published"
                ) from None
            offsets.append(offset)
            payloads.append(payload)
            if events is not None and event is not None:
                events.append(event)
        if len(by_wire) == 1:
            await self._send_on(
                wires[0], bases[wires[0]], by_wire[wires[0]], changes, payloads, events
            )
            return
        # Each channel on its own, all at once, under its own lock: a channel that hangs (its
        # shard failing over) holds back neither the batch's other channels nor, while the
        # batch waits for it or sends on it, their other changes and heartbeats. A batch never
        # holds one channel's lock while it waits for another's.
        results = await asyncio.gather(
            *(
                self._send_on(wire, bases[wire], offsets, changes, payloads, events)
                for wire, offsets in by_wire.items()
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _build(self, seq: int, change: Change, model: bool) -> tuple[bytes, ChangeEvent | None]:
        """The bytes of the event for ``change`` with ``seq``, and its model if ``model``."""
        payload = None if model else self._plain_payload(seq, change)
        if payload is not None:
            return payload, None
        event = self._event(seq, change)
        return self._payload(event), event

    async def _send_on(
        self,
        wire: str,
        base: int,
        offsets: list[int],
        changes: Sequence[Change],
        payloads: list[bytes],
        events: list[ChangeEvent] | None,
    ) -> None:
        """Take the seqs of ``changes[offsets]`` on ``wire`` and send them there, in order,
        under that channel's lock. They were built with the seqs that followed ``base``: if
        others were taken meanwhile, they are built again with the next ones (and so are
        those without a ``ts`` if the lock was waited for: their ``ts`` is when it is held)."""
        async with self._holding(wire) as waited:
            last = self._last_seq(wire)
            if last != base or (waited and any(changes[o].ts is None for o in offsets)):
                for seq, offset in enumerate(offsets, start=last + 1):
                    payload, event = self._build(seq, changes[offset], events is not None)
                    payloads[offset] = payload
                    if events is not None and event is not None:
                        events[offset] = event
            seq = last + len(offsets)
            if wire == self.channel:
                self.seq = seq
            else:
                self._wire_ns.setdefault(wire, changes[offsets[0]].ns)
                self._wire_seqs[wire] = seq
            await self._send_payloads(wire, [payloads[offset] for offset in offsets])

    @contextlib.asynccontextmanager
    async def _holding(self, wire: str, timeout: float | None = None) -> AsyncIterator[bool]:
        """Hold ``wire``'s lock (waiting ``timeout`` seconds at most, then TimeoutError);
        yields whether it had to wait. A lock is kept only while someone holds or waits for
        it, so there are never more than there are sends under way."""
        entry = self._locks.get(wire)
        if entry is None:
            entry = self._locks[wire] = _Turn()
        entry.users += 1
        try:
            waited = entry.lock.locked()
            if timeout is None:
                await entry.lock.acquire()
            else:
                async with asyncio.timeout(timeout):
                    await entry.lock.acquire()
            try:
                yield waited
            finally:
                entry.lock.release()
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[wire]

    def _last_seq(self, wire: str) -> int:
        return self.seq if wire == self.channel else self._wire_seqs.get(wire, 0)

    def stats(self) -> dict[str, Any]:
        """Counters and state, as every long-running object gives them: events ``published``,
        ``publish_errors`` (publishes that raised), and ``source``, ``channel``, ``seq``."""
        return {
            "published": self.published,
            "publish_errors": self.publish_errors,
            "source": self.source,
            "channel": self.channel,
            "seq": self.seq,
        }

    def state(self) -> PublisherState:
        """Source id, channel, last seq and heartbeat interval (for ``/cachesync/state``)."""
        return PublisherState(
            source=self.source,
            channel=self.channel,
            seq=self.seq,
            heartbeat_interval=self.heartbeat_interval,
            schema_version=self.schema_version,
        )

    # -- internals -------------------------------------------------------------------------

    def _event(self, seq: int, change: Change) -> ChangeEvent:
        ts = self._clock() if change.ts is None else change.ts
        if change.tags and self.schema_version < 2:
            # Schema 1 cannot name tags: drop the whole namespace instead (coarser, still safe).
            return ChangeEvent(
                v=self.schema_version, source=self.source, seq=seq, ns=change.ns,
                op=Op.FLUSH, ts=ts,
            )  # fmt: skip
        return ChangeEvent(
            v=self.schema_version,
            source=self.source,
            seq=seq,
            ns=change.ns,
            op=change.op,
            keys=tuple(change.keys),
            version=change.version,
            value=change.value,
            ts=ts,
            tags=tuple(change.tags) if change.tags else None,
        )

    def _plain_payload(self, seq: int, change: Change) -> bytes | None:
        """The bytes of the event for ``change`` without building the model, when every field
        is of the plain kind the model takes as it is (``_check`` has seen the keys); None
        otherwise, and the model decides (and gives the error)."""
        ts = self._clock() if change.ts is None else change.ts
        version = change.version
        keys = change.keys
        if (
            self._signer is not None
            or type(change.op) is not Op
            or type(change.ns) is not str
            or len(change.ns) > MAX_NS_LENGTH
            or type(keys) is not tuple
            or not (version is None or type(version) is int)
            or type(ts) is not float
            or not math.isfinite(ts)
            or (change.tags and (self.schema_version < 2 or type(change.tags) is not tuple))
        ):
            return None
        try:
            return encode_fields(
                v=self.schema_version,
                source=self.source,
                seq=seq,
                ns=change.ns,
                op=change.op,
                keys=keys,
                version=version,
                value=change.value,
                ts=ts,
                tags=change.tags or None,
            )
        except Exception:  # a value pydantic cannot write: the model says why
            return None

    def _payload(self, event: ChangeEvent) -> bytes:
        """The bytes sent for ``event``: signed when the publisher has a key."""
        signer = self._signer
        return (signer.sign(event) if signer is not None else event).encode()

    async def _send_payloads(
        self, channel: str, payloads: Sequence[bytes], *, timeout: float | None = None
    ) -> None:
        """Publish ``payloads`` on ``channel``, together and in order, retrying (and
        reconnecting) for ``timeout`` seconds at most, ``publish_timeout`` by default, from the
        first attempt to the last: a stalled network or a broker that is down makes it raise
        TransportError in time, and the next call tries again on a fresh connection, however
        long the outage lasts."""
        budget = self.publish_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        backoff: Backoff | None = None  # made on the first failure: seeding it reads urandom
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    if len(payloads) == 1:
                        await self._transport.publish(channel, payloads[0])
                    else:
                        await self._transport.publish_many(channel, payloads)
                self.published += len(payloads)
                return
            except (TransportError, TimeoutError) as exc:
                self.publish_errors += 1
                if backoff is None:
                    backoff = Backoff(initial=0.05, maximum=1.0)
                delay = backoff.next_delay()
                # A broker client's message may quote the URL, password and all.
                detail = scrub(str(exc), self.url) or "no answer from the broker"
                if loop.time() + delay >= deadline:
                    raise TransportError(
                        f"could not publish to {redact_url(self.url)} within "
                        f"{budget:g}s: {detail}; is the broker running?"
                    ) from exc
                log.warning(
                    "publish failed, reconnecting",
                    extra={"url": redact_url(self.url), "error": detail, "retry_in": delay},
                )
                await asyncio.sleep(delay)
                # connect() is a no-op on a live connection and waits for a dead one to come
                # back; bounded by what is left of the deadline.
                with contextlib.suppress(TransportError, TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await self._transport.connect()

    def _beating(self) -> list[tuple[str, str]]:
        """``(channel, namespace)`` for every channel this publisher sends on: each gets a
        heartbeat with its last seq (on a channel of its own, a heartbeat names a namespace of
        that channel)."""
        beats = []
        if self._transport.channel_for(self.channel, "") == self.channel or not self._wire_seqs:
            beats.append((self.channel, ""))
        beats += [(wire, self._wire_ns[wire]) for wire in self._wire_seqs]
        return beats

    async def _beat(self, wire: str, ns: str, interval: float) -> None:
        """One heartbeat on ``wire``, with the seq last sent there: under that channel's lock,
        waited for an interval at most (a beat that cannot go out is skipped, not queued)."""
        async with self._holding(wire, timeout=max(interval, 0.001)):
            beat = ChangeEvent(
                v=self.schema_version,
                source=self.source,
                seq=self._last_seq(wire),
                ns=ns,
                op=Op.HEARTBEAT,
                value={"interval": interval},
                ts=self._clock(),
            )
            await self._send_payloads(
                wire, [self._payload(beat)], timeout=min(interval, self.publish_timeout)
            )

    async def _heartbeat_loop(self, interval: float) -> None:
        # The first beat goes out at once, so consumers learn of a restarted owner (a new
        # source) right away rather than at its first change. A beat that cannot go out within
        # the interval is skipped, not queued; whatever fails, the loop goes on until stop().
        # Each channel's beat runs on its own, every interval, whatever the others do: one
        # that fails or hangs (its shard failing over, a client library that lost the
        # cancellation of its timeout) holds back neither the beats of the others (consumers
        # would miss them) nor, for more than an interval, the changes waiting; while its beat
        # is still under way, that channel's next ones are skipped.
        beating: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                failures: list[BaseException] = []
                for wire, task in list(beating.items()):
                    if task.done():
                        del beating[wire]
                        if not task.cancelled() and (failure := task.exception()) is not None:
                            failures.append(failure)
                try:
                    for wire, ns in self._beating():
                        if wire not in beating:
                            beating[wire] = asyncio.create_task(
                                self._beat(wire, ns, interval), name="cachesync-heartbeat"
                            )
                except Exception as exc:
                    failures.append(exc)
                if failures:
                    self._beat_failed(failures[0])
                await asyncio.sleep(interval)
        finally:
            for task in beating.values():
                task.cancel()
            if beating:
                await asyncio.gather(*beating.values(), return_exceptions=True)

    def _beat_failed(self, exc: BaseException) -> None:
        if isinstance(exc, TransportError | TimeoutError):
            error = scrub(str(exc), self.url) or type(exc).__name__
            log.warning("heartbeat not sent", extra={"error": error})
        else:
            log.error("heartbeat failed; the next one goes out as usual", exc_info=exc)


class BlockingPublisher:
    """:class:`Publisher` for sync code (Django views, management commands, scripts): the same
    events, ``seq`` and heartbeats, from a :class:`Publisher` that runs on a daemon thread's
    event loop. Each call blocks until the broker took the event (or raises
    :class:`~cachesync.errors.TransportError` after ``publish_timeout``).

    It starts on first use in each process, so one made before a fork (gunicorn
    ``--preload``) works in every worker: each worker publishes as a source of its own.
    ``with BlockingPublisher(...) as pub:`` or :meth:`stop` stops it; so does the
    interpreter's exit. Thread-safe. Like every long-running object of cachesync it has
    ``start``/``stop`` (blocking ones, for sync code) and a context manager; ``close`` is
    ``stop`` under the name sync libraries use.
    """

    def __init__(
        self,
        url: str = "memory://",
        channel: str = DEFAULT_CHANNEL,
        *,
        heartbeat_interval: float | None = 1.0,
        publish_timeout: float = 10.0,
        signing_key: bytes | str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._options: dict[str, Any] = dict(
            url=url,
            channel=channel,
            heartbeat_interval=heartbeat_interval,
            publish_timeout=publish_timeout,
            signing_key=signing_key,
            clock=clock,
        )
        Publisher(**self._options)  # checks the arguments now, not at the first publish
        self.url = url
        self.channel = channel
        self.publish_timeout = publish_timeout
        self._lock = threading.Lock()
        self._thread: LoopThread | None = None
        self._publisher: Publisher | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect now rather than at the first publish (a no-op when already started)."""
        self._running()

    def stop(self) -> None:
        """Stop the heartbeat, close the connection and the thread. Idempotent."""
        with self._lock:
            self._closed = True
            thread, publisher = self._thread, self._publisher
            self._thread = self._publisher = None
        if thread is None or publisher is None or not thread.alive:
            return
        with contextlib.suppress(Exception):
            thread.call(publisher.stop(), timeout=self.publish_timeout)
        thread.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    close = stop

    @property
    def publisher(self) -> Publisher:
        """The :class:`Publisher` behind this one (its ``source``, ``seq`` and counters)."""
        return self._running()[1]

    def stats(self) -> dict[str, Any]:
        """:meth:`Publisher.stats` of the publisher behind this one (starting it if needed)."""
        return self.publisher.stats()

    # -- the API ---------------------------------------------------------------------------

    def changed(
        self,
        ns: str,
        *keys: str,
        version: int | None = None,
        value: Any = None,
        ts: float | None = None,
    ) -> ChangeEvent:
        """As :meth:`Publisher.changed`, blocking."""
        thread, publisher = self._running()
        return self._call(thread, publisher.changed(ns, *keys, version=version, value=value, ts=ts))

    def deleted(
        self, ns: str, *keys: str, version: int | None = None, ts: float | None = None
    ) -> ChangeEvent:
        """As :meth:`Publisher.deleted`, blocking."""
        thread, publisher = self._running()
        return self._call(thread, publisher.deleted(ns, *keys, version=version, ts=ts))

    def flush(self, ns: str, ts: float | None = None) -> ChangeEvent:
        """As :meth:`Publisher.flush`, blocking."""
        thread, publisher = self._running()
        return self._call(thread, publisher.flush(ns, ts=ts))

    def send_many(self, changes: Sequence[Change]) -> list[ChangeEvent]:
        """As :meth:`Publisher.send_many`, blocking."""
        thread, publisher = self._running()
        return self._call(thread, publisher.send_many(changes))

    # -- internals -------------------------------------------------------------------------

    def _call(self, thread: LoopThread, coro: Coroutine[Any, Any, T]) -> T:
        # A little past publish_timeout: the publisher raises its own TransportError first.
        return thread.call(coro, timeout=self.publish_timeout + 5.0)

    def _running(self) -> tuple[LoopThread, Publisher]:
        with self._lock:
            if self._closed:
                raise StateError("this BlockingPublisher is closed; create a new one")
            thread, publisher = self._thread, self._publisher
            if thread is not None and publisher is not None and thread.alive:
                return thread, publisher
            if thread is not None and thread.pid != os.getpid():
                # Made in a parent process: its loop and connection are the parent's and must
                # stay untouched here (see cachesync.runner).
                INHERITED.extend((thread, publisher))
            thread = LoopThread("cachesync-publisher")
            thread.start()
            publisher = Publisher(**self._options)
            try:
                thread.call(publisher.start(), timeout=self.publish_timeout + 5.0)
            except BaseException:
                thread.stop()
                raise
            self._thread, self._publisher = thread, publisher
            return thread, publisher
