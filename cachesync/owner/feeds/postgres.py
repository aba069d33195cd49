"""PostgreSQL change feed: a logical replication slot with the built-in ``pgoutput`` plugin.

The driver is **psycopg2** (``psycopg2-binary``): among maintained Python drivers it is the one
that speaks the streaming replication protocol (``LogicalReplicationConnection``, ``COPY BOTH``,
standby status updates). psycopg 3 has no replication support yet (psycopg/psycopg#71) and
asyncpg none either. psycopg2's asynchronous mode is used, so the stream is read on the event
loop (``loop.add_reader`` on the socket) with no thread: messages are decoded as they arrive,
which keeps commit-to-publish latency at the cost of one socket read.

What the feed sets up (idempotent; ``ChangeFeed.drop()`` removes both):

- a publication ``NAME`` for the mapped tables (``CREATE PUBLICATION``; ``ALTER PUBLICATION ...
  SET TABLE`` when the mapping changed), created before the slot so decoding can see it;
- a logical replication slot ``NAME`` with ``pgoutput``: the server keeps the WAL from the
  slot's confirmed position on, so a feed that was down resumes exactly there.

The position confirmed to the server (``flush_lsn`` of a standby status update) is the end of
the last commit whose events the broker took. While idle, the feed confirms the position the
server reports in its keepalives, so a slot on a busy database with quiet tables does not hold
WAL back. Deletes need the key columns in the table's replica identity (the primary key by
default); otherwise ``start()`` asks for ``ALTER TABLE ... REPLICA IDENTITY FULL``.

A slot nobody reads keeps every WAL segment from its position on: stop and drop a retired feed
(``cachesync cdc DSN --drop-slot --name NAME`` or ``ChangeFeed.drop()``), or in SQL::

    SELECT slot_name, active, pg_size_pretty(pg_current_wal_lsn() - confirmed_flush_lsn)
      FROM pg_replication_slots;
    SELECT pg_drop_replication_slot('cachesync');  DROP PUBLICATION IF EXISTS cachesync;
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from .base import Batch, FeedError, RowChange, Source, Table
from .pgoutput import Begin, Commit, Decoder, Relation, RowMessage, Truncate, lsn_to_str

try:
    import psycopg2
    import psycopg2.extensions
    import psycopg2.extras
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the PostgreSQL change feed needs psycopg2: pip install 'cachesync[cdc]'"
    ) from exc

__all__ = ["PostgresSource"]

_STATUS_INTERVAL = 1
_SLOW_SLOT = 5.0
log = logging.getLogger("cachesync.feeds")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _wait(conn: Any) -> None:
    """Drive an asynchronous psycopg2 connection until its pending operation completes."""
    loop = asyncio.get_running_loop()
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        fd = conn.fileno()
        ready: asyncio.Future[None] = loop.create_future()

        def wake(future: asyncio.Future[None] = ready) -> None:
            if not future.done():
                future.set_result(None)

        if state == psycopg2.extensions.POLL_READ:
            loop.add_reader(fd, wake)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
        elif state == psycopg2.extensions.POLL_WRITE:
            loop.add_writer(fd, wake)
            try:
                await ready
            finally:
                loop.remove_writer(fd)
        else:  # pragma: no cover - poll() raises rather than returning anything else
            raise psycopg2.OperationalError(f"unexpected poll state {state}")


class _Admin:
    """An ordinary asynchronous connection for the setup statements and the lag query."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()

    @classmethod
    async def connect(cls, dsn: str) -> _Admin:
        conn = psycopg2.connect(dsn, async_=True)
        try:
            await _wait(conn)
        except BaseException:
            conn.close()
            raise
        return cls(conn)

    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self.lock:
            cur = self.conn.cursor()
            try:
                cur.execute(sql, tuple(args))
                await _wait(self.conn)
                return list(cur.fetchall()) if cur.description is not None else []
            finally:
                cur.close()

    def close(self) -> None:
        self.conn.close()


