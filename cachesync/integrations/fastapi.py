"""FastAPI glue: lifespans that run cachesync beside the app, and the owner's state router.

Owner::

    relay = OutboxRelay(engine, "redis://redis:6379/0")
    app = FastAPI(lifespan=owner_lifespan(relay))
    app.include_router(state_router(relay))          # GET /cachesync/state

Consumer::

    sync = CacheSync("redis://redis:6379/0")
    owner = HttpFetcher("http://owner:8000", "/currencies/{key}", model=Currency)
    app = FastAPI(lifespan=consumer_lifespan(sync, fetchers=[owner]))
    app.include_router(consumer_router(sync))        # GET /cachesync/explain?ns=..&key=..

Each lifespan starts its objects before the app serves its first request and stops them, in
reverse order, after the last one; ``app_lifespan`` nests the app's own lifespan inside, so it
runs with cachesync already up (a good place to warm caches).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

try:
    from fastapi import APIRouter, FastAPI, HTTPException
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "cachesync.integrations.fastapi needs FastAPI: pip install 'cachesync[fastapi]'"
    ) from exc

from ..client import CacheSync
from ..fetch import HttpFetcher
from ..publisher import Publisher

if TYPE_CHECKING:
    # Only for types: importing the outbox needs SQLAlchemy (the ``outbox`` extra), which a
    # consumer does not install.
    from ..owner.feeds import ChangeFeed
    from ..owner.outbox import OutboxRelay

__all__ = [
    "Lifespan",
    "consumer_lifespan",
    "consumer_router",
    "feed_lifespan",
    "owner_lifespan",
    "state_router",
]

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]
"""What ``FastAPI(lifespan=...)`` takes."""


def owner_lifespan(
    *sources: Publisher | OutboxRelay, app_lifespan: Lifespan | None = None
) -> Lifespan:
    """A lifespan that starts the owner's publishers and outbox relays, in the order given.

    An :class:`OutboxRelay` starts even while the broker or the database is down (it retries
    in the background); a bare :class:`Publisher` needs its broker at startup. Pass a
    ``Publisher`` before a relay that was given that publisher, so it is started first.
    """
    if not sources:
        raise ValueError("owner_lifespan needs at least one Publisher or OutboxRelay")
    for source in sources:
        _publisher_of(source)  # type check

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for source in sources:
                await stack.enter_async_context(source)
            app.state.cachesync_sources = sources
            if app_lifespan is not None:
                await stack.enter_async_context(app_lifespan(app))
            yield

    return lifespan


def feed_lifespan(*feeds: ChangeFeed, app_lifespan: Lifespan | None = None) -> Lifespan:
    """A lifespan that runs change feeds (:class:`~cachesync.owner.feeds.ChangeFeed`) beside
    the app, started in the order given and stopped in reverse.

    Startup raises :class:`~cachesync.owner.feeds.FeedError` when the database is not set up
    for a feed (``wal_level``, binlog format, a missing table or column); a database that is
    merely down is retried in the background. ``app.state.cachesync_feeds`` holds the feeds
    (their ``stats()`` include the slot lag).
    """
    from ..owner.feeds import ChangeFeed

    if not feeds:
        raise ValueError("feed_lifespan needs at least one ChangeFeed")
    for feed in feeds:
        if not isinstance(feed, ChangeFeed):
            raise TypeError(f"expected a ChangeFeed, got {type(feed).__name__}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for feed in feeds:
                await stack.enter_async_context(feed)
            app.state.cachesync_feeds = feeds
            if app_lifespan is not None:
                await stack.enter_async_context(app_lifespan(app))
            yield

    return lifespan


def consumer_lifespan(
    sync: CacheSync,
    *,
    fetchers: Iterable[HttpFetcher[Any]] = (),
    app_lifespan: Lifespan | None = None,
) -> Lifespan:
    """A lifespan that runs ``sync`` (connect, subscribe, listen) while the app serves.

    Startup waits until the subscription is live and raises
    :class:`~cachesync.errors.TransportError` if the broker cannot be reached within the
    client's ``connect_timeout``. ``fetchers`` are closed on shutdown, after ``sync`` stops.
    ``app.state.cachesync`` is the client.
    """
    if not isinstance(sync, CacheSync):
        raise TypeError(f"expected a CacheSync, got {type(sync).__name__}")
    owned = list(fetchers)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for fetcher in owned:
                stack.push_async_callback(fetcher.aclose)
            await stack.enter_async_context(sync)
            app.state.cachesync = sync
            if app_lifespan is not None:
                await stack.enter_async_context(app_lifespan(app))
            yield

    return lifespan


def state_router(*sources: Publisher | OutboxRelay, prefix: str = "/cachesync") -> APIRouter:
    """A router serving ``GET {prefix}/state``: what the owner has published so far.

    The answer names, per channel, the publisher's ``source`` id, its last ``seq`` and its
    ``heartbeat_interval``; top-level ``source`` and ``heartbeat_interval`` are those of the
    first publisher, and ``outbox`` holds each relay's ``stats()``. It lets an operator (or a
    consumer) compare what it has seen with what was sent.
    """
    if not sources:
        raise ValueError("state_router needs at least one Publisher or OutboxRelay")
    for source in sources:
        _publisher_of(source)
    router = APIRouter(prefix=prefix, tags=["cachesync"])

    @router.get("/state", summary="cachesync publisher state")
    async def cachesync_state() -> dict[str, Any]:
        channels: dict[str, Any] = {}
        outbox: dict[str, Any] = {}
        for source in sources:
            state = dict(_publisher_of(source).state())
            channel = state.pop("channel")
            channels[channel] = state
            if not isinstance(source, Publisher):
                outbox[channel] = source.stats()
        first_publisher = _publisher_of(sources[0])
        return {
            "source": first_publisher.source,
            "heartbeat_interval": first_publisher.heartbeat_interval,
            "channels": channels,
            "outbox": outbox,
        }

    return router


def consumer_router(sync: CacheSync, prefix: str = "/cachesync") -> APIRouter:
    """A router for a consumer instance: ``GET {prefix}/explain?ns=NS&key=KEY`` answers
    :meth:`CacheSync.explain` (why a key is or is not served from this instance's cache), and
    ``GET {prefix}/stats`` answers :meth:`CacheSync.stats`. ``cachesync explain URL NS KEY``
    asks the first. Mount it where only operators reach it: it names keys and sources."""
    if not isinstance(sync, CacheSync):
        raise TypeError(f"expected a CacheSync, got {type(sync).__name__}")
    router = APIRouter(prefix=prefix, tags=["cachesync"])

    @router.get("/explain", summary="why a key is or is not served from this instance's cache")
    async def cachesync_explain(ns: str, key: str) -> dict[str, Any]:
        try:
            return sync.explain(ns, key)
        except KeyError:
            raise HTTPException(
                status_code=404, detail=f"nothing is cached under namespace {ns!r} here"
            ) from None

    @router.get("/stats", summary="cachesync consumer counters")
    async def cachesync_stats() -> dict[str, Any]:
        return sync.stats()

    return router


def _publisher_of(source: Publisher | OutboxRelay) -> Publisher:
    if isinstance(source, Publisher):
        return source
    publisher = getattr(source, "publisher", None)
    if not isinstance(publisher, Publisher) or not hasattr(source, "stats"):
        raise TypeError(f"expected a Publisher or an OutboxRelay, got {type(source).__name__}")
    return publisher
