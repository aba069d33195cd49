"""A change feed: the owner's tables published from the database log, with no owner code.

Any writer (the owner service, a migration, admin SQL, a second service) changes
``currencies`` or ``customers``; the feed reads the committed rows from PostgreSQL's logical
decoding (or the MySQL/MariaDB binlog) and publishes them, with the row as the event's value,
so consumers in refresh mode (``examples/consumer_service.py``) hold the committed value at
once. Run it beside ``examples/owner_service.py`` pointed at the same PostgreSQL database::

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/uvicorn examples.cdc_feed:app --port 8010
    psql -h 127.0.0.1 -U postgres test \\
        -c "UPDATE currencies SET rate = 1.2, version = version + 1 WHERE code = 'USD'"
    curl localhost:8010/feed          # transactions, changes, slot lag in bytes and seconds

Configuration (environment variables): ``DATABASE_URL`` (``postgresql://...`` or
``mysql://...``; default the local PostgreSQL ``test`` database), ``CACHESYNC_URL``
(``redis://127.0.0.1:6379/0``), ``CACHESYNC_CHANNEL`` (``cachesync``), ``FEED_NAME`` (the slot
and publication: ``cachesync_example``). Retire a feed for good with
``cachesync cdc DATABASE_URL --drop-slot --name cachesync_example``.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI

from cachesync import ChangeFeed
from cachesync.contrib.fastapi import feed_lifespan
from cachesync.owner.feeds import Table

TABLES = [
    # The columns of examples.models.Currency / Customer, so consumers validate them as is.
    Table("currencies", ("code",), version="version", value=("code", "name", "rate", "version")),
    Table(
        "customers",
        ("id",),
        version="version",
        value=("id", "name", "email", "tier", "version"),
    ),
]


def create_app(
    database_url: str | None = None,
    cachesync_url: str | None = None,
    channel: str | None = None,
    name: str | None = None,
) -> FastAPI:
    """The feed app; arguments override the environment variables."""
    feed = ChangeFeed(
        database_url or os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        TABLES,
        cachesync_url or os.environ.get("CACHESYNC_URL", "redis://127.0.0.1:6379/0"),
        channel=channel or os.environ.get("CACHESYNC_CHANNEL", "cachesync"),
        name=name or os.environ.get("FEED_NAME", "cachesync_example"),
    )
    app = FastAPI(title="cachesync example: change feed", lifespan=feed_lifespan(feed))
    app.state.feed = feed

    @app.get("/feed")
    async def stats() -> dict[str, Any]:
        return feed.stats()

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": feed.stats()["running"]}

    return app


app = create_app()
