"""CacheSync: where the transport and the caches meet.

The client owns one transport subscription and the namespaces (one
:class:`~cachesync.cache.LocalCache` each) of the functions it decorates. Its listener decodes
each message, tracks every publisher's ``source`` and ``seq``, applies the event to its
namespace, and treats anything that may have lost an event as a reason to stop trusting the
cache:

- a **reconnect** (the subscription broke): reads go through to the owner while it is down,
  and the caches are flushed when it is back (unless the transport replayed what was missed);
  where the transport subscribes again to part of the channels by itself (``redis+cluster://``:
  a shard failed over), only the namespaces of those channels, the same way;
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
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Unpack

from .backoff import Backoff
from .batch import ManyDecorator
from .cache import LocalCache
from .cached import CacheOptions, CacheOptionsDict, Decorator, Mode, cache_options
from .clock import ExactClock, HitClock, LoopClock
from .errors import EventDecodeError, StateError, TransportError, UnknownSchemaError
from .events import (
    DEFAULT_CHANNEL,
    MAX_EVENT_BYTES,
    MAX_NS_LENGTH,
    ChangeEvent,
    EventView,
    Op,
    decode_event,
)
from .explain import MAX_RECENT_KEYS, History, as_dict, describe_entry, key_event, summary, trim
from .lifecycle import Service
from .logutil import RateLimitedLogger
from .observe import Observer
from .runner import BackgroundRunner
from .signing import Signer
from .tracing import Tracing
from .transports.base import Transport, from_url, redact_url

__all__ = ["CacheSync", "ClientState", "ClientStats", "Decorator"]

log = logging.getLogger("cachesync.client")

# The heartbeat timeout, in heartbeat intervals, when the client derives it from the
# interval a publisher announces.
HEARTBEAT_TIMEOUT_INTERVALS = 3.0

# How many publishers the client tracks at once (each owner instance start is a new one),
# and how many silent ones it remembers, so that their events replayed later are known.
MAX_SOURCES = 1024
MAX_RETIRED_SOURCES = 4096

# How many functions caching under one namespace are taken for a decoration per instance or
# per call (each is kept for the client's life): the client says so, then at each doubling.
MANY_FUNCTIONS = 128

# Plain strings: comparing an event's op to these is cheaper than to enum members.
_UPSERT = Op.UPSERT.value
_FLUSH = Op.FLUSH.value
_HEARTBEAT = Op.HEARTBEAT.value


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
    duplicates: int = 0
    apply_failures: int = 0
    unknown_schema: int = 0
    partial_reconnects: int = 0
    """Parts of the subscription (a shard's channels) lost and live again: their namespaces
    were flushed, the others kept."""

    def snapshot(self) -> dict[str, Any]:
        """The counters as a dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class _Source:
    seq: int
    last_seen: float
    timeout: float | None
    last_ts: float | None = None  # the owner's ts of its last message heard (for explain)


@dataclass(slots=True)
class _Member:
    """One cached function of a namespace: its cache and how events reach it."""

    cache: LocalCache
    mode: Mode
    from_event: Callable[[Any], Any] | None


@dataclass(slots=True)
class _Namespace:
    """The owner's entity type: every function cached under it, and the sources whose events
    named it (a namespace whose sources all fell silent is not served: guarantee 5)."""

    name: str
    members: list[_Member]
    heard: set[str]
    silent: bool = False
    # key -> (the last event applied to it, or its summary; monotonic time), for explain()
    recent: dict[str, tuple[Any, float]] = field(default_factory=dict)


class _GuardedObserver:
    """The user's observer, whose failures are logged, never raised: a metrics hook must not
    stop the listener, leave a cache trusted, or leave a fetch's waiters waiting."""

    __slots__ = ("_observer", "_warn")

    def __init__(self, observer: Observer, warn: RateLimitedLogger) -> None:
        self._observer = observer
        self._warn = warn

    def fetch_done(self, ns: str, seconds: float, ok: bool) -> None:
        try:
            self._observer.fetch_done(ns, seconds, ok)
        except Exception:
            self._failed("fetch_done")

    def event_applied(self, ns: str, op: str, lag_seconds: float) -> None:
        try:
            self._observer.event_applied(ns, op, lag_seconds)
        except Exception:
            self._failed("event_applied")

    def lost_events(self, cause: str) -> None:
        try:
            self._observer.lost_events(cause)
        except Exception:
            self._failed("lost_events")

    def listener_state(self, up: bool) -> None:
        try:
            self._observer.listener_state(up)
        except Exception:
            self._failed("listener_state")

    def _failed(self, hook: str) -> None:
        self._warn.exception(f"observer.{hook}", "the observer's %s() failed; ignored", hook)


class _ApplyFailed(Exception):
    """Applying an event failed: the caches are distrusted and the listener restarts."""


class _Unsigned(Exception):
    """An event without a valid signature, where signatures are required (counted, logged)."""


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
    clock every cache uses (inject a fake one in tests). ``tracing=True`` (the global
    OpenTelemetry tracer provider) or ``tracing=provider`` makes spans for owner fetches,
    events and flushes (see :mod:`cachesync.tracing`; the ``otel`` extra); hits make none.
    """

    def __init__(
        self,
        url: str = "memory://",
        channel: str = DEFAULT_CHANNEL,
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
        tracing: Any = False,
    ) -> None:
        if not channel:
            raise ValueError("channel must be a non-empty string")
        if not connect_timeout > 0:  # NaN too: it would leave every attempt unbounded
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
        # The transport drops what is larger, where it can before buffering it whole.
        self._transport.max_payload = max_event_bytes
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
        self._retired: dict[str, int] = {}  # silent sources -> their last seq
        self._wires: list[str] = []  # the channels subscribed to
        self._down: set[str] = set()  # of those, the ones the transport is subscribing again to
        # Sources of such channels, whose next gap flushes that channel's namespaces only.
        self._rebased: set[str] = set()
        # Whether the transport gives namespaces channels of their own (Redis Cluster).
        self._spread = type(self._transport).channel_for is not Transport.channel_for
        self._suspect_on_ready = False  # an apply failed: flush when the listener is back
        self._stats = ClientStats()
        self._state = ClientState.UNOPENED
        self._ready = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        # The last event applied (its owner's ts) and our clock when it was.
        self._last_event: EventView | None = None
        self._last_applied = 0.0
        self._warn = RateLimitedLogger(log, per_seconds=10.0)
        self._observer = _GuardedObserver(observer, self._warn) if observer is not None else None
        self._stats_sources: dict[str, Callable[[], dict[str, Any]]] = {}
        self._runner: BackgroundRunner | None = None
        self._async_functions: list[str] = []
        self._history = History()
        self._tracing: Tracing | None = None
        if tracing is True:
            self._tracing = Tracing()
        elif tracing is not False and tracing is not None:
            self._tracing = Tracing(tracing)  # a TracerProvider

    # -- decorating ------------------------------------------------------------------------

    def cached(self, ns: str, **options: Unpack[CacheOptionsDict]) -> Decorator:
        """Cache the results of a fetch function in namespace ``ns`` of this instance.

        ``ns`` is the owner's entity type, as its events name it. Several functions may cache
        under one namespace: each keeps its own entries and options, and an event for
        ``(ns, key)`` reaches all of them. The key is built from the arguments (see
        :mod:`cachesync.keys`; ``key=`` to build it yourself) and must be the key the owner's
        events name. ``options`` are the fields of :class:`~cachesync.cached.CacheOptions`,
        which says what each does (``ttl``, ``maxsize``, ``key``, ``mode``,
        ``stale_while_revalidate``, ``stale_if_error``, ``negative_ttl``, ``jitter``,
        ``from_event``, ``version_of``, ``tags``, ``max_bytes``, ``weigher``); an unknown one
        raises ``TypeError``. Works on coroutine functions and on plain functions (callable
        from any thread).
        """
        self._check_ns(ns)
        checked = cache_options("cached", options)
        return Decorator(
            ns,
            checked,
            make_cache=self._make_cache,
            spawn=self._spawn,
            submit=self._submit,
            observe=self._observer.fetch_done if self._observer is not None else None,
            on_async=self._decorated_async,
            wrap_fetch=self._tracing.wrap_fetch if self._tracing is not None else None,
        )

    def cached_many(
        self, ns: str, *, shares: Any = None, **options: Unpack[CacheOptionsDict]
    ) -> ManyDecorator:
        """Cache a *batch* fetch function in namespace ``ns``: it takes a list of keys and
        returns a mapping of the keys found to their values (async or plain).

        A call serves the keys cached here and makes one owner call for the others; a key
        another read is fetching is joined, not fetched again; a key an event invalidates
        while the batch is on its way is not stored; a key the mapping leaves out is absent
        (cached for ``negative_ttl`` if set, and left out of the result).
        ``shares=get_one`` (a ``@sync.cached`` function of ``ns``) makes batch and single
        reads share its entries, options and single-flight; otherwise ``options`` are those
        of :meth:`cached` (``key`` excepted: batch keys are the owner's keys), and the wrapped
        function gets ``.one(key)``, a single-key reader over the same entries.
        """
        self._check_ns(ns)
        if shares is not None and options:
            raise ValueError(
                "cached_many(shares=...) uses the options of the shared function; "
                f"remove {sorted(options)}"
            )
        if "key" in options:
            raise ValueError("cached_many() takes no key=: batch keys are the owner's keys")
        return ManyDecorator(
            ns,
            cache_options("cached_many", options),
            shares=shares,
            make_cache=self._make_cache,
            spawn=self._spawn,
            submit=self._submit,
            observe=self._observer.fetch_done if self._observer is not None else None,
            wrap_fetch=self._tracing.wrap_fetch if self._tracing is not None else None,
        )

    @staticmethod
    def _check_ns(ns: object) -> None:
        if not isinstance(ns, str) or not ns:
            raise ValueError(f"ns must be a non-empty namespace name, got {ns!r}")
        if len(ns) > MAX_NS_LENGTH:
            raise ValueError(
                f"ns must be at most {MAX_NS_LENGTH} characters (what an event can name)"
            )

    def _make_cache(self, ns: str, options: CacheOptions) -> LocalCache:
        cache = LocalCache(
            ns,
            ttl=options.ttl,
            maxsize=options.max_entries,
            negative_ttl=options.negative_ttl,
            jitter=options.jitter,
            stale_while_revalidate=options.stale_while_revalidate,
            stale_if_error=options.stale_if_error,
            clock=self._clock,
            hit_clock=self._hit_clock,
            rng=self._rng,
            tags=options.tags,
            max_bytes=options.max_bytes,
            weigher=options.weigher,
        )
        namespace = self._namespaces.get(ns)
        if namespace is None:
            namespace = self._namespaces[ns] = _Namespace(ns, [], set())
            if self._retired and not self._sources:
                # Registered while every source is silent: not fed, so not served either.
                self._silence(namespace, ns)
        wire = self._transport.channel_for(self.channel, ns) if self._spread else self.channel
        serving = wire in self._wires and wire not in self._down
        if self._stats.listener_up and not namespace.silent and serving:
            cache.trust()
        namespace.members.append(_Member(cache, options.mode, options.from_event))
        listener = self._listener
        if listener is not None and not listener.done() and wire not in self._wires:
            # A namespace of a channel of its own, added while listening: subscribe again, to
            # its channel too (its cache is not trusted until then). cached() may run on
            # another thread than the listener's loop.
            loop = listener.get_loop()
            if _running_loop() is loop:
                self._resubscribe()
            else:
                loop.call_soon_threadsafe(self._resubscribe)
        count = len(namespace.members)
        if count >= MANY_FUNCTIONS and count & (count - 1) == 0:  # at 128, 256, 512...
            log.warning(
                "%d functions cache under namespace %r: each keeps its cache, and receives "
                "every event, for the client's life. Decorate once (at import, or on the "
                "class), not per instance or per call",
                count,
                ns,
                extra={"ns": ns},
            )
        return cache

    def caches(self, ns: str) -> list[LocalCache]:
        """The caches of every function cached under ``ns`` (KeyError if there is none)."""
        return [member.cache for member in self._namespaces[ns].members]

    def namespace(self, ns: str) -> LocalCache:
        """The cache of the one function cached under ``ns`` (KeyError if there is none;
        ValueError if there are several: use :meth:`caches`, or ``fn.cache``)."""
        caches = self.caches(ns)
        if len(caches) > 1:
            raise ValueError(
                f"{len(caches)} functions cache under {ns!r}: use sync.caches({ns!r}) or the "
                "cached function's .cache"
            )
        return caches[0]

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

    # -- running without an event loop (see cachesync.runner) -------------------------------

    def start_in_background(self, *, wait: bool = True) -> None:
        """Run the listener on a daemon thread with an event loop of its own, for sync apps
        (Django, Flask, gunicorn workers); return once the subscription is live, or raise
        :class:`~cachesync.errors.TransportError` after ``connect_timeout`` (``wait=False``:
        return at once and keep trying to connect, reads going to the owner meanwhile).
        Cached plain functions then work from any thread. In a process forked from this one
        the caches are distrusted at once and the listener starts again there. Stopped by
        :meth:`stop_background` or at interpreter exit."""
        if self._runner is None:
            self._runner = BackgroundRunner(self)
        self._runner.start(wait=wait)

    def stop_background(self, timeout: float = 5.0) -> None:
        """Stop what :meth:`start_in_background` started. Idempotent."""
        if self._runner is not None:
            self._runner.stop(timeout)

    @contextlib.contextmanager
    def running(self) -> Iterator[CacheSync]:
        """``with sync.running():`` runs the listener in the background for the block."""
        self.start_in_background()
        try:
            yield self
        finally:
            self.stop_background()

    def _decorated_async(self, fn: Callable[..., Any]) -> None:
        name = getattr(fn, "__qualname__", repr(fn))
        self._async_functions.append(name)
        if self._runner is not None and self._runner.running:
            self._check_thread_safe()

    def _check_thread_safe(self) -> None:
        """Refuse async functions where the listener's loop is a background thread's."""
        if self._async_functions:
            names = ", ".join(self._async_functions)
            raise StateError(
                f"cached async def functions ({names}) cannot run with start_in_background(): "
                "the listener's event loop is private to its thread. Cache plain (def) "
                "functions for threads, or run the client with 'async with sync:' in your "
                "event loop"
            )

    def _fork_locks(self) -> list[Any]:
        """The locks a fork must not catch held (see cachesync.runner)."""
        return [m.cache.lock for ns in self._namespaces.values() for m in ns.members]

    def _reopen(self) -> Transport:
        """Forget the listener, tasks and connection (in a forked child they belong to the
        parent's threads and sockets), distrust every cache and return to UNOPENED so that
        start() may run again. Returns the transport it replaced, which the caller keeps
        unclosed when it came from a parent process."""
        self._set_down()
        self._hit_clock.close()
        old = self._transport
        self._transport = from_url(old.url, connect_timeout=self.connect_timeout)
        self._state = ClientState.UNOPENED
        self._ready = asyncio.Event()
        self._tasks = set()
        self._listener = self._watchdog = None
        self._executor = None
        self._sources.clear()
        self._retired.clear()
        self._rebased.clear()
        self._backoff.reset()
        return old

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: ``{"listener": {...}, "namespaces": {ns: {...}}}``, with per-namespace
        hits, misses, fetches, stale serves, events, errors and more, and the listener's
        messages, bad events, gaps, source changes, reconnects and heartbeat misses."""
        namespaces = {}
        for name, ns in self._namespaces.items():
            totals: dict[str, int] = {}
            for member in ns.members:
                for counter, value in member.cache.snapshot().items():
                    totals[counter] = totals.get(counter, 0) + value
            totals["functions"] = len(ns.members)
            totals["silent"] = int(ns.silent)
            namespaces[name] = totals
        listener = self._stats.snapshot()
        listener["silent_namespaces"] = sum(ns.silent for ns in self._namespaces.values())
        listener["last_event_lag"] = None
        listener["oversized_dropped"] = self._transport.oversized  # by the transport
        if self._last_event is not None:  # the owner's commit to our apply, of the last event
            ts, applied = self._last_event.ts, self._last_applied
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

    def stats_source(self, name: str) -> Callable[[], dict[str, Any]] | None:
        """What :meth:`add_stats` was given under ``name`` (None if nothing), so add-ons of
        one kind can share one section."""
        return self._stats_sources.get(name)

    def invalidate_tags(self, ns: str, *tags: str) -> int:
        """Drop, in this instance, every entry of ``ns`` stored with one of ``tags`` (every
        function cached under it); how many were dropped. Other instances hear of it through
        ``Publisher.changed(ns, tags=[...])``."""
        return sum(member.cache.invalidate_tags(tags) for member in self._namespaces[ns].members)

    def explain(self, ns: str, key: str) -> dict[str, Any]:
        """Why ``key`` of ``ns`` is (or is not) served from this instance's cache.

        For each function cached under ``ns``: whether the key is cached and fresh, its state
        (fresh, expired, invalidated, flushed, not cached, not served), version, age, time
        to expiry, and whether a fill is in flight. For the key: the last event applied to it
        (op, source, seq, version, when). For the namespace: the last flush and its cause
        (flush event, tags, gap, reconnect, new source, heartbeat, silence, schema), whether
        it is served at all, and every source heard with its last seq, liveness and lag.
        A JSON-ready dict (KeyError if nothing is cached under ``ns`` here).
        """
        namespace = self._namespaces[ns]
        wall = self._wall_clock()
        now = self._clock()
        sources = []
        for name in sorted(namespace.heard):
            live = self._sources.get(name)
            lag = None
            if live is not None and live.last_ts is not None:
                # The owner's commit time of its last message to when it was heard here.
                lag = wall - (now - live.last_seen) - live.last_ts
            info: dict[str, Any] = {
                "source": name,
                "live": live is not None,
                "last_seq": live.seq if live is not None else self._retired.get(name),
                "last_heard_ago": round(now - live.last_seen, 6) if live is not None else None,
                "heartbeat_timeout": live.timeout if live is not None else None,
                "lag": round(lag, 6) if lag is not None else None,
            }
            sources.append(info)
        return {
            "ns": ns,
            "key": key,
            "listener_up": self._stats.listener_up,
            "namespace_silent": namespace.silent,
            "functions": [describe_entry(m.cache, key) for m in namespace.members],
            "last_event": as_dict(key_event(namespace.recent.get(key), wall, now), wall),
            "last_flush": as_dict(self._history.last_flush(ns), wall),
            "sources": sources,
        }

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
                    messages = self._transport.subscribe(self.channel, self._on_ready)
                else:
                    messages = self._transport.subscribe_many(
                        self._wires, self._on_ready, self._on_channels
                    )
                try:
                    async for payload in messages:
                        self.handle_message(payload)
                finally:
                    aclose = getattr(messages, "aclose", None)
                    if aclose is not None:
                        with contextlib.suppress(Exception):
                            await aclose()
                raise TransportError("the subscription ended")
            except Exception as exc:
                # TransportError is the expected case; anything else is a bug, and the
                # listener must outlive it all the same (reads go to the owner meanwhile).
                if isinstance(exc, _ApplyFailed):
                    self._stats.reconnects += 1
                elif not isinstance(exc, TransportError):
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

    def _on_ready(self, resumed: bool) -> None:
        if self._suspect_on_ready:
            resumed, self._suspect_on_ready = False, False
        if not resumed:
            self._flushed(None, "reconnect", self._wall_clock(), channel=self.channel)
        if self._down:
            self._expect_again(self._down)
            self._down.clear()
        for ns in self._namespaces.values():
            for member in ns.members:
                if not resumed:
                    member.cache.suspect_all()
                if not ns.silent:
                    member.cache.trust()
        if resumed:
            self._stats.replays += 1
        self._stats.listener_up = True
        if self._observer is not None:
            self._observer.listener_state(True)
        self._backoff.reset()
        self._ready.set()
        log.info("cachesync listener up", extra={"resumed": resumed, "channel": self.channel})

    def _on_channels(self, channels: Sequence[str], live: bool) -> None:
        """Part of the subscription broke (``live`` false) or is live again: the namespaces of
        those channels are not served in between, and are flushed when they are back; the
        others are untouched (see ``Transport.subscribe_many``)."""
        wires = set(channels)
        names = [
            n for n in self._namespaces if self._transport.channel_for(self.channel, n) in wires
        ]
        if not live:
            self._down |= wires
            for name in names:
                for member in self._namespaces[name].members:
                    member.cache.distrust()
            # Their sources there keep their last seqs (a replay is still a duplicate); their
            # silence meanwhile is no loss (see check_sources), and a gap when they speak
            # again flushes these namespaces only.
            self._rebased.update(
                s for s in (*self._sources, *self._retired) if s.partition("@")[2] in wires
            )
            log.warning(
                "cachesync lost part of its subscription; reads of its namespaces go to the "
                "owner until it is back",
                extra={"channels": sorted(wires), "namespaces": names},
            )
            return
        self._down -= wires
        self._stats.partial_reconnects += 1
        self._expect_again(wires)
        wall = self._wall_clock()
        for name in names:
            ns = self._namespaces[name]
            self._flushed(
                name, "reconnect", wall, channel=self._transport.channel_for(self.channel, name)
            )
            for member in ns.members:
                member.cache.suspect_all()
                if self._stats.listener_up and not ns.silent:
                    member.cache.trust()
        if self._observer is not None:
            self._observer.lost_events("reconnect")
        log.info(
            "cachesync subscribed again", extra={"channels": sorted(wires), "namespaces": names}
        )

    def _expect_again(self, wires: set[str]) -> None:
        """The channels ``wires`` are live again: their sources, not expected while they were
        down, are from now on (silent past their timeout, they are missed)."""
        now = self._clock()
        for name, source in self._sources.items():
            if name.partition("@")[2] in wires:
                source.last_seen = now

    def _lost_on(self, name: str, event: EventView) -> None:
        """A gap in the seqs of source ``name`` on a channel subscribed again (see
        :meth:`_on_channels`): events on it may have been lost after it was back, and only
        there. Flush the namespaces of that channel."""
        wire = name.partition("@")[2]
        wall = self._wall_clock()
        for ns_name, ns in self._namespaces.items():
            if self._transport.channel_for(self.channel, ns_name) == wire:
                self._flushed(ns_name, "gap", wall, source=event.source, seq=event.seq)
                for member in ns.members:
                    member.cache.suspect_all()
        if self._observer is not None:
            self._observer.lost_events("gap")
        log.warning(
            "cachesync flushed the namespaces of %s: events may have been lost (gap)",
            wire,
            extra={"cause": "gap", "channel": wire, "source": event.source, "seq": event.seq},
        )

    def _set_down(self) -> None:
        # Distrust first: nothing after this may leave the caches trusted.
        for ns in self._namespaces.values():
            for member in ns.members:
                member.cache.distrust()
        was_up = self._stats.listener_up
        self._stats.listener_up = False
        self._ready.clear()
        if was_up and self._observer is not None:
            self._observer.listener_state(False)

    def handle_message(self, payload: bytes) -> None:
        """Decode one message and apply it.

        Bad input (a malformed, oversized, unsigned or duplicate event) is counted and logged,
        never raised. If applying a valid event fails, the caches are distrusted at once and
        an exception tells the listener to restart (which flushes them when it is back).
        """
        stats = self._stats
        stats.messages += 1
        now = self._clock()
        try:
            if self._signer is None:
                event: EventView = decode_event(payload, max_bytes=self._max_event_bytes)
            else:
                event = self._signed(payload, self._signer)
        except UnknownSchemaError as exc:
            stats.unknown_schema += 1
            self._unknown_schema(exc)
            return
        except EventDecodeError as exc:
            stats.bad_events += 1
            self._warn.warning("bad_event", "dropped a malformed event: %s", exc)
            return
        except _Unsigned:
            return
        if self._tracing is not None:
            with self._tracing.event(event, self._wall_clock() - event.ts):
                self._handle(event, now)
        else:
            self._handle(event, now)

    def _signed(self, payload: bytes, signer: Signer) -> ChangeEvent:
        """The event, decoded by the model (a signature covers its encoding), if signed with
        one of the keys; counted, logged and refused (:class:`_Unsigned`) otherwise."""
        event = ChangeEvent.decode(payload, max_bytes=self._max_event_bytes)
        try:
            if signer.verify(event):
                return event
            self._warn.warning("bad_signature", "dropped an event with a missing or bad signature")
        except Exception:
            self._warn.exception("bad_signature", "could not verify an event's signature")
        self._stats.bad_signatures += 1
        raise _Unsigned

    def _handle(self, event: EventView, now: float) -> None:
        stats = self._stats
        try:
            op = event.op
            if event.seq == 0 and op != _HEARTBEAT:
                self._numbered_zero(event)
                return
            source = self._source_key(event) if self._spread else event.source
            if not self._track(event, source, now):
                stats.duplicates += 1
                return
            if op == _HEARTBEAT:
                stats.heartbeats += 1
            else:
                self._apply(event, source, now)
        except Exception as exc:
            # Some cache may hold a half-applied event: trust none until the listener is back.
            stats.apply_failures += 1
            self._suspect_on_ready = True
            self._set_down()
            self._warn.exception("apply_failed", "could not apply an event; restarting")
            raise _ApplyFailed(f"could not apply an event: {exc!r}") from exc

    def _unknown_schema(self, exc: UnknownSchemaError) -> None:
        """An event this consumer cannot read (a newer owner's schema) may have changed
        anything in its namespace: flush that namespace, or every one when it cannot be told.
        Its seq is not tracked (it cannot be trusted), so the next event of its source shows
        a gap and flushes again: upgrade consumers before owners write a newer schema."""
        self._warn.warning(
            "unknown_schema",
            "flushed %s: %s; upgrade this consumer",
            f"namespace {exc.ns!r}" if exc.ns is not None else "every namespace",
            exc,
        )
        # Logged above at most once per 10 s: a flood of such events must not flood the log.
        if exc.ns is None:
            flushed = list(self._namespaces.values())
        elif exc.ns in self._namespaces:
            flushed = [self._namespaces[exc.ns]]
        else:
            return
        self._flushed(exc.ns, "schema", self._wall_clock(), version=str(exc.version))
        for ns in flushed:
            for member in ns.members:
                member.cache.suspect_all()
        if self._observer is not None:
            self._observer.lost_events("schema")

    def _apply(self, event: EventView, name: str, now: float) -> None:
        self._last_event = event
        self._last_applied = now
        ns = self._namespaces.get(event.ns)
        if ns is None:
            self._stats.unknown_namespace += 1
            return
        if name not in ns.heard:
            ns.heard.add(name)
            if ns.silent:  # a live source names it: it is fed again
                self._unsilence(ns)
        op = event.op
        if self._observer is not None:
            self._observer.event_applied(event.ns, str(op), self._wall_clock() - event.ts)
        version = event.version
        keys = event.keys
        tags = event.tags
        value = event.value
        if keys:  # for explain(): the last event applied to each key (the event is immutable)
            recent = ns.recent
            record = (event if value is None else summary(event), now)
            for key in keys:
                recent[key] = record
            if len(recent) > MAX_RECENT_KEYS:
                trim(recent, MAX_RECENT_KEYS)
        # A new value for one key: stored by the caches in refresh mode.
        refresh = value is not None and op == _UPSERT and len(keys) == 1
        if tags is None and op != _FLUSH and not refresh:
            # The common event: its keys are dropped from every cache of the namespace. (The
            # loop below does the same after its checks; this saves about 1,000 instructions
            # of the listener's 29,000 per event.)
            for member in ns.members:
                cache = member.cache
                cache.stats.events += 1
                for key in keys:
                    cache.invalidate(key, version)
            return
        if op == _FLUSH or tags is not None:
            self._history.flushed_by(event, self._wall_clock())
        for member in ns.members:
            cache = member.cache
            cache.stats.events += 1
            if tags is not None:
                cache.invalidate_tags(tags)
            if op == _FLUSH:
                cache.clear()
            elif refresh and member.mode == "refresh":
                self._refresh(member, keys[0], value, version)
            else:
                for key in keys:
                    cache.invalidate(key, version)

    def _refresh(self, member: _Member, key: str, value: Any, version: int | None) -> None:
        cache = member.cache
        if member.from_event is not None:
            try:
                value = member.from_event(value)
            except (Exception, asyncio.CancelledError) as exc:
                # A plain function cannot be cancelled: a CancelledError from it is its own
                # bug, and must not end the listener.
                cache.stats.errors += 1
                self._warn.warning("from_event", "from_event() refused an event's value: %s", exc)
                cache.invalidate(key, version)
                return
        cache.apply_value(key, value, version)

    def _track(self, event: EventView, name: str, now: float) -> bool:
        """Follow the sequence of source ``name`` (see :meth:`_source_key`); False for a
        duplicate (seq already applied).

        Anything that may hide a lost event flushes every namespace: a gap in the seqs; the
        first message of a source whose seq is past its start (an event of it may have been
        lost before we heard it); a new source while others are known (a restarted owner
        whose last events may be lost).
        """
        heartbeat = event.op == _HEARTBEAT
        seq = event.seq
        source = self._sources.get(name)
        if source is None:
            retired = self._retired.pop(name, None)
            timeout = self._timeout_for(event) if heartbeat else self.heartbeat_timeout
            last = retired if retired is not None else 0  # a new source starts at seq 0
            if retired is not None and (seq < retired or (seq == retired and not heartbeat)):
                # A silent source's old event, replayed: applied already (or flushed since).
                self._retired[name] = retired
                return False
            if len(self._sources) >= MAX_SOURCES:  # bounded: retire the longest silent one
                oldest = min(self._sources, key=lambda name: self._sources[name].last_seen)
                self._retire(oldest)
            at_start = seq == (last if heartbeat else last + 1)
            # Another publisher (not this one on another channel) may have lost events.
            others = any(_source_id(known) != event.source for known in self._sources)
            self._sources[name] = _Source(seq, now, timeout, event.ts)
            self._heard_again(name)
            if retired is not None:
                if not at_start:
                    self._stats.gaps += 1
                    self._gap(name, event, expected=last + (0 if heartbeat else 1))
                elif self._rebased:
                    self._heard_back(name)
            elif others or not at_start:
                # Quietly when nothing is cached: then it only voids the fetches in flight.
                quiet = not self._had_entries()
                if others and not quiet:
                    self._stats.source_changes += 1
                self._lost("source" if others else "first message", event, quiet=quiet)
            return True
        # A message older than the last applied (a replay, a redelivery) is a duplicate, and
        # no sign of life either: replayed old messages must not keep a dead source trusted.
        if seq < source.seq or (seq == source.seq and not heartbeat):
            if heartbeat:
                self._warn.warning(
                    "old_heartbeat",
                    "dropped a heartbeat of source %s at seq %d, below its last event %d: "
                    "replayed, or a publisher reused a source id (each start must draw a new "
                    "one)",
                    event.source,
                    seq,
                    source.seq,
                )
            return False
        source.last_seen = now
        source.last_ts = event.ts
        if heartbeat:
            timeout = self._timeout_for(event)
            if timeout is not None:
                source.timeout = timeout
            expected = source.seq
        else:
            expected = source.seq + 1
        if seq > expected:
            self._stats.gaps += 1
            self._gap(name, event, expected=expected)
        elif self._rebased:
            self._heard_back(name)
        if seq > source.seq:
            source.seq = seq
        return True

    def _gap(self, name: str, event: EventView, expected: int) -> None:
        """A gap in the seqs of source ``name``: flush every namespace, or only those of its
        channel where that channel was subscribed again (see :meth:`_on_channels`)."""
        if self._rebased and name in self._rebased:
            self._heard_back(name)
            self._lost_on(name, event)
        else:
            self._lost("gap", event, expected=expected)

    def _heard_back(self, name: str) -> None:
        """Source ``name`` was heard in order: once its channel is live, it is followed as
        any other again."""
        if name in self._rebased and name.partition("@")[2] not in self._down:
            self._rebased.discard(name)

    def _numbered_zero(self, event: EventView) -> None:
        """Events are numbered from 1 (seq 0 is a heartbeat's "nothing sent yet"): an event at
        0 would pass for a duplicate of nothing, and applying it would leave its replays
        applicable. Flush instead, so the change it announces is not missed."""
        self._stats.gaps += 1
        self._warn.warning(
            "seq_zero", "an event of source %s has seq 0 (events start at 1)", event.source
        )
        self._lost("bad seq", event)

    def _resubscribe(self) -> None:
        self._set_down()
        self._spawn(self._transport.close())

    def _channels(self) -> list[str]:
        """The channels to subscribe to: ``channel``, or one per namespace on a transport
        that spreads namespaces over shards (see ``Transport.channel_for``)."""
        if not self._spread:
            return [self.channel]
        wires = {self._transport.channel_for(self.channel, ns) for ns in self._namespaces}
        return sorted(wires) if wires and wires != {self.channel} else [self.channel]

    def _source_key(self, event: EventView) -> str:
        """Sequences run per publisher and channel: the name a publisher is tracked under
        (``source@channel`` where the transport gives the namespace a channel of its own)."""
        if not self._spread:
            return event.source
        wire = self._transport.channel_for(self.channel, event.ns) if event.ns else self.channel
        return event.source if wire == self.channel else f"{event.source}@{wire}"

    def _retire(self, name: str) -> None:
        """Forget a live source, remembering its last seq (so its replays are known)."""
        source = self._sources.pop(name)
        self._retired[name] = source.seq
        while len(self._retired) > MAX_RETIRED_SOURCES:
            forgotten = next(iter(self._retired))
            del self._retired[forgotten]
            self._rebased.discard(forgotten)
            for ns in self._namespaces.values():  # what namespaces heard stays bounded too
                ns.heard.discard(forgotten)

    def _heard_again(self, name: str) -> None:
        """A new or retired source speaks: namespaces silent for want of it serve again (they
        were flushed when it fell silent). A source a namespace never heard does not end its
        silence (it may feed other namespaces only: one channel carries every owner's
        events) until it names the namespace (see :meth:`_apply`); a namespace that never
        heard any source is fed by whichever speaks."""
        for ns in self._namespaces.values():
            if ns.silent and (name in ns.heard or not ns.heard):
                self._unsilence(ns)

    def _unsilence(self, ns: _Namespace) -> None:
        ns.silent = False
        down = self._down and self._transport.channel_for(self.channel, ns.name) in self._down
        if self._stats.listener_up and not down:
            for member in ns.members:
                member.cache.trust()

    def _silence(self, ns: _Namespace, name: str) -> None:
        ns.silent = True
        self._flushed(name, "silent", self._wall_clock())
        log.warning(
            "every source of namespace %r is silent; reads go to the owner until one is "
            "heard again",
            name,
            extra={"ns": name},
        )
        for member in ns.members:
            member.cache.distrust()

    def _timeout_for(self, heartbeat: EventView) -> float | None:
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
        self, cause: str, event: EventView | None = None, *, quiet: bool = False, **details: Any
    ) -> None:
        """Events may have been lost: nothing cached may be trusted as fresh any more.
        ``quiet`` when nothing was cached: flights are voided, nothing is reported."""
        for ns in self._namespaces.values():
            for member in ns.members:
                member.cache.suspect_all()
        extra: dict[str, Any] = {"cause": cause, "channel": self.channel, **details}
        if event is not None:
            extra.update(source=event.source, seq=event.seq)
        self._flushed(
            None, cause, self._wall_clock(), **{k: v for k, v in extra.items() if k != "cause"}
        )
        if quiet:
            log.debug("flushed an empty cache (%s)", cause, extra=extra)
            return
        if self._observer is not None:
            self._observer.lost_events(cause)
        log.warning("cachesync flushed: events may have been lost (%s)", cause, extra=extra)

    def _flushed(self, ns: str | None, cause: str, wall: float, **details: Any) -> None:
        """Remember a flush of ``ns`` (None: every namespace) for explain() and tracing."""
        self._history.flush(ns, cause, wall, **details)
        if self._tracing is not None:
            self._tracing.flush(cause, ns, details)

    def _had_entries(self) -> bool:
        """Whether any cache holds an entry (a flush would change something)."""
        return any(len(m.cache) for ns in self._namespaces.values() for m in ns.members)

    async def _watch(self) -> None:
        """Notice silent publishers and stalled connections (missed heartbeats)."""
        while True:
            await asyncio.sleep(self._watch_interval())
            if not self._stats.listener_up:
                continue
            try:
                await self._watch_once()
            except Exception:
                # The watchdog must outlive a bug as the listener does: distrust, go on.
                log.exception("cachesync watchdog failed; the caches are distrusted")
                self._suspect_on_ready = True
                self._set_down()
                with contextlib.suppress(Exception):
                    await self._transport.close()

    async def _watch_once(self) -> None:
        if self.check_sources() and not self._sources_heard_since(self._clock()):
            # Nothing at all arrives: the connection may be stalled without breaking.
            # Closing it makes the listener reconnect.
            log.warning("no event or heartbeat arrives; restarting the connection")
            self._set_down()
            with contextlib.suppress(TransportError):
                await self._transport.close()

    def check_sources(self) -> int:
        """Retire the sources silent past their heartbeat timeout (flushing every namespace),
        and stop serving the namespaces none of whose sources is live (silence is not
        safety); return how many were retired. The watchdog calls it a few times per
        timeout."""
        now = self._clock()
        down = self._down
        silent = [
            name
            for name, src in self._sources.items()
            if src.timeout is not None
            and now - src.last_seen > src.timeout
            and not (down and name.partition("@")[2] in down)  # not expected meanwhile
        ]
        for name in silent:
            self._retire(name)
            self._stats.heartbeat_misses += 1
            self._lost("heartbeat", source=name)
        if silent:
            self._silence_orphans()
        return len(silent)

    def _silence_orphans(self) -> None:
        live = self._sources
        for name, ns in self._namespaces.items():
            if ns.silent:
                continue
            orphaned = not any(source in live for source in ns.heard) if ns.heard else not live
            if orphaned:
                self._silence(ns, name)

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

    def _submit(self, job: Callable[[], None]) -> concurrent.futures.Future[None]:
        with self._executor_lock:  # two threads' first refreshes make one executor
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=4, thread_name_prefix="cachesync-refresh"
                )
            executor = self._executor
        return executor.submit(job)


def _source_id(name: str) -> str:
    """The publisher's id in a tracked source name (``source`` or ``source@channel``)."""
    return name.partition("@")[0]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
