"""The ``@cached`` wrappers and their options: a hot path that is a dict lookup and two
comparisons, and a miss path with single-flight, stale-while-revalidate and stale-if-error.

Each decorated function gets a :class:`~cachesync.cache.LocalCache` of its own, built from its
:class:`CacheOptions`; the wrappers read and fill it and know nothing of events or transports.
:meth:`CacheSync.cached <cachesync.client.CacheSync.cached>` returns a :class:`Decorator`,
which builds them and registers each cache with the client under its namespace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import inspect
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, ParamSpec, Protocol, TypedDict, TypeVar, overload

from .cache import BulkFill, Entry, Flight, Generation, LocalCache, check_settings
from .keys import KeyBuilder, KeyFunc
from .tags import TagFunc

__all__ = [
    "CacheOptions",
    "CacheOptionsDict",
    "CachedCoroutine",
    "CachedFunction",
    "Decorator",
    "KeyFunc",
    "Mode",
    "wrap_async",
    "wrap_sync",
]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

Mode = Literal["invalidate", "refresh"]
VersionOf = Callable[[Any], int | None]
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Future[None]"]
Submit = Callable[[Callable[[], None]], "concurrent.futures.Future[None] | None"]
FetchObserver = Callable[[str, float, bool], None]
"""Told (namespace, seconds, ok) after each fetch from the owner."""

log = logging.getLogger("cachesync.cache")

_NO_ARG: Any = object()  # "no positional argument" in the wrappers' signatures
F = TypeVar("F", bound=Callable[..., Any])


class _Handle(Protocol):
    """What the cached function carries besides being callable."""

    cache: LocalCache
    namespace: str

    def key_for(self, *args: Any, **kwargs: Any) -> str: ...
    def invalidate(self, *args: Any, **kwargs: Any) -> bool: ...
    def cache_clear(self) -> None: ...
    def prime(self, key: str, value: Any, *, version: int | None = None) -> bool: ...
    def bulk(self) -> contextlib.AbstractContextManager[BulkFill]: ...
    def invalidate_tags(self, *tags: str) -> int: ...


class CachedCoroutine(_Handle, Protocol, Generic[P, R_co]):
    """A coroutine function wrapped by ``@sync.cached``."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R_co]: ...


