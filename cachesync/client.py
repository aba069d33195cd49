"""CacheSync: where the transport and the caches meet.

The client owns one transport subscription and the namespaces (one
:class:`~cachesync.cache.LocalCache` each) of the functions it decorates. Its listener decodes
each message, tracks every publisher's ``source`` and ``seq``, applies the event to its
namespace, and treats anything that may have lost an event as a reason to stop trusting the
cache:

- a **reconnect** (the subscription broke): reads go through to the owner while it is down,
  and the caches are flushed when it is back (unless the transport replayed what was missed);
- a **sequence gap**, a **new source** (a restarted owner), or a heartbeat that carries a later
  ``seq`` than the last event seen: every namespace is flushed at once;
- a **missed heartbeat**: the source is forgotten and every namespace flushed; when no source
  has been heard for the timeout, the connection itself is restarted (it may be stalled).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import inspect
import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, ParamSpec, TypeVar, overload

from .backoff import Backoff
from .cache import LocalCache
from .clock import ExactClock, HitClock, LoopClock
from .decorator import (
    CachedAsync,
    CachedSync,
    FetchObserver,
    KeyFunc,
    VersionOf,
    wrap_async,
    wrap_sync,
)
from .errors import EventDecodeError, StateError, TransportError
from .events import MAX_EVENT_BYTES, ChangeEvent, Op
from .lifecycle import Service
from .logutil import RateLimitedLogger
from .observe import Observer
from .signing import Signer
from .transports.base import Transport, from_url, redact_url

__all__ = ["CacheSync", "ClientState", "ClientStats", "Decorator"]

P = ParamSpec("P")
R = TypeVar("R")
Mode = Literal["invalidate", "refresh"]

log = logging.getLogger("cachesync.client")

# The heartbeat timeout, in heartbeat intervals, when the client derives it from the
# interval a publisher announces.
HEARTBEAT_TIMEOUT_INTERVALS = 3.0

# How many publishers the client tracks at once (each owner instance start is a new one).
MAX_SOURCES = 1024

# Plain strings: comparing an event's op to these is cheaper than to enum members.
_UPSERT = Op.UPSERT.value
_FLUSH = Op.FLUSH.value
_HEARTBEAT = Op.HEARTBEAT.value


class Decorator:
    """What :meth:`CacheSync.cached` returns: wraps a coroutine function or a plain one."""

    def __init__(
        self,
        cache: LocalCache,
        key: KeyFunc | None,
        version_of: VersionOf | None,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        submit: Callable[[Callable[[], None]], None],
        observe: FetchObserver | None = None,
    ) -> None:
        self.cache = cache
        self._observe = observe
        self._key = key
        self._version_of = version_of
        self._spawn = spawn
        self._submit = submit

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> CachedAsync[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> CachedSync[P, R]: ...

    def __call__(self, fn: Callable[..., Any]) -> Any:
        if inspect.iscoroutinefunction(fn):
            return wrap_async(
                fn,
                self.cache,
                key_func=self._key,
                version_of=self._version_of,
                spawn=self._spawn,
                observe=self._observe,
            )
        if not callable(fn):
            raise TypeError(f"cached() decorates functions, got {type(fn).__name__}")
        return wrap_sync(
            fn,
            self.cache,
            key_func=self._key,
            version_of=self._version_of,
            submit=self._submit,
            observe=self._observe,
        )


class ClientState(enum.Enum):
    """Lifecycle of a :class:`CacheSync`: it opens once and closes once."""

    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(slots=True)
class ClientStats:
    """Counters of the listener (``stats()["listener"]``)."""

    listener_up: bool = False
    messages: int = 0
    heartbeats: int = 0
    bad_events: int = 0
    bad_signatures: int = 0
    unknown_namespace: int = 0
    gaps: int = 0
    source_changes: int = 0
    reconnects: int = 0
    heartbeat_misses: int = 0
    replays: int = 0

    def snapshot(self) -> dict[str, Any]:
        """The counters as a dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class _Source:
    seq: int
    last_seen: float
    timeout: float | None


@dataclass(slots=True)
class _Namespace:
    cache: LocalCache
    mode: Mode
    from_event: Callable[[Any], Any] | None


