"""The transactional outbox: changes committed with the data, published by a relay.

Publishing from the request handler after the commit loses the event if the process dies or the
broker is down in between (the dual write). Instead the owner writes an outbox row in the same
transaction as its data, and :class:`OutboxRelay` publishes the committed rows::

    async with session.begin():
        currency.rate = new_rate
        currency.version += 1
        Outbox.add(session, "currencies", currency.code, version=currency.version,
                   value=CurrencyOut.model_validate(currency))

    async with OutboxRelay(engine, "redis://localhost:6379/0"):
        ...   # runs beside the app; see cachesync.integrations.fastapi.owner_lifespan

What the relay guarantees (guarantee 6 of the design): every committed row is published at
least once, rows of one channel in ``id`` order, even if the broker or the database is down for a
while or the owner restarts in between; a row is marked sent only after the broker took it. It
never keeps a "last id" cursor: with concurrent transactions ids commit out of order, so each
round selects the lowest unsent ids again and a late-committing lower id is never skipped.

PostgreSQL (asyncpg) gets a statement trigger that does ``pg_notify`` on insert, so the relay
wakes the moment a transaction commits; polling every ``poll_interval`` is the fallback (other
databases, and a lost LISTEN connection). With asyncpg the relay also runs its two hot
statements (select the pending rows, mark them sent) on the driver's connection, bypassing
SQLAlchemy, whose per-statement overhead is larger than the query on an idle database; every
other statement and database goes through SQLAlchemy. SQLite (aiosqlite) works with polling
alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from pydantic_core import PydanticSerializationError, to_jsonable_python
from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    any_,
    bindparam,
    delete,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .backoff import Backoff
from .errors import StateError, TransportError
from .events import MAX_EVENT_BYTES, ChangeEvent, Op
from .lifecycle import Service
from .publisher import Change, Publisher
from .transports.base import from_url, redact_url

__all__ = ["DEFAULT_CHANNEL", "Outbox", "OutboxRelay"]

log = logging.getLogger("cachesync.outbox")

DEFAULT_CHANNEL = "cachesync"
TABLE_NAME = "cachesync_outbox"
_MAX_NS = 256
_OPS = {Op.UPSERT.value, Op.DELETE.value, Op.FLUSH.value}
# What a lost or refused database connection looks like through SQLAlchemy and the drivers;
# asyncpg's own errors too, for the statements the relay runs on the driver's connection.
_DB_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError, TimeoutError)
try:
    import asyncpg  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - the outbox works without asyncpg (SQLite, psycopg)
    pass
else:
    _DB_ERRORS += (asyncpg.PostgresError, asyncpg.InterfaceError)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Base(DeclarativeBase):
    # A metadata of its own, so the owner's create_all/migrations include the outbox only when
    # they ask for it (``Outbox.metadata``).
    metadata = MetaData()


class Outbox(_Base):
    """One change waiting to be published; also the helpers to write and create the table.

    Columns: ``id`` (autoincrement, the publish order), ``channel``, ``ns``, ``op``, ``keys``
    (JSON list), ``version``, ``value`` (JSON), ``created_at``, ``sent_at`` (NULL until the
    broker took it), ``attempts``, ``failed_reason``. Use :meth:`add` inside the transaction
    that changes the data, and :meth:`create_table` (or ``Outbox.metadata`` plus
    :meth:`notify_trigger_sql` in a migration) to create it.
    """

    __tablename__ = TABLE_NAME
    __table_args__ = (
        # The relay's query: lowest unsent ids of one channel. Partial, so it stays small.
        Index(
            "ix_cachesync_outbox_unsent",
            "channel",
            "id",
            postgresql_where=text("sent_at IS NULL"),
            sqlite_where=text("sent_at IS NULL"),
        ),
        Index("ix_cachesync_outbox_sent_at", "sent_at"),
        # AUTOINCREMENT: SQLite must never reuse an id, or publish order could go backwards.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    channel: Mapped[str] = mapped_column(String(255), default=DEFAULT_CHANNEL)
    ns: Mapped[str] = mapped_column(String(_MAX_NS))
    op: Mapped[str] = mapped_column(String(16), default=Op.UPSERT.value)
    keys: Mapped[list[str]] = mapped_column(JSON)
    version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    value: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    failed_reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    @classmethod
    def add(
        cls,
        session: Session | AsyncSession,
        ns: str,
        *keys: str,
        version: int | None = None,
        value: Any = None,
        op: str | Op = Op.UPSERT,
        channel: str = DEFAULT_CHANNEL,
    ) -> Outbox:
        """Stage one change in ``session``; it is published only if the transaction commits.

        Only calls ``session.add``, so it works with ``Session`` and ``AsyncSession`` alike and
        never does I/O. ``value`` (one key only) may be anything pydantic can turn into JSON,
        a model included; it is converted now, so a bad value fails here, not in the relay.
        """
        op_value = op.value if isinstance(op, Op) else op
        if op_value not in _OPS:
            raise ValueError(f"op must be one of {sorted(_OPS)}, got {op_value!r}")
        if not isinstance(ns, str) or not ns or len(ns) > _MAX_NS:
            raise ValueError(f"ns must be a non-empty string of at most {_MAX_NS} characters")
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(f"outbox keys must be strings, got {type(key).__name__}")
        if op_value != Op.FLUSH.value and not keys:
            raise ValueError(f"a {op_value} change needs at least one key")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise TypeError("version must be an int or None")
        if value is not None:
            if len(keys) != 1:
                raise ValueError("a change that carries a value must name exactly one key")
            try:
                value = to_jsonable_python(value)
            except PydanticSerializationError as exc:
                raise TypeError(f"value cannot be stored as JSON: {exc}") from exc
        row = cls(
            channel=channel,
            ns=ns,
            op=op_value,
            keys=list(keys),
            version=version,
            value=value,
            created_at=_utcnow(),
            attempts=0,
        )
        session.add(row)
        return row

    @classmethod
    async def create_table(cls, engine: AsyncEngine | AsyncConnection) -> None:
        """Create the table if missing and, on PostgreSQL, the NOTIFY trigger. Idempotent.

        Honours the engine's ``schema_translate_map`` (a schema per tenant or per test).
        """
        if isinstance(engine, AsyncConnection):
            await cls._create(engine)
            return
        async with engine.begin() as conn:
            await cls._create(conn)

    @classmethod
    async def _create(cls, conn: AsyncConnection) -> None:
        await conn.run_sync(cls.metadata.create_all)
        if conn.dialect.name == "postgresql":
            schema = await _effective_schema(conn)
            for statement in cls.notify_trigger_sql(schema):
                await conn.exec_driver_sql(statement)

    @staticmethod
    def notify_trigger_sql(schema: str = "public") -> list[str]:
        """The PostgreSQL statements that make an insert wake the relay (for migrations)."""
        qschema = _quote_ident(schema)
        channel = notify_channel(schema)
        function = f"{qschema}.cachesync_outbox_notify"
        return [
            f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN PERFORM pg_notify('{channel}', ''); RETURN NULL; END $$",
            # FOR EACH STATEMENT: one notification per insert statement is enough, and
            # PostgreSQL folds equal notifications of one transaction into one anyway.
            f"CREATE OR REPLACE TRIGGER cachesync_outbox_notify AFTER INSERT ON "
            f"{qschema}.{_quote_ident(TABLE_NAME)} FOR EACH STATEMENT "
            f"EXECUTE FUNCTION {function}()",
        ]


_TABLE = cast(Table, Outbox.__table__)


def notify_channel(schema: str) -> str:
    """The LISTEN channel of the outbox table in ``schema`` (hashed: names are <= 63 bytes)."""
    digest = hashlib.sha1(f"{schema}.{TABLE_NAME}".encode()).hexdigest()[:16]
    return f"cachesync_outbox_{digest}"


def _lock_key(schema: str, channel: str) -> int:
    """The advisory lock key (a signed 64-bit int) that elects one relay per table and channel."""
    digest = hashlib.sha1(f"cachesync-outbox:{schema}.{TABLE_NAME}:{channel}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _explicit_schema(conn: AsyncConnection) -> str | None:
    """The table's schema as SQLAlchemy renders it on ``conn`` (None: the search path's)."""
    options = conn.sync_connection.get_execution_options() if conn.sync_connection else {}
    translate = options.get("schema_translate_map") or {}
    schema = translate.get(_TABLE.schema, _TABLE.schema)
    return str(schema) if schema else None


async def _effective_schema(conn: AsyncConnection) -> str:
    schema = _explicit_schema(conn)
    if schema:
        return schema
    result = await conn.exec_driver_sql("SELECT current_schema()")
    return str(result.scalar_one())


class _RelayState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class _BadRow(Exception):
    """A row that cannot be published as written; ``reason`` says why."""


class OutboxRelay(Service):
    """Publishes committed outbox rows of one channel, in id order, at least once.

    ``url_or_publisher`` is a broker URL (the relay then owns a :class:`Publisher`, with
    heartbeats, and starts and stops it) or a started ``Publisher`` the caller owns. Each round
    selects up to ``batch_size`` unsent rows (``sent_at IS NULL``, lowest ids first), publishes
    them one by one and marks them sent. On PostgreSQL with asyncpg a NOTIFY trigger wakes the
    relay at once; otherwise, and as a fallback, it polls every ``poll_interval`` seconds.

    Faults: while the broker or the database is down the relay logs, counts (``stats()``),
    backs off and tries again; no row is skipped, and a row is marked sent only after the
    broker took it. A row that cannot be published as written is published in the safest form
    that still tells consumers something changed (without its value, or as a flush of its
    namespace) with the reason in ``failed_reason``; a row with no usable namespace is marked
    failed and left unsent. Sent rows older than ``retention`` seconds are deleted (``None``
    keeps them).

    One relay per owner instance is the usual deployment. On PostgreSQL (asyncpg) they elect
    one: the relay that holds a session advisory lock for the table and channel publishes, the
    others stand by (``stats()["leading"]`` is False) and try to take over at every wake-up, so
    when the leader stops or its connection dies the next commit (or poll) hands the channel
    to another. Rows are never published twice by two live relays. Other databases have no
    election: run one relay per channel there.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        url_or_publisher: str | Publisher = "memory://",
        channel: str | None = None,
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        retention: float | None = 3600.0,
        listen: bool = True,
        heartbeat_interval: float | None = 1.0,
        connect_timeout: float = 2.0,
        publish_timeout: float = 2.0,
        max_value_bytes: int = MAX_EVENT_BYTES - 4096,
        backoff_max: float = 5.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise TypeError("engine must be an AsyncEngine (sqlalchemy.ext.asyncio)")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        if retention is not None and retention < 0:
            raise ValueError("retention must be >= 0 seconds, or None to keep sent rows")
        if isinstance(url_or_publisher, Publisher):
            if channel is not None and channel != url_or_publisher.channel:
                raise ValueError(
                    f"channel {channel!r} differs from the publisher's {url_or_publisher.channel!r}"
                )
            self.publisher = url_or_publisher
            self._owns_publisher = False
        elif isinstance(url_or_publisher, str):
            transport = from_url(url_or_publisher, connect_timeout=connect_timeout)
            self.publisher = Publisher(
                url_or_publisher,
                channel or DEFAULT_CHANNEL,
                heartbeat_interval=heartbeat_interval,
                publish_timeout=publish_timeout,
                transport=transport,
            )
            self._owns_publisher = True
        else:
            raise TypeError("url_or_publisher must be a broker URL or a Publisher")
        self.engine = engine
        self.channel = self.publisher.channel
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention = retention
        self.max_value_bytes = max_value_bytes
        self.stop_timeout = stop_timeout
        # Built once: constructing the statement costs more than running it on an idle DB.
        self._query = (
            select(_TABLE)
            .where(
                _TABLE.c.channel == self.channel,
                _TABLE.c.sent_at.is_(None),
                _TABLE.c.failed_reason.is_(None),
            )
            .order_by(_TABLE.c.id)
            .limit(batch_size)
        )
        self._in_round = False
        self._listen = listen
        self._backoff = Backoff(initial=0.05, maximum=backoff_max)
        self._state = _RelayState.NEW
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._publisher_started = not self._owns_publisher
        self._conn: AsyncConnection | None = None
        # The asyncpg connection under self._conn (None for other drivers), and its SQL.
        self._asyncpg: Any = None
        self._pg_select = self._pg_mark_sent = ""
        self._listen_channel = ""
        self._listen_failed = False
        # Leader election (PostgreSQL + asyncpg): the advisory lock's key, and whether this
        # relay holds it on its connection. Elsewhere every relay leads.
        self._lock_key = 0
        self._leading = False
        self._next_prune = 0.0
        self._progress = asyncio.Condition()
        self._rounds_started = 0
        self._last_empty_round = 0
        self._stats: dict[str, Any] = {
            "published": 0,
            "rounds": 0,
            "degraded": 0,
            "failed": 0,
            "publish_errors": 0,
            "db_errors": 0,
            "pruned": 0,
            "notifies": 0,
            "broker_up": False,
            "db_up": False,
            "listening": False,
            "leading": None,
            "last_error": None,
            "last_published_id": None,
            "lag_seconds": None,
        }

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the relay task. Returns at once: an unreachable broker or DB is retried."""
        if self._state is not _RelayState.NEW:
            raise StateError(f"this OutboxRelay is {self._state.value}; create a new one")
        self._state = _RelayState.RUNNING
        self._task = asyncio.create_task(self._run(), name="cachesync-outbox-relay")

    async def stop(self) -> None:
        """Stop the relay and, if it owns it, the publisher. Unsent rows stay for the next run.

        A round in progress may finish first (up to ``stop_timeout`` seconds), so rows it
        published are marked sent rather than published again by the next relay.
        """
        if self._state is _RelayState.CLOSED:
            return
        self._state = _RelayState.CLOSED
        task, self._task = self._task, None
        if task is not None:
            # Only a healthy round is worth waiting for; one stuck retrying a dead broker or
            # database has nothing to finish.
            healthy = self._stats["broker_up"] and self._stats["db_up"]
            if self._in_round and healthy:
                self._wakeup.set()
                await asyncio.wait({task}, timeout=self.stop_timeout)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._drop_connection()
        if self._owns_publisher:
            await self.publisher.stop()

    # -- the API ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Start a round now instead of at the next poll (e.g. right after a commit)."""
        self._wakeup.set()

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until a round that started after this call found no unsent rows.

        So every row committed before the call has been published (or marked failed). Raises
        ``TimeoutError`` after ``timeout`` seconds.
        """
        if self._state is not _RelayState.RUNNING:
            raise StateError("the relay is not running")
        threshold = self._rounds_started
        self.wake()
        async with asyncio.timeout(timeout):
            async with self._progress:
                await self._progress.wait_for(lambda: self._last_empty_round > threshold)

    def stats(self) -> dict[str, Any]:
        """Counters and state: published, failed, degraded, errors, broker/db up, lag…"""
        return {
            **self._stats,
            "channel": self.channel,
            "source": self.publisher.source,
            "seq": self.publisher.seq,
        }

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        while self._state is _RelayState.RUNNING:
            self._in_round = True
            try:
                await self._ensure_publisher()
                # Cleared before the query: a NOTIFY that lands during the round wakes the next.
                self._wakeup.clear()
                more = await self._round()
                self._backoff.reset()
                if not more:
                    await self._maybe_prune()
            except (TransportError, StateError) as exc:
                # StateError: a publisher the caller has not started (yet).
                self._broker_down(exc)
                await self._pause()
                continue
            except _DB_ERRORS as exc:
                self._db_down(exc)
                await self._drop_connection()
                await self._pause()
                continue
            except Exception as exc:  # noqa: BLE001 - the relay must outlive any surprise
                self._stats["last_error"] = f"{type(exc).__name__}: {exc}"
                log.exception("outbox relay round failed", extra={"channel": self.channel})
                await self._drop_connection()
                await self._pause()
                continue
            finally:
                self._in_round = False
            if more or self._state is not _RelayState.RUNNING:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wakeup.wait()

    async def _pause(self) -> None:
        self._in_round = False
        if self._state is _RelayState.RUNNING:
            await asyncio.sleep(self._backoff.next_delay())

    async def _ensure_publisher(self) -> None:
        if self._publisher_started:
            return
        await self.publisher.start()
        self._publisher_started = True
        self._stats["broker_up"] = True
        log.info(
            "outbox relay connected to the broker",
            extra={"url": redact_url(self.publisher.url), "channel": self.channel},
        )

    async def _round(self) -> bool:
        """Publish one batch; True if there may be more rows waiting."""
        self._rounds_started += 1
        round_no = self._rounds_started
        self._stats["rounds"] += 1
        if not await self._lead():
            return False  # standing by; not an empty round, so wait_idle() keeps waiting
        rows = await self._pending()
        self._db_up()
        if not rows:
            async with self._progress:
                self._last_empty_round = round_no
                self._progress.notify_all()
            return False
        sent: list[int] = []
        notes: dict[int, str] = {}
        failed: dict[int, str] = {}
        batch: list[tuple[int, Change]] = []
        for row in rows:
            prepared = self._prepare(row, notes, failed)
            if prepared is not None:
                batch.append((row["id"], prepared))
        try:
            # One batch, one broker round trip where the transport can (a Redis pipeline).
            await self.publisher.send_many([change for _, change in batch])
        except (TransportError, StateError):
            # None of the batch is marked sent (some may have gone out: at least once); the
            # rows that cannot be published are marked failed all the same.
            first = batch[0][0] if batch else None
            with contextlib.suppress(*_DB_ERRORS):
                await self._mark(sent, notes, failed, failed_attempt=first)
            raise
        if batch:
            self._broker_up()
            last_id, last = batch[-1]
            sent.extend(row_id for row_id, _ in batch)
            self._stats["published"] += len(batch)
            self._stats["last_published_id"] = last_id
            self._stats["lag_seconds"] = max(0.0, time.time() - (last.ts or time.time()))
        await self._mark(sent, notes, failed, failed_attempt=None)
        return len(rows) == self.batch_size

    async def _lead(self) -> bool:
        """Whether this relay publishes now; on PostgreSQL, take the lead if it is free."""
        await self._connection()
        if self._asyncpg is None:
            self._leading = True
        elif not self._leading:
            was_standing_by = self._stats["leading"] is False
            self._leading = bool(
                await self._asyncpg.fetchval("SELECT pg_try_advisory_lock($1)", self._lock_key)
            )
            if self._leading:
                log.info("outbox relay leads its channel", extra={"channel": self.channel})
            elif not was_standing_by:
                log.info(
                    "outbox relay stands by: another relay publishes this channel",
                    extra={"channel": self.channel},
                )
        self._stats["leading"] = self._leading
        return self._leading

    async def _pending(self) -> Sequence[Mapping[Any, Any]]:
        """The lowest unsent rows of the channel (id, ns, op, keys, version, value, created_at)."""
        conn = await self._connection()
        if self._asyncpg is None:
            rows = (await conn.execute(self._query)).mappings().all()
            await conn.rollback()  # ends SQLAlchemy's transaction; autocommit ended the DB's
            return rows
        # JSON is selected as text and decoded here, whatever codecs the connection has.
        records = await self._asyncpg.fetch(self._pg_select, self.channel, self.batch_size)
        return [
            {
                **record,
                "keys": _json_or_none(record["keys"]),
                "value": _json_or_none(record["value"]),
            }
            for record in records
        ]

    def _prepare(self, row: Any, notes: dict[int, str], failed: dict[int, str]) -> Change | None:
        """The change to publish for ``row``, or None (and the row marked failed)."""
        row_id: int = row["id"]
        try:
            op, keys, version, value, note = self._event_args(row)
            change = Change(op, row["ns"], keys, version, value, _epoch(row["created_at"]))
            # Build the event once now, so a row the event model refuses fails alone instead
            # of failing its whole batch.
            ChangeEvent(
                source="check",
                seq=0,
                ns=change.ns,
                op=op,
                keys=keys,
                version=version,
                value=value,
                ts=change.ts or 0.0,
            )
        except (_BadRow, ValueError, TypeError) as exc:
            failed[row_id] = str(exc)
            self._stats["failed"] += 1
            log.error(
                "outbox row cannot be published, marked failed",
                extra={"id": row_id, "reason": str(exc), "channel": self.channel},
            )
            return None
        if note is not None:
            notes[row_id] = note
            self._stats["degraded"] += 1
            log.warning(
                "outbox row published in a degraded form", extra={"id": row_id, "reason": note}
            )
        return change

    def _event_args(self, row: Any) -> tuple[Op, tuple[str, ...], int | None, Any, str | None]:
        """What to publish for ``row``, and a note if that is less than the row says."""
        ns = row["ns"]
        if not isinstance(ns, str) or not ns or len(ns) > _MAX_NS:
            raise _BadRow(f"ns {ns!r} is not a usable namespace; nothing could be published")
        keys = row["keys"]
        op_value = row["op"]
        if op_value not in _OPS:
            return Op.FLUSH, (), None, None, f"unknown op {op_value!r}: flushed the namespace"
        op = Op(op_value)
        if op is Op.FLUSH:
            return op, (), None, None, None
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            return Op.FLUSH, (), None, None, f"unusable keys {keys!r}: flushed the namespace"
        version = row["version"]
        value = row["value"] if op is Op.UPSERT else None
        note = None
        if value is not None:
            if len(keys) != 1:
                value, note = None, "a value with several keys: sent as an invalidation"
            else:
                size = len(json.dumps(value, separators=(",", ":")))
                if size > self.max_value_bytes:
                    value = None
                    note = (
                        f"value of {size} bytes exceeds {self.max_value_bytes}: "
                        "sent as an invalidation"
                    )
        return op, tuple(keys), version, value, note

    async def _mark(
        self,
        sent: list[int],
        notes: dict[int, str],
        failed: dict[int, str],
        failed_attempt: int | None,
    ) -> None:
        table = _TABLE
        now = _utcnow()
        conn = await self._connection()
        try:
            if sent and self._asyncpg is not None:
                await self._asyncpg.execute(self._pg_mark_sent, sent, now)
            elif sent:
                await conn.execute(
                    update(table)
                    .where(self._id_in(sent))
                    .values(sent_at=now, attempts=table.c.attempts + 1)
                )
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
            if failed_attempt is not None:
                await conn.execute(
                    update(table)
                    .where(table.c.id == failed_attempt)
                    .values(attempts=table.c.attempts + 1)
                )
            await conn.commit()
        except _DB_ERRORS:
            await self._drop_connection()
            raise

    def _id_in(self, ids: list[int]) -> ColumnElement[bool]:
        if self.engine.dialect.name == "postgresql":
            # One array parameter instead of an IN list of batch_size parameters: rendering
            # and binding 500 parameters costs more than the update itself.
            return _TABLE.c.id == any_(bindparam("ids", ids, type_=postgresql.ARRAY(BigInteger)))
        return _TABLE.c.id.in_(ids)

    async def _maybe_prune(self) -> None:
        if self.retention is None or not self._leading:
            return
        now = time.monotonic()
        if now < self._next_prune:
            return
        # Prune at most every minute (or every retention period, if shorter): cheap enough.
        self._next_prune = now + min(60.0, max(self.retention, 1.0))
        table = _TABLE
        cutoff = _utcnow() - timedelta(seconds=self.retention)
        conn = await self._connection()
        result = await conn.execute(
            delete(table).where(table.c.sent_at.is_not(None), table.c.sent_at <= cutoff)
        )
        await conn.commit()
        self._stats["pruned"] += result.rowcount or 0

    # -- the connection, and LISTEN/NOTIFY (PostgreSQL + asyncpg) ---------------------------

    async def _connection(self) -> AsyncConnection:
        """The relay's own connection, opened on first use and after a failure.

        One connection held for the relay's life: no pool checkout per round, and on
        PostgreSQL with asyncpg the same connection runs the hot statements and LISTENs for
        the outbox trigger's NOTIFY.
        """
        if self._conn is not None:
            return self._conn
        conn = await self.engine.connect()
        try:
            # Autocommit: each statement is its own transaction, so a round costs one round
            # trip per statement (no BEGIN/ROLLBACK), holds no SQLite lock or PostgreSQL
            # snapshot while it publishes, and never delays a NOTIFY (which PostgreSQL delivers
            # only between transactions). Nothing here needs two statements to be atomic.
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            if conn.dialect.name == "postgresql":
                await self._use_asyncpg(conn)
        except BaseException:
            with contextlib.suppress(*_DB_ERRORS):
                await conn.invalidate()
            with contextlib.suppress(*_DB_ERRORS):
                await conn.close()
            raise
        self._conn = conn
        return conn

    async def _use_asyncpg(self, conn: AsyncConnection) -> None:
        """Run the hot statements on ``conn``'s asyncpg connection, and LISTEN there if asked.

        Other drivers keep the SQLAlchemy statements, and poll.
        """
        if conn.dialect.driver != "asyncpg":
            if self._listen and not self._listen_failed:
                log.info("outbox relay polls: LISTEN/NOTIFY needs the asyncpg driver")
            self._listen_failed = True
            return
        # The same rows as self._query, the table named as SQLAlchemy names it; asyncpg
        # prepares each statement once (its statement cache).
        table = _quote_ident(TABLE_NAME)
        if explicit := _explicit_schema(conn):
            table = f"{_quote_ident(explicit)}.{table}"
        self._pg_select = (
            f"SELECT id, ns, op, keys::text AS keys, version, value::text AS value, created_at "
            f"FROM {table} WHERE channel = $1 AND sent_at IS NULL AND failed_reason IS NULL "
            f"ORDER BY id LIMIT $2"
        )
        self._pg_mark_sent = (
            f"UPDATE {table} SET sent_at = $2, attempts = attempts + 1 WHERE id = ANY($1::bigint[])"
        )
        driver: Any = (await conn.get_raw_connection()).driver_connection
        self._asyncpg = driver
        schema = await _effective_schema(conn)
        await conn.rollback()
        self._lock_key = _lock_key(schema, self.channel)
        if not self._listen:
            return
        channel = notify_channel(schema)
        await driver.add_listener(channel, self._on_notify)
        driver.add_termination_listener(self._on_listen_lost)
        self._listen_channel = channel
        self._stats["listening"] = True
        log.debug("outbox relay listening", extra={"notify_channel": channel})

    def _on_notify(self, *_args: Any) -> None:
        self._stats["notifies"] += 1
        self._wakeup.set()

    def _on_listen_lost(self, *_args: Any) -> None:
        # The connection died (database restart): poll until it is set up again.
        self._stats["listening"] = False
        self._wakeup.set()

    async def _drop_connection(self) -> None:
        conn, driver = self._conn, self._asyncpg
        self._conn = self._asyncpg = None
        self._stats["listening"] = False
        # Closing the connection releases the advisory lock: another relay may take over.
        self._leading = False
        if conn is None:
            return
        if driver is not None and self._listen_channel:
            with contextlib.suppress(*_DB_ERRORS):
                if not driver.is_closed():
                    await driver.remove_listener(self._listen_channel, self._on_notify)
        # Never hand a LISTENing (or broken) connection back to the pool.
        with contextlib.suppress(*_DB_ERRORS):
            await conn.invalidate()
        with contextlib.suppress(*_DB_ERRORS):
            await conn.close()

    # -- bookkeeping -----------------------------------------------------------------------

    def _broker_down(self, exc: BaseException) -> None:
        self._stats["publish_errors"] += 1
        self._stats["broker_up"] = False
        self._stats["last_error"] = f"broker: {exc}"
        log.warning(
            "outbox relay cannot publish, will retry",
            extra={"url": redact_url(self.publisher.url), "error": str(exc)},
        )

    def _broker_up(self) -> None:
        if not self._stats["broker_up"]:
            self._stats["broker_up"] = True
            log.info("outbox relay publishes again", extra={"channel": self.channel})

    def _db_down(self, exc: BaseException) -> None:
        self._stats["db_errors"] += 1
        self._stats["db_up"] = False
        self._stats["last_error"] = f"database: {type(exc).__name__}: {exc}"
        log.warning("outbox relay cannot read the outbox, will retry", extra={"error": str(exc)})

    def _db_up(self) -> None:
        if not self._stats["db_up"]:
            self._stats["db_up"] = True
            log.info("outbox relay reads the outbox", extra={"channel": self.channel})


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _epoch(moment: datetime | None) -> float:
    if moment is None:
        return time.time()
    if moment.tzinfo is None:  # SQLite hands back naive datetimes; they were written in UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
