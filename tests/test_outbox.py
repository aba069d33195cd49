"""The transactional outbox and its relay: order, at-least-once, faults, guarantees 6 and 14.

SQLite + the memory bus for the quick cases; real PostgreSQL (LISTEN/NOTIFY, concurrent
transactions, row locks, terminated sessions, a database cut through a TCP proxy) and real
Redis through a TCP proxy for guarantee 6 and long outages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, create_engine, insert, make_url, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from cachesync import Op, Publisher
from cachesync.owner.outbox import Outbox, OutboxRelay, notify_channel
from cachesync.owner.outbox import relay as relay_module
from cachesync.owner.outbox.database import OutboxDatabase
from cachesync.owner.outbox.generic import GenericDatabase

from .helpers import eventually
from .outbox_tools import (
    Collector,
    FlakyTransport,
    StallingTransport,
    session_pids,
    terminate_sessions,
)
from .tcpproxy import TcpProxy

TABLE = Outbox.__table__


async def _rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(TABLE).order_by(TABLE.c.id))).mappings())


async def _commit(
    engine: AsyncEngine, *changes: tuple[str, str, int], channel: str = "cachesync"
) -> None:
    async with AsyncSession(engine) as session, session.begin():
        for ns, key, version in changes:
            value = {"key": key, "v": version}
            Outbox.add(session, ns, key, version=version, value=value, channel=channel)


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'owner.db'}")
    await Outbox.create_table(engine)
    yield engine
    await engine.dispose()


def _asyncpg(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


@pytest.fixture
async def pg_schema(postgres_dsn: str, unique: str) -> AsyncIterator[str]:
    """A fresh schema for this test, dropped afterwards."""
    schema = f"cs_test_{unique}"
    admin = create_async_engine(_asyncpg(postgres_dsn))
    async with admin.begin() as conn:
        await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        async with admin.begin() as conn:
            await conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.dispose()


@pytest.fixture
async def named_pg_engine(
    postgres_dsn: str, pg_schema: str
) -> AsyncIterator[Callable[[str], AsyncEngine]]:
    """Engines in the test's schema whose sessions carry an application_name (to find them)."""
    bases: list[AsyncEngine] = []

    def make(name: str) -> AsyncEngine:
        settings = {"server_settings": {"application_name": name}}
        base = create_async_engine(_asyncpg(postgres_dsn), connect_args=settings)
        bases.append(base)
        return base.execution_options(schema_translate_map={None: pg_schema})

    yield make
    for base in bases:
        await base.dispose()


@pytest.fixture
async def pg_engine(postgres_dsn: str, pg_schema: str) -> AsyncIterator[AsyncEngine]:
    base = create_async_engine(_asyncpg(postgres_dsn))
    engine = base.execution_options(schema_translate_map={None: pg_schema})
    await Outbox.create_table(engine)
    yield engine
    await base.dispose()


# -- Outbox.add ------------------------------------------------------------------------------


@pytest.mark.timeout(5)
def test_add_checks_its_arguments_before_anything_is_written() -> None:
    session = Session()
    with pytest.raises(ValueError):
        Outbox.add(session, "", "USD")
    with pytest.raises(ValueError):
        Outbox.add(session, "currencies")  # an upsert needs a key
    with pytest.raises(ValueError):
        Outbox.add(session, "currencies", "USD", op="rename")
    with pytest.raises(ValueError):
        Outbox.add(session, "currencies", "USD", "EUR", value={"a": 1})
    with pytest.raises(TypeError):
        Outbox.add(session, "currencies", 7)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Outbox.add(session, "currencies", "USD", value=object())
    with pytest.raises(TypeError):
        Outbox.add(session, "currencies", "USD", version="7")  # type: ignore[arg-type]
    assert not session.new
    row = Outbox.add(session, "currencies", op="flush")
    assert list(session.new) == [row]
    session.close()


@pytest.mark.timeout(10)
async def test_sync_session_rows_are_published_in_id_order(tmp_path: Path, unique: str) -> None:
    path = tmp_path / "sync.db"
    sync_engine = create_engine(f"sqlite:///{path}")
    Outbox.metadata.create_all(sync_engine)
    with Session(sync_engine) as session, session.begin():
        for version in range(1, 6):
            Outbox.add(session, "currencies", "USD", version=version, value={"v": version})
        Outbox.add(session, "currencies", "USD", op=Op.DELETE, version=6)
        Outbox.add(session, "customers", op="flush")
    sync_engine.dispose()

    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    url = f"memory://{unique}"
    try:
        async with Collector(url) as collector, OutboxRelay(engine, url, poll_interval=0.05):
            events = await collector.wait_changes(7)
        assert [(e.op, e.ns, e.version) for e in events] == [
            *((Op.UPSERT, "currencies", v) for v in range(1, 6)),
            (Op.DELETE, "currencies", 6),
            (Op.FLUSH, "customers", None),
        ]
        assert events[0].value == {"v": 1} and events[0].keys == ("USD",)
        assert [e.seq for e in events] == list(range(1, 8))
        rows = await _rows(engine)
        assert all(r["sent_at"] is not None and r["attempts"] == 1 for r in rows)
    finally:
        await engine.dispose()


