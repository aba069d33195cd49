"""Readers: one per caching strategy, each configured the way its own documentation shows.

A reader answers ``get(key) -> (version, hit)`` and can say how many change events or
invalidations it has applied. The hit flag is read from the cache *before* the call and the
call itself is the library's ordinary read path, so the hit-path latency measured around it is
the library's.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import json
import time
from typing import Any

import httpx
from cachetools import TTLCache

from .workload import ITEM_NS, PROBE_KEY

PROBE_KEY_BYTES = PROBE_KEY.encode()

CACHE_ENTRIES = 20_000
"""Every local cache is sized to hold the whole data set (10,000 items and the probe)."""


class Reader(abc.ABC):
    """One consumer instance's way of reading an item.

    ``probe_applied`` collects the monotonic times at which the library dropped or replaced its
    entry of the probe key on an event (diagnostics: delivery time, apart from polling)."""

    def __init__(self) -> None:
        self.probe_applied: list[int] = []
        # (start, duration) in ns of hits timed inside the library's own thread, for readers
        # whose call also waits for that thread (redis-py's sync client)
        self.hit_service: list[tuple[int, int]] = []

    def _applied(self, key: str | bytes) -> None:
        if key == PROBE_KEY or key == PROBE_KEY_BYTES:
            self.probe_applied.append(time.monotonic_ns())

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and subscribe; return once reads are served as in steady state."""

    async def prefill(self, items: list[dict[str, Any]]) -> None:
        """Load ``items`` (those this reader will read, and the probe key), as a long-running
        instance would hold them. No update runs yet."""
        return None

    @abc.abstractmethod
    async def get(self, key: str) -> tuple[int, bool]:
        """The version read for ``key`` and whether the local cache served it."""

    async def flush(self) -> None:
        """Empty the local cache, as a flush (a lost event, a restart) would."""
        return None

    def events(self) -> int | None:
        """Change events (or invalidation messages) applied so far; None if not observable."""
        return None

    def extra(self) -> dict[str, Any]:
        """Library counters worth reporting."""
        return {}

    @abc.abstractmethod
    async def stop(self) -> None:
        """Disconnect. Safe after a failed start."""


class NoCache(Reader):
    """Every read is a request to the owner."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        super().__init__()
        self.client = client

    async def start(self) -> None:
        return None

    async def get(self, key: str) -> tuple[int, bool]:
        response = await self.client.get(f"/items/{key}")
        response.raise_for_status()
        return int(response.json()["version"]), False

    async def stop(self) -> None:
        return None


class _AgedClock:
    """A monotonic clock that can be set back while a prefill inserts aged entries."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


class TtlOnly(Reader):
    """A cachetools ``TTLCache`` in front of the owner's API.

    cachetools' decorators do not support coroutines, so the cache is used directly, the usual
    way in async code (check, else fetch and store; no single-flight). The prefill gives each
    entry an age drawn uniformly from ``[0, ttl)``, the steady state of a TTL cache whose keys are
    read often, so a short run sees expiries at the steady-state rate from its first second.
    """

    def __init__(self, client: httpx.AsyncClient, ttl: float, seed: int = 0) -> None:
        super().__init__()
        self.client = client
        self.ttl = ttl
        self.clock = _AgedClock()
        self.cache: TTLCache[str, dict[str, Any]] = TTLCache(
            maxsize=CACHE_ENTRIES, ttl=ttl, timer=self.clock
        )
        self.seed = seed

    async def start(self) -> None:
        return None

    async def prefill(self, items: list[dict[str, Any]]) -> None:
        import random

        rng = random.Random(self.seed)
        ages = sorted(((rng.random() * self.ttl, item) for item in items), key=lambda p: -p[0])
        # Oldest first: TTLCache keeps its expiry list in insertion order.
        for age, item in ages:
            self.clock.offset = -age
            self.cache[item["key"]] = item
        self.clock.offset = 0.0

    async def flush(self) -> None:
        self.cache.clear()

    async def get(self, key: str) -> tuple[int, bool]:
        item = self.cache.get(key)
        if item is not None:
            return int(item["version"]), True
        response = await self.client.get(f"/items/{key}")
        response.raise_for_status()
        item = response.json()
        self.cache[key] = item
        return int(item["version"]), False

    async def stop(self) -> None:
        return None


