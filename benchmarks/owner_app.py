"""The owner service of the strategy comparison: a small FastAPI app served by uvicorn.

It holds an in-memory dict of items, each with a version and the monotonic time of the commit
that made it, and it is the only writer. After each commit it tells the strategy's readers
through a *sink*: nothing (no cache, TTL caches), a :class:`cachesync.Publisher` on the
strategy's transport, or a write of the new value into Redis (redis-py client-side caching and
cashews, whose readers read Redis). Commits go to an update log the harness reads at the end.

Routes: ``GET /items/{key}`` (one item, counted), ``GET /items`` (all of them, for warm-up),
``GET /stats``, ``GET /log``, ``POST /control/start`` and ``/control/stop`` (the updater),
``GET /health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Response

from .workload import ITEM_NS, PROBE_KEY, ZipfKeys, key_name

CASHEWS_PREFIX = "cashews:"
"""The key prefix cashews' client-side backend reads under (``client_side_prefix``)."""


@dataclass(frozen=True)
class OwnerConfig:
    """What the owner serves and how it announces changes."""

    n_keys: int = 10_000
    value_bytes: int = 100
    sink: str = "none"  # none | cachesync | redis | cashews
    url: str = ""  # the transport (cachesync) or Redis URL (redis, cashews)
    channel: str = "cachesync-bench"
    carry_value: bool = False  # cachesync refresh mode: events carry the new value
    redis_prefix: str = "bench:item:"
    update_rate: float = 5.0
    update_dist: str = "zipf"  # zipf | uniform
    zipf_s: float = 1.1
    probe_rate: float = 10.0
    seed: int = 1


class Sink(Protocol):
    """Where the owner announces a commit."""

    async def start(self, items: dict[str, dict[str, Any]]) -> None: ...
    async def changed(self, key: str, item: dict[str, Any]) -> None: ...
    async def stop(self) -> None: ...


class NullSink:
    """No announcement: readers only learn of changes by reading the owner."""

    async def start(self, items: dict[str, dict[str, Any]]) -> None:
        return None

    async def changed(self, key: str, item: dict[str, Any]) -> None:
        return None

    async def stop(self) -> None:
        return None


class CachesyncSink:
    """A :class:`cachesync.Publisher`: invalidations, or the new value in refresh mode."""

    def __init__(self, url: str, channel: str, carry_value: bool) -> None:
        from cachesync import Publisher

        self.publisher = Publisher(url, channel)
        self.carry_value = carry_value

    async def start(self, items: dict[str, dict[str, Any]]) -> None:
        await self.publisher.start()

    async def changed(self, key: str, item: dict[str, Any]) -> None:
        value = item if self.carry_value else None
        await self.publisher.changed(ITEM_NS, key, version=item["version"], value=value)

    async def stop(self) -> None:
        await self.publisher.stop()


