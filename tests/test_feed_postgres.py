"""The PostgreSQL change feed against the real server: logical decoding with pgoutput."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg2
import pytest

from cachesync import CacheSync
from cachesync.events import Op
from cachesync.owner.feeds import ChangeFeed, FeedError, Table
from cachesync.owner.feeds.postgres import slot_status
from tests.feed_tools import Collector, FeedProcess, assert_none_lost, require_setting
from tests.helpers import eventually

pytestmark = pytest.mark.postgres


@dataclass
class Pg:
    dsn: str
    table: str
    name: str
    conn: Any

    def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(statement, args)
            return list(cur.fetchall()) if cur.description is not None else []


def _drop_slot(pg: Pg, name: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = pg.sql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", name)
        if not rows:
            break
        if rows[0][0] is None:
            pg.sql("SELECT pg_drop_replication_slot(%s)", name)
            break
        time.sleep(0.05)
    pg.sql(f'DROP PUBLICATION IF EXISTS "{name}"')


@pytest.fixture
def pg(postgres_dsn: str, unique: str) -> Iterator[Pg]:
    conn = psycopg2.connect(postgres_dsn)
    conn.autocommit = True
    env = Pg(postgres_dsn, f"cdc_{unique}", f"cs_{unique}", conn)
    try:
        (level,) = env.sql("SHOW wal_level")[0]
        require_setting(
            level == "logical", f"PostgreSQL runs with wal_level={level}, the feed needs logical"
        )
        env.sql(
            f"CREATE TABLE {env.table} (code text PRIMARY KEY, rate numeric, "
            "version integer NOT NULL, meta jsonb)"
        )
        yield env
    finally:
        _drop_slot(env, env.name)
        env.sql(f"DROP TABLE IF EXISTS {env.table}")
        conn.close()


def _feed(pg: Pg, url: str, **table: Any) -> ChangeFeed:
    options: dict[str, Any] = {"version": "version", "value": True, **table}
    return ChangeFeed(
        pg.dsn,
        [Table(pg.table, ("code",), ns="fx", **options)],
        url,
        name=pg.name,
        lag_interval=0.1,
    )


@pytest.mark.timeout(20)
async def test_each_operation_becomes_its_event_in_commit_order(pg: Pg, unique: str) -> None:
    url = f"memory://{unique}"
    async with Collector(url) as collector, _feed(pg, url):
        pg.sql(f"INSERT INTO {pg.table} VALUES ('USD', 1.5, 1, '{{\"a\": 1}}')")
        pg.sql(f"UPDATE {pg.table} SET rate = 2, version = 2 WHERE code = 'USD'")
        pg.sql(f"UPDATE {pg.table} SET code = 'EUR', version = 3 WHERE code = 'USD'")
        pg.sql(
            f"BEGIN; INSERT INTO {pg.table} VALUES ('GBP', 3, 1); "
            f"DELETE FROM {pg.table} WHERE code = 'EUR'; COMMIT"
        )
        pg.sql(f"TRUNCATE {pg.table}")
        events = await collector.wait_changes(7)
    assert [(e.op, e.keys, e.version) for e in events] == [
        (Op.UPSERT, ("USD",), 1),
        (Op.UPSERT, ("USD",), 2),
        (Op.DELETE, ("USD",), None),  # the key changed: the old key is gone
        (Op.UPSERT, ("EUR",), 3),
        (Op.UPSERT, ("GBP",), 1),
        (Op.DELETE, ("EUR",), None),
        (Op.FLUSH, (), None),
    ]
    assert all(e.ns == "fx" for e in events)
    # numeric keeps its text (no float rounding), jsonb arrives as JSON, ints as numbers
    assert events[0].value == {"code": "USD", "rate": "1.5", "version": 1, "meta": {"a": 1}}
    assert events[4].value == {"code": "GBP", "rate": "3", "version": 1, "meta": None}
    assert len({e.source for e in events}) == 1
    assert [e.seq for e in events] == sorted(e.seq for e in events)


@pytest.mark.timeout(20)
async def test_a_refresh_mode_consumer_ends_on_the_committed_value(pg: Pg, unique: str) -> None:
    url = f"memory://{unique}"
    pg.sql(f"INSERT INTO {pg.table} VALUES ('USD', 1, 1)")
    fetches = 0

    async def fetch(code: str) -> Any:
        nonlocal fetches
        fetches += 1
        conn = await asyncpg.connect(pg.dsn)
        try:
            row = await conn.fetchrow(f"SELECT * FROM {pg.table} WHERE code = $1", code)
        finally:
            await conn.close()
        return {"code": row["code"], "rate": str(row["rate"]), "version": row["version"]}

    sync = CacheSync(url)
    get = sync.cached("fx", ttl=3600, mode="refresh")(fetch)
    async with sync, _feed(pg, url, value=("code", "rate", "version")):
        assert (await get("USD"))["version"] == 1
        for version in range(2, 22):
            pg.sql(
                f"UPDATE {pg.table} SET rate = %s, version = %s WHERE code = 'USD'",
                version,
                version,
            )
        await eventually(lambda: sync.stats()["namespaces"]["fx"]["refreshes"] >= 20, timeout=10)
        assert await get("USD") == {"code": "USD", "rate": "21", "version": 21}
    assert fetches == 1


@pytest.mark.timeout(45)
async def test_a_feed_killed_mid_stream_and_restarted_loses_nothing(
    pg: Pg, redis_url: str, unique: str
) -> None:
    args = [
        pg.dsn,
        "--table",
        f"{pg.table}:code:version=version:value=*:ns=fx",
        "--to",
        redis_url,
        "--channel",
        unique,
        "--name",
        pg.name,
    ]
    keys = [f"K{i}" for i in range(10)]
    committed: dict[str, list[int]] = {key: [] for key in keys}
    writer = await asyncpg.connect(pg.dsn)
    feed = FeedProcess(args)
    try:
        async with Collector(redis_url, unique) as collector:
            await feed.start()

            async def write(first: int, last: int) -> None:
                for version in range(first, last):
                    key = keys[version % len(keys)]
                    await writer.execute(
                        f"INSERT INTO {pg.table} (code, version) VALUES ($1, $2) "
                        "ON CONFLICT (code) DO UPDATE SET version = EXCLUDED.version",
                        key,
                        version,
                    )
                    committed[key].append(version)

            writing = asyncio.create_task(write(1, 401))
            await collector.wait_for(lambda: len(collector.changes) >= 100)
            feed.kill()  # SIGKILL mid-stream: no chance to confirm anything more
            await feed.proc.wait()  # type: ignore[union-attr]
            await writing  # commits go on while the feed is dead
            await feed.start()
            await write(401, 501)
            last = {key: versions[-1] for key, versions in committed.items()}

            def caught_up() -> bool:
                newest: dict[str, int] = {}
                for event in collector.changes:
                    if event.version is not None:
                        newest[event.keys[0]] = max(newest.get(event.keys[0], 0), event.version)
                return newest == last

            await collector.wait_for(caught_up, timeout=20)
            duplicates = assert_none_lost(collector.changes, committed, "fx")
            assert len({e.source for e in collector.changes}) == 2
            assert duplicates >= 0
            assert await feed.stop() == 0
    finally:
        await feed.reap()
        await writer.close()


@pytest.mark.timeout(20)
async def test_schema_changes_keep_working_or_flush_with_a_clear_error(pg: Pg, unique: str) -> None:
    url = f"memory://{unique}"
    feed = _feed(pg, url)
    async with Collector(url) as collector, feed:
        pg.sql(f"INSERT INTO {pg.table} VALUES ('USD', 1, 1)")
        await collector.wait_changes(1)
        pg.sql(f"ALTER TABLE {pg.table} ADD COLUMN symbol text")
        pg.sql(f"UPDATE {pg.table} SET symbol = '$', version = 2")
        events = await collector.wait_changes(2)
        assert events[1].value["symbol"] == "$" and events[1].version == 2
        pg.sql(f"ALTER TABLE {pg.table} RENAME COLUMN version TO revision")
        pg.sql(f"UPDATE {pg.table} SET revision = 3")
        events = await collector.wait_changes(3)
        assert events[2].op == Op.UPSERT and events[2].version is None  # no version column
        pg.sql(f"ALTER TABLE {pg.table} RENAME COLUMN code TO iso")
        pg.sql(f"UPDATE {pg.table} SET revision = 4")
        events = await collector.wait_changes(4)
        # the key column is gone: the namespace is flushed, never left stale
        assert (events[3].op, events[3].ns) == (Op.FLUSH, "fx")
        stats = feed.stats()
    assert stats["schema_errors"] >= 2
    assert "key column 'code'" in stats["last_error"]


@pytest.mark.timeout(30)
async def test_slot_lag_is_reported_and_a_restart_resumes_from_the_slot(
    pg: Pg, unique: str
) -> None:
    url = f"memory://{unique}"
    async with Collector(url) as collector:
        feed = _feed(pg, url)
        async with feed:
            await eventually(lambda: feed.stats()["lag_bytes"] is not None, timeout=5)
            assert feed.stats()["slot"] == pg.name
        # The feed is down: changes wait in the slot, and its lag shows them.
        for version in range(1, 51):
            pg.sql(f"INSERT INTO {pg.table} VALUES (%s, 1, %s)", f"C{version}", version)
        (slot,) = [s for s in await slot_status(pg.dsn) if s["slot"] == pg.name]
        assert slot["active"] is False and slot["lag_bytes"] > 0
        feed = _feed(pg, url)
        async with feed:
            await collector.wait_changes(50)
            await eventually(lambda: feed.stats()["lag_bytes"] == 0, timeout=10)
            stats = feed.stats()
            assert stats["transactions"] == 50 and stats["upserts"] == 50
            assert stats["lag_seconds"] >= 0
        await feed.drop()
    assert not [s for s in await slot_status(pg.dsn) if s["slot"] == pg.name]
    assert not pg.sql("SELECT 1 FROM pg_publication WHERE pubname = %s", pg.name)


@pytest.mark.timeout(20)
async def test_settings_the_feed_cannot_work_with_are_clear_errors(pg: Pg, unique: str) -> None:
    url = f"memory://{unique}"
    missing = ChangeFeed(pg.dsn, [f"{pg.table}_nope:code"], url, name=pg.name)
    with pytest.raises(FeedError, match="does not exist"):
        await missing.start()
    no_column = ChangeFeed(pg.dsn, [f"{pg.table}:code:version=rev"], url, name=pg.name)
    with pytest.raises(FeedError, match="no column"):
        await no_column.start()
    pg.sql(f"ALTER TABLE {pg.table} ADD COLUMN alt text")
    not_identity = ChangeFeed(pg.dsn, [f"{pg.table}:alt"], url, name=pg.name)
    with pytest.raises(FeedError, match="REPLICA IDENTITY FULL"):
        await not_identity.start()
    pg.sql(f"ALTER TABLE {pg.table} REPLICA IDENTITY FULL")
    async with (
        Collector(url) as collector,
        ChangeFeed(pg.dsn, [f"{pg.table}:alt"], url, name=pg.name),
    ):
        pg.sql(f"INSERT INTO {pg.table} (code, version, alt) VALUES ('USD', 1, 'x')")
        pg.sql(f"DELETE FROM {pg.table}")
        events = await collector.wait_changes(2)
    assert [(e.op, e.keys) for e in events] == [(Op.UPSERT, ("x",)), (Op.DELETE, ("x",))]


def test_table_specs_parse_and_bad_ones_are_refused() -> None:
    table = Table.parse("public.rates:base,quote:version=rev:value=*:ns=fx")
    assert (table.name, table.keys, table.version, table.value) == (
        "public.rates",
        ("base", "quote"),
        "rev",
        True,
    )
    assert table.namespace == "fx" and table.schema == "public"
    assert Table.parse("currencies:code").namespace == "currencies"
    assert Table.parse("c:code:value=code,rate").value == ("code", "rate")
    for bad in ("currencies", "currencies:", "c:code:colour=red", "c;drop:code", "c:co de"):
        with pytest.raises(ValueError):
            Table.parse(bad)


@pytest.mark.timeout(20)
async def test_fastapi_lifespan_and_prometheus_metrics_show_the_feed(pg: Pg, unique: str) -> None:
    from fastapi import FastAPI
    from prometheus_client import CollectorRegistry, generate_latest

    from cachesync.contrib.fastapi import feed_lifespan
    from cachesync.owner.feeds.prometheus import register_feed_metrics

    url = f"memory://{unique}"
    feed = _feed(pg, url)
    registry = CollectorRegistry()
    register_feed_metrics(registry, feed)
    app = FastAPI()
    with pytest.raises(TypeError):
        feed_lifespan(object())  # type: ignore[arg-type]
    async with Collector(url) as collector, feed_lifespan(feed)(app):
        assert app.state.cachesync_feeds == (feed,)
        pg.sql(f"INSERT INTO {pg.table} VALUES ('USD', 1, 1)")
        await collector.wait_changes(1)
        await eventually(lambda: feed.stats()["lag_bytes"] is not None, timeout=5)
        text = generate_latest(registry).decode()
    assert f'cachesync_feed_lag_bytes{{feed="{pg.name}"}}' in text
    assert f'cachesync_feed_upserts_total{{feed="{pg.name}"}} 1.0' in text
    assert not feed.stats()["running"]


def test_the_cdc_command_checks_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from cachesync.cli import main

    assert main(["cdc", "postgresql://x@127.0.0.1/db"]) == 2
    assert "--table" in capsys.readouterr().err
    assert main(["cdc", "postgresql://x@127.0.0.1/db", "--table", "currencies:code"]) == 2
    assert "--to" in capsys.readouterr().err
    assert main(["cdc", "sqlite:///x.db", "--table", "c:code", "--to", "memory://"]) == 2
    assert "no change feed for 'sqlite'" in capsys.readouterr().err
    assert main(["cdc", "postgresql://x@h/db", "--table", "c", "--to", "memory://"]) == 2


@pytest.mark.timeout(20)
async def test_the_example_feed_publishes_rows_a_consumer_model_accepts(
    pg: Pg, unique: str
) -> None:
    import httpx

    from examples.cdc_feed import create_app
    from examples.models import Currency

    schema = f"cs_example_{unique}"
    pg.sql(f"CREATE SCHEMA {schema}")
    try:
        pg.sql(
            f"CREATE TABLE {schema}.currencies (code text PRIMARY KEY, name text, "
            "rate double precision, version integer)"
        )
        pg.sql(
            f"CREATE TABLE {schema}.customers (id text PRIMARY KEY, name text, email text, "
            "tier text, version integer)"
        )
        dsn = f"{pg.dsn}?options=-csearch_path%3D{schema}"
        url = f"memory://{unique}"
        app = create_app(database_url=dsn, cachesync_url=url, name=pg.name)
        async with Collector(url) as collector, app.router.lifespan_context(app):
            pg.sql(f"INSERT INTO {schema}.currencies VALUES ('USD', 'US dollar', 1.1, 1)")
            (event,) = await collector.wait_changes(1)
            assert Currency.model_validate(event.value) == Currency(
                code="USD", name="US dollar", rate=1.1, version=1
            )
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                stats = (await client.get("/feed")).json()
            assert stats["upserts"] == 1 and stats["slot"] == pg.name
    finally:
        pg.sql(f"DROP SCHEMA {schema} CASCADE")