@pytest.mark.timeout(10)
async def test_value_models_are_stored_as_json(sqlite_engine: AsyncEngine, unique: str) -> None:
    from pydantic import BaseModel

    class Currency(BaseModel):
        code: str
        rate: float

    async with AsyncSession(sqlite_engine) as session, session.begin():
        Outbox.add(session, "currencies", "USD", version=1, value=Currency(code="USD", rate=1.0))
    url = f"memory://{unique}"
    async with Collector(url) as collector, OutboxRelay(sqlite_engine, url, poll_interval=0.05):
        (event,) = await collector.wait_changes(1)
    assert event.value == {"code": "USD", "rate": 1.0}


# -- the relay ---------------------------------------------------------------------------------


@pytest.mark.timeout(10)
async def test_broker_down_rows_wait_and_go_out_when_it_returns(
    sqlite_engine: AsyncEngine, unique: str
) -> None:
    url = f"memory://{unique}"
    transport = FlakyTransport(url)
    publisher = Publisher(url, transport=transport, heartbeat_interval=None, publish_timeout=0.05)
    async with Collector(url) as collector:
        await publisher.start()
        relay = OutboxRelay(sqlite_engine, publisher, poll_interval=0.05, backoff_max=0.05)
        transport.down = True
        async with relay:
            await _commit(sqlite_engine, *(("currencies", f"K{i % 5}", i) for i in range(40)))
            await eventually(lambda: relay.stats()["publish_errors"] >= 2)
            stats = relay.stats()
            assert stats["broker_up"] is False and "broker" in stats["last_error"]
            assert stats["published"] == 0
            assert all(r["sent_at"] is None for r in await _rows(sqlite_engine))
            transport.down = False
            events = await collector.wait_changes(40)
            await relay.wait_idle(5)
        await publisher.stop()
    assert [e.version for e in events] == list(range(40))
    assert relay.stats()["broker_up"] is True
    rows = await _rows(sqlite_engine)
    assert all(r["sent_at"] is not None for r in rows)
    assert rows[0]["attempts"] >= 2  # the failed tries are counted on the row


@pytest.mark.timeout(10)
async def test_bad_rows_are_degraded_or_failed_and_the_relay_goes_on(
    sqlite_engine: AsyncEngine, unique: str
) -> None:
    # Rows written behind Outbox.add's back (raw SQL, another writer): the relay must cope.
    def row(**values: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"channel": "cachesync", "ns": "currencies", "op": "upsert"}
        base.update(keys=["USD"], attempts=0, version=None, value=None)
        return {**base, **values}

    async with sqlite_engine.begin() as conn:
        await conn.execute(
            insert(TABLE),
            [
                row(version=1, value={"ok": 1}),
                row(ns=""),  # 2: nothing usable: failed
                row(op="rename"),  # 3: unknown op: flush the namespace
                row(version=4, value={"blob": "x" * 5000}),  # 4: too big: invalidation
                row(keys=[1, 2]),  # 5: bad keys: flush
                row(version=6, value={"ok": 6}),
            ],
        )
    url = f"memory://{unique}"
    async with (
        Collector(url) as collector,
        OutboxRelay(sqlite_engine, url, poll_interval=0.05, max_value_bytes=1000) as relay,
    ):
        events = await collector.wait_changes(5)
        await relay.wait_idle(5)
    assert [(e.op, e.version, e.value) for e in events] == [
        (Op.UPSERT, 1, {"ok": 1}),
        (Op.FLUSH, None, None),
        (Op.UPSERT, 4, None),
        (Op.FLUSH, None, None),
        (Op.UPSERT, 6, {"ok": 6}),
    ]
    rows = {r["id"]: r for r in await _rows(sqlite_engine)}
    assert rows[2]["sent_at"] is None and "namespace" in rows[2]["failed_reason"]
    assert rows[3]["sent_at"] is not None and "unknown op" in rows[3]["failed_reason"]
    assert rows[4]["sent_at"] is not None and "invalidation" in rows[4]["failed_reason"]
    assert rows[1]["failed_reason"] is None and rows[6]["failed_reason"] is None
    stats = relay.stats()
    assert stats["failed"] == 1 and stats["degraded"] == 3 and stats["published"] == 5