class CachedFunction(_Handle, Protocol, Generic[P, R_co]):
    """A plain function wrapped by ``@sync.cached``; callable from any thread."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...


def _attach(
    wrapper: Any,
    fn: Callable[..., Any],
    cache: LocalCache,
    make_key: KeyBuilder,
) -> None:
    # An object with __call__ (an HttpFetcher) lends its name and doc, not its attributes.
    updated = ("__dict__",) if inspect.isfunction(fn) else ()
    functools.update_wrapper(wrapper, fn, updated=updated)
    wrapper.cache = cache
    wrapper.namespace = cache.name

    def key_for(*args: Any, **kwargs: Any) -> str:
        """The cache key these arguments map to."""
        return make_key(args, kwargs)

    def invalidate(*args: Any, **kwargs: Any) -> bool:
        """Drop the entry for these arguments in this instance; True if one was dropped."""
        return cache.invalidate(make_key(args, kwargs))

    def cache_clear() -> None:
        """Drop every entry of this namespace in this instance."""
        cache.clear()

    def prime(key: str, value: Any, *, version: int | None = None) -> bool:
        """Store ``value`` (current now) for ``key`` as if fetched; False if refused."""
        return cache.prime(key, value, version)

    @contextlib.contextmanager
    def bulk() -> Iterator[BulkFill]:
        """Reserve a warm-up: read values inside the block, ``put`` them; keys changed by an
        event meanwhile are refused, so a warm-up never stores a value older than an event."""
        reservation = cache.begin_bulk()
        try:
            yield reservation
        finally:
            reservation.close()

    def invalidate_tags(*tags: str) -> int:
        """Drop the entries stored with one of ``tags`` in this instance (and void the fills
        in flight); how many were dropped."""
        return cache.invalidate_tags(tags)

    wrapper.invalidate_tags = invalidate_tags
    wrapper.key_for = key_for
    wrapper.invalidate = invalidate
    wrapper.cache_clear = cache_clear
    wrapper.prime = prime
    wrapper.bulk = bulk


def _all_args(first: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return args if first is _NO_ARG else (first, *args)


def _named_like(wrapper: F, name: str) -> F | None:
    """``wrapper`` (whose one parameter is ``arg``) with that parameter renamed ``name``, so
    ``get(code="USD")`` works as well as ``get("USD")``; None if the name is taken.

    The one-parameter wrapper is the hot path's fastest shape: no ``*args``/``**kwargs`` to
    pack on every call. Renaming a parameter in the code object changes nothing else.
    """
    code = wrapper.__code__
    if name in code.co_varnames or name in code.co_freevars or not name.isidentifier():
        return None
    wrapper.__code__ = code.replace(co_varnames=(name, *code.co_varnames[1:]))
    return wrapper


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` gives a coroutine: an ``async def`` function, a partial of one,
    or an object whose ``__call__`` is ``async def`` (such as :class:`~cachesync.HttpFetcher`)."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's, not the instance's
    return not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


def wrap_async(
    fn: Callable[P, Awaitable[R]],
    cache: LocalCache,
    *,
    key_func: KeyFunc | None,
    version_of: VersionOf | None,
    spawn: Spawn,
    observe: FetchObserver | None = None,
) -> CachedCoroutine[P, R]:
    """Wrap coroutine function ``fn`` so that its results are cached in ``cache``."""
    data = cache.data
    get = data.get
    hit_clock = cache.hit_clock
    stats = cache.stats
    flights = cache.flights
    make_key = KeyBuilder(fn, key_func)
    hits = 0
    cache.hit_counters.append(lambda: hits)
    serving: Generation | None = None

    def set_serving(gen: Generation) -> None:
        nonlocal serving
        serving = gen

    cache.watch_serving(set_serving)

    async def fill(flight: Flight, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        waiter: asyncio.Future[Any] = flight.waiter
        stats.fetches += 1
        started = time.perf_counter()
        try:
            value = await fn(*args, **kwargs)
        except Exception as exc:
            stale = _fetch_failed(cache, flight, exc, observe, started)
            if stale is None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(stale.value)
            return
        except BaseException:
            cache.abandon_fill(flight)
            waiter.cancel()
            raise
        if observe is not None:
            observe(cache.name, time.perf_counter() - started, True)
        cache.finish_fill(flight, value, _version(version_of, value, cache))
        waiter.set_result(value)

    def start_fill(key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Flight:
        flight = cache.begin_fill(key, _fill_waiter())
        task = spawn(fill(flight, args, kwargs))
        # A fill cancelled before it ran (stop(), a loop shutting down) never reaches its own
        # cleanup: its readers would wait forever, and so would every later reader of the key.
        task.add_done_callback(functools.partial(_fill_ended, cache, flight))
        return flight

    async def miss(key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        nonlocal hits
        fresh = cache.get_fresh(key)
        if fresh is not None:  # the hit clock was paused (idle): the real clock says fresh
            hit_clock.wake()
            hits += 1
            fresh.used = True
            return fresh.value  # type: ignore[no-any-return]
        stale = cache.get_stale(key, for_error=False)
        if stale is not None:
            stats.stale_serves += 1
            if key not in flights:
                start_fill(key, args, kwargs)
            return stale.value  # type: ignore[no-any-return]
        cache.count_misses(1)
        flight = flights.get(key)
        if flight is None or flight.waiter.get_loop() is not asyncio.get_running_loop():
            # A fill on another event loop (another thread's, or one that has ended) cannot
            # be awaited from this one: fetch here.
            flight = start_fill(key, args, kwargs)
        return await asyncio.shield(flight.waiter)

    # The hit path: a dict lookup, a comparison with the hit clock's reading (an attribute,
    # not a clock call: see cachesync.clock) and one with the generation served. An entry
    # that is expired, distrusted, flushed or a tombstone fails one of them.
    async def lookup(key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        nonlocal hits
        entry = get(key)
        if entry is not None and entry.expires > hit_clock.now and entry.gen is serving:
            hits += 1
            entry.used = True  # for eviction's second chance (see Entry)
            return entry.value
        return await miss(key, args, kwargs)

    async def wrapper(first: Any = _NO_ARG, /, *args: Any, **kwargs: Any) -> Any:
        all_args = _all_args(first, args)
        return await lookup(make_key(all_args, kwargs), all_args, kwargs)

    async def lone(arg: Any) -> Any:
        # lookup() inlined for a str argument, the common case
        nonlocal hits
        if type(arg) is str:
            entry = get(arg)
            if entry is not None and entry.expires > hit_clock.now and entry.gen is serving:
                hits += 1
                entry.used = True  # for eviction's second chance (see Entry)
                return entry.value
            return await miss(arg, (arg,), {})
        return await lookup(make_key((arg,), {}), (arg,), {})

    lone_name = make_key.lone_name
    chosen = (_named_like(lone, lone_name) if lone_name else None) or wrapper
    _attach(chosen, fn, cache, make_key)
    return chosen  # type: ignore[return-value]


def wrap_sync(
    fn: Callable[P, R],
    cache: LocalCache,
    *,
    key_func: KeyFunc | None,
    version_of: VersionOf | None,
    submit: Submit,
    observe: FetchObserver | None = None,
) -> CachedFunction[P, R]:
    """Wrap plain function ``fn`` so that its results are cached in ``cache``.

    Safe to call from any thread: concurrent misses of one key wait for one fetch.
    """
    data = cache.data
    get = data.get
    clock = cache.clock
    stats = cache.stats
    lock = cache.lock
    flights = cache.thread_flights
    make_key = KeyBuilder(fn, key_func)
    hits = 0
    cache.hit_counters.append(lambda: hits)
    serving: Generation | None = None

    def set_serving(gen: Generation) -> None:
        nonlocal serving
        serving = gen

    cache.watch_serving(set_serving)

    def fill(flight: Flight, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        waiter: concurrent.futures.Future[Any] = flight.waiter
        stats.fetches += 1
        started = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
            _refuse_awaitable(fn, value)
        except Exception as exc:
            stale = _fetch_failed(cache, flight, exc, observe, started)
            if stale is None:
                waiter.set_exception(exc)
                raise
            waiter.set_result(stale.value)
            return stale.value
        except BaseException as exc:
            cache.abandon_fill(flight)
            waiter.set_exception(exc)
            raise
        if observe is not None:
            observe(cache.name, time.perf_counter() - started, True)
        cache.finish_fill(flight, value, _version(version_of, value, cache))
        waiter.set_result(value)
        return value

    def background_fill(flight: Flight, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            fill(flight, args, kwargs)
        except Exception:
            pass  # counted in fetch_errors; the stale value was served

    def miss(key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        stale = cache.get_stale(key, for_error=False)
        if stale is not None:
            stats.stale_serves += 1
            with lock:
                leader = key not in flights
                if leader:
                    flight = cache.begin_fill(key, concurrent.futures.Future(), threaded=True)
            if leader:
                try:
                    job = submit(functools.partial(background_fill, flight, args, kwargs))
                    if job is not None:
                        # Cancelled before it ran (the client stopped): release any reader
                        # that joined it once the stale window was over.
                        job.add_done_callback(functools.partial(_job_ended, cache, flight))
                except BaseException:
                    # Not refreshed after all (the executor is shut down): forget the flight,
                    # which nobody would ever finish, and still serve the stale value.
                    cache.abandon_fill(flight)
                    flight.waiter.cancel()
                    log.warning("could not start a background refresh", exc_info=True)
            return stale.value
        cache.count_misses(1)
        with lock:
            existing = flights.get(key)
            if existing is None:
                flight = cache.begin_fill(key, concurrent.futures.Future(), threaded=True)
        if existing is not None:
            return existing.waiter.result()
        return fill(flight, args, kwargs)

    # As in wrap_async, but with a clock call: a thread may run while no event loop ticks.
    def lookup(key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        nonlocal hits
        entry = get(key)
        if entry is not None and entry.expires > clock() and entry.gen is serving:
            hits += 1
            entry.used = True  # for eviction's second chance (see Entry)
            return entry.value
        return miss(key, args, kwargs)

    def wrapper(first: Any = _NO_ARG, /, *args: Any, **kwargs: Any) -> Any:
        all_args = _all_args(first, args)
        return lookup(make_key(all_args, kwargs), all_args, kwargs)

    def lone(arg: Any) -> Any:
        nonlocal hits
        if type(arg) is str:
            entry = get(arg)
            if entry is not None and entry.expires > clock() and entry.gen is serving:
                hits += 1
                entry.used = True  # for eviction's second chance (see Entry)
                return entry.value
            return miss(arg, (arg,), {})
        return lookup(make_key((arg,), {}), (arg,), {})

    lone_name = make_key.lone_name
    chosen = (_named_like(lone, lone_name) if lone_name else None) or wrapper
    _attach(chosen, fn, cache, make_key)
    return chosen  # type: ignore[return-value]


def _name_of(fn: object) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}" if module else name


def _refuse_awaitable(fn: Callable[..., Any], result: object) -> None:
    """Raise TypeError if plain function ``fn`` returned an awaitable (closed first)."""
    if not inspect.isawaitable(result):
        return
    close = getattr(result, "close", None)
    if callable(close):
        close()  # no "coroutine was never awaited" warning on top of the error
    raise TypeError(
        f"{getattr(fn, '__qualname__', fn)!r} returned an awaitable, so it cannot "
        "be cached as a plain function: make it 'async def'"
    )


def _fetch_failed(
    cache: LocalCache,
    flight: Flight,
    exc: Exception,
    observe: FetchObserver | None,
    started: float,
) -> Entry | None:
    """Count a failed fetch and forget its flight; the entry to serve instead, if
    ``stale_if_error`` allows one (guarantee 7)."""
    cache.stats.fetch_errors += 1
    if observe is not None:
        observe(cache.name, time.perf_counter() - started, False)
    cache.abandon_fill(flight)
    stale = cache.get_stale(flight.key, for_error=True)
    if stale is not None:
        cache.stats.stale_serves += 1
        log.warning(
            "serving a stale value: the fetch failed",
            extra={"ns": cache.name, "key": flight.key, "error": repr(exc)},
        )
    return stale


def _version(version_of: VersionOf | None, value: Any, cache: LocalCache) -> int | None:
    if version_of is None or value is None:
        return None
    try:
        version = version_of(value)
    except Exception:
        cache.stats.errors += 1
        log.warning("version_of() failed; storing without a version", exc_info=True)
        return None
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        # Versions are compared with the events' (ints): anything else would raise there, in
        # the listener, at every event for the key.
        cache.stats.errors += 1
        log.warning(
            "version_of() returned %r, not an int; storing without a version",
            version,
            extra={"ns": cache.name},
        )
        return None
    return version


def _fill_ended(cache: LocalCache, flight: Flight, task: asyncio.Future[None]) -> None:
    waiter: asyncio.Future[Any] = flight.waiter
    if not waiter.done():  # the fill never ran: release its readers
        cache.abandon_fill(flight)
        waiter.cancel()


def _job_ended(cache: LocalCache, flight: Flight, job: concurrent.futures.Future[None]) -> None:
    if job.cancelled() and not flight.waiter.done():
        cache.abandon_fill(flight)
        flight.waiter.cancel()


def _fill_waiter() -> asyncio.Future[Any]:
    """The future a fill on the running loop gives its readers."""
    waiter = asyncio.get_running_loop().create_future()
    # A fill nobody waits for (a background revalidation) must not leave its exception
    # unretrieved.
    waiter.add_done_callback(_retrieve)
    return waiter


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """The options of one cached function, checked once when ``cached()`` is called.

    This is their one definition: :meth:`CacheSync.cached <cachesync.client.CacheSync.cached>`
    and :meth:`~cachesync.client.CacheSync.cached_many` take them as keywords
    (``sync.cached("ns", ttl=60, mode="refresh")``), typed by :class:`CacheOptionsDict`.

    - ``ttl``: seconds an entry lives. Only the safety net: events keep entries coherent.
    - ``maxsize``: bound on the entries (10,000 by default; unbounded when ``max_bytes`` is
      set). The least recently used is evicted (approximately: an entry read since it was
      stored gets a second chance).
    - ``key``: builds the key from the arguments yourself (by default see
      :mod:`cachesync.keys`); it must be the key the owner's events name.
    - ``mode``: ``"invalidate"`` drops the entry on an event; ``"refresh"`` stores the value
      the event carries (through ``from_event``) instead.
    - ``stale_while_revalidate``: seconds an expired value is still served while one fetch
      refreshes it.
    - ``stale_if_error``: seconds the last value is served when the fetch fails.
    - ``negative_ttl``: a result of ``None`` means "absent" and is cached this many seconds if
      set (not at all otherwise).
    - ``jitter``: spreads TTLs by this fraction, so entries do not all expire together.
    - ``from_event``: turns the value an event carries into the cached value (refresh mode).
    - ``version_of``: ``version_of(value)`` gives the owner's version of a fetched value, so an
      older fetch or event never replaces a newer one.
    - ``tags``: ``tags(value)`` (or ``tags(key, value)``) tags each entry stored, for tag
      invalidations (``Publisher.changed(ns, tags=[...])``, ``fn.invalidate_tags(...)``).
    - ``max_bytes``: bounds the entries' weight instead of their count (the least recently
      used, approximately, evicted).
    - ``weigher``: ``weigher(value)`` weighs an entry against ``max_bytes`` (by default a
      cheap estimate).

    Adding an option: a field here and in :class:`CacheOptionsDict` (a test checks they
    match), its use where the wrappers or the client read it, a test.
    """

    ttl: float = 3600.0
    maxsize: int | None = None
    key: KeyFunc | None = None
    mode: Mode = "invalidate"
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    negative_ttl: float | None = None
    jitter: float = 0.1
    from_event: Callable[[Any], Any] | None = None
    version_of: VersionOf | None = None
    tags: TagFunc | None = None
    max_bytes: int | None = None
    weigher: Callable[[Any], int] | None = None

    @property
    def max_entries(self) -> int:
        """``maxsize``, or its default: 10,000 entries, unbounded when ``max_bytes`` is set."""
        if self.maxsize is not None:
            return self.maxsize
        return 10_000 if self.max_bytes is None else sys.maxsize

    def __post_init__(self) -> None:
        if self.mode not in ("invalidate", "refresh"):
            raise ValueError(f"mode must be 'invalidate' or 'refresh', got {self.mode!r}")
        for name in ("key", "from_event", "version_of", "tags", "weigher"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name}= must be a function")
            if value is not None and is_async_callable(value):
                # Called where nothing awaits (the listener, the hit path): the value cached
                # would be a coroutine object.
                raise TypeError(f"{name}= must be a plain function, not 'async def'")
        if self.weigher is not None and self.max_bytes is None:
            raise ValueError("weigher= needs max_bytes=: it weighs entries against that budget")
        check_settings(
            ttl=self.ttl,
            maxsize=self.max_entries,
            max_bytes=self.max_bytes,
            negative_ttl=self.negative_ttl,
            jitter=self.jitter,
            stale_while_revalidate=self.stale_while_revalidate,
            stale_if_error=self.stale_if_error,
        )


class CacheOptionsDict(TypedDict, total=False):
    """The fields of :class:`CacheOptions` as keywords, each optional: the type of
    ``**options`` in ``cached()``. Kept identical to :class:`CacheOptions` (a test checks the
    names and types); what each does is in :class:`CacheOptions`."""

    ttl: float
    maxsize: int | None
    key: KeyFunc | None
    mode: Mode
    stale_while_revalidate: float
    stale_if_error: float
    negative_ttl: float | None
    jitter: float
    from_event: Callable[[Any], Any] | None
    version_of: VersionOf | None
    tags: TagFunc | None
    max_bytes: int | None
    weigher: Callable[[Any], int] | None


def cache_options(caller: str, options: CacheOptionsDict) -> CacheOptions:
    """``CacheOptions(**options)``, with an error naming ``caller`` and the valid options
    for a keyword that is not one."""
    unknown = options.keys() - {field.name for field in dataclasses.fields(CacheOptions)}
    if unknown:
        valid = ", ".join(field.name for field in dataclasses.fields(CacheOptions))
        raise TypeError(f"{caller}() got unknown options {sorted(unknown)}; the options: {valid}")
    return CacheOptions(**options)


WrapFetch = Callable[[Callable[..., Any], str], Callable[..., Any]]
"""Wraps a fetch function of a namespace (tracing's spans); never on the hit path."""

MakeCache = Callable[[str, CacheOptions], LocalCache]
"""Builds the cache of one function and registers it under its namespace (the client's)."""


class Decorator:
    """What :meth:`CacheSync.cached <cachesync.client.CacheSync.cached>` returns: wraps a
    coroutine function (or an object with an ``async def __call__``) or a plain function.
    Each function it wraps gets a cache of its own in namespace ``ns``."""

    def __init__(
        self,
        ns: str,
        options: CacheOptions,
        *,
        make_cache: MakeCache,
        spawn: Spawn,
        submit: Submit,
        observe: FetchObserver | None = None,
        on_async: Callable[[Callable[..., Any]], None] | None = None,
        wrap_fetch: WrapFetch | None = None,
    ) -> None:
        self.ns = ns
        self.options = options
        self._make_cache = make_cache
        self._spawn = spawn
        self._submit = submit
        self._observe = observe
        self._on_async = on_async
        self._wrap_fetch = wrap_fetch

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> CachedCoroutine[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> CachedFunction[P, R]: ...

    def __call__(self, fn: Callable[..., Any]) -> Any:
        if isinstance(fn, staticmethod | classmethod):
            # Wrapped, it would be a plain function in the class body: called on an instance
            # it would get the instance as its first argument.
            kind = type(fn).__name__
            raise TypeError(f"put @{kind} above @cached(), not below it")
        if not callable(fn):
            raise TypeError(f"cached() decorates functions, got {type(fn).__name__}")
        options = self.options
        # Checked before the cache is registered: a key that cannot be built fails here.
        KeyBuilder(fn, options.key)
        is_async = is_async_callable(fn)
        if is_async and self._on_async is not None:
            self._on_async(fn)  # may refuse it (a client running on a background thread)
        cache = self._make_cache(self.ns, options)
        cache.function = _name_of(fn)
        if self._wrap_fetch is not None:  # tracing: a span around each owner call
            fn = self._wrap_fetch(fn, self.ns)
        if is_async:
            return wrap_async(
                fn,
                cache,
                key_func=options.key,
                version_of=options.version_of,
                spawn=self._spawn,
                observe=self._observe,
            )
        return wrap_sync(
            fn,
            cache,
            key_func=options.key,
            version_of=options.version_of,
            submit=self._submit,
            observe=self._observe,
        )
