"""The relay on SQLite, and on any database SQLAlchemy speaks: SQLAlchemy statements, polling.

No election: every relay leads (run one per channel). The rows go out in ``commit_seq`` order,
then ``id`` order. SQLite lets one transaction write at a time, so its ids are drawn in commit
order and serve as the commit stamp; on PostgreSQL without asyncpg the trigger's
``commit_seq`` is the stamp. Elsewhere (MySQL, MariaDB...) rows carry no stamp: give them
versions if two transactions may change one key concurrently.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from .database import Batch, OutboxDatabase
from .model import TABLE

__all__ = ["GenericDatabase"]

log = logging.getLogger("cachesync.outbox")


class GenericDatabase(OutboxDatabase):
    """SQLAlchemy statements on the relay's connection; polling; every relay leads."""

    def _configure(self) -> None:
        table = TABLE
        # Built once: constructing the statement costs more than running it on an idle DB.
        self._query = (
            select(table)
            .where(
                table.c.channel == self.channel,
                table.c.sent_at.is_(None),
                table.c.failed_reason.is_(None),
            )
            .order_by(table.c.commit_seq, table.c.id)
            .limit(self.batch_size)
        )
        dialect = self.engine.dialect
        self._ids_are_stamps = dialect.name == "sqlite"
        if self.listen and dialect.name == "postgresql":
            log.info("outbox relay polls: LISTEN/NOTIFY needs the asyncpg driver")

    async def _setup(self, conn: AsyncConnection) -> None:
        if conn.dialect.name not in ("sqlite", "postgresql"):
            log.info(
                "outbox relay on %s: no leader election and no commit stamp; run one relay "
                "per channel, and give rows versions",
                conn.dialect.name,
            )

    async def _teardown(self, conn: AsyncConnection) -> None:
        return None

    async def next_batch(self) -> Batch:
        conn = await self.connection()
        try:
            found = (await conn.execute(self._query)).mappings().all()
            await conn.rollback()  # ends SQLAlchemy's transaction; autocommit ended the DB's
        except self.errors:
            await self.close()
            raise
        ids_are_stamps = self._ids_are_stamps
        rows = [
            {
                **row,
                "stamp": row["commit_seq"]
                if row["commit_seq"] is not None
                else (row["id"] if ids_are_stamps else None),
            }
            for row in found
        ]
        return Batch(True, rows)
