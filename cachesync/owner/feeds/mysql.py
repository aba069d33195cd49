"""MySQL / MariaDB change feed: the row-based binlog, read with ``mysql-replication``.

The feed connects as a replica (``COM_BINLOG_DUMP``) with **mysql-replication** over PyMySQL,
the maintained pure-Python binlog reader. Its reader blocks, so it runs on one thread that
hands decoded rows to the event loop through a bounded queue (the thread waits when the
publisher falls behind); the server's heartbeat (every 0.5 s when idle) lets the thread
notice a stop.

The server needs ``log_bin``, ``binlog_format=ROW`` and ``binlog_row_image=FULL`` (checked at
start), and a ``server_id``; ``binlog_row_metadata=FULL`` (MySQL 8, MariaDB 10.5+) gives column
names from the log itself, so rows decoded after an ``ALTER TABLE`` use the columns they were
written with. The feed's replica id is derived from its ``name``: one running feed per name.

The position (binlog file and offset after the last published commit) is kept in the table
``cachesync_feed_position`` of the DSN's database, written after the broker took the events,
with ``sql_log_bin=0`` so it stays out of the log it tracks. A restart resumes there; a first
start begins at the server's current position. ``ChangeFeed.drop()`` deletes the row. The
server purges binlogs by age (``binlog_expire_logs_seconds``): a feed down for longer than
that cannot resume and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic_core import to_jsonable_python

from .base import Batch, FeedError, Kind, RowChange, Source, Table

try:
    import pymysql
    from pymysqlreplication import BinLogStreamReader
    from pymysqlreplication.event import HeartbeatLogEvent, QueryEvent, XidEvent
    from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the MySQL/MariaDB change feed needs mysql-replication: pip install 'cachesync[cdc]'"
    ) from exc

__all__ = ["MySQLSource"]

POSITION_TABLE = "cachesync_feed_position"
_HEARTBEAT = 0.5
SAVE_INTERVAL = 0.2
_QUEUE = 20_000
_CHUNK = 1000
_TRUNCATE = re.compile(
    r"^\s*TRUNCATE\s+(?:TABLE\s+)?(?:`?([A-Za-z0-9_$]+)`?\s*\.\s*)?`?([A-Za-z0-9_$]+)`?\s*;?\s*$",
    re.IGNORECASE,
)
# Statements logged inside a transaction: the position after them is not a commit boundary.
_IN_TRANSACTION = ("SAVEPOINT", "ROLLBACK TO", "RELEASE SAVEPOINT", "XA ")


def _settings(dsn: str) -> tuple[dict[str, Any], str]:
    parts = urlsplit(dsn)
    database = parts.path.lstrip("/")
    if not database:
        raise FeedError("name the database in the DSN: mysql://USER@HOST:PORT/DATABASE")
    settings = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": unquote(parts.username or "root"),
        "password": unquote(parts.password or ""),
    }
    return settings, database


def _connect(**settings: Any) -> Any:
    # mysql-replication names the database with PyMySQL's deprecated ``db``.
    if "db" in settings:
        settings["database"] = settings.pop("db")
    return pymysql.connect(**settings)


def _json(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    try:
        return to_jsonable_python(value)
    except Exception:  # a type pydantic does not know: its text is still a faithful key
        return str(value)


class FeedBusy(ConnectionError):
    """Another feed of the same name holds the lock: this one retries until it is gone."""


class MySQLSource(Source):
    """Reads the row binlog from a saved position; see the module docstring."""

    errors = (pymysql.err.MySQLError, OSError, TimeoutError)

    def __init__(self, dsn: str, tables: Sequence[Table], name: str) -> None:
        self.settings, self.database = _settings(dsn)
        self.name = name
        self.tables = tables
        self.server_id = 0x40000000 + zlib.crc32(name.encode()) % 0x3FFFFFFF
        self._by_table = {(t.schema or self.database, t.table): t for t in tables}
        self._ctl: Any = None
        self._ctl_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue(_QUEUE)
        self._ready = asyncio.Event()
        self._waiting = False
        self._woken = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._position: tuple[str, int] | None = None
        self._saved: tuple[str, int] | None = None
        self._saved_at = 0.0
        self._idle_reported = False

    # -- setup -----------------------------------------------------------------------------

    def _connect(self) -> Any:
        return pymysql.connect(**self.settings, database=self.database, autocommit=True)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        # One connection, used from worker threads (confirm, lag): one statement at a time.
        with self._ctl_lock, self._ctl.cursor() as cur:
            cur.execute(sql, tuple(args))
            return list(cur.fetchall())

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ctl = await asyncio.to_thread(self._connect)
        position = await asyncio.to_thread(self._setup)
        self._position = self._saved = position
        self._saved_at = time.monotonic()
        self._stop = threading.Event()
        self._queue = queue.Queue(_QUEUE)
        self._ready = asyncio.Event()
        self._idle_reported = False
        self._thread = threading.Thread(
            target=self._reader, args=(position,), name=f"cachesync-binlog-{self.name}", daemon=True
        )
        self._thread.start()

    def _setup(self) -> tuple[str, int]:
        (log_bin, fmt, image) = self._query(
            "SELECT @@log_bin, @@binlog_format, @@binlog_row_image"
        )[0]
        if str(log_bin) not in ("1", "ON") or fmt != "ROW" or image != "FULL":
            raise FeedError(
                f"the server runs with log_bin={log_bin}, binlog_format={fmt}, "
                f"binlog_row_image={image}; a change feed needs log_bin, binlog_format=ROW, "
                "binlog_row_image=FULL and a server_id in the [mysqld] section of its "
                "configuration (then restart it)"
            )
        for (schema, name), table in self._by_table.items():
            columns = {
                row[0]
                for row in self._query(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = %s AND table_name = %s",
                    (schema, name),
                )
            }
            if not columns:
                raise FeedError(f"table {schema}.{name} does not exist")
            missing = sorted(table.columns() - columns)
            if missing:
                raise FeedError(f"table {schema}.{name} has no column(s) {', '.join(missing)}")
        # One running feed per name: a second one waits (its start retries) until the lock,
        # held by this connection, is released with it.
        (locked,) = self._query("SELECT GET_LOCK(%s, 0)", (f"cachesync_feed_{self.name}",))[0]
        if locked != 1:
            raise FeedBusy(f"feed {self.name} already runs against this server; waiting")
        self._query(
            f"CREATE TABLE IF NOT EXISTS {POSITION_TABLE} (name VARCHAR(64) PRIMARY KEY, "
            "log_file VARCHAR(255) NOT NULL, log_pos BIGINT NOT NULL, "
            "updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) "
            "ON UPDATE CURRENT_TIMESTAMP(6))"
        )
        with contextlib.suppress(pymysql.err.MySQLError):  # needs a privilege; harmless without
            self._query("SET SESSION sql_log_bin = 0")
        rows = self._query(
            f"SELECT log_file, log_pos FROM {POSITION_TABLE} WHERE name = %s", (self.name,)
        )
        logs = {row[0] for row in self._query("SHOW BINARY LOGS")}
        if rows:
            log_file, log_pos = rows[0][0], int(rows[0][1])
            if log_file not in logs:
                raise FeedError(
                    f"binlog {log_file} of feed {self.name} was purged: changes since were lost "
                    f"to it. Flush the consumers' caches, then DELETE FROM {POSITION_TABLE} "
                    f"WHERE name = '{self.name}' to start from now"
                )
            return log_file, log_pos
        log_file, log_pos = self._query("SHOW MASTER STATUS")[0][:2]
        self._save((log_file, int(log_pos)))
        return log_file, int(log_pos)

    def _save(self, position: tuple[str, int]) -> None:
        self._query(
            f"INSERT INTO {POSITION_TABLE} (name, log_file, log_pos) VALUES (%s, %s, %s) "
            "ON DUPLICATE KEY UPDATE log_file = VALUES(log_file), log_pos = VALUES(log_pos)",
            (self.name, *position),
        )

    # -- the reader thread -----------------------------------------------------------------

    def _reader(self, position: tuple[str, int]) -> None:
        stream = None
        try:
            stream = BinLogStreamReader(
                connection_settings=self.settings,
                server_id=self.server_id,
                resume_stream=True,
                log_file=position[0],
                log_pos=position[1],
                blocking=True,
                only_events=[
                    WriteRowsEvent,
                    UpdateRowsEvent,
                    DeleteRowsEvent,
                    XidEvent,
                    QueryEvent,
                    HeartbeatLogEvent,
                ],
                only_schemas=sorted({schema for schema, _ in self._by_table}),
                slave_heartbeat=_HEARTBEAT,
                pymysql_wrapper=_connect,
                enable_logging=False,
                freeze_schema=True,
            )
            last = position
            # A transaction's items go to the queue together, at its commit (or every
            # _CHUNK rows of a large one): one queue operation per transaction, not per event.
            pending: list[Any] = []
            while not self._stop.is_set():
                event = stream.fetchone()
                if event is None:
                    continue
                if isinstance(event, HeartbeatLogEvent):
                    # The server beats only when it has sent everything: its position is a
                    # commit boundary past changes of other tables, safe to confirm.
                    here = (stream.log_file, stream.log_pos)
                    if here != last:
                        last = here
                        self._put([*pending, ("idle", here, None)])
                        pending = []
                    continue
                items = self._items(event, stream)
                if not items:
                    continue
                pending.extend(items)
                if len(pending) >= _CHUNK or not isinstance(items[-1], RowChange):
                    self._put(pending)
                    pending = []
        except BaseException as exc:  # handed to the loop, which reconnects
            self._put(exc)
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()

    def _items(self, event: Any, stream: Any) -> list[Any]:
        ts = float(event.timestamp)
        if isinstance(event, XidEvent):
            return [("commit", (stream.log_file, stream.log_pos), ts)]
        if isinstance(event, QueryEvent):
            query = event.query.strip() if isinstance(event.query, str) else ""
            upper = query.upper()
            if upper in ("BEGIN", "COMMIT", "ROLLBACK") or upper.startswith(_IN_TRANSACTION):
                return []  # not a commit boundary: no position to confirm here
            items: list[Any] = []
            match = _TRUNCATE.match(query)
            if match is not None:
                schema = match.group(1) or (
                    event.schema.decode() if isinstance(event.schema, bytes) else event.schema
                )
                table = self._by_table.get((schema, match.group(2)))
                if table is not None:
                    items.append(RowChange(table, "truncate", None, ts))
            # DDL commits on its own: a position to confirm.
            items.append(("commit", (stream.log_file, stream.log_pos), ts))
            return items
        table = self._by_table.get((event.schema, event.table))
        if table is None:
            return []
        changes: list[Any] = []
        if isinstance(event, UpdateRowsEvent):
            for row in event.rows:
                new = {k: _json(v) for k, v in row["after_values"].items()}
                old = {k: _json(v) for k, v in row["before_values"].items()}
                changes.append(RowChange(table, "update", new, ts, old))
        else:
            kind: Kind = "insert" if isinstance(event, WriteRowsEvent) else "delete"
            for row in event.rows:
                values = {k: _json(v) for k, v in row["values"].items()}
                changes.append(RowChange(table, kind, values, ts))
        return changes

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
            except queue.Full:
                continue
            if self._waiting and not self._woken and self._loop is not None:
                self._woken = True  # one wake-up per wait, however many items follow
                with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
                    self._loop.call_soon_threadsafe(self._ready.set)
            return

    # -- the loop side ---------------------------------------------------------------------

    async def read(self, max_changes: int) -> Batch:
        batch = Batch()
        changes = batch.changes
        get = self._queue.get_nowait
        while len(changes) < max_changes:
            try:
                items = get()
            except queue.Empty:
                if changes or batch.position is not None:
                    return batch
                if not self._idle_reported:
                    self._idle_reported = True
                    return batch
                await self._wait(1.0)
                continue
            self._idle_reported = False
            if isinstance(items, BaseException):
                raise items
            for item in items:
                if isinstance(item, RowChange):
                    changes.append(item)
                else:
                    kind, batch.position, ts = item
                    if kind == "commit":
                        batch.commit_ts = ts
                        batch.commits += 1
        return batch

    async def _wait(self, timeout: float) -> None:
        self._woken = False
        self._ready.clear()
        self._waiting = True
        try:
            if self._queue.empty():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), timeout)
        finally:
            self._waiting = False

    async def confirm(self, position: Any) -> None:
        # Stored at most every SAVE_INTERVAL (and on close): a write per batch would cap a
        # backlog of small transactions at the database's commit rate. A feed killed in
        # between publishes those batches again, which at-least-once allows.
        self._position = position
        now = time.monotonic()
        if now - self._saved_at >= SAVE_INTERVAL:
            self._saved_at = now
            await asyncio.to_thread(self._save, position)
            self._saved = position

    async def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            # The reader notices the stop at its next event or heartbeat.
            await asyncio.to_thread(thread.join, 5.0)
        position = self._position
        if self._ctl is not None and position is not None and position != self._saved:
            with contextlib.suppress(*self.errors):
                await asyncio.to_thread(self._save, position)
                self._saved = position
        ctl, self._ctl = self._ctl, None
        if ctl is not None:
            with contextlib.suppress(Exception):
                ctl.close()

    async def lag(self) -> int | None:
        position = self._position
        if position is None or self._ctl is None:
            return None
        logs = await asyncio.to_thread(self._query, "SHOW BINARY LOGS")
        behind = 0
        seen = False
        for name, size, *_ in logs:
            if name == position[0]:
                seen = True
                behind += int(size) - position[1]
            elif seen:
                behind += int(size)
        return max(0, behind) if seen else None

    def describe(self) -> dict[str, Any]:
        position = self._position
        return {
            "server_id": self.server_id,
            "position": f"{position[0]}:{position[1]}" if position else None,
        }

    async def drop(self) -> None:
        own = self._ctl is None
        if own:
            self._ctl = await asyncio.to_thread(self._connect)
        try:
            await asyncio.to_thread(
                self._query,
                f"DELETE FROM {POSITION_TABLE} WHERE name = %s",
                (self.name,),
            )
        except pymysql.err.ProgrammingError:
            pass  # no position table: nothing to drop
