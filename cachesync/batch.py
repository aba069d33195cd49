"""Batch reads: ``@sync.cached_many`` around a function that takes a list of keys and returns a
mapping, so a call with many keys serves the hits locally and makes one owner call for the rest.

The batch wrappers fill the same :class:`~cachesync.cache.LocalCache` the single-key wrappers
do, through the same reservations (:class:`~cachesync.cache.Flight`), one per missing key:

- **single-flight across batch and single reads**: a key another read (batch or single) is
  already fetching is awaited, not fetched again; a key a batch is fetching is found in the
  cache's flights by a single read, which joins it;
- **a batch fill racing an invalidation** of one of its keys does not store that key (its flight
  was voided), while the other keys of the batch are stored;
- **absent keys**: a key the mapping leaves out (or maps to ``None``) is "absent": cached for
  ``negative_ttl`` if set, and left out of the result;
- ``stale_while_revalidate`` serves expired keys as they are while one background batch
  refreshes them, and ``stale_if_error`` serves the last values when the owner call fails.

A batch function may share the entries of a single-key function (``shares=get_currency``), so
both kinds of read are served from one cache; otherwise it has a cache of its own and ``.one``,
a single-key reader over it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from .cache import Flight, Generation, LocalCache
from .cached import (
    CacheOptions,
    FetchObserver,
    MakeCache,
    Spawn,
    Submit,
    VersionOf,
    _fill_ended,
    _fill_waiter,
    _job_ended,
    _name_of,
    _refuse_awaitable,
    _version,
    is_async_callable,
    wrap_async,
    wrap_sync,
)

__all__ = [
    "CachedMany",
    "CachedManyCoroutine",
    "ManyDecorator",
    "wrap_many_async",
    "wrap_many_sync",
]

log = logging.getLogger("cachesync.cache")

V = TypeVar("V")

ManyFetch = Callable[[list[str]], Any]
"""The owner call: a list of keys -> a mapping of the keys found to their values."""


class _ManyHandle(Protocol):
    cache: LocalCache
    namespace: str


class CachedManyCoroutine(_ManyHandle, Protocol, Generic[V]):
    """A batch coroutine function wrapped by ``@sync.cached_many``."""

    def __call__(self, keys: Iterable[str]) -> Awaitable[dict[str, V]]: ...


class CachedMany(_ManyHandle, Protocol, Generic[V]):
    """A batch plain function wrapped by ``@sync.cached_many``; callable from any thread."""

    def __call__(self, keys: Iterable[str]) -> dict[str, V]: ...


def _unique(keys: Iterable[str]) -> list[str]:
    if isinstance(keys, str):
        raise TypeError("a batch read takes a list of keys, not one str: pass [key]")
    unique = list(dict.fromkeys(keys))
    for key in unique:
        if type(key) is not str:
            raise TypeError(f"batch keys must be str, got {type(key).__name__}")
    return unique


def _check_mapping(fn: Callable[..., Any], result: object) -> Mapping[str, Any]:
    if result is None:
        return {}
    if not isinstance(result, Mapping):
        raise TypeError(
            f"{getattr(fn, '__qualname__', fn)!r} must return a mapping of key -> value "
            f"for a batch read, got {type(result).__name__}"
        )
    return result


def wrap_many_async(
    fn: Callable[[list[str]], Awaitable[Mapping[str, Any] | None]],
    cache: LocalCache,
    *,
    version_of: VersionOf | None,
    spawn: Spawn,
    observe: FetchObserver | None = None,
) -> CachedManyCoroutine[Any]:
    """Wrap batch coroutine function ``fn`` so that its results are cached in ``cache``."""
    get = cache.data.get
    flights = cache.flights
    stats = cache.stats
    clock = cache.clock
    hits = 0
    cache.hit_counters.append(lambda: hits)
    serving: Generation | None = None

    def set_serving(gen: Generation) -> None:
        nonlocal serving
        serving = gen

    cache.watch_serving(set_serving)
    swr = cache.stale_while_revalidate > 0

    async def fill(reserved: list[Flight]) -> None:
        stats.fetches += 1
        started = time.perf_counter()
        try:
            mapping = _check_mapping(fn, await fn([flight.key for flight in reserved]))
        except Exception as exc:
            _failed(cache, reserved, exc, observe, started)
            return
        except BaseException:
            for flight in reserved:
                cache.abandon_fill(flight)
                flight.waiter.cancel()
            raise
        _filled(cache, reserved, mapping, version_of, observe, started)

    async def wrapper(keys: Iterable[str]) -> dict[str, Any]:
        nonlocal hits
        wanted = _unique(keys)
        found: dict[str, Any] = {}
        joined: list[tuple[str, Flight]] = []
        missing: list[str] = []
        revalidate: list[str] = []
        now = clock()  # once per batch: the hit clock may be paused while idle
        loop = asyncio.get_running_loop()
        for key in wanted:
            entry = get(key)
            if entry is not None and entry.expires > now and entry.gen is serving:
                hits += 1
                entry.used = True
                if entry.value is not None:
                    found[key] = entry.value
                continue
            flight = flights.get(key)
            stale = cache.get_stale(key, for_error=False) if swr else None
            if stale is not None:  # served as is while one fetch refreshes it
                stats.stale_serves += 1
                if stale.value is not None:
                    found[key] = stale.value
                if flight is None:
                    revalidate.append(key)
            elif flight is not None and flight.waiter.get_loop() is loop:
                joined.append((key, flight))
            else:
                # Not filling, or filling on another event loop (another thread's, or one that
                # has ended), whose future this one cannot await: fetch here.
                missing.append(key)
        if revalidate:
            _spawn_fill(
                cache, spawn, fill, [cache.begin_fill(k, _fill_waiter()) for k in revalidate]
            )
        if missing:
            cache.count_misses(len(missing))
            reserved = []
            for key in missing:
                flight = cache.begin_fill(key, _fill_waiter())
                reserved.append(flight)
                joined.append((key, flight))
            _spawn_fill(cache, spawn, fill, reserved)
        for key, flight in joined:
            value = await asyncio.shield(flight.waiter)
            if value is not None:
                found[key] = value
        # In the order asked for, as a dict comprehension over the caller's list would give.
        return {key: found[key] for key in wanted if key in found}

    _attach_many(wrapper, fn, cache)
    return wrapper  # type: ignore[return-value]


def wrap_many_sync(
    fn: Callable[[list[str]], Mapping[str, Any] | None],
    cache: LocalCache,
    *,
    version_of: VersionOf | None,
    submit: Submit,
    observe: FetchObserver | None = None,
) -> CachedMany[Any]:
    """Wrap batch plain function ``fn`` so that its results are cached in ``cache``.

    Safe to call from any thread: a key another thread is fetching is waited for."""
    get = cache.data.get
    flights = cache.thread_flights
    stats = cache.stats
    clock = cache.clock
    lock = cache.lock
    hits = 0
    cache.hit_counters.append(lambda: hits)
    serving: Generation | None = None

    def set_serving(gen: Generation) -> None:
        nonlocal serving
        serving = gen

    cache.watch_serving(set_serving)
    swr = cache.stale_while_revalidate > 0

    def fill(reserved: list[Flight]) -> None:
        stats.fetches += 1
        started = time.perf_counter()
        try:
            result = fn([flight.key for flight in reserved])
            _refuse_awaitable(fn, result)
            mapping = _check_mapping(fn, result)
        except Exception as exc:
            _failed(cache, reserved, exc, observe, started)
            return
        except BaseException as exc:
            for flight in reserved:
                cache.abandon_fill(flight)
                flight.waiter.set_exception(exc)
            raise
        _filled(cache, reserved, mapping, version_of, observe, started)

    def wrapper(keys: Iterable[str]) -> dict[str, Any]:
        nonlocal hits
        wanted = _unique(keys)
        found: dict[str, Any] = {}
        joined: list[tuple[str, Flight]] = []
        reserved: list[Flight] = []
        revalidate: list[Flight] = []
        now = clock()
        for key in wanted:
            entry = get(key)
            if entry is not None and entry.expires > now and entry.gen is serving:
                hits += 1
                entry.used = True
                if entry.value is not None:
                    found[key] = entry.value
                continue
            stale = cache.get_stale(key, for_error=False) if swr else None
            with lock:
                flight = flights.get(key)
                if flight is None:
                    flight = cache.begin_fill(key, concurrent.futures.Future(), threaded=True)
                    (revalidate if stale is not None else reserved).append(flight)
            if stale is not None:  # served as is while one fetch refreshes it
                stats.stale_serves += 1
                if stale.value is not None:
                    found[key] = stale.value
                continue
            joined.append((key, flight))
        if revalidate:
            try:
                job = submit(functools.partial(fill, revalidate))
                if job is not None:  # cancelled before it ran (the client stopped)
                    job.add_done_callback(functools.partial(_jobs_ended, cache, revalidate))
            except BaseException:
                # Not refreshed after all (the executor is shut down): the stale values are
                # served; forget the flights, which nobody would ever finish.
                for flight in revalidate:
                    cache.abandon_fill(flight)
        if reserved:
            cache.count_misses(len(reserved))
            fill(reserved)
        for key, flight in joined:
            value = flight.waiter.result()
            if value is not None:
                found[key] = value
        return {key: found[key] for key in wanted if key in found}

    _attach_many(wrapper, fn, cache)
    return wrapper  # type: ignore[return-value]


def _filled(
    cache: LocalCache,
    reserved: list[Flight],
    mapping: Mapping[str, Any],
    version_of: VersionOf | None,
    observe: FetchObserver | None,
    started: float,
) -> None:
    """One owner call succeeded: each key's value (None if left out) is stored as
    :meth:`~cachesync.cache.LocalCache.finish_fill` allows, and given to its readers."""
    if observe is not None:
        observe(cache.name, time.perf_counter() - started, True)
    for flight in reserved:
        value = mapping.get(flight.key)
        cache.finish_fill(flight, value, _version(version_of, value, cache))
        flight.waiter.set_result(value)


def _failed(
    cache: LocalCache,
    reserved: list[Flight],
    exc: Exception,
    observe: FetchObserver | None,
    started: float,
) -> None:
    """One owner call failed: counted once; each key gets its ``stale_if_error`` value if it
    has one (guarantee 7), else the error."""
    cache.stats.fetch_errors += 1
    if observe is not None:
        observe(cache.name, time.perf_counter() - started, False)
    served = 0
    for flight in reserved:
        cache.abandon_fill(flight)
        stale = cache.get_stale(flight.key, for_error=True)
        if stale is None:
            flight.waiter.set_exception(exc)
        else:
            served += 1
            flight.waiter.set_result(stale.value)
    if served:
        cache.stats.stale_serves += served
        log.warning(
            "serving stale values: the batch fetch failed",
            extra={"ns": cache.name, "keys": served, "error": repr(exc)},
        )


def _attach_many(wrapper: Any, fn: Callable[..., Any], cache: LocalCache) -> None:
    updated = ("__dict__",) if inspect.isfunction(fn) else ()
    functools.update_wrapper(wrapper, fn, updated=updated)
    wrapper.cache = cache
    wrapper.namespace = cache.name

    def invalidate(*keys: str) -> int:
        """Drop these keys in this instance; how many entries were dropped."""
        return sum(1 for key in keys if cache.invalidate(key))

    def cache_clear() -> None:
        """Drop every entry of this function in this instance."""
        cache.clear()

    def invalidate_tags(*tags: str) -> int:
        """Drop the entries stored with one of ``tags`` in this instance."""
        return cache.invalidate_tags(tags)

    wrapper.invalidate = invalidate
    wrapper.cache_clear = cache_clear
    wrapper.invalidate_tags = invalidate_tags


def one_of_async(
    fn: Callable[[list[str]], Awaitable[Mapping[str, Any] | None]],
) -> Callable[[str], Awaitable[Any]]:
    """A single-key fetch made of batch fetch ``fn`` (for the ``.one`` reader)."""

    async def one(key: str) -> Any:
        return _check_mapping(fn, await fn([key])).get(key)

    one.__qualname__ = f"{getattr(fn, '__qualname__', 'fetch')}.one"
    one.__name__ = "one"
    return one


def one_of_sync(
    fn: Callable[[list[str]], Mapping[str, Any] | None],
) -> Callable[[str], Any]:
    """A single-key fetch made of batch plain function ``fn``."""

    def one(key: str) -> Any:
        return _check_mapping(fn, fn([key])).get(key)

    one.__qualname__ = f"{getattr(fn, '__qualname__', 'fetch')}.one"
    one.__name__ = "one"
    return one


class ManyDecorator:
    """What :meth:`CacheSync.cached_many <cachesync.client.CacheSync.cached_many>` returns:
    wraps a batch function (keys -> mapping), async or plain.

    With ``shares``, the batch reads fill and serve the cache of that ``@sync.cached``
    function (its options apply); otherwise the function gets a cache of its own, built from
    ``options``, and a ``.one(key)`` single-key reader over it."""

    def __init__(
        self,
        ns: str,
        options: CacheOptions,
        *,
        shares: Any = None,
        make_cache: MakeCache,
        spawn: Spawn,
        submit: Submit,
        observe: FetchObserver | None = None,
        wrap_fetch: Callable[..., Any] | None = None,
    ) -> None:
        if shares is not None:
            cache = getattr(shares, "cache", None)
            if not isinstance(cache, LocalCache):
                raise TypeError("shares= must be a function decorated with @sync.cached")
            if cache.name != ns:
                raise ValueError(
                    f"shares= caches under {cache.name!r}, not {ns!r}: a batch read shares "
                    "entries only within one namespace"
                )
        self.ns = ns
        self.options = options
        self._shares = shares
        self._make_cache = make_cache
        self._spawn = spawn
        self._submit = submit
        self._observe = observe
        self._wrap_fetch = wrap_fetch

    def __call__(self, fn: Callable[[list[str]], Any]) -> Any:
        if not callable(fn):
            raise TypeError(f"cached_many() decorates functions, got {type(fn).__name__}")
        is_async = is_async_callable(fn)
        name = _name_of(fn)
        if self._wrap_fetch is not None:  # tracing: a span around each owner call
            fn = self._wrap_fetch(fn, self.ns, batch=True)
        if self._shares is not None:
            cache: LocalCache = self._shares.cache
            version_of = self.options.version_of
            one: Any = self._shares
        else:
            cache = self._make_cache(self.ns, self.options)
            cache.function = name
            version_of = self.options.version_of
            if is_async:
                one = wrap_async(
                    one_of_async(fn),
                    cache,
                    key_func=None,
                    version_of=version_of,
                    spawn=self._spawn,
                    observe=self._observe,
                )
            else:
                one = wrap_sync(
                    one_of_sync(fn),
                    cache,
                    key_func=None,
                    version_of=version_of,
                    submit=self._submit,
                    observe=self._observe,
                )
        if is_async:
            wrapped: Any = wrap_many_async(
                fn, cache, version_of=version_of, spawn=self._spawn, observe=self._observe
            )
        else:
            wrapped = wrap_many_sync(
                fn, cache, version_of=version_of, submit=self._submit, observe=self._observe
            )
        wrapped.one = one
        return wrapped


def _spawn_fill(
    cache: LocalCache,
    spawn: Spawn,
    fill: Callable[[list[Flight]], Coroutine[Any, Any, None]],
    flights: list[Flight],
) -> None:
    """Run ``fill(flights)`` in a task; if the task ends before the fill ran (cancelled by
    ``stop()`` or the loop's end), release the keys, as a single read's fill does."""
    task = spawn(fill(flights))
    task.add_done_callback(functools.partial(_fills_ended, cache, flights))


def _fills_ended(cache: LocalCache, flights: list[Flight], task: asyncio.Future[None]) -> None:
    for flight in flights:
        _fill_ended(cache, flight, task)


def _jobs_ended(
    cache: LocalCache, flights: list[Flight], job: concurrent.futures.Future[None]
) -> None:
    for flight in flights:
        _job_ended(cache, flight, job)
