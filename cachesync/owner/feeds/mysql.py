"""MySQL / MariaDB change feed: the row-based binlog, read with ``mysql-replication``.

The feed connects as a replica (``COM_BINLOG_DUMP``) with **mysql-replication** over PyMySQL,
the maintained pure-Python binlog reader (:mod:`cachesync.owner.feeds.binlog`). Its reader
blocks, so it runs on one thread that hands each transaction's rows to the event loop through a
bounded queue (the thread waits when the publisher falls behind), waking the loop once however
many transactions follow before it runs; the server's heartbeat (every 0.5 s when idle) lets the
thread notice a stop and moves the position past other tables' changes.

The server needs ``log_bin``, ``binlog_format=ROW`` and ``binlog_row_image=FULL`` (checked at
start), and a ``server_id``; ``binlog_row_metadata=FULL`` (MySQL 8, MariaDB 10.5+) gives column
names from the log itself, so rows decoded after an ``ALTER TABLE`` use the columns they were
written with. The feed's replica id is derived from its ``name``: one running feed per name.

XA transactions: the rows of one prepared (``XA PREPARE``) are held until its ``XA COMMIT``,
published then, and dropped at its ``XA ROLLBACK``; while one is open, no position is confirmed
(a restart reads its prepare again, and publishes the commits after it again). An ``XA
COMMIT`` of a transaction prepared before the feed's first position flushes every table's
namespace: its rows are not in what the feed read.

The position is kept in the table ``cachesync_feed_position`` of the DSN's database, written
after the broker took the events (at most every ``SAVE_INTERVAL`` and on close), with the
``server_id`` of the server it was read from. On MariaDB it holds the GTID position
(``domain-server-seq`` per domain) beside the binlog file and offset. A restart on the same
server resumes by file and offset (exact, and quicker: a GTID start first reads the binlog file
that holds it up to there); a position saved on another server (the DSN now names a replica
promoted after a failover, which needs ``log_slave_updates``) resumes by GTID. For that the
position row replicates: on MariaDB it is written to the binlog, and the reader passes over
those writes. On MySQL it is the file and offset, written with ``sql_log_bin=0``. A first
start begins at the server's current position. ``ChangeFeed.drop()`` deletes the row. The
server purges binlogs by age (``binlog_expire_logs_seconds``): a feed down for longer than
that cannot resume and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from .base import Batch, FeedError, RowChange, Source, Table

try:
    import pymysql

    from .binlog import Position, Reader
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the MySQL/MariaDB change feed needs mysql-replication: pip install 'cachesync[cdc]'"
    ) from exc

__all__ = ["MySQLSource"]

_T = TypeVar("_T")

POSITION_TABLE = "cachesync_feed_position"
_HEARTBEAT = 0.5
SAVE_INTERVAL = 0.2
_QUEUE = 2_000  # transactions (or CHUNKs of a large one) read and not yet handed over
_JOIN = 5.0  # seconds close() waits for the reader thread
_DUPLICATE_COLUMN = 1060  # ER_DUP_FIELDNAME
_MISSING_GTID = 1236  # ER_MASTER_FATAL_ERROR_READING_BINLOG: a position the server no longer has


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
        self._ctl_lock = asyncio.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue(_QUEUE)
        self._ready = asyncio.Event()
        self._waiting = False
        self._woken = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mariadb = False
        self._server = 0  # the server's server_id, stored with the position
        self._by_gtid = False
        self._position: Position | None = None
        self._saved: Position | None = None
        self._saved_at = 0.0
        self._idle_reported = False
        self._reader: Reader | None = None

    # -- setup -----------------------------------------------------------------------------

    def _connect(self) -> Any:
        return pymysql.connect(**self.settings, database=self.database, autocommit=True)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._ctl.cursor() as cur:
            cur.execute(sql, tuple(args))
            return list(cur.fetchall())

    async def _ask(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self._locked(self._query, sql, args)

    async def _locked(self, work: Callable[..., _T], *args: Any) -> _T:
        # One connection, used from worker threads (confirm, lag, close): one statement at a
        # time. A cancelled caller (the feed stopping) holds the lock until its thread is done
        # with the connection, or close() would write to it at the same time.
        async with self._ctl_lock:
            done = asyncio.ensure_future(asyncio.to_thread(work, *args))
            try:
                return await asyncio.shield(done)
            except asyncio.CancelledError:
                await asyncio.wait([done])
                raise

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ctl = await asyncio.to_thread(self._connect)
        position = await asyncio.to_thread(self._setup)
        self._position = self._saved = position
        self._saved_at = time.monotonic()
        # Each reader thread has its own stop and queue: one that outlived a close (blocked
        # past _JOIN in a connect or a read) puts nothing into its successor's queue.
        stop = self._stop = threading.Event()
        items: queue.Queue[Any] = queue.Queue(_QUEUE)
        self._queue = items
        self._ready = asyncio.Event()
        self._idle_reported = False

        def send(item: Any) -> None:
            self._put(items, stop, item)

        reader = Reader(
            settings=self.settings,
            server_id=self.server_id,
            position=position,
            by_gtid=self._by_gtid,
            tables=self._by_table,
            own=(self.database, POSITION_TABLE),
            heartbeat=_HEARTBEAT,
            send=send,
            stop=stop,
        )
        self._reader = reader
        self._thread = threading.Thread(
            target=self._read_binlog,
            args=(reader, send),
            name=f"cachesync-binlog-{self.name}",
            daemon=True,
        )
        self._thread.start()

    def _setup(self) -> Position:
        (log_bin, fmt, image, version, server) = self._query(
            "SELECT @@log_bin, @@binlog_format, @@binlog_row_image, VERSION(), @@server_id"
        )[0]
        if str(log_bin) not in ("1", "ON") or fmt != "ROW" or image != "FULL":
            raise FeedError(
                f"the server runs with log_bin={log_bin}, binlog_format={fmt}, "
                f"binlog_row_image={image}; a change feed needs log_bin, binlog_format=ROW, "
                "binlog_row_image=FULL and a server_id in the [mysqld] section of its "
                "configuration (then restart it)"
            )
        self._mariadb = "mariadb" in str(version).lower()
        self._server = int(server)
        self._by_gtid = False
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
            "log_file VARCHAR(255) NOT NULL, log_pos BIGINT NOT NULL, gtid TEXT NULL, "
            "server_id BIGINT NULL, "
            "updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) "
            "ON UPDATE CURRENT_TIMESTAMP(6))"
        )
        have = {
            row[0]
            for row in self._query(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND table_name = %s",
                (POSITION_TABLE,),
            )
        }
        for column, definition in (("gtid", "TEXT NULL"), ("server_id", "BIGINT NULL")):
            if column not in have:  # a table from before GTID positions
                try:
                    self._query(f"ALTER TABLE {POSITION_TABLE} ADD COLUMN {column} {definition}")
                except pymysql.err.MySQLError as exc:
                    if exc.args[:1] != (_DUPLICATE_COLUMN,):
                        raise  # else: a feed of another name added it meanwhile
        if not self._mariadb:
            # A file and offset mean nothing on another server: keep the row out of the log.
            with contextlib.suppress(pymysql.err.MySQLError):  # needs a privilege
                self._query("SET SESSION sql_log_bin = 0")
        rows = self._query(
            f"SELECT log_file, log_pos, gtid, server_id FROM {POSITION_TABLE} WHERE name = %s",
            (self.name,),
        )
        if rows:
            log_file, log_pos, gtid, saved_by = rows[0]
            log_file, log_pos, gtid = str(log_file), int(log_pos), gtid or None
            if self._mariadb and gtid and saved_by != self._server:
                # Saved on another server (a failover): its file and offset mean nothing here,
                # the GTID does. The server says if it no longer has it. On the same server the
                # file and offset are exact and quicker: starting from a GTID, the server first
                # reads the binlog file that holds it up to there.
                self._by_gtid = True
                return log_file, log_pos, gtid
            if saved_by is not None and int(saved_by) != self._server:
                # A file and offset of another server: resuming there would skip or garble
                # changes without a word.
                raise FeedError(
                    f"the position of feed {self.name} ({log_file}:{log_pos}) was saved on "
                    f"the server with server_id {saved_by}, this one has {self._server}, and "
                    f"it has no GTID to resume from. {self._start_over}"
                )
            logs = {row[0] for row in self._query("SHOW BINARY LOGS")}
            if log_file not in logs:
                raise FeedError(
                    f"binlog {log_file} of feed {self.name} was purged: changes since were lost "
                    f"to it. {self._start_over}"
                )
            return log_file, log_pos, gtid
        position = self._current()
        self._save(position)
        return position

    def _current(self) -> Position:
        """The server's position now. On MariaDB its GTID is read before and after the file
        and offset, until both agree (BINLOG_GTID_POS would read the whole binlog file): the
        earlier one, if they never do, at worst sends a commit twice after a failover."""
        log_file, log_pos = self._query("SHOW MASTER STATUS")[0][:2]
        if not self._mariadb:
            return str(log_file), int(log_pos), None
        gtid = first = self._query("SELECT @@gtid_binlog_pos")[0][0]
        for _ in range(5):
            log_file, log_pos = self._query("SHOW MASTER STATUS")[0][:2]
            after = self._query("SELECT @@gtid_binlog_pos")[0][0]
            if after == gtid:
                return str(log_file), int(log_pos), gtid or None
            gtid = after
        return str(log_file), int(log_pos), first or None

    @property
    def _start_over(self) -> str:
        return (
            f"Flush the consumers' caches, then DELETE FROM {POSITION_TABLE} "
            f"WHERE name = '{self.name}' to start from now"
        )

    def _save(self, position: Position) -> None:
        self._query(
            f"INSERT INTO {POSITION_TABLE} (name, log_file, log_pos, gtid, server_id) "
            "VALUES (%s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE log_file = VALUES(log_file), "
            "log_pos = VALUES(log_pos), gtid = VALUES(gtid), server_id = VALUES(server_id)",
            (self.name, *position, self._server),
        )

    # -- reading ---------------------------------------------------------------------------

    def _read_binlog(self, reader: Reader, send: Callable[[Any], None]) -> None:
        try:
            reader.run()
        except BaseException as exc:  # handed to the loop, which reconnects
            send(self._error(exc))

    def _put(self, items: queue.Queue[Any], stop: threading.Event, item: Any) -> None:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.2)
            except queue.Full:
                continue
            if self._waiting and not self._woken and self._loop is not None:
                self._woken = True  # one wake-up per wait, however many items follow
                with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
                    self._loop.call_soon_threadsafe(self._ready.set)
            return

    def _error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, pymysql.err.OperationalError) and exc.args[:1] == (_MISSING_GTID,):
            return FeedError(
                f"the server cannot send the binlog of feed {self.name} from "
                f"{self._describe_position()}: {exc.args[-1]}. If it was purged, changes since "
                f"were lost to it. {self._start_over}"
            )
        return exc

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
                    kind, position, ts = item
                    if kind != "held":  # a commit while an XA transaction is prepared
                        batch.position = position
                    if kind != "idle":
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
            await self._locked(self._save, position)
            self._saved = position

    async def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            # The reader notices the stop at its next event or heartbeat.
            await asyncio.to_thread(thread.join, _JOIN)
        position = self._position
        if self._ctl is not None and position is not None and position != self._saved:
            with contextlib.suppress(*self.errors):
                await self._locked(self._save, position)
                self._saved = position
        ctl, self._ctl = self._ctl, None
        if ctl is not None:
            with contextlib.suppress(Exception):
                ctl.close()

    async def lag(self) -> int | None:
        position = self._position
        if position is None or self._ctl is None:
            return None
        logs = await self._ask("SHOW BINARY LOGS")
        behind = 0
        seen = False
        for name, size, *_ in logs:
            if name == position[0]:
                seen = True
                behind += int(size) - position[1]
            elif seen:
                behind += int(size)
        return max(0, behind) if seen else None

    def _describe_position(self) -> str:
        position = self._position
        if position is None:
            return "no position"
        return f"GTID {position[2]}" if self._by_gtid else f"{position[0]}:{position[1]}"

    def describe(self) -> dict[str, Any]:
        position = self._position
        reader = self._reader
        xa_open, xa_open_seconds = reader.open_xa() if reader is not None else (0, None)
        return {
            "server_id": self.server_id,
            "position": f"{position[0]}:{position[1]}" if position else None,
            "gtid": position[2] if position else None,
            # Prepared XA transactions not yet ended: the position stays before them.
            "xa_open": xa_open,
            "xa_open_seconds": xa_open_seconds,
        }

    async def drop(self) -> None:
        own = self._ctl is None
        if own:
            self._ctl = await asyncio.to_thread(self._connect)
        try:
            await self._ask(f"DELETE FROM {POSITION_TABLE} WHERE name = %s", (self.name,))
        except pymysql.err.ProgrammingError:
            pass  # no position table: nothing to drop