class CacheSync(Service):
    """Keeps the local caches of this instance coherent with the owner's change events.

    ``url`` picks the transport (``memory://``, ``redis://``, ``redis+stream://``,
    ``amqp://``, and past one node ``redis+sentinel://``, ``redis+cluster://``, ``nats://``,
    ``amqp+stream://``); events arrive on ``channel`` (on ``redis+cluster://``, on a channel
    per namespace derived from it). Decorate fetch functions with :meth:`cached`,
    then run the client with ``async with sync:``, which connects, subscribes and starts the
    listener, and returns once the subscription is live (or raises
    :class:`~cachesync.errors.TransportError` after ``connect_timeout``). Until then, and
    whenever the listener is down, reads go through to the owner.

    ``heartbeat_timeout`` is how long a publisher may stay silent before its events are taken as
    lost; by default it is three times the interval its heartbeats announce. ``signing_keys``
    makes the client accept only events signed with one of them. ``clock`` is the monotonic
    clock every cache uses (inject a fake one in tests).
    """

    def __init__(
        self,
        url: str = "memory://",
        channel: str = "cachesync",
        *,
        transport: Transport | None = None,
        connect_timeout: float = 10.0,
        heartbeat_timeout: float | None = None,
        reconnect_initial: float = 0.05,
        reconnect_max: float = 5.0,
        signing_keys: Sequence[bytes | str] | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        observer: Observer | None = None,
    ) -> None:
        if not channel:
            raise ValueError("channel must be a non-empty string")
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be positive")
        if heartbeat_timeout is not None and heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be positive, or None to derive it")
        self.url = url
        self.channel = channel
        self.connect_timeout = connect_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self._transport = (
            transport if transport is not None else from_url(url, connect_timeout=connect_timeout)
        )
        self._backoff = Backoff(
            initial=reconnect_initial, maximum=reconnect_max, rng=rng or random.Random()
        )
        self._signer = Signer(signing_keys) if signing_keys else None
        self._max_event_bytes = max_event_bytes
        self._clock = clock
        # The async hit path's time (see cachesync.clock): refreshed by the loop for the real
        # clock; an injected clock is read at every hit, so tests see its moves at once.
        self._hit_clock: HitClock = (
            LoopClock(clock) if clock is time.monotonic else ExactClock(clock)
        )
        self._wall_clock = wall_clock
        self._rng = rng
        self._namespaces: dict[str, _Namespace] = {}
        self._sources: dict[str, _Source] = {}
        self._wires: list[str] = []  # the channels subscribed to
        self._stats = ClientStats()
        self._state = ClientState.UNOPENED
        self._ready = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._last_event: tuple[float, float] | None = None  # (owner's ts, our clock at apply)
        self._warn = RateLimitedLogger(log, per_seconds=10.0)
        self._observer = observer
        self._stats_sources: dict[str, Callable[[], dict[str, Any]]] = {}

    # -- decorating ------------------------------------------------------------------------

    def cached(
        self,
        ns: str,
        *,
        ttl: float = 3600.0,
        maxsize: int = 10_000,
        key: KeyFunc | None = None,
        mode: Mode = "invalidate",
        stale_while_revalidate: float = 0.0,
        stale_if_error: float = 0.0,
        negative_ttl: float | None = None,
        jitter: float = 0.1,
        from_event: Callable[[Any], Any] | None = None,
        version_of: VersionOf | None = None,
    ) -> Decorator:
        """Cache the results of a fetch function in namespace ``ns`` of this instance.

        The key is built from the arguments (``key=`` to build it yourself) and must be the key
        the owner's events name. ``ttl`` is only the safety net: events keep entries coherent.
        ``mode="refresh"`` stores the value an event carries (through ``from_event``) instead
        of dropping the entry. A result of ``None`` means "absent" and is cached for
        ``negative_ttl`` seconds if set. ``stale_while_revalidate`` serves an expired value
        while one fetch refreshes it; ``stale_if_error`` serves the last value when the fetch
        fails. ``version_of(value)`` gives the owner's version of a fetched value, so an older
        fetch or event never replaces a newer one. Works on coroutine functions and on plain
        functions (callable from any thread). Several functions may share one namespace if
        they use the same options.
        """
        if mode not in ("invalidate", "refresh"):
            raise ValueError(f"mode must be 'invalidate' or 'refresh', got {mode!r}")
        if key is not None and not callable(key):
            raise TypeError("key= must be a function that returns the cache key as a str")
        if not isinstance(ns, str) or not ns:
            raise ValueError(f"ns must be a non-empty namespace name, got {ns!r}")
        namespace = self._namespaces.get(ns)
        if namespace is None:
            cache = LocalCache(
                ns,
                ttl=ttl,
                maxsize=maxsize,
                negative_ttl=negative_ttl,
                jitter=jitter,
                stale_while_revalidate=stale_while_revalidate,
                stale_if_error=stale_if_error,
                clock=self._clock,
                hit_clock=self._hit_clock,
                rng=self._rng,
            )
            wire = self._transport.channel_for(self.channel, ns)
            cache.trusted = self._stats.listener_up and wire in self._wires
            namespace = _Namespace(cache, mode, from_event)
            self._namespaces[ns] = namespace
            if self._listener is not None and not self._listener.done() and wire not in self._wires:
                # A namespace of its own channel, added while listening: subscribe again,
                # to its channel too (the caches are not trusted until then). cached() may
                # run on another thread than the listener's loop.
                loop = self._listener.get_loop()
                if _running_loop() is loop:
                    self._resubscribe()
                else:
                    loop.call_soon_threadsafe(self._resubscribe)
        return Decorator(
            namespace.cache,
            key,
            version_of,
            spawn=self._spawn,
            submit=self._submit,
            observe=self._observer.fetch_done if self._observer is not None else None,
        )

    def namespace(self, ns: str) -> LocalCache:
        """The cache of namespace ``ns`` (KeyError if nothing was decorated for it)."""
        return self._namespaces[ns].cache

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        """Where this client is in its lifecycle."""
        return self._state

    @property
    def listener_up(self) -> bool:
        """True while the subscription is live and the caches are trusted."""
        return self._stats.listener_up

    async def start(self) -> None:
        """Connect, subscribe and start the listener; return once the subscription is live.

        Raises :class:`~cachesync.errors.TransportError` if the broker cannot be reached within
        ``connect_timeout`` (reads keep going to the owner meanwhile).
        """
        if self._state is ClientState.CLOSED:
            raise StateError("this CacheSync is closed; create a new one")
        if self._state is ClientState.OPEN:
            raise StateError("this CacheSync is already started")
        self._state = ClientState.OPEN
        try:
            await self._transport.connect()
            self._listener = asyncio.create_task(self._listen(), name="cachesync-listener")
            self._watchdog = asyncio.create_task(self._watch(), name="cachesync-watchdog")
            await self.wait_ready(self.connect_timeout)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "cachesync listening",
            extra={"url": redact_url(self.url), "channel": self.channel},
        )

    async def stop(self) -> None:
        """Stop the listener and every background fetch, close the transport. Idempotent."""
        if self._state is ClientState.CLOSED:
            return
        self._state = ClientState.CLOSED
        self._set_down()
        tasks = [t for t in (self._listener, self._watchdog) if t is not None] + list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._transport.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the subscription is live and the caches are trusted.

        Raises :class:`~cachesync.errors.TransportError` after ``timeout`` seconds.
        """
        if self._ready.is_set():
            return
        listener = self._listener
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._ready.wait())]
        if listener is not None:
            waiters.append(listener)
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiters[0].cancel()
        if self._ready.is_set():
            return
        if listener is not None and listener.done() and not listener.cancelled():
            exc = listener.exception()
            if exc is not None:
                raise exc
        raise TransportError(
            f"cachesync could not subscribe to {redact_url(self.url)} within {timeout}s; "
            "is the broker running?"
        )

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: ``{"listener": {...}, "namespaces": {ns: {...}}}``, with per-namespace
        hits, misses, fetches, stale serves, events, errors and more, and the listener's
        messages, bad events, gaps, source changes, reconnects and heartbeat misses."""
        namespaces = {}
        for name, ns in self._namespaces.items():
            namespaces[name] = ns.cache.snapshot()
        listener = self._stats.snapshot()
        listener["last_event_lag"] = None
        if self._last_event is not None:  # the owner's commit to our apply, of the last event
            ts, applied = self._last_event
            listener["last_event_lag"] = self._wall_clock() - (self._clock() - applied) - ts
        result: dict[str, Any] = {"listener": listener, "namespaces": namespaces}
        for name, source in self._stats_sources.items():
            result[name] = source()
        return result

    def add_stats(self, name: str, source: Callable[[], dict[str, Any]]) -> None:
        """Include ``source()`` under ``name`` in :meth:`stats` (for add-ons such as the
        consistency monitor)."""
        if name in ("listener", "namespaces"):
            raise ValueError(f"{name!r} is a reserved stats section")
        self._stats_sources[name] = source

    # -- the listener ----------------------------------------------------------------------

    async def _listen(self) -> None:
        try:
            await self._listen_until_cancelled()
        finally:
            # Cancelled by stop(), or by the loop's shutdown when nobody called stop(): either
            # way no more events are applied, so nothing may be served from the caches.
            self._set_down()
            self._hit_clock.close()

    async def _listen_until_cancelled(self) -> None:
        first = True
        while True:
            try:
                if not first:
                    await self._transport.connect()
                first = False
                self._wires = self._channels()
                if self._wires == [self.channel]:
                    subscription = self._transport.subscribe(self.channel, self._on_ready)
                else:
                    subscription = self._transport.subscribe_many(self._wires, self._on_ready)
                async for payload in subscription:
                    self.handle_message(payload)
                raise TransportError("the subscription ended")
            except Exception as exc:
                # TransportError is the expected case; anything else is a bug, and the
                # listener must outlive it all the same (reads go to the owner meanwhile).
                if not isinstance(exc, TransportError):
                    log.exception("cachesync listener failed; reconnecting")
                if self._stats.listener_up:
                    self._stats.reconnects += 1
                    if self._observer is not None:
                        self._observer.lost_events("reconnect")
                self._set_down()
                delay = self._backoff.next_delay()
                log.warning(
                    "cachesync listener down; reads go to the owner until it reconnects",
                    extra={"url": redact_url(self.url), "error": str(exc), "retry_in": delay},
                )
                await asyncio.sleep(delay)

    def _resubscribe(self) -> None:
        self._set_down()
        self._spawn(self._transport.close())

    def _channels(self) -> list[str]:
        """The channels to subscribe to: ``channel``, or one per namespace on a transport
        that spreads namespaces over shards (see ``Transport.channel_for``)."""
        wires = {self._transport.channel_for(self.channel, ns) for ns in self._namespaces}
        return sorted(wires) if wires and wires != {self.channel} else [self.channel]

    def _source_key(self, event: ChangeEvent) -> str:
        """Sequences run per publisher and channel: the key a publisher is tracked under."""
        wire = self._transport.channel_for(self.channel, event.ns) if event.ns else self.channel
        return event.source if wire == self.channel else f"{event.source}@{wire}"

    def _on_ready(self, resumed: bool) -> None:
        for ns in self._namespaces.values():
            if not resumed:
                ns.cache.suspect_all()
            ns.cache.trust()
        if resumed:
            self._stats.replays += 1
        self._stats.listener_up = True
        if self._observer is not None:
            self._observer.listener_state(True)
        self._backoff.reset()
        self._ready.set()
        log.info("cachesync listener up", extra={"resumed": resumed, "channel": self.channel})

    def _set_down(self) -> None:
        if self._stats.listener_up and self._observer is not None:
            self._observer.listener_state(False)
        self._stats.listener_up = False
        self._ready.clear()
        for ns in self._namespaces.values():
            ns.cache.distrust()

    def handle_message(self, payload: bytes) -> None:
        """Decode one message and apply it. Never raises: bad input is counted and logged."""
        stats = self._stats
        stats.messages += 1
        now = self._clock()
        try:
            event = ChangeEvent.decode(payload, max_bytes=self._max_event_bytes)
        except EventDecodeError as exc:
            stats.bad_events += 1
            self._warn.warning("bad_event", "dropped a malformed event: %s", exc)
            return
        try:
            if self._signer is not None and not self._signer.verify(event):
                stats.bad_signatures += 1
                self._warn.warning(
                    "bad_signature", "dropped an event with a missing or bad signature"
                )
                return
            self._track(event, now)
            if event.op == _HEARTBEAT:
                stats.heartbeats += 1
            else:
                self._apply(event, now)
        except Exception:
            # A bug or an exotic value must not kill the listener; count it and go on.
            stats.bad_events += 1
            self._warn.exception("apply_failed", "could not apply an event")

    def _apply(self, event: ChangeEvent, now: float) -> None:
        self._last_event = (event.ts, now)
        ns = self._namespaces.get(event.ns)
        if ns is None:
            self._stats.unknown_namespace += 1
            return
        op = event.op
        if self._observer is not None:
            self._observer.event_applied(event.ns, str(op), self._wall_clock() - event.ts)
        cache = ns.cache
        cache.stats.events += 1
        if op == _FLUSH:
            cache.clear()
            return
        version = event.version
        keys = event.keys
        if ns.mode == "refresh" and op == _UPSERT and event.value is not None and len(keys) == 1:
            value = event.value
            if ns.from_event is not None:
                try:
                    value = ns.from_event(value)
                except Exception as exc:
                    cache.stats.errors += 1
                    self._warn.warning(
                        "from_event", "from_event() refused an event's value: %s", exc
                    )
                    cache.invalidate(keys[0], version)
                    return
            cache.apply_value(keys[0], value, version)
            return
        for key in keys:
            cache.invalidate(key, version)

    def _track(self, event: ChangeEvent, now: float) -> None:
        key = self._source_key(event)
        source = self._sources.get(key)
        heartbeat = event.op == _HEARTBEAT
        if source is None:
            timeout = self._timeout_for(event) if heartbeat else self.heartbeat_timeout
            # A publisher we have not heard from. If we heard none since the subscription
            # went live, everything cached was fetched after it did, so nothing of this
            # publisher's past can be missing. Otherwise this may be a restarted owner whose
            # last events were lost: flush (quietly when nothing is cached, which then only
            # voids the fetches in flight).
            first = not self._sources
            if len(self._sources) >= MAX_SOURCES:  # bounded: forget the longest silent one
                oldest = min(self._sources, key=lambda name: self._sources[name].last_seen)
                del self._sources[oldest]
            self._sources[key] = _Source(event.seq, now, timeout)
            if first:
                log.debug("first publisher heard", extra={"source": event.source})
            elif not self._had_entries():
                self._lost("source", event, quiet=True)
            else:
                self._stats.source_changes += 1
                self._lost("source", event)
            return
        source.last_seen = now
        if heartbeat:
            timeout = self._timeout_for(event)
            if timeout is not None:
                source.timeout = timeout
            expected = source.seq
        else:
            expected = source.seq + 1
        seq = event.seq
        if seq > expected:
            self._stats.gaps += 1
            self._lost("gap", event, expected=expected)
        if seq > source.seq:
            source.seq = seq

    def _timeout_for(self, heartbeat: ChangeEvent) -> float | None:
        if self.heartbeat_timeout is not None:
            return self.heartbeat_timeout
        if isinstance(heartbeat.value, dict):
            interval = heartbeat.value.get("interval")
            if isinstance(interval, int | float) and interval > 0:
                # Clamped: a forged interval must not make the watchdog spin or sleep forever.
                interval = min(max(float(interval), 0.05), 3600.0)
                return HEARTBEAT_TIMEOUT_INTERVALS * interval
        return None

    def _lost(
        self, cause: str, event: ChangeEvent | None = None, *, quiet: bool = False, **details: Any
    ) -> None:
        """Events may have been lost: nothing cached may be trusted as fresh any more.
        ``quiet`` when nothing was cached: flights are voided, nothing is reported."""
        for ns in self._namespaces.values():
            ns.cache.suspect_all()
        extra: dict[str, Any] = {"cause": cause, "channel": self.channel, **details}
        if event is not None:
            extra.update(source=event.source, seq=event.seq)
        if quiet:
            log.debug("flushed an empty cache (%s)", cause, extra=extra)
            return
        if self._observer is not None:
            self._observer.lost_events(cause)
        log.warning("cachesync flushed: events may have been lost (%s)", cause, extra=extra)

    def _had_entries(self) -> bool:
        """Whether any namespace holds an entry (a flush would change something)."""
        return any(len(ns.cache) for ns in self._namespaces.values())

    async def _watch(self) -> None:
        """Notice silent publishers and stalled connections (missed heartbeats)."""
        while True:
            await asyncio.sleep(self._watch_interval())
            if not self._stats.listener_up:
                continue
            now = self._clock()
            silent = [
                name
                for name, src in self._sources.items()
                if src.timeout is not None and now - src.last_seen > src.timeout
            ]
            for name in silent:
                del self._sources[name]
                self._stats.heartbeat_misses += 1
                self._lost("heartbeat", source=name)
            if silent and not self._sources_heard_since(now):
                # Nothing at all arrives: the connection may be stalled without breaking.
                # Closing it makes the listener reconnect.
                log.warning("no event or heartbeat arrives; restarting the connection")
                self._set_down()
                with contextlib.suppress(TransportError):
                    await self._transport.close()

    def _sources_heard_since(self, now: float) -> bool:
        return any(
            src.timeout is None or now - src.last_seen <= src.timeout
            for src in self._sources.values()
        )

    def _watch_interval(self) -> float:
        timeouts = [s.timeout for s in self._sources.values() if s.timeout is not None]
        if self.heartbeat_timeout is not None:
            timeouts.append(self.heartbeat_timeout)
        return min([0.25, *(t / 4 for t in timeouts)])

    # -- background work -------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _submit(self, job: Callable[[], None]) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix="cachesync-refresh"
            )
        self._executor.submit(job)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