class Cachesync(Reader):
    """``@sync.cached(ITEM_NS, ttl=3600, mode=...)`` over ``HttpFetcher``, as the README shows;
    warmed with ``HttpFetcher.warm`` from the owner's list endpoint."""

    def __init__(
        self,
        url: str,
        channel: str,
        mode: str,
        client: httpx.AsyncClient,
        base_url: str,
    ) -> None:
        from cachesync import CacheSync
        from cachesync.fetch import HttpFetcher

        super().__init__()
        self.sync = CacheSync(url, channel)
        self.fetcher: HttpFetcher[Any] = HttpFetcher(base_url, "/items/{key}", client=client)
        self.mode = mode
        self.fn = self.sync.cached(
            ITEM_NS,
            ttl=3600,
            maxsize=CACHE_ENTRIES,
            mode=mode,  # type: ignore[arg-type]
            version_of=lambda item: item["version"],
        )(self.fetcher.get)
        self.cache = self.sync.namespace(ITEM_NS)
        self._watch_probe()

    def _watch_probe(self) -> None:
        """Note when an event drops or replaces the probe key (the client calls these two)."""
        cache = self.cache
        invalidate, apply_value = cache.invalidate, cache.apply_value

        def watched_invalidate(key: str, version: int | None = None) -> bool:
            self._applied(key)
            return invalidate(key, version)

        def watched_apply(key: str, value: Any, version: int | None) -> bool:
            self._applied(key)
            return apply_value(key, value, version)

        cache.invalidate = watched_invalidate  # type: ignore[method-assign]
        cache.apply_value = watched_apply  # type: ignore[method-assign]

    async def start(self) -> None:
        await self.sync.start()
        # The first event of a publisher this client has not heard flushes every namespace that
        # holds entries (it may be a restarted owner), so a warm-up done before that event is
        # thrown away a moment later. Wait for the publisher's first heartbeat, then warm.
        deadline = time.monotonic() + 5.0
        while self.sync.stats()["listener"]["messages"] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def prefill(self, items: list[dict[str, Any]]) -> None:
        await self.fetcher.warm(
            self.fn, "/items", key=lambda item: item["key"], version=lambda item: item["version"]
        )

    async def flush(self) -> None:
        self.cache.clear()

    async def get(self, key: str) -> tuple[int, bool]:
        hit = self.cache.get_fresh(key) is not None
        item = await self.fn(key)
        if item is None:
            raise LookupError(f"the owner has no item {key!r}")
        return int(item["version"]), hit

    def events(self) -> int | None:
        return int(self.cache.stats.events)

    def extra(self) -> dict[str, Any]:
        stats = self.sync.stats()
        return {"listener": stats["listener"], "namespace": stats["namespaces"][ITEM_NS]}

    async def stop(self) -> None:
        await self.sync.stop()


REDIS_MIN_VERSION_FIX = "6.0.0"
"""CLIENT TRACKING and RESP3 exist since Redis 6.0; redis-py asks for 7.4."""