class RedisSink:
    """Writes each item as JSON under ``prefix + key`` (readers: redis-py client-side cache)."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as aredis

        self.client = aredis.Redis.from_url(url)
        self.prefix = prefix
        self.written: list[str] = []

    async def start(self, items: dict[str, dict[str, Any]]) -> None:
        names = self.written = list(items)
        for i in range(0, len(names), 1000):
            chunk = {self.prefix + k: json.dumps(items[k]) for k in names[i : i + 1000]}
            await self.client.mset(chunk)

    async def changed(self, key: str, item: dict[str, Any]) -> None:
        await self.client.set(self.prefix + key, json.dumps(item))

    async def stop(self) -> None:
        try:
            names = [self.prefix + k for k in self.written]
            for i in range(0, len(names), 1000):
                await self.client.unlink(*names[i : i + 1000])
        finally:
            await self.client.aclose()


class CashewsSink:
    """Writes each item through cashews (same setup URL as the readers, so the same format)."""

    def __init__(self, url: str) -> None:
        from cashews import Cache

        self.cache = Cache()
        self.cache.setup(url)
        self.written: list[str] = []

    async def start(self, items: dict[str, dict[str, Any]]) -> None:
        await self.cache.init()
        names = self.written = list(items)
        for i in range(0, len(names), 1000):
            await self.cache.set_many({k: items[k] for k in names[i : i + 1000]})

    async def changed(self, key: str, item: dict[str, Any]) -> None:
        await self.cache.set(key, item)

    async def stop(self) -> None:
        try:
            for i in range(0, len(self.written), 1000):
                await self.cache.delete_many(*self.written[i : i + 1000])
        finally:
            await self.cache.close()


def make_sink(config: OwnerConfig) -> Sink:
    """The sink ``config.sink`` names."""
    if config.sink == "none":
        return NullSink()
    if config.sink == "cachesync":
        return CachesyncSink(config.url, config.channel, config.carry_value)
    if config.sink == "redis":
        return RedisSink(config.url, config.redis_prefix)
    if config.sink == "cashews":
        return CashewsSink(config.url)
    raise ValueError(f"unknown sink {config.sink!r}")


class Owner:
    """The owner's data, update log and updater. Use as ``async with Owner(config):``."""

    def __init__(self, config: OwnerConfig, sink: Sink | None = None) -> None:
        self.config = config
        self.sink = sink if sink is not None else make_sink(config)
        self.filler = "x" * config.value_bytes
        now = time.monotonic_ns()
        self.items: dict[str, dict[str, Any]] = {}
        self.bodies: dict[str, bytes] = {}
        for name in [key_name(i) for i in range(config.n_keys)] + [PROBE_KEY]:
            self._store({"key": name, "version": 1, "ts": now, "data": self.filler})
        self.log: list[list[Any]] = []  # [key, version, committed_ns, announced_ns]
        self.requests = 0
        self.publish_errors = 0
        self._tasks: list[asyncio.Task[None]] = []

    def _store(self, item: dict[str, Any]) -> None:
        self.items[item["key"]] = item
        self.bodies[item["key"]] = json.dumps(item).encode()

    async def __aenter__(self) -> Owner:
        await self.sink.start(self.items)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_updates()
        await self.sink.stop()

    async def commit(self, key: str) -> None:
        """Bump ``key`` to its next version now, log the commit, then announce it."""
        old = self.items[key]
        ts = time.monotonic_ns()
        item = {"key": key, "version": old["version"] + 1, "ts": ts, "data": self.filler}
        self._store(item)
        entry = [key, item["version"], ts, 0]
        self.log.append(entry)
        try:
            await self.sink.changed(key, item)
        except Exception:
            self.publish_errors += 1
        entry[3] = time.monotonic_ns()  # when the announcement left (diagnostics)

    def start_updates(self) -> None:
        """Start the updater: workload keys at ``update_rate`` (Poisson arrivals) and the probe
        key on a fixed beat of ``probe_rate`` per second."""
        if self._tasks:
            return
        cfg = self.config
        if cfg.update_rate > 0:
            self._tasks.append(asyncio.create_task(self._update_loop()))
        if cfg.probe_rate > 0:
            self._tasks.append(asyncio.create_task(self._probe_loop()))

    async def stop_updates(self) -> None:
        """Stop the updater and wait for it."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _update_loop(self) -> None:
        cfg = self.config
        rng = random.Random(cfg.seed)
        nprng = np.random.default_rng(cfg.seed)
        zipf = ZipfKeys(cfg.n_keys, cfg.zipf_s)
        next_t = time.monotonic()
        while True:
            next_t += rng.expovariate(cfg.update_rate)
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            if cfg.update_dist == "uniform":
                index = rng.randrange(cfg.n_keys)
            else:
                index = int(zipf.sample(nprng, 1)[0])
            await self.commit(key_name(index))

    async def _probe_loop(self) -> None:
        interval = 1.0 / self.config.probe_rate
        next_t = time.monotonic()
        while True:
            next_t += interval
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            await self.commit(PROBE_KEY)


def create_app(owner: Owner, *, manage_lifespan: bool = True) -> FastAPI:
    """The owner's HTTP API over ``owner``. With ``manage_lifespan`` the app enters and leaves
    ``owner`` (connects its sink) on startup and shutdown, as under uvicorn."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_lifespan:
            async with owner:
                yield
        else:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/items/{key}")
    async def get_item(key: str) -> Response:
        owner.requests += 1
        body = owner.bodies.get(key)
        if body is None:
            return Response(status_code=404)
        return Response(content=body, media_type="application/json")

    @app.get("/items")
    async def all_items() -> Response:
        body = b"[" + b",".join(owner.bodies.values()) + b"]"
        return Response(content=body, media_type="application/json")

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        return {
            "requests": owner.requests,
            "updates": len(owner.log),
            "publish_errors": owner.publish_errors,
        }

    @app.get("/log")
    async def log() -> dict[str, list[list[Any]]]:
        return {"log": owner.log}

    @app.post("/control/start")
    async def start() -> dict[str, bool]:
        owner.start_updates()
        return {"ok": True}

    @app.post("/control/stop")
    async def stop() -> dict[str, bool]:
        await owner.stop_updates()
        return {"ok": True}

    return app


def serve(config: OwnerConfig, port: int) -> None:
    """Process entry: serve the owner with uvicorn on 127.0.0.1:``port`` until SIGTERM."""
    import signal

    import uvicorn

    # Ctrl-C reaches the whole process group; the harness stops this process itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    app = create_app(Owner(config))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            # Longer than any idle gap of a run: a keep-alive connection closed by the server
            # just as a client reuses it is a "connection reset" the client did not earn.
            timeout_keep_alive=120,
        )
    )
    server.run()
