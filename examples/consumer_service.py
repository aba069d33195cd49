"""Example consumer service: reads currencies and customers through a coherent local cache.

Reads are served from this instance's cache; a miss (or an untrusted cache, while the broker
connection is down) asks the owner's REST API with :class:`~cachesync.fetch.HttpFetcher`.
Change events from the owner refresh entries in place. Run several of them::

    OWNER_URL=http://127.0.0.1:8000 uvicorn examples.consumer_service:app --port 8001

Configuration (environment variables): ``OWNER_URL`` (``http://127.0.0.1:8000``),
``CACHESYNC_URL`` (``redis://127.0.0.1:6379/0``), ``CACHESYNC_CHANNEL`` (``cachesync``),
``CACHE_TTL`` (the safety-net TTL, ``3600`` seconds).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException

from cachesync import CacheSync, FetchError
from cachesync.contrib.fastapi import consumer_lifespan
from cachesync.fetch import HttpFetcher

from .models import Currency, Customer

log = logging.getLogger("examples.consumer")


def create_app(
    owner_url: str | None = None,
    cachesync_url: str | None = None,
    channel: str | None = None,
) -> FastAPI:
    """The consumer app; arguments override the environment variables."""
    owner_url = owner_url or os.environ.get("OWNER_URL", "http://127.0.0.1:8000")
    cachesync_url = cachesync_url or os.environ.get("CACHESYNC_URL", "redis://127.0.0.1:6379/0")
    channel = channel or os.environ.get("CACHESYNC_CHANNEL", "cachesync")
    ttl = float(os.environ.get("CACHE_TTL", "3600"))

    sync = CacheSync(cachesync_url, channel=channel)
    currencies = HttpFetcher(owner_url, "/currencies/{key}", model=Currency, timeout=2.0)
    customers = HttpFetcher(owner_url, "/customers/{key}", model=Customer, timeout=2.0)

    # refresh mode: an event that carries the new value replaces the entry in place, so the
    # next read is a hit; version_of keeps an older fetch from replacing a newer event.
    @sync.cached(
        "currencies",
        ttl=ttl,
        negative_ttl=30,
        stale_if_error=600,
        mode="refresh",
        from_event=Currency.model_validate,
        version_of=lambda c: c.version,
    )
    async def get_currency(code: str) -> Currency | None:
        return await currencies.get(code)

    @sync.cached(
        "customers",
        ttl=ttl,
        negative_ttl=30,
        stale_if_error=600,
        mode="refresh",
        from_event=Customer.model_validate,
        version_of=lambda c: c.version,
    )
    async def get_customer(customer_id: str) -> Customer | None:
        return await customers.get(customer_id)

    @asynccontextmanager
    async def warm(app: FastAPI) -> AsyncIterator[None]:
        # A new instance starts hot; if the owner is not up yet, it starts cold instead.
        try:
            await currencies.warm(
                get_currency, "/currencies", key=lambda c: c.code, version=lambda c: c.version
            )
            await customers.warm(
                get_customer, "/customers", key=lambda c: c.id, version=lambda c: c.version
            )
        except FetchError as exc:
            log.warning("could not warm the caches: %s", exc)
        yield

    app = FastAPI(
        title="cachesync example: consumer",
        lifespan=consumer_lifespan(sync, fetchers=[currencies, customers], app_lifespan=warm),
    )

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "listener_up": sync.listener_up}

    @app.get("/currencies/{code}", response_model=Currency)
    async def read_currency(code: str) -> Any:
        try:
            value = await get_currency(code)
        except FetchError as exc:
            raise HTTPException(503, f"the owner cannot answer: {exc}") from exc
        if value is None:
            raise HTTPException(404, f"currency {code} not found")
        return value

    @app.get("/customers/{customer_id}", response_model=Customer)
    async def read_customer(customer_id: str) -> Any:
        try:
            value = await get_customer(customer_id)
        except FetchError as exc:
            raise HTTPException(503, f"the owner cannot answer: {exc}") from exc
        if value is None:
            raise HTTPException(404, f"customer {customer_id} not found")
        return value

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {
            "cachesync": sync.stats(),
            "fetchers": {"currencies": currencies.stats(), "customers": customers.stats()},
        }

    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # ``app`` is built on first access (``uvicorn examples.<module>:app``), not at import, so
    # importing the module for create_app() reads no environment and opens nothing.
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
