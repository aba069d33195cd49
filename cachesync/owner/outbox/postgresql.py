"""The relay on PostgreSQL with asyncpg: one statement per round, LISTEN/NOTIFY, the election.

The two hot statements (elect and select the pending rows; mark them sent) run on the asyncpg
connection under the relay's SQLAlchemy connection (``driver_connection``, SQLAlchemy's public
handle to it), prepared once by asyncpg's statement cache: SQLAlchemy's per-statement overhead
is larger than the query on an idle database. The rarer statements (notes, failures, pruning)
go through SQLAlchemy. The outbox trigger's ``pg_notify`` wakes the relay the moment a
transaction commits; polling is the fallback while LISTEN is off or its connection is lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from .database import DB_ERRORS, Batch, OutboxDatabase
from .election import lock_key
from .model import TABLE_NAME, effective_schema, explicit_schema, notify_channel, quote_ident

try:
    import asyncpg  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the outbox relay on PostgreSQL needs asyncpg: pip install 'cachesync[outbox]'",
        name=exc.name,
    ) from exc

__all__ = ["PostgresDatabase"]

log = logging.getLogger("cachesync.outbox")


class PostgresDatabase(OutboxDatabase):
    """PostgreSQL through asyncpg: elected by an advisory lock, woken by NOTIFY."""

    errors = (*DB_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError)

    def _configure(self) -> None:
        self._driver: Any = None
        self._select = self._mark_sent_sql = ""
        self._lock_key = 0
        self._listen_channel = ""
        self._warned_unstamped = False

    async def _setup(self, conn: AsyncConnection) -> None:
        table = quote_ident(TABLE_NAME)
        if explicit := explicit_schema(conn):
            table = f"{quote_ident(explicit)}.{table}"
        # One round trip elects and reads: the lock is tried first (re-entrant for the session
        # that holds it), and only its holder gets rows. JSON is selected as text and decoded
        # here, whatever codecs the connection has.
        self._select = (
            "SELECT l.leads, o.id, o.ns, o.op, o.keys, o.version, o.value, o.created_at, "
            "o.commit_seq FROM (SELECT pg_try_advisory_lock($3) AS leads) AS l "
            "LEFT JOIN LATERAL (SELECT id, ns, op, keys::text AS keys, version, "
            f"value::text AS value, created_at, commit_seq FROM {table} "
            "WHERE l.leads AND channel = $1 AND sent_at IS NULL AND failed_reason IS NULL "
            "ORDER BY commit_seq, id LIMIT $2) AS o ON true ORDER BY o.commit_seq, o.id"
        )
        self._mark_sent_sql = (
            f"UPDATE {table} SET sent_at = $2, attempts = attempts + 1 WHERE id = ANY($1::bigint[])"
        )
        driver: Any = (await conn.get_raw_connection()).driver_connection
        schema = await effective_schema(conn)
        await conn.rollback()
        self._driver = driver
        self._lock_key = lock_key(schema, self.channel)
        if not self.listen:
            return
        channel = notify_channel(schema)
        await driver.add_listener(channel, self._on_notify)
        driver.add_termination_listener(self._on_listen_lost)
        self._listen_channel = channel
        self.listening = True
        log.debug("outbox relay listening", extra={"notify_channel": channel})

    async def next_batch(self) -> Batch:
        await self.connection()
        try:
            records = await self._driver.fetch(
                self._select, self.channel, self.batch_size, self._lock_key
            )
        except self.errors:
            await self.close()
            raise
        leads = bool(records[0]["leads"])
        rows = [
            {
                "id": record["id"],
                "ns": record["ns"],
                "op": record["op"],
                "keys": _json_or_none(record["keys"]),
                "version": record["version"],
                "value": _json_or_none(record["value"]),
                "created_at": record["created_at"],
                "stamp": record["commit_seq"],
            }
            for record in records
            if record["id"] is not None
        ]
        if rows and rows[-1]["stamp"] is None and not self._warned_unstamped:
            # NULLs sort last: rows written without the stamp trigger.
            self._warned_unstamped = True
            log.warning(
                "outbox rows without a commit stamp: run Outbox.postgresql_sql(schema) to "
                "install the trigger; until then such rows keep only their own versions"
            )
        return Batch(leads, rows)

    async def _mark_sent(self, conn: AsyncConnection, ids: Sequence[int], now: datetime) -> None:
        await self._driver.execute(self._mark_sent_sql, list(ids), now)

    def _on_notify(self, *_args: Any) -> None:
        self.notifies += 1
        self.on_wake()

    def _on_listen_lost(self, *_args: Any) -> None:
        # The connection died (database restart): poll until it is set up again.
        self.listening = False
        self.on_wake()

    async def _teardown(self, conn: AsyncConnection) -> None:
        driver, self._driver = self._driver, None
        if driver is not None and self._listen_channel:
            with contextlib.suppress(*self.errors):
                if not driver.is_closed():
                    await driver.remove_listener(self._listen_channel, self._on_notify)


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)