@pytest.mark.timeout(10)
async def test_sent_rows_are_pruned_after_the_retention(
    sqlite_engine: AsyncEngine, unique: str
) -> None:
    await _commit(sqlite_engine, ("currencies", "USD", 1), ("currencies", "EUR", 1))
    async with sqlite_engine.begin() as conn:
        await conn.execute(insert(TABLE).values(ns="", keys=["X"], op="upsert", attempts=0))
    url = f"memory://{unique}"
    async with OutboxRelay(sqlite_engine, url, poll_interval=0.05, retention=0) as relay:
        await relay.wait_idle(5)
        await relay.wait_idle(5)  # the round after an empty one prunes
    rows = await _rows(sqlite_engine)
    assert [r["ns"] for r in rows] == [""]  # only the failed row is kept, for inspection
    assert relay.stats()["pruned"] == 2


@pytest.mark.timeout(10)
async def test_a_restarted_relay_resumes_where_the_last_one_stopped(
    sqlite_engine: AsyncEngine, unique: str
) -> None:
    url = f"memory://{unique}"
    async with Collector(url) as collector:
        async with OutboxRelay(sqlite_engine, url, poll_interval=0.05) as first:
            await _commit(sqlite_engine, *(("currencies", "USD", v) for v in range(1, 4)))
            await collector.wait_changes(3)
            await first.wait_idle(5)
        await _commit(sqlite_engine, *(("currencies", "USD", v) for v in range(4, 7)))
        async with OutboxRelay(sqlite_engine, url, poll_interval=0.05) as second:
            events = await collector.wait_changes(6)
            await second.wait_idle(5)
    assert [e.version for e in events] == [1, 2, 3, 4, 5, 6]  # once each, in order
    assert events[2].source != events[3].source  # a new publisher: consumers notice


@pytest.mark.timeout(5)
async def test_lifecycle_and_arguments(sqlite_engine: AsyncEngine, unique: str) -> None:
    with pytest.raises(ValueError):
        OutboxRelay(sqlite_engine, f"memory://{unique}", batch_size=0)
    with pytest.raises(ValueError):
        OutboxRelay(sqlite_engine, Publisher(f"memory://{unique}"), channel="other")
    with pytest.raises(TypeError):
        OutboxRelay(sqlite_engine, 42)  # type: ignore[arg-type]
    relay = OutboxRelay(sqlite_engine, f"memory://{unique}")
    async with relay:
        pass
    await relay.stop()  # idempotent
    with pytest.raises(Exception, match="closed"):
        await relay.start()


@pytest.mark.timeout(10)
async def test_rows_without_a_version_carry_their_commit_stamp_on_sqlite(
    sqlite_engine: AsyncEngine, unique: str
) -> None:
    # SQLite lets one transaction write at a time: ids follow the commit order.
    for v in (1, 2):
        async with AsyncSession(sqlite_engine) as session, session.begin():
            Outbox.add(session, "currencies", "USD", value={"v": v})
    async with AsyncSession(sqlite_engine) as session, session.begin():
        Outbox.add(session, "currencies", "USD", version=70, value={"v": 3})
        Outbox.add(session, "currencies", op="flush")
    url = f"memory://{unique}"
    async with Collector(url) as collector, OutboxRelay(sqlite_engine, url, poll_interval=0.05):
        events = await collector.wait_changes(4)
    ids = [r["id"] for r in await _rows(sqlite_engine)]
    assert [e.version for e in events] == [ids[0], ids[1], 70, None]


@pytest.mark.timeout(10)
async def test_a_table_from_an_earlier_version_gets_an_error_that_says_what_to_do(
    sqlite_engine: AsyncEngine, unique: str
) -> None:
    async with sqlite_engine.begin() as conn:
        await conn.exec_driver_sql("DROP INDEX ix_cachesync_outbox_pending")
        await conn.exec_driver_sql("ALTER TABLE cachesync_outbox DROP COLUMN commit_seq")
    url = f"memory://{unique}"
    async with OutboxRelay(sqlite_engine, url, poll_interval=0.05, backoff_max=0.05) as relay:
        await eventually(lambda: "ADD COLUMN commit_seq" in (relay.stats()["last_error"] or ""))


# -- PostgreSQL ------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.timeout(10)
async def test_notify_wakes_the_relay_without_waiting_for_the_poll(
    pg_engine: AsyncEngine, pg_schema: str, unique: str
) -> None:
    url = f"memory://{unique}"
    async with (
        Collector(url) as collector,
        OutboxRelay(pg_engine, url, poll_interval=30.0) as relay,
    ):
        await eventually(lambda: relay.stats()["listening"])
        for version in range(1, 4):
            await _commit(pg_engine, ("currencies", "USD", version))
            await collector.wait_changes(version, timeout=2.0)  # far below the 30 s poll
        assert relay.stats()["notifies"] >= 3
    assert notify_channel(pg_schema).startswith("cachesync_outbox_")