class RedisClientSide(Reader):
    """redis-py's server-assisted client-side caching, as its docs show:
    ``redis.Redis(protocol=3, cache_config=CacheConfig())``, parsing with hiredis. redis-py 8
    has it on the sync client only (not on ``redis.asyncio``), so each reader process drives it
    the way a sync service would: its reads run on one thread of its own (a single-worker
    executor), so the event loop (the probe, the timers) never blocks on a read. One thread,
    because redis-py 8.1's client-side cache stalls for seconds when several threads share the
    client (``python -m benchmarks.csc_threads`` shows it). The hit latency measured around the
    call includes waiting for that thread; the hit timed inside the thread
    (``hit_service``) is reported beside it.

    redis-py 8.1 refuses servers older than 7.4 (``CacheProxyConnection.MIN_ALLOWED_VERSION``);
    ``fix=True`` lowers that gate to 6.0, the smallest change that makes it run on Redis 7.0.
    """

    def __init__(self, url: str, prefix: str, fix: bool, threads: int = 1) -> None:
        super().__init__()
        self.url = url
        self.prefix = prefix
        self.fix = fix
        self.invalidations = 0
        self.client: Any = None
        self._cache: Any = None
        self._thread = concurrent.futures.ThreadPoolExecutor(threads, "csc-reader")

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def start(self) -> None:
        await self._call(self._start)

    def _start(self) -> None:
        import redis
        from redis.cache import CacheConfig, CacheKey, DefaultCache
        from redis.connection import CacheProxyConnection

        if self.fix:
            CacheProxyConnection.MIN_ALLOWED_VERSION = REDIS_MIN_VERSION_FIX
        reader = self

        class CountingCache(DefaultCache):
            """Counts the invalidation messages applied; behaves as DefaultCache."""

            def delete_by_redis_keys(self, redis_keys: Any) -> Any:
                reader.invalidations += 1
                for key in redis_keys:
                    reader._applied(key[len(reader.prefix) :])
                return super().delete_by_redis_keys(redis_keys)

        self._key = CacheKey
        self.client = redis.Redis.from_url(
            self.url,
            protocol=3,
            cache_config=CacheConfig(max_size=CACHE_ENTRIES, cache_class=CountingCache),
        )
        self.client.ping()
        self._cache = self.client.connection_pool.cache
        self.client.get(self.prefix + "warm-up")  # the first GET opens the tracked connection

    async def prefill(self, items: list[dict[str, Any]]) -> None:
        def load() -> None:
            for item in items:
                self.client.get(self.prefix + item["key"])

        await self._call(load)

    async def flush(self) -> None:
        await self._call(self._cache.flush)

    def _get(self, name: str) -> tuple[int, bool]:
        t0, p0 = time.monotonic_ns(), time.perf_counter_ns()
        hit = self._cache.get(self._key("GET", (name,), ("GET", name))) is not None
        raw = self.client.get(name)
        version = int(json.loads(raw)["version"])
        if hit:
            self.hit_service.append((t0, time.perf_counter_ns() - p0))
        return version, hit

    async def get(self, key: str) -> tuple[int, bool]:
        result: tuple[int, bool] = await self._call(self._get, self.prefix + key)
        return result

    def events(self) -> int | None:
        return self.invalidations

    async def stop(self) -> None:
        if self.client is not None:
            await self._call(self.client.close)
        self._thread.shutdown(wait=False)


class Cashews(Reader):
    """cashews' client-side backend, as its README shows:
    ``cache.setup("redis://...?client_side=true")`` and ``await cache.get(key)``; the owner
    writes every item through cashews. The URL is the strategy's (``&protocol=2`` is the fix:
    see the report)."""

    def __init__(self, url: str) -> None:
        from cashews import Cache
        from cashews.backends.memory import Memory

        super().__init__()
        reader = self

        class CountingMemory(Memory):
            """cashews' default local store; counts the deletes its invalidation listener does."""

            async def delete(self, key: str) -> bool:
                reader.invalidations += 1
                reader._applied(key)
                return bool(await super().delete(key))

        self.invalidations = 0
        self.cache = Cache()
        self.local = CountingMemory(size=CACHE_ENTRIES)
        self.backend: Any = self.cache.setup(url, local_cache=self.local)

    async def start(self) -> None:
        await self.cache.init()

    async def prefill(self, items: list[dict[str, Any]]) -> None:
        keys = [item["key"] for item in items]
        for i in range(0, len(keys), 1000):
            await self.cache.get_many(*keys[i : i + 1000])

    async def flush(self) -> None:
        await self.local.clear()

    async def get(self, key: str) -> tuple[int, bool]:
        backend = self.backend
        hit = backend._listen_started.is_set() and key in backend._local_cache.store
        item = await self.cache.get(key)
        if item is None:
            raise LookupError(f"Redis has no item {key!r}")
        return int(item["version"]), hit

    def events(self) -> int | None:
        return self.invalidations

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.cache.close()
