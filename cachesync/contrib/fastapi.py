"""FastAPI glue: lifespans that run cachesync beside the app, and the owner's state router.

Owner::

    relay = OutboxRelay(engine, "redis://redis:6379/0")
    app = FastAPI(lifespan=owner_lifespan(relay))
    app.include_router(state_router(relay, dependencies=[Depends(operators_only)]))

Consumer::

    sync = CacheSync("redis://redis:6379/0")
    owner = HttpFetcher("http://owner:8000", "/currencies/{key}", model=Currency)
    app = FastAPI(lifespan=consumer_lifespan(sync, fetchers=[owner]))
    app.include_router(consumer_router(sync, dependencies=[Depends(operators_only)]))

Each lifespan starts its objects before the app serves its first request and stops them, in
reverse order, after the last one; ``app_lifespan`` nests the app's own lifespan inside, so it
runs with cachesync already up (a good place to warm caches).

Exposure is the app's choice: both routers take FastAPI ``dependencies`` (authentication, an
IP allow-list...) applied to every route they serve; without any, anyone who reaches the app
reaches them. The state route keeps connection details (broker or database user, host, port,
database) out of what it answers: an error shows only where it happened and its kind
(``"database: OperationalError"``) unless ``show_errors=True``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

try:
    from fastapi import APIRouter, FastAPI, HTTPException
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "cachesync.contrib.fastapi needs FastAPI: pip install 'cachesync[fastapi]'"
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

    return _running(sources, "cachesync_sources", sources, app_lifespan)


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

    return _running(feeds, "cachesync_feeds", feeds, app_lifespan)


def _running(
    services: Sequence[contextlib.AbstractAsyncContextManager[Any]],
    state_name: str,
    state_value: Any,
    app_lifespan: Lifespan | None,
    *,
    closed_after: Sequence[HttpFetcher[Any]] = (),
) -> Lifespan:
    """The lifespan the factories above share: ``services`` entered in order (left in
    reverse), ``app.state.<state_name>`` set, then the app's own lifespan; ``closed_after``
    fetchers are closed once the services have stopped."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for fetcher in closed_after:
                stack.push_async_callback(fetcher.aclose)
            for service in services:
                await stack.enter_async_context(service)
            setattr(app.state, state_name, state_value)
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

    return _running([sync], "cachesync", sync, app_lifespan, closed_after=owned)


def state_router(
    *sources: Publisher | OutboxRelay,
    prefix: str = "/cachesync",
    dependencies: Sequence[Any] | None = None,
    show_errors: bool = False,
) -> APIRouter:
    """A router serving ``GET {prefix}/state``: what the owner has published so far.

    The answer names, per channel, the publisher's ``source`` id, its last ``seq`` and its
    ``heartbeat_interval``; top-level ``source`` and ``heartbeat_interval`` are those of the
    first publisher, and ``outbox`` holds each relay's ``stats()``. It lets an operator (or a
    consumer) compare what it has seen with what was sent.

    ``dependencies`` (e.g. ``[Depends(operators_only)]``) run before the route, as for any
    FastAPI router: that is where authentication goes. An error message can name the broker's
    or the database's user, host, port and database, so ``last_error`` keeps only where the
    error happened and its kind (``"broker: TransportError"``); ``show_errors=True`` answers
    the whole message (passwords are always redacted), for a route only operators reach.
    """
    if not sources:
        raise ValueError("state_router needs at least one Publisher or OutboxRelay")
    for source in sources:
        _publisher_of(source)
    router = APIRouter(prefix=prefix, tags=["cachesync"], dependencies=list(dependencies or ()))

    @router.get("/state", summary="cachesync publisher state")
    async def cachesync_state() -> dict[str, Any]:
        channels: dict[str, Any] = {}
        outbox: dict[str, Any] = {}
        for source in sources:
            state = dict(_publisher_of(source).state())
            channel = state.pop("channel")
            channels[channel] = state
            if not isinstance(source, Publisher):
                stats = source.stats()
                outbox[channel] = stats if show_errors else _without_details(stats)
        first_publisher = _publisher_of(sources[0])
        return {
            "source": first_publisher.source,
            "heartbeat_interval": first_publisher.heartbeat_interval,
            "channels": channels,
            "outbox": outbox,
        }

    return router


def consumer_router(
    sync: CacheSync, prefix: str = "/cachesync", dependencies: Sequence[Any] | None = None
) -> APIRouter:
    """A router for a consumer instance: ``GET {prefix}/explain?ns=NS&key=KEY`` answers
    :meth:`CacheSync.explain` (why a key is or is not served from this instance's cache), and
    ``GET {prefix}/stats`` answers :meth:`CacheSync.stats`. ``cachesync explain URL NS KEY``
    asks the first. It names keys and sources: mount it where only operators reach it, or
    pass ``dependencies`` (e.g. ``[Depends(operators_only)]``) that check who asks."""
    if not isinstance(sync, CacheSync):
        raise TypeError(f"expected a CacheSync, got {type(sync).__name__}")
    router = APIRouter(prefix=prefix, tags=["cachesync"], dependencies=list(dependencies or ()))

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


_WORD = re.compile(r"[A-Za-z_][\w.]*")


def _error_kind(message: str) -> str:
    """``"database: OperationalError: connection to server at ..."`` -> ``"database:
    OperationalError"``: the leading words that name where and what, none of the details."""
    kept: list[str] = []
    for part in message.split(": "):
        if not _WORD.fullmatch(part.strip()):
            break
        kept.append(part.strip())
    return ": ".join(kept) or "error"


def _without_details(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        name: _error_kind(value) if name.endswith("error") and isinstance(value, str) else value
        for name, value in stats.items()
    }


def _publisher_of(source: Publisher | OutboxRelay) -> Publisher:
    if isinstance(source, Publisher):
        return source
    publisher = getattr(source, "publisher", None)
    if not isinstance(publisher, Publisher) or not hasattr(source, "stats"):
        raise TypeError(f"expected a Publisher or an OutboxRelay, got {type(source).__name__}")
    return publisher