class PostgresSource(Source):
    """Reads a ``pgoutput`` slot over the replication protocol; see the module docstring."""

    errors = (psycopg2.Error, OSError, TimeoutError)

    def __init__(self, dsn: str, tables: Sequence[Table], name: str) -> None:
        self.dsn = dsn
        self.tables = tables
        self.slot = name
        self.publication = name
        self._admin: _Admin | None = None
        self._conn: Any = None
        self._cur: Any = None
        self._decoder = Decoder()
        self._by_relation: dict[tuple[str, str], Table] = {}
        self._in_tx = False
        self._tx_ts = 0.0
        self._confirmed = 0
        self._idle_reported = False

    # -- setup -----------------------------------------------------------------------------

    async def open(self) -> None:
        admin = self._admin = await _Admin.connect(self.dsn)
        (level,) = (await admin.query("SHOW wal_level"))[0]
        if level != "logical":
            raise FeedError(
                f"PostgreSQL runs with wal_level={level}; a change feed needs logical: "
                "ALTER SYSTEM SET wal_level = logical; then restart the server"
            )
        resolved = [await self._resolve(admin, table) for table in self.tables]
        self._by_relation = {(schema, name): table for schema, name, table in resolved}
        await self._ensure_publication(admin, [(s, n) for s, n, _ in resolved])
        await self._ensure_slot(admin)
        conn = psycopg2.connect(
            self.dsn,
            connection_factory=psycopg2.extras.LogicalReplicationConnection,
            async_=True,
        )
        self._conn = conn
        await _wait(conn)
        cur = conn.cursor()
        cur.start_replication(
            slot_name=self.slot,
            decode=False,
            options={"proto_version": "1", "publication_names": self.publication},
            status_interval=_STATUS_INTERVAL,
        )
        await _wait(conn)
        self._cur = cur
        self._decoder = Decoder()
        self._in_tx = False
        self._idle_reported = False

    async def _resolve(self, admin: _Admin, table: Table) -> tuple[str, str, Table]:
        name = ".".join(quote_ident(part) for part in table.name.split("."))
        rows = await admin.query(
            "SELECT c.oid, n.nspname, c.relname, c.relreplident FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
            (name,),
        )
        if not rows:
            raise FeedError(f"table {table.name} does not exist (or is not on the search_path)")
        oid, schema, relname, identity = rows[0]
        columns = {
            row[0]
            for row in await admin.query(
                "SELECT attname FROM pg_attribute "
                "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
                (oid,),
            )
        }
        missing = sorted(table.columns() - columns)
        if missing:
            raise FeedError(f"table {table.name} has no column(s) {', '.join(missing)}")
        if identity != "f":
            flag = "indisprimary" if identity == "d" else "indisreplident"
            key_columns = {
                row[0]
                for row in await admin.query(
                    "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
                    "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                    f"WHERE i.indrelid = %s AND i.{flag}",
                    (oid,),
                )
            }
            if identity == "n" or not set(table.keys) <= key_columns:
                raise FeedError(
                    f"deletes from {table.name} would not carry its key column(s) "
                    f"{', '.join(table.keys)}: make them the primary key, or run "
                    f"ALTER TABLE {name} REPLICA IDENTITY FULL"
                )
        return schema, relname, table

    async def _ensure_publication(self, admin: _Admin, tables: list[tuple[str, str]]) -> None:
        listed = ", ".join(f"{quote_ident(s)}.{quote_ident(n)}" for s, n in tables)
        exists = await admin.query(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication,)
        )
        if not exists:
            await admin.query(
                f"CREATE PUBLICATION {quote_ident(self.publication)} FOR TABLE {listed}"
            )
            return
        current = set(
            await admin.query(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                (self.publication,),
            )
        )
        if current != set(tables):
            await admin.query(
                f"ALTER PUBLICATION {quote_ident(self.publication)} SET TABLE {listed}"
            )

    async def _ensure_slot(self, admin: _Admin) -> None:
        rows = await admin.query(
            "SELECT plugin, database, confirmed_flush_lsn::text FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (self.slot,),
        )
        if not rows:
            # The server waits for every transaction open at this moment to end before the
            # slot exists: say why, if it takes long.
            create = asyncio.ensure_future(
                admin.query(
                    "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot,)
                )
            )
            try:
                done, _ = await asyncio.wait({create}, timeout=_SLOW_SLOT)
                if not done:
                    log.warning(
                        "creating replication slot %s waits for the transactions open on the "
                        "server to end; look for 'idle in transaction' in pg_stat_activity",
                        self.slot,
                    )
                await create
            finally:
                create.cancel()
            return
        plugin, database, _lsn = rows[0]
        (current_db,) = (await admin.query("SELECT current_database()"))[0]
        if plugin != "pgoutput" or database != current_db:
            raise FeedError(
                f"replication slot {self.slot} exists with plugin {plugin} on database "
                f"{database}; pick another name= or drop it: "
                f"SELECT pg_drop_replication_slot('{self.slot}')"
            )

    # -- the stream ------------------------------------------------------------------------

    async def read(self, max_changes: int) -> Batch:
        cur = self._cur
        if cur is None:
            raise psycopg2.InterfaceError("the replication stream is not open")
        batch = Batch()
        changes = batch.changes
        decode = self._decoder.decode
        lookup = self._by_relation.get
        while len(changes) < max_changes:
            message = cur.read_message()
            if message is None:
                if changes or batch.position is not None:
                    return batch
                if not self._in_tx:
                    self._advance_idle()
                if not self._idle_reported:
                    self._idle_reported = True
                    return batch
                await self._readable(_STATUS_INTERVAL)
                continue
            self._idle_reported = False
            decoded = decode(message.payload)
            if isinstance(decoded, RowMessage):
                relation = decoded.relation
                table = lookup((relation.schema, relation.name))
                if table is not None:
                    row = decoded.new if decoded.new is not None else decoded.old
                    changes.append(RowChange(table, decoded.kind, row, self._tx_ts, decoded.old))
            elif isinstance(decoded, Begin):
                self._in_tx = True
                self._tx_ts = decoded.commit_ts
            elif isinstance(decoded, Commit):
                self._in_tx = False
                batch.commits += 1
                batch.position = decoded.end_lsn
                batch.commit_ts = decoded.commit_ts
            elif isinstance(decoded, Truncate):
                for relation in decoded.relations:
                    table = lookup((relation.schema, relation.name))
                    if table is not None:
                        changes.append(RowChange(table, "truncate", None, self._tx_ts))
            elif isinstance(decoded, Relation):
                pass  # the decoder keeps it; rows are read by column name
        return batch

    def _advance_idle(self) -> None:
        # Everything the server sent is read and confirmed, no transaction is open: the
        # position of its last keepalive holds nothing for us, so the slot may move on.
        wal_end = self._cur.wal_end
        if wal_end > self._confirmed:
            self._confirmed = wal_end
            self._cur.send_feedback(flush_lsn=wal_end)

    async def _readable(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        fd = self._conn.fileno()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)

    async def confirm(self, position: Any) -> None:
        if position > self._confirmed:
            self._confirmed = position
        self._cur.send_feedback(flush_lsn=self._confirmed, force=True)

    async def close(self) -> None:
        for conn in (self._conn, self._admin.conn if self._admin is not None else None):
            if conn is not None and not conn.closed:
                conn.close()
        self._conn = self._cur = self._admin = None

    async def lag(self) -> int | None:
        admin = self._admin
        if admin is None:
            return None
        rows = await admin.query(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,),
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def describe(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "publication": self.publication,
            "confirmed_lsn": lsn_to_str(self._confirmed),
        }

    async def drop(self) -> None:
        admin = self._admin if self._admin is not None else await _Admin.connect(self.dsn)
        self._admin = admin
        # A feed that just stopped leaves its walsender for a moment: wait for it to go.
        for _ in range(50):
            rows = await admin.query(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
            )
            if not rows or rows[0][0] is None:
                break
            await asyncio.sleep(0.1)
        if rows and rows[0][0] is not None:
            raise FeedError(
                f"replication slot {self.slot} is in use by backend {rows[0][0]}: stop that "
                "feed first"
            )
        if rows:
            await admin.query("SELECT pg_drop_replication_slot(%s)", (self.slot,))
        await admin.query(f"DROP PUBLICATION IF EXISTS {quote_ident(self.publication)}")


async def slot_status(dsn: str) -> list[dict[str, Any]]:
    """Every logical slot of the server with its lag in bytes and whether a feed reads it:
    the check to run when a dead feed may have left a slot behind."""
    admin = await _Admin.connect(dsn)
    try:
        rows = await admin.query(
            "SELECT slot_name, plugin, database, active, "
            "(pg_current_wal_lsn() - confirmed_flush_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY slot_name"
        )
    finally:
        admin.close()
    return [
        {"slot": r[0], "plugin": r[1], "database": r[2], "active": r[3], "lag_bytes": r[4]}
        for r in rows
    ]
