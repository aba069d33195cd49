"""The binlog reader of the MySQL/MariaDB change feed: the row events of a transaction in,
:class:`~cachesync.owner.feeds.base.RowChange` s and commit positions out.

:class:`Reader` runs on the feed's reader thread with **mysql-replication** and hands each
transaction's items (or every ``CHUNK`` rows of a large one) to ``send`` in one call:

- :class:`RowChange` s, values already JSON values;
- ``("commit", (file, pos, gtid), ts)``: a commit boundary, safe to confirm once published;
- ``("idle", (file, pos, gtid), 0.0)``: the server has sent everything up to there;
- ``("held", None, ts)``: a commit whose position cannot be confirmed yet, because an XA
  transaction prepared before it has not ended (its rows are held until its XA COMMIT, and a
  restart must read its prepare again).

``gtid`` is MariaDB's GTID position (``domain-server-seq`` per domain, comma-separated) after
the commit, or None without GTIDs. Transactions that write nothing but the feeds' position table
are passed over: they are the feeds' own bookkeeping (on MariaDB they are in the binlog, so that
the position replicates), and confirming them would only write it again.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pymysql
from pydantic_core import to_jsonable_python
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import (
    HeartbeatLogEvent,
    MariadbGtidEvent,
    QueryEvent,
    XAPrepareEvent,
    XidEvent,
)
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from .base import Kind, RowChange, Table

Position = tuple[str, int, "str | None"]

log = logging.getLogger("cachesync.feeds")

CHUNK = 100  # rows: a large transaction reaches the loop in pieces, published while read
_TRUNCATE = re.compile(
    r"^\s*TRUNCATE\s+(?:TABLE\s+)?(?:`?([A-Za-z0-9_$]+)`?\s*\.\s*)?`?([A-Za-z0-9_$]+)`?\s*;?\s*$",
    re.IGNORECASE,
)
# Comments are logged with the statement (an ORM's or a proxy's tag before it, say); the
# server runs what is inside /*! ... */ and /*M! ... */.
_COMMENT = re.compile(r"/\*(M?!\d*)?(.*?)\*/|--[ \t][^\n]*|#[^\n]*", re.DOTALL)
# Statements logged inside a transaction: the position after them is not a commit boundary.
_IN_TRANSACTION = ("SAVEPOINT", "ROLLBACK TO", "RELEASE SAVEPOINT", "XA ")
# How the binlog names an XA transaction in XA COMMIT / XA ROLLBACK: gtrid, bqual, formatID.
_XID = re.compile(r"X'([0-9A-Fa-f]*)'\s*,\s*X'([0-9A-Fa-f]*)'\s*,\s*(\d+)")
XA_WARN_AFTER = 60.0  # seconds a prepared XA transaction may hold the position unremarked
_FL_PREPARED_XA = 64  # MariaDB's GTID event flag: the transaction ends with an XA PREPARE
XidKey = tuple[int, bytes, bytes]  # formatID, gtrid, bqual


def _json(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    try:
        return to_jsonable_python(value)
    except Exception:  # a type pydantic does not know: its text is still a faithful key
        return str(value)


_JSON_TYPES = frozenset({str, int, float, bool, type(None)})


def _row(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v if type(v) in _JSON_TYPES else _json(v) for k, v in values.items()}


@dataclass(slots=True)
class _Prepared:
    """A prepared XA transaction: its rows, the prepare's time (server clock), and whether it
    was logged as open too long."""

    rows: list[RowChange]
    at: float
    warned: bool = False


class Reader:
    """Reads the binlog from ``position`` (from its GTID when ``by_gtid``, else from its file
    and offset) and hands what the feed needs to ``send`` until ``stop`` is set (seen at the
    next event or heartbeat)."""

    def __init__(
        self,
        *,
        settings: dict[str, Any],
        server_id: int,
        position: Position,
        by_gtid: bool,
        tables: dict[tuple[str, str], Table],
        own: tuple[str, str],
        heartbeat: float,
        send: Callable[[list[Any]], None],
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.server_id = server_id
        self.position = position
        self.by_gtid = by_gtid and bool(position[2])
        self.tables = tables
        self.own = own
        self.heartbeat = heartbeat
        self.send = send
        self.stop = stop
        self._streams = 0
        # The rows of XA transactions prepared and not yet committed or rolled back: held,
        # and published at their XA COMMIT. While any is held, no position is confirmed, so
        # that a restart reads its prepare again.
        self.prepared: dict[XidKey, _Prepared] = {}
        # Prepared XA transactions that touch none of the tables: nothing to hold them for.
        self.untracked_xa: set[XidKey] = set()
        # The GTID position, one entry per replication domain.
        self.gtids = {
            part.split("-", 1)[0]: part for part in (position[2] or "").split(",") if part
        }

    def stream(self) -> Any:
        """The library's reader, with the options that keep its work to what the feed needs."""
        options: dict[str, Any] = {}
        if self.by_gtid:
            options.update(is_mariadb=True, auto_position=self.position[2])
        else:
            options.update(resume_stream=True, log_file=self.position[0], log_pos=self.position[1])
        schemas = {schema for schema, _ in self.tables} | {self.own[0]}
        names = {table for _, table in self.tables} | {self.own[1]}
        return BinLogStreamReader(
            connection_settings=dict(self.settings),
            server_id=self.server_id,
            blocking=True,
            only_events=[
                WriteRowsEvent,
                UpdateRowsEvent,
                DeleteRowsEvent,
                XidEvent,
                QueryEvent,
                HeartbeatLogEvent,
                MariadbGtidEvent,
                XAPrepareEvent,
            ],
            only_schemas=sorted(schemas),
            only_tables=sorted(names),
            # A table id names one version of a table's definition (an ALTER TABLE gives the
            # table a new one), so its table map is decoded once, not before every row event.
            freeze_schema=True,
            slave_heartbeat=self.heartbeat,
            pymysql_wrapper=self._connect,
            enable_logging=False,
            **options,
        )

    def _connect(self, **settings: Any) -> Any:
        # mysql-replication reconnects a lost stream by itself, from where its last event
        # ended (mid-transaction) or, by GTID, from where it started: the feed's transaction
        # state and position would no longer match what the server sends. The second stream
        # connection fails instead, and the feed resumes from its confirmed position.
        if "cursorclass" not in settings:  # not the library's schema connection
            if self._streams:
                raise ConnectionError("the binlog connection was lost")
            self._streams += 1
        return _connect(**settings)

    def run(self) -> None:
        """Read until ``stop`` is set; errors propagate."""
        stream = self.stream()
        try:
            self._run(stream)
        finally:
            stream.close()

    def _run(self, stream: Any) -> None:
        send = self.send
        stop = self.stop
        tables = self.tables
        own = self.own
        pending: list[Any] = []
        gtid = ""  # the GTID of the transaction being read
        xa = False  # it is an XA transaction: its rows wait for its XA COMMIT
        held: list[RowChange] = []  # the rows of that XA transaction so far
        prepared = self.prepared
        own_tx = False  # it wrote the position table
        tracked = False  # it wrote a row of the tables the feed reads
        moved = False  # a transaction not confirmed yet has ended since the last position
        last: tuple[str, int] = (self.position[0], self.position[1])
        while not stop.is_set():
            event = stream.fetchone()
            if event is None:
                continue
            if isinstance(event, MariadbGtidEvent):
                gtid = event.gtid
                own_tx = tracked = False
                xa = bool(event.flags & _FL_PREPARED_XA)
                continue
            if isinstance(event, HeartbeatLogEvent):
                # The server beats only when it has sent everything: its position is a commit
                # boundary past changes of other tables, safe to confirm.
                here = (stream.log_file, stream.log_pos)
                if prepared:
                    self._warn_open_xa()
                elif here != last and (moved or here[0] != last[0]):
                    last = here
                    moved = False
                    pending.append(("idle", (*here, self._gtid()), 0.0))
                    send(pending)
                    pending = []
                continue
            ts = float(event.timestamp)
            if isinstance(event, XidEvent):
                if own_tx and not tracked:
                    own_tx = False
                    continue  # the feeds' own bookkeeping: nothing to publish or confirm
                own_tx = tracked = False
            elif isinstance(event, XAPrepareEvent):
                rows, held, xa = held, [], False
                own_tx = tracked = False
                if not event.one_phase:
                    xid = (event.xid_format_id, event.xid_gtrid, event.xid_bqual)
                    if rows:
                        prepared[xid] = _Prepared(rows, ts)
                    else:
                        self.untracked_xa.add(xid)
                    continue  # not committed: nothing to publish or confirm yet
                pending.extend(rows)  # XA COMMIT ... ONE PHASE (MySQL): a commit
            elif isinstance(event, QueryEvent):
                query = event.query.strip() if isinstance(event.query, str) else ""
                upper = query.upper()
                if upper.startswith(("XA COMMIT", "XA ROLLBACK")):
                    self._end_xa(query, upper, pending, ts)
                elif upper.startswith("XA START"):  # MySQL marks XA transactions so
                    xa = True
                    continue
                elif upper in ("BEGIN", "COMMIT", "ROLLBACK") or upper.startswith(_IN_TRANSACTION):
                    # Not a commit boundary (a COMMIT of non-transactional tables is confirmed
                    # at the next heartbeat).
                    moved = moved or not own_tx
                    continue
                elif (match := _TRUNCATE.match(_COMMENT.sub(_uncomment, query))) is not None:
                    schema = match.group(1) or (
                        event.schema.decode() if isinstance(event.schema, bytes) else event.schema
                    )
                    truncated = tables.get((schema, match.group(2)))
                    if truncated is not None:
                        pending.append(RowChange(truncated, "truncate", None, ts))
                # DDL commits on its own: a position to confirm, as after a transaction.
            else:
                key = (event.schema, event.table)
                if key == own:
                    own_tx = True
                    continue
                table = tables.get(key)
                if table is None:
                    continue
                tracked = True
                into = held if xa else pending
                if isinstance(event, UpdateRowsEvent):
                    for row in event.rows:
                        new, old = _row(row["after_values"]), _row(row["before_values"])
                        into.append(RowChange(table, "update", new, ts, old))
                else:
                    kind: Kind = "insert" if isinstance(event, WriteRowsEvent) else "delete"
                    for row in event.rows:
                        into.append(RowChange(table, kind, _row(row["values"]), ts))
                if len(pending) >= CHUNK:
                    send(pending)
                    pending = []
                continue
            # A commit boundary (a transaction's XID, an XA's end or a DDL statement): confirm
            # its position, unless an XA transaction prepared before it is still open.
            self._advance(gtid)
            if prepared:
                moved = True
                pending.append(("held", None, ts))
                self._warn_open_xa()
            else:
                last = (stream.log_file, stream.log_pos)
                moved = False
                pending.append(("commit", (*last, self._gtid()), ts))
            send(pending)
            pending = []

    def _end_xa(self, query: str, upper: str, pending: list[Any], ts: float) -> None:
        """XA COMMIT or XA ROLLBACK (``upper`` is the query in upper case) of a prepared
        transaction: its held rows go out with this commit, or are dropped. A commit of one
        this reader never saw prepared (before the feed's start position) flushes every
        table's namespace: its rows are unknown."""
        match = _XID.search(query)
        key = None
        if match is not None:
            key = (
                int(match.group(3)),
                bytes.fromhex(match.group(1)),
                bytes.fromhex(match.group(2)),
            )
        if key in self.untracked_xa:
            self.untracked_xa.discard(key)
            return  # it wrote none of the tables
        held = self.prepared.pop(key, None) if key is not None else None
        if not upper.startswith("XA COMMIT") or "ONE PHASE" in upper:
            return
        if held is None:
            pending.extend(RowChange(table, "truncate", None, ts) for table in self.tables.values())
        else:
            pending.extend(held.rows)

    def open_xa(self) -> tuple[int, float | None]:
        """How many prepared XA transactions hold the position, and the age of the oldest
        (seconds); safe to call from another thread."""
        since = [held.at for held in list(self.prepared.values())]
        return len(since), (max(0.0, time.time() - min(since)) if since else None)

    def _warn_open_xa(self) -> None:
        now = time.time()
        for xid, held in list(self.prepared.items()):
            if not held.warned and now - held.at > XA_WARN_AFTER:
                held.warned = True
                log.warning(
                    "change feed: XA transaction %r was prepared %.0f s ago and has not ended; "
                    "the feed's position stays before it until XA COMMIT or XA ROLLBACK "
                    "(XA RECOVER lists it)",
                    xid[1] + xid[2],
                    now - held.at,
                )

    def _advance(self, gtid: str) -> None:
        if gtid:
            self.gtids[gtid.split("-", 1)[0]] = gtid

    def _gtid(self) -> str | None:
        gtids = self.gtids
        if len(gtids) < 2:  # no GTIDs, or the usual single replication domain
            return next(iter(gtids.values()), None)
        return ",".join(self.gtids[domain] for domain in sorted(self.gtids, key=int))


def _uncomment(match: re.Match[str]) -> str:
    return f" {match.group(2)} " if match.group(1) is not None else " "


def _connect(**settings: Any) -> Any:
    # mysql-replication names the database with PyMySQL's deprecated ``db``.
    if "db" in settings:
        settings["database"] = settings.pop("db")
    return pymysql.connect(**settings)
