"""What every change feed shares: the table mapping, the source contract, and ``ChangeFeed``.

A *source* (PostgreSQL logical decoding, the MySQL/MariaDB binlog) reads committed row changes
from the database's own log and hands them over in batches, each with the log position that
is safe to confirm once the batch is published. :class:`ChangeFeed` maps the rows to events
(:class:`Table`), publishes them with a :class:`~cachesync.publisher.Publisher`, and only then
confirms the position: a feed that dies at any point resumes from the last confirmed position
and publishes the unconfirmed changes again (at least once; a restarted feed is a new
publisher ``source``, so consumers flush once and then apply the replay).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from ...backoff import Backoff
from ...errors import CacheSyncError, ConfigError, StateError, TransportError
from ...events import DEFAULT_CHANNEL, MAX_EVENT_BYTES, MAX_NS_LENGTH, Op
from ...lifecycle import Service
from ...publisher import Change, Publisher
from ...transports.base import redact_url

__all__ = ["Batch", "ChangeFeed", "FeedError", "RowChange", "Source", "Table"]

log = logging.getLogger("cachesync.feeds")

Kind = Literal["insert", "update", "delete", "truncate"]
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


class FeedError(CacheSyncError):
    """The database cannot serve a change feed as configured; the message says what to change
    (``wal_level``, the binlog format, a missing table or key column, a replica identity)."""


@dataclass(frozen=True)
class Table:
    """How one table's rows become events.

    ``name`` is the table (``currencies``, or ``schema.currencies`` / ``db.currencies``);
    ``keys`` the column(s) whose values make the event key (several are joined with ``:``, as
    ``@sync.cached`` joins several arguments); ``ns`` the namespace (default: the table name
    without its schema); ``version`` an integer column carried as the event's version;
    ``value``: ``False`` sends invalidations, ``True`` the whole row as the event's value (for
    refresh mode), a tuple of column names just those columns.
    """

    name: str
    keys: tuple[str, ...]
    ns: str | None = None
    version: str | None = None
    value: bool | tuple[str, ...] = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _IDENT.match(self.name):
            raise ValueError(f"table name {self.name!r} must be 'table' or 'schema.table'")
        keys = (self.keys,) if isinstance(self.keys, str) else tuple(self.keys)
        object.__setattr__(self, "keys", keys)
        if not keys:
            raise ValueError(f"table {self.name}: name at least one key column")
        value = self.value if isinstance(self.value, bool) else tuple(self.value)
        object.__setattr__(self, "value", value)
        columns = [*keys, *([self.version] if self.version else [])]
        if isinstance(value, tuple):
            columns += value
        for column in columns:
            if not isinstance(column, str) or not _COLUMN.match(column):
                raise ValueError(f"table {self.name}: {column!r} is not a column name")
        if self.ns is not None and (not self.ns or len(self.ns) > MAX_NS_LENGTH):
            raise ValueError(f"ns must be a non-empty string of at most {MAX_NS_LENGTH} characters")

    @property
    def namespace(self) -> str:
        return self.ns or self.name.rpartition(".")[2]

    @property
    def table(self) -> str:
        """The table name without its schema."""
        return self.name.rpartition(".")[2]

    @property
    def schema(self) -> str | None:
        """The schema (or MySQL database) the name gave, if any."""
        return self.name.rpartition(".")[0] or None

    @classmethod
    def parse(cls, spec: str) -> Table:
        """``TABLE:KEY[,KEY...][:version=COL][:value=*|COL,COL][:ns=NAME]``, e.g.
        ``currencies:code``, ``public.rates:base,quote:version=version:value=*:ns=rates``."""
        parts = spec.split(":")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise ValueError(
                f"table spec {spec!r}: expected TABLE:KEY[,KEY...][:version=COL]"
                "[:value=*|COL,...][:ns=NAME]"
            )
        options: dict[str, Any] = {}
        for part in parts[2:]:
            name, sep, text = part.partition("=")
            if not sep or name not in ("version", "value", "ns") or not text:
                raise ValueError(
                    f"table spec {spec!r}: unknown option {part!r} (version=, value=, ns=)"
                )
            if name == "value":
                options["value"] = True if text == "*" else tuple(text.split(","))
            else:
                options[name] = text
        return cls(parts[0], tuple(parts[1].split(",")), **options)

    def columns(self) -> set[str]:
        """Every column the mapping reads (``value=True`` reads the whole row)."""
        wanted = set(self.keys)
        if self.version:
            wanted.add(self.version)
        if isinstance(self.value, tuple):
            wanted.update(self.value)
        return wanted


@dataclass(slots=True)
class RowChange:
    """One committed change as a source reads it. ``row`` is the row after an insert or update
    and the old key (or row) for a delete; ``old`` the old key of an update, when the source
    knows it. Values are JSON values, or a marker for a column the log did not carry."""

    table: Table
    kind: Kind
    row: Mapping[str, Any] | None
    ts: float
    old: Mapping[str, Any] | None = None


@dataclass(slots=True)
class Batch:
    """Changes in commit order, and the position to confirm once they are published (None when
    the batch ends inside a transaction). ``commit_ts`` is the time of the last commit in it."""

    changes: list[RowChange] = field(default_factory=list)
    position: Any = None
    commit_ts: float | None = None
    commits: int = 0


class Source(abc.ABC):
    """One database's change log. The feed calls ``open``, then ``read``/``confirm`` in turn,
    and ``close`` when it stops or the connection broke (then ``open`` again)."""

    #: Errors that mean "the database connection broke or refused": the feed reconnects.
    errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, check the server's settings and the tables, set up the log position."""

    @abc.abstractmethod
    async def read(self, max_changes: int) -> Batch:
        """Wait for the next batch (at most ``max_changes`` changes, cut early when the log has
        no more for now)."""

    @abc.abstractmethod
    async def confirm(self, position: Any) -> None:
        """Everything up to ``position`` was published: never read it again."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connections; safe to call twice."""

    @abc.abstractmethod
    async def lag(self) -> int | None:
        """How many bytes of log the confirmed position is behind the server's end."""

    def describe(self) -> dict[str, Any]:
        """The source's position and names, for stats."""
        return {}

    @abc.abstractmethod
    async def drop(self) -> None:
        """Remove what the feed keeps on the server (slot, publication, stored position)."""


