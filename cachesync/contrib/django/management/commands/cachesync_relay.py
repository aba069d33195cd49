"""``manage.py cachesync_relay``: publish the committed rows of the outbox table.

Runs :class:`cachesync.OutboxRelay` (at least once, in commit order, leader election on
PostgreSQL) on the Django database, until SIGTERM or Ctrl-C; ``--until-idle`` stops once every
row committed before the start is published (``--timeout`` bounds the wait: a cron job or a
deploy step). While the broker is down the rows wait in the table.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from ... import _config


class Command(BaseCommand):
    help = "Publish the committed rows of the cachesync outbox table (runs until stopped)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", help='broker URL [CACHESYNC["PUBLISH_URL"] or ["URL"]]')
        parser.add_argument("--channel", help='channel [CACHESYNC["CHANNEL"]]')
        parser.add_argument("--database", default="default", help="Django database alias")
        parser.add_argument(
            "--until-idle", action="store_true", help="stop once no committed row is pending"
        )
        parser.add_argument(
            "--timeout", type=float, default=None, help="with --until-idle: give up after this"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        config = _config()
        url = options["url"] or config.options["PUBLISH_URL"] or config.options["URL"]
        channel = options["channel"] or config.options["CHANNEL"]
        database = connections[options["database"]].settings_dict
        try:
            published = asyncio.run(
                _relay(
                    database,
                    url,
                    channel,
                    dict(config.options["RELAY"]),
                    until_idle=options["until_idle"],
                    timeout=options["timeout"],
                )
            )
        except TimeoutError:
            raise CommandError(
                f"rows still pending after {options['timeout']}s; is the broker at {url} up?"
            ) from None
        self.stdout.write(f"cachesync_relay: published {published} events")


async def _relay(
    database: dict[str, Any],
    url: str,
    channel: str,
    relay_options: dict[str, Any],
    *,
    until_idle: bool,
    timeout: float | None,
) -> int:
    from sqlalchemy.ext.asyncio import create_async_engine

    from cachesync import OutboxRelay  # the outbox extra: SQLAlchemy and asyncpg

    engine = create_async_engine(sqlalchemy_url(database))
    try:
        relay = OutboxRelay(engine, url, channel, **relay_options)
        async with relay:
            if until_idle:
                await relay.wait_idle(timeout)
            else:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, stop.set)
                await stop.wait()
            return int(relay.stats()["published"])
    finally:
        await engine.dispose()


def sqlalchemy_url(database: dict[str, Any]) -> Any:
    """The SQLAlchemy URL (async driver) of a Django ``DATABASES`` entry."""
    from sqlalchemy.engine import URL

    engine = database["ENGINE"]
    if engine.endswith("postgresql"):
        return URL.create(
            "postgresql+asyncpg",
            username=database.get("USER") or None,
            password=database.get("PASSWORD") or None,
            host=database.get("HOST") or None,
            port=int(database["PORT"]) if database.get("PORT") else None,
            database=database.get("NAME") or None,
        )
    if engine.endswith("sqlite3"):
        return URL.create("sqlite+aiosqlite", database=str(database["NAME"]))
    raise CommandError(f"cachesync_relay supports PostgreSQL and SQLite, not {engine}")
