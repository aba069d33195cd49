"""The outbox table, ``Outbox.add`` for the owner's transactions, and the table's DDL.

Commit order. An ``id`` is drawn at INSERT, not at commit: transaction B may insert its row,
wait on a row lock that A holds, and commit after A, with the lower id. So on PostgreSQL a
deferred constraint trigger stamps each row at commit time with ``commit_seq``, the next value
of a sequence. Two transactions that change the same data row hold its lock until they commit,
so the one that commits later draws the higher stamp: per key, ``commit_seq`` follows the
commit order. The relay publishes in ``commit_seq`` order and sends the stamp as the event's
``version`` when the row has none, so a consumer ends on the committed last value even when
events arrive out of order (a relay that lost the lead and published late). SQLite has one
writer at a time, so there the ids are already in commit order and serve as the stamp.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, cast

from pydantic_core import PydanticSerializationError, to_jsonable_python
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from ...events import DEFAULT_CHANNEL, Op

__all__ = [
    "DEFAULT_CHANNEL",
    "MAX_NS",
    "OPS",
    "TABLE",
    "TABLE_NAME",
    "Outbox",
    "effective_schema",
    "explicit_schema",
    "notify_channel",
    "quote_ident",
]

TABLE_NAME = "cachesync_outbox"
SEQUENCE_NAME = "cachesync_outbox_commit_seq"
MAX_NS = 256
OPS = frozenset({Op.UPSERT.value, Op.DELETE.value, Op.FLUSH.value})


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Base(DeclarativeBase):
    # A metadata of its own, so the owner's create_all/migrations include the outbox only when
    # they ask for it (``Outbox.metadata``).
    metadata = MetaData()


class Outbox(_Base):
    """One change waiting to be published; also the helpers to write and create the table.

    Columns: ``id`` (autoincrement), ``channel``, ``ns``, ``op``, ``keys`` (JSON list),
    ``version``, ``value`` (JSON), ``created_at``, ``commit_seq`` (the commit stamp, set on
    PostgreSQL by a trigger at commit), ``sent_at`` (NULL until the broker took it),
    ``attempts``, ``failed_reason`` (why a row could not be published, or was published in a
    reduced form). Use :meth:`add` inside the transaction that changes the data, and
    :meth:`create_table` (or ``Outbox.metadata`` plus :meth:`postgresql_sql` in a migration) to
    create it.
    """

    __tablename__ = TABLE_NAME
    __table_args__ = (
        # The relay's query: the unsent rows of one channel in commit order. Partial, so it
        # stays small. (commit_seq is NULL on SQLite: the ids order it there.)
        Index(
            "ix_cachesync_outbox_pending",
            "channel",
            "commit_seq",
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
    ns: Mapped[str] = mapped_column(String(MAX_NS))
    op: Mapped[str] = mapped_column(String(16), default=Op.UPSERT.value)
    keys: Mapped[list[str]] = mapped_column(JSON)
    version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    value: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)
    commit_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
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
        Without ``version`` the event carries the row's commit stamp as its version (on
        PostgreSQL and SQLite; see the module docstring).
        """
        op_value = op.value if isinstance(op, Op) else op
        if op_value not in OPS:
            raise ValueError(f"op must be one of {sorted(OPS)}, got {op_value!r}")
        if not isinstance(ns, str) or not ns or len(ns) > MAX_NS:
            raise ValueError(f"ns must be a non-empty string of at most {MAX_NS} characters")
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
        """Create the table if missing and, on PostgreSQL, its triggers. Idempotent.

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
            schema = await effective_schema(conn)
            for statement in cls.postgresql_sql(schema):
                await conn.exec_driver_sql(statement)

    @staticmethod
    def postgresql_sql(schema: str = "public") -> list[str]:
        """The PostgreSQL statements to run after creating the table (for migrations).

        A sequence and a deferred trigger that stamp each row's ``commit_seq`` at commit time
        (the order the relay publishes in), and a trigger whose ``pg_notify`` wakes the relay
        when a transaction with outbox rows commits. Idempotent.
        """
        qschema = quote_ident(schema)
        table = f"{qschema}.{quote_ident(TABLE_NAME)}"
        sequence = f"{qschema}.{quote_ident(SEQUENCE_NAME)}"
        stamp = f"{qschema}.cachesync_outbox_stamp"
        notify = f"{qschema}.cachesync_outbox_notify"
        channel = notify_channel(schema)
        regclass = f"'{table.replace(chr(39), chr(39) * 2)}'::regclass"
        return [
            f"CREATE SEQUENCE IF NOT EXISTS {sequence}",
            f"CREATE OR REPLACE FUNCTION {stamp}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN UPDATE {table} SET commit_seq = nextval('{sequence}') WHERE id = NEW.id; "
            f"RETURN NULL; END $$",
            # DEFERRABLE INITIALLY DEFERRED: it runs at commit, while the transaction still
            # holds its row locks. (A constraint trigger has no CREATE OR REPLACE.)
            f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = {regclass} "
            f"AND tgname = 'cachesync_outbox_stamp') THEN "
            f"CREATE CONSTRAINT TRIGGER cachesync_outbox_stamp AFTER INSERT ON {table} "
            f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {stamp}(); "
            f"END IF; END $$",
            f"CREATE OR REPLACE FUNCTION {notify}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN PERFORM pg_notify('{channel}', ''); RETURN NULL; END $$",
            # FOR EACH STATEMENT: one notification per insert statement is enough, and
            # PostgreSQL folds equal notifications of one transaction into one anyway.
            f"CREATE OR REPLACE TRIGGER cachesync_outbox_notify AFTER INSERT ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {notify}()",
        ]


TABLE = cast(Table, Outbox.__table__)


def notify_channel(schema: str) -> str:
    """The LISTEN channel of the outbox table in ``schema`` (hashed: names are <= 63 bytes)."""
    digest = hashlib.sha1(f"{schema}.{TABLE_NAME}".encode()).hexdigest()[:16]
    return f"cachesync_outbox_{digest}"


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def explicit_schema(conn: AsyncConnection) -> str | None:
    """The table's schema as SQLAlchemy renders it on ``conn`` (None: the search path's)."""
    options = conn.sync_connection.get_execution_options() if conn.sync_connection else {}
    translate = options.get("schema_translate_map") or {}
    schema = translate.get(TABLE.schema, TABLE.schema)
    return str(schema) if schema else None


async def effective_schema(conn: AsyncConnection) -> str:
    """The schema the table lives in on ``conn``: explicit, or the search path's first."""
    schema = explicit_schema(conn)
    if schema:
        return schema
    result = await conn.exec_driver_sql("SELECT current_schema()")
    return str(result.scalar_one())