def _key_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class ChangeFeed(Service):
    """Publishes the committed changes of database tables as cachesync events.

    ``dsn`` picks the source by scheme: ``postgresql://`` (logical decoding with ``pgoutput``,
    see :mod:`cachesync.owner.feeds.postgres`) or ``mysql://`` / ``mariadb://`` (the row
    binlog, see :mod:`cachesync.owner.feeds.mysql`). ``tables`` are :class:`Table` s or their
    spec strings (``"currencies:code"``). ``publisher`` is a URL or a :class:`Publisher`
    (a Publisher given here is started and stopped by the caller).

    Inserts and updates become ``changed`` (with the row or chosen columns as the value when
    the table asks for it), deletes ``deleted``, ``TRUNCATE`` a ``flush`` of the namespace, in
    commit order. A position is confirmed only after the broker took every event before it, so
    a feed killed at any point and started again loses nothing (at least once). Broker or
    database outages are retried with backoff; settings the feed cannot work with raise
    :class:`FeedError` from ``start()``. ``name`` names what the feed keeps on the server (the
    PostgreSQL slot and publication, the stored binlog position): one running feed per name.
    """

    def __init__(
        self,
        dsn: str,
        tables: Iterable[Table | str],
        publisher: str | Publisher = "memory://",
        *,
        channel: str = DEFAULT_CHANNEL,
        name: str = "cachesync",
        batch_size: int = 1000,
        lag_interval: float = 5.0,
        publish_timeout: float = 10.0,
        heartbeat_interval: float | None = 1.0,
    ) -> None:
        parsed = [t if isinstance(t, Table) else Table.parse(t) for t in tables]
        if not parsed:
            raise ValueError("a ChangeFeed needs at least one table")
        if len({t.name for t in parsed}) != len(parsed):
            raise ValueError("each table may be named only once")
        if not re.match(r"^[a-z_][a-z0-9_]{0,50}$", name):
            raise ValueError(
                f"name {name!r} must be lower-case letters, digits and _ (it names a slot)"
            )
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if lag_interval <= 0:
            raise ValueError("lag_interval must be positive")
        self.dsn = dsn
        self.tables = tuple(parsed)
        self.name = name
        self.batch_size = batch_size
        self.lag_interval = lag_interval
        if isinstance(publisher, Publisher):
            self.publisher = publisher
            self._own_publisher = False
        else:
            self.publisher = Publisher(
                publisher,
                channel,
                heartbeat_interval=heartbeat_interval,
                publish_timeout=publish_timeout,
            )
            self._own_publisher = True
        self.source = make_source(dsn, self.tables, name)
        self._task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._running = False
        self._caught_up = asyncio.Event()
        self._stats: dict[str, Any] = {
            "transactions": 0,
            "changes": 0,
            "upserts": 0,
            "deletes": 0,
            "flushes": 0,
            "schema_errors": 0,
            "oversized_values": 0,
            "reconnects": 0,
            "confirmed_at": None,
            "lag_bytes": None,
            "lag_seconds": 0.0,
            "last_error": None,
        }
        self._pending_since: float | None = None
        self._logged: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the publisher and open the log; :class:`FeedError` if the database is not
        set up for a feed. A database that is down is retried in the background."""
        if self._running:
            raise StateError("this ChangeFeed is already started")
        if self._own_publisher:
            await self.publisher.start()
        try:
            await self.source.open()
        except FeedError:
            await self.source.close()  # its connection may hold the feed's lock
            await self._stop_publisher()
            raise
        except self.source.errors as exc:
            log.warning("change feed: database unreachable, retrying", extra={"error": str(exc)})
            self._stats["last_error"] = str(exc)
            await self.source.close()
            opened = False
        else:
            opened = True
        self._running = True
        self._task = asyncio.create_task(self._run(opened), name=f"cachesync-feed-{self.name}")
        self._lag_task = asyncio.create_task(self._lag_loop(), name="cachesync-feed-lag")
        log.info(
            "change feed started",
            extra={
                "tables": [t.name for t in self.tables],
                "url": redact_url(self.publisher.url),
                "feed": self.name,
            },
        )

    async def stop(self) -> None:
        """Stop reading, close the log connection and (if it owns it) the publisher. The
        position stays on the server, so the next start resumes there."""
        self._running = False
        for task in (self._task, self._lag_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._lag_task = None
        await self.source.close()
        await self._stop_publisher()

    async def drop(self) -> None:
        """Remove what this feed keeps on the server (PostgreSQL: the replication slot and the
        publication; MySQL: the stored position). Run it on a stopped feed you retire for
        good: a slot nobody reads keeps the server from recycling its log."""
        if self._running:
            raise StateError("stop the ChangeFeed before dropping its slot")
        try:
            await self.source.drop()
        finally:
            await self.source.close()

    async def wait_caught_up(self, timeout: float | None = None) -> None:
        """Wait until the feed has read everything the log held and confirmed it."""
        async with asyncio.timeout(timeout):
            await self._caught_up.wait()

    def stats(self) -> dict[str, Any]:
        """Counts (transactions, changes by op, reconnects, schema errors), the source's
        position, and its lag: ``lag_bytes`` (log the confirmed position is behind, refreshed
        every ``lag_interval``) and ``lag_seconds`` (while changes wait: how long the oldest
        one not yet confirmed has waited since its commit; after a batch: its last commit's
        age when confirmed; 0 once the feed has read all the log had). MySQL commit times
        have a resolution of one second."""
        result = dict(self._stats)
        if self._pending_since is not None:
            result["lag_seconds"] = max(0.0, time.time() - self._pending_since)
        result["running"] = self._running
        result["published"] = self.publisher.published
        result.update(self.source.describe())
        return result

    # -- internals -------------------------------------------------------------------------

    async def _stop_publisher(self) -> None:
        if self._own_publisher:
            await self.publisher.stop()

    async def _run(self, opened: bool) -> None:
        backoff = Backoff(initial=0.1, maximum=5.0)
        retry: tuple[type[BaseException], ...] = (TransportError, FeedError, *self.source.errors)
        while True:
            try:
                if not opened:
                    await self.source.open()
                    opened = True
                    self._stats["reconnects"] += 1
                    log.info("change feed reconnected", extra={"feed": self.name})
                backoff.reset()
                await self._pump()
            except asyncio.CancelledError:
                raise
            except retry as exc:
                self._stats["last_error"] = str(exc)
                self._caught_up.clear()
                log.warning(
                    "change feed interrupted, resuming from the last confirmed position",
                    extra={"feed": self.name, "error": str(exc)},
                )
            except Exception as exc:  # a bug must not stop the feed for good: log and resume
                self._stats["last_error"] = f"{type(exc).__name__}: {exc}"
                self._caught_up.clear()
                log.exception("change feed failed, resuming from the last confirmed position")
            opened = False
            await self.source.close()
            await asyncio.sleep(backoff.next_delay())

    async def _pump(self) -> None:
        while True:
            batch = await self.source.read(self.batch_size)
            if batch.changes:
                if self._pending_since is None:
                    self._pending_since = batch.changes[0].ts
                changes = self._events(batch.changes)
                if changes:
                    await self.publisher.send_batch(changes)
            if batch.position is not None:
                await self.source.confirm(batch.position)
                self._stats["transactions"] += batch.commits
                self._stats["confirmed_at"] = time.time()
                if batch.commit_ts is not None:
                    self._stats["lag_seconds"] = max(0.0, time.time() - batch.commit_ts)
                self._pending_since = None
            if not batch.changes and batch.position is None:
                self._caught_up.set()
                self._stats["lag_seconds"] = 0.0
            else:
                self._caught_up.clear()

    async def _lag_loop(self) -> None:
        while True:
            try:
                self._stats["lag_bytes"] = await self.source.lag()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # lag is informative: never let it stop the feed
                log.debug("change feed lag not read", extra={"error": str(exc)})
            await asyncio.sleep(self.lag_interval)

    def _events(self, rows: Sequence[RowChange]) -> list[Change]:
        changes: list[Change] = []
        append = changes.append
        upserts = deletes = flushes = 0
        for change in rows:
            table = change.table
            ns = table.namespace
            ts = change.ts
            if change.kind == "truncate":
                append(Change(Op.FLUSH, ns, (), None, None, ts))
                flushes += 1
                continue
            row = change.row or {}
            key = self._key(table, row)
            if key is None:
                append(Change(Op.FLUSH, ns, (), None, None, ts))
                flushes += 1
                continue
            version = self._version(table, row)
            if change.kind == "delete":
                append(Change(Op.DELETE, ns, (key,), version, None, ts))
                deletes += 1
                continue
            if change.old:
                old_key = self._key(table, change.old, quiet=True)
                if old_key is not None and old_key != key:
                    append(Change(Op.DELETE, ns, (old_key,), None, None, ts))
                    deletes += 1
            append(Change(Op.UPSERT, ns, (key,), version, self._value(table, row), ts))
            upserts += 1
        stats = self._stats
        stats["changes"] += len(rows)
        stats["upserts"] += upserts
        stats["deletes"] += deletes
        stats["flushes"] += flushes
        return changes

    def _schema_error(self, table: Table, message: str) -> None:
        self._stats["schema_errors"] += 1
        self._stats["last_error"] = message
        # Once per distinct problem: a renamed column must not log once per row.
        if message in self._logged or len(self._logged) > 100:
            return
        self._logged.add(message)
        log.error(
            "change feed: %s; fix the table mapping (Table(...) or --table)",
            message,
            extra={"table": table.name},
        )

    def _key(self, table: Table, row: Mapping[str, Any], *, quiet: bool = False) -> str | None:
        if len(table.keys) == 1:  # the common case, first
            value = row.get(table.keys[0])
            if type(value) is str:
                return value
            if type(value) is int:
                return str(value)
        parts = []
        for column in table.keys:
            value = row.get(column, _MISSING)
            if value is _MISSING or value is None or not _is_plain(value):
                if not quiet:
                    self._schema_error(
                        table,
                        f"{table.name} has no value for key column {column!r} "
                        f"(renamed or dropped?); its namespace is flushed instead",
                    )
                return None
            parts.append(_key_text(value))
        return ":".join(parts)

    def _version(self, table: Table, row: Mapping[str, Any]) -> int | None:
        if table.version is None:
            return None
        value = row.get(table.version, _MISSING)
        if type(value) is int:
            return value
        if value is _MISSING:
            self._schema_error(
                table, f"{table.name} has no version column {table.version!r}; sent without"
            )
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        if value is not None and _is_plain(value):
            self._schema_error(table, f"{table.name}.{table.version} is not an integer version")
        return None

    def _value(self, table: Table, row: Mapping[str, Any]) -> Any:
        if table.value is False:
            return None
        whole = table.value is True
        columns: Iterable[str] = row.keys() if table.value is True else table.value
        value = {}
        # An upper bound of the value's JSON size: a JSON string takes at most 6 bytes per
        # character (\\uXXXX), so rows of short values are passed without encoding them.
        bound = 0
        for column in columns:
            item = row.get(column, _MISSING)
            kind = type(item)
            if kind is str:
                bound += 6 * (len(column) + len(item)) + 8
            elif kind in _SCALARS:
                bound += 6 * len(column) + 40
            elif item is _MISSING and not whole:
                self._schema_error(
                    table, f"{table.name} has no column {column!r}; sent as an invalidation"
                )
                return None
            elif not _is_plain(item):  # a value the log did not carry: invalidate instead
                return None
            elif isinstance(item, list | dict):
                bound = MAX_VALUE_BYTES + 1  # nested: only its encoding tells
            else:  # a subclass of a scalar type
                bound += 6 * len(column) + (6 * len(item) if isinstance(item, str) else 32) + 8
            value[column] = item
        if bound > MAX_VALUE_BYTES and _too_large(value):
            # Consumers drop an event over their max_event_bytes: its cache entry would stay
            # stale. Without the value they fetch it.
            self._stats["oversized_values"] += 1
            return None
        return value


_MISSING: Any = object()


MAX_VALUE_BYTES = MAX_EVENT_BYTES - 4096  # room for the event's other fields


_SCALARS = frozenset({int, float, bool, type(None)})


def _too_large(value: dict[str, Any]) -> bool:
    return len(json.dumps(value, separators=(",", ":")).encode()) > MAX_VALUE_BYTES


def _is_plain(value: Any) -> bool:
    kind = type(value)
    return kind is str or kind in _SCALARS or isinstance(value, str | int | float | list | dict)


def make_source(dsn: str, tables: Sequence[Table], name: str) -> Source:
    """The source for ``dsn``'s scheme; the driver is imported only now (an optional extra)."""
    scheme = urlsplit(dsn).scheme.lower()
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresSource

        return PostgresSource(dsn, tables, name)
    if scheme in ("mysql", "mariadb"):
        from .mysql import MySQLSource

        return MySQLSource(dsn, tables, name)
    raise ConfigError(
        f"no change feed for {scheme or 'a DSN without a scheme'!r}: use postgresql://... "
        "or mysql://... (mariadb://...)"
    )
