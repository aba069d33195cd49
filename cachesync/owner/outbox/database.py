"""What every database path of the relay shares: its one connection, and the marking statements.

A database path (:mod:`.generic`, :mod:`.postgresql`) says how to elect, select and wake;
:func:`database_for` picks the one for an engine, once, so the relay never asks which it has.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, delete, false, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ...errors import ConfigError
from .model import TABLE, TABLE_NAME
from .rows import Row

__all__ = ["DB_ERRORS", "Batch", "OutboxDatabase", "database_for"]

DB_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError, TimeoutError)
"""What a lost or refused database connection looks like through SQLAlchemy and the drivers."""


@dataclass(frozen=True, slots=True)
class Batch:
    """One round's election and reading: whether this relay leads, and if so its rows."""

    leads: bool
    rows: Sequence[Row]


class OutboxDatabase(abc.ABC):
    """One relay's access to the outbox: a connection held for the relay's life, in autocommit.

    Autocommit: each statement is its own transaction, so a round costs one round trip per
    statement (no BEGIN/ROLLBACK), holds no SQLite lock or PostgreSQL snapshot while it
    publishes, and never delays a NOTIFY (delivered only between transactions). Nothing here
    needs two statements to be atomic. Any error drops the connection (see :meth:`close`); the
    next call opens a new one.
    """

    #: The exceptions that mean "the database or the connection failed".
    errors: tuple[type[BaseException], ...] = DB_ERRORS

    def __init__(
        self,
        engine: AsyncEngine,
        channel: str,
        batch_size: int,
        *,
        listen: bool,
        on_wake: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.batch_size = batch_size
        self.listen = listen
        self.on_wake = on_wake
        #: Whether a NOTIFY wakes the relay right now (else it polls).
        self.listening = False
        #: NOTIFYs received.
        self.notifies = 0
        self._conn: AsyncConnection | None = None
        self._configure()

    @abc.abstractmethod
    def _configure(self) -> None:
        """Build what does not depend on a connection."""

    async def connection(self) -> AsyncConnection:
        """The relay's connection, opened on first use and after a failure."""
        if self._conn is not None:
            return self._conn
        conn = await self.engine.connect()
        try:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await _check_columns(conn)
            await self._setup(conn)
        except BaseException:
            await _discard(conn)
            raise
        self._conn = conn
        return conn

    @abc.abstractmethod
    async def _setup(self, conn: AsyncConnection) -> None:
        """Prepare a new connection (statements, LISTEN)."""

    @abc.abstractmethod
    async def next_batch(self) -> Batch:
        """Elect, and read the channel's lowest unsent rows in commit order if leading."""

    async def mark(
        self,
        sent: Sequence[int],
        notes: Mapping[int, str],
        failed: Mapping[int, str],
        attempted: int | None,
    ) -> None:
        """Record a round: ``sent`` rows took by the broker, ``notes`` on sent rows published in
        a reduced form, ``failed`` rows that cannot be published, and one more ``attempted``
        try on the first row of a batch the broker refused."""
        table = TABLE
        conn = await self.connection()
        try:
            if sent:
                await self._mark_sent(conn, sent, datetime.now(UTC))
            for row_id, reason in notes.items():
                await conn.execute(
                    update(table).where(table.c.id == row_id).values(failed_reason=reason)
                )
            for row_id, reason in failed.items():
                await conn.execute(
                    update(table)
                    .where(table.c.id == row_id)
                    .values(failed_reason=reason, attempts=table.c.attempts + 1)
                )
            if attempted is not None:
                await conn.execute(
                    update(table)
                    .where(table.c.id == attempted)
                    .values(attempts=table.c.attempts + 1)
                )
            await conn.commit()
        except self.errors:
            await self.close()
            raise

    async def _mark_sent(self, conn: AsyncConnection, ids: Sequence[int], now: datetime) -> None:
        table = TABLE
        await conn.execute(
            update(table).where(self._id_in(ids)).values(sent_at=now, attempts=table.c.attempts + 1)
        )

    def _id_in(self, ids: Sequence[int]) -> ColumnElement[bool]:
        return TABLE.c.id.in_(ids)

    async def prune(self, cutoff: datetime) -> int:
        """Delete the rows sent before ``cutoff``; how many."""
        table = TABLE
        conn = await self.connection()
        try:
            result = await conn.execute(
                delete(table).where(table.c.sent_at.is_not(None), table.c.sent_at <= cutoff)
            )
            await conn.commit()
        except self.errors:
            await self.close()
            raise
        return result.rowcount or 0

    async def close(self) -> None:
        """Drop the connection (never back to the pool: it may LISTEN, or be broken).

        On PostgreSQL this ends the session, and with it the advisory lock: another relay may
        take over.
        """
        conn, self._conn = self._conn, None
        self.listening = False
        if conn is not None:
            await self._teardown(conn)
            await _discard(conn)

    @abc.abstractmethod
    async def _teardown(self, conn: AsyncConnection) -> None:
        """Undo :meth:`_setup` on a connection about to be dropped."""


async def _check_columns(conn: AsyncConnection) -> None:
    """Fail with what to do when the table predates a column the relay reads."""
    try:
        await conn.execute(select(TABLE.c.commit_seq).where(false()))
        await conn.rollback()
    except SQLAlchemyError as exc:
        if "commit_seq" not in str(exc):
            raise
        raise ConfigError(
            "the outbox table has no commit_seq column (it was made by an earlier version): "
            f"ALTER TABLE {TABLE_NAME} ADD COLUMN commit_seq BIGINT, then on PostgreSQL run "
            "Outbox.postgresql_sql(schema); see the CHANGELOG for the index"
        ) from exc


async def _discard(conn: AsyncConnection) -> None:
    with contextlib.suppress(*DB_ERRORS):
        await conn.invalidate()
    with contextlib.suppress(*DB_ERRORS):
        await conn.close()


def database_for(
    engine: AsyncEngine,
    channel: str,
    batch_size: int,
    *,
    listen: bool,
    on_wake: Callable[[], None],
) -> OutboxDatabase:
    """The database path for ``engine``: PostgreSQL with asyncpg, or the generic one."""
    cls: type[OutboxDatabase]
    if engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg":
        from .postgresql import PostgresDatabase

        cls = PostgresDatabase
    else:
        from .generic import GenericDatabase

        cls = GenericDatabase
    return cls(engine, channel, batch_size, listen=listen, on_wake=on_wake)