@pytest.mark.postgres
@pytest.mark.timeout(10)
async def test_a_late_committing_lower_id_is_not_skipped(
    pg_engine: AsyncEngine, unique: str
) -> None:
    url = f"memory://{unique}"
    async with (
        Collector(url) as collector,
        OutboxRelay(pg_engine, url, poll_interval=30.0) as relay,
        AsyncSession(pg_engine) as slow,
    ):
        await eventually(lambda: relay.stats()["listening"])
        slow_tx = await slow.begin()
        Outbox.add(slow, "currencies", "SLOW", version=1)
        await slow.flush()  # takes the lower id now, commits later
        await _commit(pg_engine, ("currencies", "FAST", 1))
        (fast,) = await collector.wait_changes(1)
        assert fast.keys == ("FAST",)
        await slow_tx.commit()
        events = await collector.wait_changes(2)
        await relay.wait_idle(5)
    assert [e.keys for e in events] == [("FAST",), ("SLOW",)]
    rows = await _rows(pg_engine)
    assert [r["keys"] for r in rows] == [["SLOW"], ["FAST"]]  # ids: SLOW's is the lower
    assert all(r["sent_at"] is not None for r in rows)


@pytest.mark.postgres
@pytest.mark.timeout(10)
async def test_a_killed_database_session_is_replaced_and_listening_resumes(
    pg_engine: AsyncEngine, named_pg_engine: Callable[[str], AsyncEngine], unique: str
) -> None:
    url = f"memory://{unique}"
    name = f"relay-{unique}"
    engine = named_pg_engine(name)
    async with (
        Collector(url) as collector,
        OutboxRelay(engine, url, poll_interval=0.1, backoff_max=0.05) as relay,
    ):
        await eventually(lambda: relay.stats()["listening"])
        (pid,) = await terminate_sessions(pg_engine, name)
        await _commit(pg_engine, ("currencies", "USD", 1))
        await collector.wait_changes(1)
        # asyncpg's error on the dead connection counts as the database's, not a surprise.
        assert relay.stats()["db_errors"] >= 1
        assert relay.stats()["last_error"].startswith("database")
        await eventually(lambda: relay.stats()["listening"])
        assert await session_pids(pg_engine, name) not in ([], [pid])
        await _commit(pg_engine, ("currencies", "USD", 2))
        events = await collector.wait_changes(2)
    assert [e.version for e in events] == [1, 2]


@pytest.mark.postgres
@pytest.mark.timeout(20)
async def test_the_asyncpg_path_reads_and_marks_rows_as_sqlalchemy_does(
    pg_engine: AsyncEngine, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With asyncpg the relay selects and marks rows on the driver's connection: odd rows
    included, it must publish what the generic (SQLAlchemy) path publishes, in the same order,
    and leave the rows in the same state."""

    def row(**values: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"ns": "currencies", "op": "upsert", "keys": ["USD"]}
        base.update(attempts=0, version=None, value=None, created_at=created)
        return {**base, **values}

    created = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)

    odd = [
        row(version=1, value={"ok": 1, "nested": [1.5, {"é": None}]}),
        row(ns=""),  # nothing usable: marked failed and left unsent
        row(op="rename"),  # unknown op: flush
        row(version=4, value={"blob": "x" * 5000}),  # too big: an invalidation
        row(keys=[1, 2]),  # bad keys: flush
        row(keys="USD"),  # a JSON string, not a list: flush
        row(version=7, value="a JSON string"),
        row(version=8, value=JSON.NULL),  # JSON null, not SQL NULL: no value either way
        row(op="delete", version=9),
        row(version=10, value=[False, 0, ""]),
    ]

    def generic_only(engine: AsyncEngine, *args: Any, **kwargs: Any) -> OutboxDatabase:
        return GenericDatabase(engine, *args, **kwargs)

    published: dict[str, list[tuple[Any, ...]]] = {}
    states: dict[str, list[tuple[Any, ...]]] = {}
    for path in ("asyncpg", "sqlalchemy"):
        if path == "sqlalchemy":
            monkeypatch.setattr(relay_module, "database_for", generic_only)
        channel = f"{path}-{unique}"
        async with pg_engine.begin() as conn:  # 20 rows: 7 rounds of 3
            await conn.execute(insert(TABLE), [{**r, "channel": channel} for r in odd + odd])
        url = f"memory://{channel}"
        options: dict[str, Any] = {"batch_size": 3, "max_value_bytes": 1000, "retention": None}
        async with (
            Collector(url, channel) as collector,
            OutboxRelay(pg_engine, url, channel, poll_interval=0.05, **options) as relay,
        ):
            await relay.wait_idle(5)
            assert relay.stats()["listening"] is (path == "asyncpg")
            assert relay.stats()["published"] == 18 and relay.stats()["failed"] == 2
        published[path] = [(e.op, e.keys, e.version, e.value, e.ts) for e in collector.changes]
        states[path] = [
            (r["sent_at"] is not None, r["attempts"], r["failed_reason"])
            for r in await _rows(pg_engine)
            if r["channel"] == channel
        ]
    assert published["asyncpg"] == published["sqlalchemy"]
    assert {ts for *_, ts in published["asyncpg"]} == {created.timestamp()}
    assert states["asyncpg"] == states["sqlalchemy"]
    assert [(op, keys, version, value) for op, keys, version, value, _ in published["asyncpg"]] == [
        (Op.UPSERT, ("USD",), 1, {"ok": 1, "nested": [1.5, {"é": None}]}),
        (Op.FLUSH, (), None, None),
        (Op.UPSERT, ("USD",), 4, None),
        (Op.FLUSH, (), None, None),
        (Op.FLUSH, (), None, None),
        (Op.UPSERT, ("USD",), 7, "a JSON string"),
        (Op.UPSERT, ("USD",), 8, None),
        (Op.DELETE, ("USD",), 9, None),
        (Op.UPSERT, ("USD",), 10, [False, 0, ""]),
    ] * 2
    assert states["asyncpg"][1] == (
        False,
        1,
        "ns '' is not a usable namespace; nothing could be published",
    )
    assert all(sent and attempts == 1 for sent, attempts, _ in states["asyncpg"][2:10])


@pytest.mark.postgres
@pytest.mark.timeout(10)
async def test_postgres_sent_rows_are_pruned_after_the_retention(
    pg_engine: AsyncEngine, unique: str
) -> None:
    await _commit(pg_engine, ("currencies", "USD", 1), ("currencies", "EUR", 1))
    url = f"memory://{unique}"
    async with OutboxRelay(pg_engine, url, retention=0) as relay:
        await relay.wait_idle(5)
        await relay.wait_idle(5)  # the round after an empty one prunes
    assert await _rows(pg_engine) == []
    assert relay.stats()["pruned"] == 2


@pytest.mark.postgres
@pytest.mark.timeout(20)
async def test_relays_of_several_owner_instances_elect_one_and_fail_over(
    pg_engine: AsyncEngine, unique: str
) -> None:
    url = f"memory://{unique}"
    async with Collector(url) as collector:
        first = OutboxRelay(pg_engine, url, poll_interval=0.05)
        second = OutboxRelay(pg_engine, url, poll_interval=0.05)
        try:
            await first.start()
            await eventually(lambda: first.stats()["leading"] is True)
            await second.start()
            await eventually(lambda: second.stats()["leading"] is False)
            for version in range(1, 21):
                await _commit(pg_engine, ("currencies", f"K{version}", version))
            await first.wait_idle(5)
            changes = await collector.wait_changes(20)
            # Published once each, all by the leader; the other relay stood by.
            assert [e.version for e in changes] == list(range(1, 21))
            assert {e.source for e in changes} == {first.publisher.source}
            assert second.stats()["published"] == 0
            await first.stop()  # its connection closes: the lock is free
            await _commit(pg_engine, ("currencies", "AFTER", 21))
            await collector.wait_changes(21)
            assert second.stats()["leading"] is True
            assert len(collector.changes) == 21
            assert collector.changes[-1].source == second.publisher.source
        finally:
            await first.stop()
            await second.stop()


async def test_without_postgres_every_relay_leads(sqlite_engine: AsyncEngine, unique: str) -> None:
    async with OutboxRelay(sqlite_engine, f"memory://{unique}", poll_interval=0.05) as relay:
        await relay.wait_idle(5)
        assert relay.stats()["leading"] is True


@pytest.mark.postgres
@pytest.mark.timeout(20)
async def test_database_down_relay_retries_says_so_and_skips_nothing(
    postgres_dsn: str, pg_schema: str, pg_engine: AsyncEngine, unique: str
) -> None:
    url = f"memory://{unique}"
    await _commit(pg_engine, *(("currencies", "USD", v) for v in range(1, 11)))
    async with TcpProxy("127.0.0.1", 5432) as proxy:
        proxied = make_url(_asyncpg(postgres_dsn)).set(host="127.0.0.1", port=proxy.port)
        base = create_async_engine(proxied, pool_pre_ping=True)
        engine = base.execution_options(schema_translate_map={None: pg_schema})
        try:
            proxy.refuse(True)
            async with (
                Collector(url) as collector,
                OutboxRelay(engine, url, poll_interval=0.05, backoff_max=0.1) as relay,
            ):
                await eventually(lambda: relay.stats()["db_errors"] >= 2)
                stats = relay.stats()
                assert stats["db_up"] is False and "database" in stats["last_error"]
                assert stats["published"] == 0
                proxy.refuse(False)
                await collector.wait_changes(10)
                # Cut the live connections mid-stream, commit more (directly), come back.
                await proxy.cut()
                proxy.refuse(True)
                await _commit(pg_engine, *(("currencies", "USD", v) for v in range(11, 21)))
                errors = relay.stats()["db_errors"]
                await eventually(lambda: relay.stats()["db_errors"] > errors)
                proxy.refuse(False)
                events = await collector.wait_changes(20)
                await relay.wait_idle(5)
        finally:
            await base.dispose()
    versions = [e.version for e in events]
    assert sorted(set(versions)) == list(range(1, 21))  # none skipped
    # At least once: rows published just before the cut may go out again if marking them sent
    # failed; the last delivery of each is still in order, so the consumer ends with v20.
    last = {version: index for index, version in enumerate(versions)}
    assert sorted(last, key=last.__getitem__) == list(range(1, 21))


# -- guarantee 6 -----------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(40)
def _distinct(events: list[Any]) -> list[tuple[str, int]]:
    """Each change's (key, version) once, in the order of its first arrival."""
    return list(dict.fromkeys((e.keys[0], e.version) for e in events))


async def test_guarantee_6_changes_committed_while_the_broker_is_down_are_all_published(
    pg_engine: AsyncEngine, redis_url: str, unique: str
) -> None:
    """1,000 changes committed with the broker unreachable, a relay restart in between,
    then the broker back: every change reaches a consumer, none lost, per-key order kept."""
    from cachesync import CacheSync

    channel = f"g6-{unique}"
    redis = make_url(redis_url)
    direct = f"redis+stream://{redis.host}:{redis.port}/{redis.database or 0}"
    keys = [f"K{i:02d}" for i in range(50)]
    changes = [("items", keys[i % 50], i // 50 + 1) for i in range(1000)]  # 20 versions per key

    sync = CacheSync(direct, channel=channel)
    fetched: list[str] = []

    @sync.cached("items", ttl=3600, mode="refresh", version_of=lambda v: v["v"])
    async def get_item(key: str) -> dict[str, Any]:
        fetched.append(key)
        return {"key": key, "v": -1}

    async with (
        TcpProxy(redis.host, redis.port) as proxy,
        Collector(direct, channel) as collector,
        sync,
    ):
        for key in keys:  # the consumer holds every key, so refresh events update them
            assert get_item.prime(key, {"key": key, "v": 0}, version=0)
        proxy.refuse(True)
        broker = f"redis+stream://127.0.0.1:{proxy.port}/{redis.database or 0}"
        options: dict[str, Any] = {"poll_interval": 0.05, "backoff_max": 0.1}
        options["connect_timeout"] = 0.5  # each failed connect is reported sooner
        first = OutboxRelay(pg_engine, broker, channel, **options)
        async with first:
            for start in range(0, 1000, 50):  # 20 transactions of 50 changes
                await _commit(pg_engine, *changes[start : start + 50], channel=channel)
            await eventually(lambda: first.stats()["publish_errors"] >= 1, timeout=10)
            assert first.stats()["published"] == 0
        # The owner restarts: a new relay, a new publisher, the broker still unreachable.
        second = OutboxRelay(pg_engine, broker, channel, **options)
        async with second:
            await eventually(lambda: second.stats()["publish_errors"] >= 1, timeout=10)
            proxy.refuse(False)
            # At least once: a batch the broker took part of before an error goes out again.
            await collector.wait_for(lambda: len(_distinct(collector.changes)) >= 1000, 20)
            events = _distinct(collector.changes)
            await second.wait_idle(10)
            await collector.wait_for(lambda: all(_applied(get_item, k, 20) for k in keys))
        assert second.stats()["published"] == 1000
        for key in keys:
            assert (await get_item(key))["v"] == 20

    per_key: dict[str, list[int]] = {}
    for key, version in events:
        per_key.setdefault(key, []).append(version)
    assert len(events) == 1000
    assert all(versions == list(range(1, 21)) for versions in per_key.values()), per_key
    assert len(per_key) == 50
    rows = await _rows(pg_engine)
    assert len(rows) == 1000 and all(r["sent_at"] is not None for r in rows)
    assert not fetched  # every value came from the events, none from the owner


def _applied(cached: Any, key: str, version: int) -> bool:
    entry = cached.cache.get_fresh(key)
    return entry is not None and entry.value["v"] == version


# -- no row stranded, commit order, fencing, long outages (guarantee 14) ----------------------


@pytest.mark.timeout(10)
async def test_a_row_sent_in_reduced_form_whose_publish_failed_is_not_stranded(
    sqlite_engine: AsyncEngine, unique: str
) -> None:
    """A value over max_value_bytes goes out as an invalidation, with a note. If the broker
    refuses that publish, the note must not be written: a row with a failed_reason is never
    selected again, so the row would never be sent."""
    url = f"memory://{unique}"
    transport = FlakyTransport(url)
    publisher = Publisher(url, transport=transport, heartbeat_interval=None, publish_timeout=0.05)
    async with AsyncSession(sqlite_engine) as session, session.begin():
        Outbox.add(session, "currencies", "USD", version=1, value={"blob": "x" * 500})
    async with Collector(url) as collector:
        await publisher.start()
        transport.down = True
        options: dict[str, Any] = {"poll_interval": 0.05, "backoff_max": 0.05}
        async with OutboxRelay(sqlite_engine, publisher, max_value_bytes=100, **options) as relay:
            await eventually(lambda: relay.stats()["publish_errors"] >= 2)
            (row,) = await _rows(sqlite_engine)
            assert row["sent_at"] is None and row["failed_reason"] is None
            transport.down = False
            await relay.wait_idle(5)
            assert [(e.keys, e.version, e.value) for e in collector.changes] == [
                (("USD",), 1, None)
            ]
        await publisher.stop()
    (row,) = await _rows(sqlite_engine)
    assert row["sent_at"] is not None and "invalidation" in row["failed_reason"]
    assert relay.stats()["degraded"] == 1


async def _refresh_consumer(url: str, ns: str, *keys: str) -> tuple[Any, Any]:
    """A consumer in refresh mode that holds ``keys`` (value {"v": 0}), so events update them;
    a read that misses returns {"v": -1}."""
    from cachesync import CacheSync

    sync = CacheSync(url, heartbeat_timeout=30.0)

    @sync.cached(ns, ttl=3600, mode="refresh")
    async def get_item(key: str) -> dict[str, Any]:
        return {"v": -1}

    await sync.start()
    for key in keys:
        assert get_item.prime(key, {"v": 0})
    return sync, get_item


@pytest.mark.postgres
@pytest.mark.timeout(20)
async def test_rows_go_out_in_commit_order_and_consumers_end_on_the_last_commit(
    pg_engine: AsyncEngine, pg_schema: str, unique: str
) -> None:
    """B inserts its outbox row (the lower id), then waits on A's row lock; A commits first.
    The database ends with B's value; so must a refresh-mode consumer."""
    async with pg_engine.begin() as conn:
        await conn.exec_driver_sql(
            f'CREATE TABLE "{pg_schema}".items (key text PRIMARY KEY, v int)'
        )
        await conn.exec_driver_sql(f"INSERT INTO \"{pg_schema}\".items VALUES ('K', 0)")
    update = text(f'UPDATE "{pg_schema}".items SET v = :v WHERE key = :key')
    async with AsyncSession(pg_engine) as a, AsyncSession(pg_engine) as b:
        await a.begin()
        await a.execute(update, {"v": 1, "key": "K"})  # A holds the row lock
        await b.begin()
        b_pid = (await b.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        Outbox.add(b, "items", "K", value={"v": 2})
        await b.flush()  # B's outbox row: the lower id
        b_update = asyncio.create_task(b.execute(update, {"v": 2, "key": "K"}))
        waiting = text("SELECT count(*) FROM pg_locks WHERE pid = :pid AND NOT granted")
        async with pg_engine.connect() as conn, asyncio.timeout(5):
            while not (await conn.execute(waiting, {"pid": b_pid})).scalar_one():
                await asyncio.sleep(0.005)  # until B waits on A's lock
        Outbox.add(a, "items", "K", value={"v": 1})
        await a.commit()
        await b_update
        await b.commit()
    async with pg_engine.connect() as conn:
        assert (await conn.exec_driver_sql(f'SELECT v FROM "{pg_schema}".items')).scalar() == 2
    rows = await _rows(pg_engine)
    assert [r["value"] for r in rows] == [{"v": 2}, {"v": 1}]  # by id, B's is first

    url = f"memory://{unique}"
    sync, get_item = await _refresh_consumer(url, "items", "K")
    try:
        async with Collector(url) as collector, OutboxRelay(pg_engine, url) as relay:
            events = await collector.wait_changes(2)
            await relay.wait_idle(5)
            await eventually(lambda: get_item.cache.stats.events >= 2)
            assert await get_item("K") == {"v": 2}
    finally:
        await sync.stop()
    assert [e.value for e in events] == [{"v": 1}, {"v": 2}]  # commit order
    first, second = (e.version for e in events)
    assert first is not None and second is not None and first < second  # commit stamps


@pytest.mark.postgres
@pytest.mark.timeout(30)
async def test_a_deposed_leaders_late_publish_loses_to_the_new_leader(
    pg_engine: AsyncEngine, named_pg_engine: Callable[[str], AsyncEngine], unique: str
) -> None:
    """The leader's session is terminated while its publish of row 1 is on the wire; the new
    leader publishes rows 1 and 2; then the old publish lands. Consumers keep row 2, and the
    deposed relay publishes nothing more."""
    url = f"memory://{unique}"
    name = f"old-leader-{unique}"
    stalling = StallingTransport(url)
    old_publisher = Publisher(url, transport=stalling, heartbeat_interval=None)
    sync, get_item = await _refresh_consumer(url, "items", "K", "OTHER")

    async def commit(key: str, v: int) -> None:
        async with AsyncSession(pg_engine) as session, session.begin():
            Outbox.add(session, "items", key, value={"v": v})

    old = OutboxRelay(named_pg_engine(name), old_publisher, poll_interval=0.05, backoff_max=0.05)
    new = OutboxRelay(pg_engine, url, poll_interval=0.05, backoff_max=0.05)
    try:
        async with Collector(url) as collector:
            await old_publisher.start()
            await old.start()
            await eventually(lambda: old.stats()["leading"] is True)
            await new.start()
            await eventually(lambda: new.stats()["leading"] is False)
            await commit("OTHER", 1)  # consumers hear the old leader's source first
            await collector.wait_changes(1)
            stalling.armed = True
            await commit("K", 1)
            async with asyncio.timeout(5):
                await stalling.stalled.wait()  # the old leader's publish of row 1 hangs
            await terminate_sessions(pg_engine, name)
            await commit("K", 2)
            await collector.wait_for(
                lambda: (
                    [e.value for e in collector.changes if e.source == new.publisher.source]
                    == [{"v": 1}, {"v": 2}]
                )
            )
            assert await get_item("K") == {"v": 2}
            stalling.release.set()  # the late publish lands now
            await collector.wait_for(lambda: len(collector.changes) == 4)
            late = collector.changes[-1]
            assert late.source == old_publisher.source and late.value == {"v": 1}
            await eventually(lambda: get_item.cache.stats.events >= 4)
            assert await get_item("K") == {"v": 2}
            assert get_item.cache.stats.ignored_older >= 1
            # The deposed relay reconnects, finds the lock taken and stands by.
            await eventually(lambda: old.stats()["leading"] is False and old.stats()["db_up"])
            await commit("K", 3)
            await new.wait_idle(5)
            await collector.wait_for(lambda: len(collector.changes) == 5)
            assert collector.changes[-1].source == new.publisher.source
            assert old.stats()["published"] == 2  # OTHER and the late row 1; nothing since
    finally:
        await old.stop()
        await new.stop()
        await old_publisher.stop()
        await sync.stop()


@pytest.mark.redis
@pytest.mark.timeout(30)
async def test_the_relay_publishes_again_after_a_broker_outage_of_any_length(
    sqlite_engine: AsyncEngine, redis_url: str, unique: str
) -> None:
    """A Redis outage many times the relay's connect and publish timeouts, with rows committed
    during it: once Redis is reachable again, every row goes out."""
    channel = f"outage-{unique}"
    redis = make_url(redis_url)
    direct = f"redis://{redis.host}:{redis.port}/{redis.database or 0}"
    async with TcpProxy(redis.host, redis.port) as proxy, Collector(direct, channel) as collector:
        broker = f"redis://127.0.0.1:{proxy.port}/{redis.database or 0}"
        options: dict[str, Any] = {"poll_interval": 0.05, "backoff_max": 0.1}
        options.update(connect_timeout=0.2, publish_timeout=0.2)
        async with OutboxRelay(sqlite_engine, broker, channel, **options) as relay:
            await _commit(sqlite_engine, ("currencies", "USD", 1), channel=channel)
            await collector.wait_changes(1)
            proxy.refuse(True)
            await proxy.cut()
            for version in range(2, 12):
                await _commit(sqlite_engine, ("currencies", "USD", version), channel=channel)
            # At least 6 failed rounds of >= 0.2 s each: an outage far past every timeout.
            await eventually(lambda: relay.stats()["publish_errors"] >= 6, timeout=15)
            assert relay.stats()["broker_up"] is False
            proxy.refuse(False)
            events = await collector.wait_changes(11, timeout=10)
            await relay.wait_idle(5)
    assert [e.version for e in events] == list(range(1, 12))
    assert relay.stats()["broker_up"] is True
