"""The MySQL/MariaDB change feed against the real server: the row-based binlog."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pymysql
import pytest

from cachesync import CacheSync
from cachesync.events import Op
from cachesync.owner.feeds import ChangeFeed, FeedError, Table
from tests.feed_tools import Collector, FeedProcess, assert_none_lost, require_setting
from tests.helpers import eventually

pytestmark = pytest.mark.mariadb


@dataclass
class My:
    dsn: str
    table: str
    name: str
    conn: Any

    def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(statement, args or None)
            return list(cur.fetchall())


def _connect(dsn: str) -> Any:
    parts = urlsplit(dsn)
    return pymysql.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        database=parts.path.lstrip("/"),
        autocommit=True,
    )


@pytest.fixture
def my(mariadb_dsn: str, unique: str) -> Iterator[My]:
    conn = _connect(mariadb_dsn)
    env = My(mariadb_dsn, f"cdc_{unique}", f"cs_{unique}", conn)
    try:
        (log_bin, fmt) = env.sql("SELECT @@log_bin, @@binlog_format")[0]
        require_setting(
            log_bin == 1 and fmt == "ROW",
            f"MariaDB runs with log_bin={log_bin}, binlog_format={fmt}; the feed needs the "
            "row binlog",
        )
        env.sql(
            f"CREATE TABLE {env.table} (code VARCHAR(8) PRIMARY KEY, rate DECIMAL(12, 4), "
            "version INT NOT NULL)"
        )
        yield env
    finally:
        env.sql(f"DROP TABLE IF EXISTS {env.table}")
        if env.sql("SHOW TABLES LIKE 'cachesync_feed_position'"):
            env.sql("DELETE FROM cachesync_feed_position WHERE name = %s", env.name)
        conn.close()


def _feed(my: My, url: str, **table: Any) -> ChangeFeed:
    options: dict[str, Any] = {"version": "version", "value": True, **table}
    return ChangeFeed(
        my.dsn,
        [Table(my.table, ("code",), ns="fx", **options)],
        url,
        name=my.name,
        lag_interval=0.1,
    )


@pytest.mark.timeout(20)
async def test_each_operation_becomes_its_event_in_commit_order(my: My, unique: str) -> None:
    url = f"memory://{unique}"
    async with Collector(url) as collector, _feed(my, url):
        my.sql(f"INSERT INTO {my.table} VALUES ('USD', 1.5, 1)")
        my.sql(f"UPDATE {my.table} SET rate = 2, version = 2 WHERE code = 'USD'")
        my.sql(f"UPDATE {my.table} SET code = 'EUR', version = 3 WHERE code = 'USD'")
        my.conn.begin()
        my.sql(f"INSERT INTO {my.table} VALUES ('GBP', 3, 1)")
        my.sql(f"DELETE FROM {my.table} WHERE code = 'EUR'")
        my.conn.commit()
        my.sql(f"TRUNCATE TABLE {my.table}")
        events = await collector.wait_changes(7)
    assert [(e.op, e.keys, e.version) for e in events] == [
        (Op.UPSERT, ("USD",), 1),
        (Op.UPSERT, ("USD",), 2),
        (Op.DELETE, ("USD",), None),  # the key changed: the old key is gone
        (Op.UPSERT, ("EUR",), 3),
        (Op.UPSERT, ("GBP",), 1),
        (Op.DELETE, ("EUR",), 3),
        (Op.FLUSH, (), None),
    ]
    assert all(e.ns == "fx" for e in events)
    assert events[0].value == {"code": "USD", "rate": "1.5000", "version": 1}


@pytest.mark.timeout(20)
async def test_a_refresh_mode_consumer_ends_on_the_committed_value(my: My, unique: str) -> None:
    url = f"memory://{unique}"
    my.sql(f"INSERT INTO {my.table} VALUES ('USD', 1, 1)")
    fetches = 0

    async def fetch(code: str) -> Any:
        nonlocal fetches
        fetches += 1
        rows = my.sql(f"SELECT code, rate, version FROM {my.table} WHERE code = %s", code)
        return {"code": rows[0][0], "rate": str(rows[0][1]), "version": rows[0][2]}

    sync = CacheSync(url)
    get = sync.cached("fx", ttl=3600, mode="refresh")(fetch)
    async with sync, _feed(my, url):
        assert (await get("USD"))["version"] == 1
        for version in range(2, 22):
            my.sql(
                f"UPDATE {my.table} SET rate = %s, version = %s WHERE code = 'USD'",
                version,
                version,
            )
        await eventually(lambda: sync.stats()["namespaces"]["fx"]["refreshes"] >= 20, timeout=10)
        assert await get("USD") == {"code": "USD", "rate": "21.0000", "version": 21}
    assert fetches == 1


@pytest.mark.timeout(45)
async def test_a_feed_killed_mid_stream_and_restarted_loses_nothing(
    my: My, redis_url: str, unique: str
) -> None:
    args = [
        my.dsn,
        "--table",
        f"{my.table}:code:version=version:value=*:ns=fx",
        "--to",
        redis_url,
        "--channel",
        unique,
        "--name",
        my.name,
    ]
    keys = [f"K{i}" for i in range(10)]
    committed: dict[str, list[int]] = {key: [] for key in keys}
    writer = _connect(my.dsn)
    feed = FeedProcess(args)

    def write(first: int, last: int) -> None:
        with writer.cursor() as cur:
            for version in range(first, last):
                key = keys[version % len(keys)]
                cur.execute(
                    f"INSERT INTO {my.table} (code, version) VALUES (%s, %s) "
                    "ON DUPLICATE KEY UPDATE version = VALUES(version)",
                    (key, version),
                )
                committed[key].append(version)

    try:
        async with Collector(redis_url, unique) as collector:
            await feed.start()
            writing = asyncio.create_task(asyncio.to_thread(write, 1, 401))
            await collector.wait_for(lambda: len(collector.changes) >= 100)
            feed.kill()  # SIGKILL mid-stream: no chance to save anything more
            await feed.proc.wait()  # type: ignore[union-attr]
            await writing  # commits go on while the feed is dead
            await feed.start()
            await asyncio.to_thread(write, 401, 501)
            last = {key: versions[-1] for key, versions in committed.items()}

            def caught_up() -> bool:
                newest: dict[str, int] = {}
                for event in collector.changes:
                    if event.version is not None:
                        newest[event.keys[0]] = max(newest.get(event.keys[0], 0), event.version)
                return newest == last

            await collector.wait_for(caught_up, timeout=20)
            assert_none_lost(collector.changes, committed, "fx")
            assert len({e.source for e in collector.changes}) == 2
            assert await feed.stop() == 0
    finally:
        await feed.reap()
        writer.close()


@pytest.mark.timeout(20)
async def test_schema_changes_keep_working_or_flush_with_a_clear_error(my: My, unique: str) -> None:
    url = f"memory://{unique}"
    feed = _feed(my, url)
    async with Collector(url) as collector, feed:
        my.sql(f"INSERT INTO {my.table} VALUES ('USD', 1, 1)")
        await collector.wait_changes(1)
        my.sql(f"ALTER TABLE {my.table} ADD COLUMN symbol VARCHAR(4)")
        my.sql(f"UPDATE {my.table} SET symbol = '$', version = 2")
        events = await collector.wait_changes(2)
        assert events[1].value["symbol"] == "$" and events[1].version == 2
        my.sql(f"ALTER TABLE {my.table} RENAME COLUMN code TO iso")
        my.sql(f"UPDATE {my.table} SET version = 3")
        events = await collector.wait_changes(3)
        # the key column is gone: the namespace is flushed, never left stale
        assert (events[2].op, events[2].ns) == (Op.FLUSH, "fx")
        stats = feed.stats()
    assert stats["schema_errors"] >= 1
    assert "key column 'code'" in stats["last_error"]


@pytest.mark.timeout(30)
async def test_lag_is_reported_and_a_restart_resumes_from_the_saved_position(
    my: My, unique: str
) -> None:
    url = f"memory://{unique}"
    async with Collector(url) as collector:
        feed = _feed(my, url)
        async with feed:
            await eventually(lambda: feed.stats()["lag_bytes"] is not None, timeout=5)
        for version in range(1, 51):
            my.sql(f"INSERT INTO {my.table} VALUES (%s, 1, %s)", f"C{version}", version)
        feed = _feed(my, url)
        async with feed:
            await collector.wait_changes(50)
            await eventually(lambda: feed.stats()["transactions"] >= 50, timeout=10)
            stats = feed.stats()
            assert stats["upserts"] == 50 and stats["lag_bytes"] is not None
            assert stats["position"].startswith("mariadb-bin.")
        await feed.drop()
    assert not my.sql("SELECT 1 FROM cachesync_feed_position WHERE name = %s", my.name)


def _saved(my: My) -> tuple[Any, ...]:
    rows = my.sql(
        "SELECT log_file, log_pos, gtid, server_id FROM cachesync_feed_position WHERE name = %s",
        my.name,
    )
    return rows[0]


@pytest.mark.timeout(30)
async def test_a_position_saved_on_another_server_resumes_by_gtid(my: My, unique: str) -> None:
    # After a failover the feed's DSN names the promoted replica: the saved file and offset
    # are the old primary's, only the GTID places the feed in the new server's binlog.
    url = f"memory://{unique}"
    async with Collector(url) as collector:
        feed = _feed(my, url)
        async with feed:
            for version in range(1, 11):
                my.sql(f"INSERT INTO {my.table} VALUES (%s, 1, %s)", f"A{version}", version)
            await collector.wait_changes(10)
        log_file, _, gtid, server_id = _saved(my)
        assert gtid and log_file.startswith("mariadb-bin.")
        assert server_id == my.sql("SELECT @@server_id")[0][0]
        for version in range(1, 11):  # committed while no feed runs
            my.sql(f"INSERT INTO {my.table} VALUES (%s, 1, %s)", f"B{version}", version)
        my.sql(
            "UPDATE cachesync_feed_position SET log_file = 'elsewhere-bin.000001', log_pos = 4, "
            "server_id = server_id + 1000 WHERE name = %s",
            my.name,
        )
        feed = _feed(my, url)
        async with feed:
            events = await collector.wait_changes(20)
            await feed.wait_caught_up(10)
            # Exactly the changes after the saved GTID: none lost, none sent twice.
            assert [e.keys[0] for e in events[10:]] == [f"B{v}" for v in range(1, 11)]
            assert feed.stats()["gtid"] != gtid
            assert feed.stats()["position"].startswith("mariadb-bin.")  # this server's file
        assert len(collector.changes) == 20
        # Saved on this server again: the next restart uses the file and offset.
        assert _saved(my)[0].startswith("mariadb-bin.") and _saved(my)[3] == server_id


@pytest.mark.timeout(20)
async def test_a_gtid_the_server_does_not_have_is_a_clear_error(my: My, unique: str) -> None:
    url = f"memory://{unique}"
    async with _feed(my, url):
        pass
    my.sql(
        "UPDATE cachesync_feed_position SET gtid = '0-1-999999999999', "
        "server_id = server_id + 1000 WHERE name = %s",
        my.name,
    )
    feed = _feed(my, url)
    async with feed:
        await eventually(lambda: "cannot send the binlog" in (feed.stats()["last_error"] or ""))
        assert "GTID 0-1-999999999999" in feed.stats()["last_error"]


@pytest.mark.timeout(20)
async def test_settings_the_feed_cannot_work_with_are_clear_errors(my: My, unique: str) -> None:
    url = f"memory://{unique}"
    with pytest.raises(FeedError, match="does not exist"):
        await ChangeFeed(my.dsn, [f"{my.table}_nope:code"], url, name=my.name).start()
    with pytest.raises(FeedError, match="no column"):
        await ChangeFeed(my.dsn, [f"{my.table}:code:version=rev"], url, name=my.name).start()


@pytest.mark.timeout(20)
async def test_a_position_of_another_server_without_a_gtid_is_a_clear_error(
    my: My, unique: str
) -> None:
    # Its file and offset mean nothing here (the file may even exist, at another offset):
    # resuming there would skip changes silently.
    url = f"memory://{unique}"
    async with _feed(my, url):
        pass
    my.sql(
        "UPDATE cachesync_feed_position SET gtid = NULL, server_id = server_id + 1000 "
        "WHERE name = %s",
        my.name,
    )
    with pytest.raises(FeedError, match="saved on the server with server_id"):
        await _feed(my, url).start()
    # A row from before server ids were kept (NULL) is this server's: it resumes.
    my.sql("UPDATE cachesync_feed_position SET server_id = NULL WHERE name = %s", my.name)
    async with Collector(url) as collector, _feed(my, url):
        my.sql(f"INSERT INTO {my.table} VALUES ('USD', 1, 1)")
        await collector.wait_changes(1)


@pytest.mark.timeout(20)
async def test_a_reader_thread_that_outlived_its_close_feeds_nothing_to_the_next_one(
    my: My, monkeypatch: pytest.MonkeyPatch
) -> None:
    # close() waits for the reader thread a bounded time; one stuck longer (a connect to a
    # server gone silent) must not hand its stale rows or error to the reader after it.
    from cachesync.owner.feeds import binlog, mysql

    gate, done = threading.Event(), threading.Event()

    class Stuck(binlog.Reader):
        def run(self) -> None:
            gate.wait(10)
            self.send([("idle", ("stale-bin.000001", 4, None), 0.0)])
            done.set()

    source = mysql.MySQLSource(my.dsn, [Table(my.table, ("code",), ns="fx")], my.name)
    monkeypatch.setattr(mysql, "_JOIN", 0.01)
    monkeypatch.setattr(mysql, "Reader", Stuck)
    await source.open()
    await source.close()
    monkeypatch.setattr(mysql, "Reader", binlog.Reader)
    await source.open()
    try:
        gate.set()
        assert await asyncio.to_thread(done.wait, 5)
        batch = await source.read(10)
        assert batch.position is None or batch.position[0] != "stale-bin.000001"
    finally:
        gate.set()
        await source.close()


@pytest.mark.timeout(20)
async def test_a_transaction_that_also_writes_the_position_table_is_published(
    my: My, unique: str
) -> None:
    # Only transactions that write nothing but the position table are the feeds' own.
    url = f"memory://{unique}"
    feed = _feed(my, url)
    async with Collector(url) as collector, feed:
        await feed.wait_caught_up(5)
        my.conn.begin()
        my.sql(f"INSERT INTO {my.table} VALUES ('USD', 1, 1)")
        my.sql(
            "INSERT INTO cachesync_feed_position (name, log_file, log_pos) VALUES (%s, 'x', 4)",
            f"{my.name}_other",
        )
        my.conn.commit()
        try:
            # Nothing else is written: the change comes with its own commit, not the next one.
            events = await collector.wait_changes(1, timeout=5)
        finally:
            my.sql("DELETE FROM cachesync_feed_position WHERE name = %s", f"{my.name}_other")
        assert events[0].keys == ("USD",)
        await eventually(lambda: feed.stats()["transactions"] >= 1, timeout=5)


@pytest.mark.timeout(30)
async def test_a_value_too_large_for_an_event_is_sent_as_an_invalidation(
    my: My, unique: str
) -> None:
    # An event over the consumers' max_event_bytes is dropped by them: its cache entry would
    # stay stale. The feed sends such a row without its value, so consumers fetch it.
    url = f"memory://{unique}"
    my.sql(f"ALTER TABLE {my.table} ADD COLUMN body LONGTEXT")
    my.sql(f"INSERT INTO {my.table} VALUES ('USD', 1, 1, 'small')")
    fetches = 0

    async def fetch(code: str) -> Any:
        nonlocal fetches
        fetches += 1
        rows = my.sql(f"SELECT version, LENGTH(body) FROM {my.table} WHERE code = %s", code)
        return {"version": rows[0][0], "size": rows[0][1]}

    sync = CacheSync(url)
    get = sync.cached("fx", ttl=3600, mode="refresh")(fetch)
    feed = _feed(my, url)
    async with sync, feed:
        assert (await get("USD"))["version"] == 1
        my.sql(f"UPDATE {my.table} SET body = %s, version = 2", "x" * (2 << 20))
        await eventually(lambda: sync.stats()["namespaces"]["fx"]["invalidations"] >= 1, timeout=10)
        assert await get("USD") == {"version": 2, "size": 2 << 20}
        assert fetches == 2
        assert feed.stats()["oversized_values"] == 1


@pytest.mark.timeout(30)
async def test_a_lost_binlog_connection_resumes_from_the_confirmed_position(
    my: My, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mysql-replication reconnects by itself; started by GTID it would send everything since
    # that GTID again, older values after newer ones. The feed resumes where it confirmed.
    from cachesync.owner.feeds import binlog

    streams: list[Any] = []
    connect = binlog._connect

    def spy(**settings: Any) -> Any:
        conn = connect(**settings)
        if "cursorclass" not in settings:
            streams.append(conn)
        return conn

    monkeypatch.setattr(binlog, "_connect", spy)
    url = f"memory://{unique}"
    async with _feed(my, url):
        pass
    for version in range(1, 11):
        my.sql(f"INSERT INTO {my.table} VALUES (%s, 1, %s)", f"B{version}", version)
    my.sql(  # saved on another server: this start reads by GTID
        "UPDATE cachesync_feed_position SET log_file = 'elsewhere-bin.000001', log_pos = 4, "
        "server_id = server_id + 1000 WHERE name = %s",
        my.name,
    )
    async with Collector(url) as collector:
        feed = _feed(my, url)
        async with feed:
            await collector.wait_changes(10)
            await feed.wait_caught_up(10)
            my.sql("KILL %s", streams[-1].thread_id())
            my.sql(f"INSERT INTO {my.table} VALUES ('C1', 1, 1)")
            events = await collector.wait_changes(11)
            await feed.wait_caught_up(10)
        keys = [e.keys[0] for e in events]
        assert keys == [f"B{v}" for v in range(1, 11)] + ["C1"]


@pytest.mark.timeout(20)
async def test_a_truncate_with_comments_flushes(my: My, unique: str) -> None:
    # Comments are logged with the statement: an ORM's or a proxy's tag must not hide it.
    url = f"memory://{unique}"
    async with Collector(url) as collector, _feed(my, url):
        my.sql(f"/* app=billing */ TRUNCATE /* why */ TABLE {my.table} -- done")
        my.sql(f"TRUNCATE /*!40000 TABLE */ {my.table}")
        my.sql(f"INSERT INTO {my.table} VALUES ('USD', 1, 1)")
        events = await collector.wait_changes(3)
    assert [(e.op, e.keys) for e in events] == [
        (Op.FLUSH, ()),
        (Op.FLUSH, ()),
        (Op.UPSERT, ("USD",)),
    ]


@pytest.mark.timeout(30)
async def test_a_position_table_from_before_gtids_is_migrated(my: My, unique: str) -> None:
    # Its own database: the position table there has only the file and offset columns; two
    # feeds of other names start on it at once.
    database = f"hcdc_{unique}"
    my.sql(f"CREATE DATABASE {database}")
    try:
        dsn = f"{my.dsn.rsplit('/', 1)[0]}/{database}"
        db = My(dsn, f"{database}.t", my.name, my.conn)
        db.sql(f"CREATE TABLE {db.table} (code VARCHAR(8) PRIMARY KEY, version INT NOT NULL)")
        db.sql(
            f"CREATE TABLE {database}.cachesync_feed_position (name VARCHAR(64) PRIMARY KEY, "
            "log_file VARCHAR(255) NOT NULL, log_pos BIGINT NOT NULL, "
            "updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"
        )
        log_file, log_pos = db.sql("SHOW MASTER STATUS")[0][:2]
        names = [f"{my.name}_a", f"{my.name}_b"]
        for name in names:
            db.sql(
                f"INSERT INTO {database}.cachesync_feed_position (name, log_file, log_pos) "
                "VALUES (%s, %s, %s)",
                name,
                log_file,
                log_pos,
            )
        db.sql(f"INSERT INTO {db.table} VALUES ('USD', 1)")  # while no feed ran
        url = f"memory://{unique}"
        feeds = [
            ChangeFeed(dsn, [Table("t", ("code",), ns=name)], url, name=name) for name in names
        ]
        async with Collector(url) as collector:
            await asyncio.gather(*(feed.start() for feed in feeds))
            try:
                events = await collector.wait_changes(2)
                assert sorted((e.ns, e.keys) for e in events) == [(n, ("USD",)) for n in names]
                await asyncio.gather(*(feed.wait_caught_up(10) for feed in feeds))
                # Neither took the other's migration for an unreachable database.
                assert [feed.stats()["last_error"] for feed in feeds] == [None, None]
            finally:
                await asyncio.gather(*(feed.stop() for feed in feeds))
        rows = db.sql(
            f"SELECT name, gtid, server_id FROM {database}.cachesync_feed_position ORDER BY name"
        )
        server = db.sql("SELECT @@server_id")[0][0]
        assert [(name, saved) for name, _, saved in rows] == [(n, server) for n in names]
        assert all(gtid for _, gtid, _ in rows)
    finally:
        my.sql(f"DROP DATABASE IF EXISTS {database}")


@pytest.mark.timeout(45)
async def test_a_feed_killed_inside_large_transactions_loses_nothing(
    my: My, redis_url: str, unique: str
) -> None:
    # Transactions of 250 rows reach the publisher in pieces: a kill between two pieces must
    # leave the position before the transaction, so a restart sends it whole again.
    args = [
        my.dsn,
        "--table",
        f"{my.table}:code:version=version:value=*:ns=fx",
        "--to",
        redis_url,
        "--channel",
        unique,
        "--name",
        my.name,
    ]
    keys = [f"K{i}" for i in range(300)]
    committed: dict[str, list[int]] = {key: [] for key in keys}
    writer = _connect(my.dsn)
    feed = FeedProcess(args)

    def write(first: int, last: int) -> None:
        with writer.cursor() as cur:
            for start in range(first, last, 250):
                writer.begin()
                for version in range(start, start + 250):
                    cur.execute(
                        f"INSERT INTO {my.table} (code, version) VALUES (%s, %s) "
                        "ON DUPLICATE KEY UPDATE version = VALUES(version)",
                        (keys[version % len(keys)], version),
                    )
                writer.commit()
                for version in range(start, start + 250):
                    committed[keys[version % len(keys)]].append(version)

    try:
        async with Collector(redis_url, unique) as collector:
            await feed.start()
            writing = asyncio.create_task(asyncio.to_thread(write, 1, 2501))
            await collector.wait_for(lambda: len(collector.changes) >= 420, timeout=20)
            feed.kill()  # most likely inside a transaction: 420 is no multiple of 250
            await feed.proc.wait()  # type: ignore[union-attr]
            await writing
            await feed.start()
            await asyncio.to_thread(write, 2501, 3001)
            last = {key: versions[-1] for key, versions in committed.items()}

            def caught_up() -> bool:
                newest: dict[str, int] = {}
                for event in collector.changes:
                    if event.version is not None:
                        newest[event.keys[0]] = max(newest.get(event.keys[0], 0), event.version)
                return newest == last

            await collector.wait_for(caught_up, timeout=20)
            assert_none_lost(collector.changes, committed, "fx")
            assert await feed.stop() == 0
    finally:
        await feed.reap()
        writer.close()


@pytest.mark.timeout(20)
async def test_a_save_cancelled_by_stop_is_done_before_close_uses_the_connection(
    my: My, monkeypatch: pytest.MonkeyPatch
) -> None:
    # stop() cancels the feed's task while a worker thread saves the position: close() must
    # not send its own statement on the same connection meanwhile.
    from cachesync.owner.feeds import mysql

    source = mysql.MySQLSource(my.dsn, [Table(my.table, ("code",), ns="fx")], my.name)
    await source.open()
    save = source._save
    inside, overlaps = 0, 0
    started = threading.Event()

    def slow_save(position: Any) -> None:
        nonlocal inside, overlaps
        inside += 1
        overlaps += inside > 1
        started.set()
        try:
            threading.Event().wait(0.3)
            save(position)
        finally:
            inside -= 1

    monkeypatch.setattr(source, "_save", slow_save)
    monkeypatch.setattr(mysql, "SAVE_INTERVAL", 0.0)
    position = source.describe()["position"].split(":")
    confirming = asyncio.create_task(source.confirm((position[0], int(position[1]) + 1, None)))
    assert await asyncio.to_thread(started.wait, 5)
    confirming.cancel()
    source._position = (position[0], int(position[1]) + 2, None)  # close() has one to save
    await source.close()
    with pytest.raises(asyncio.CancelledError):
        await confirming
    assert overlaps == 0


def _xa(my: My, xid: str, statements: list[str], end: str) -> None:
    """An XA transaction of ``statements``, prepared, then ``end`` (COMMIT or ROLLBACK; "ONE
    PHASE" commits it without a prepare)."""
    my.sql(f"XA START '{xid}'")
    for statement in statements:
        my.sql(statement)
    my.sql(f"XA END '{xid}'")
    if end == "ONE PHASE":
        my.sql(f"XA COMMIT '{xid}' ONE PHASE")
        return
    my.sql(f"XA PREPARE '{xid}'")
    my.sql(f"XA {end} '{xid}'")


def _prepare_xa(conn: Any, xid: str, statements: list[str]) -> None:
    """XA START ``xid``, ``statements``, XA END and XA PREPARE on ``conn``: a prepared XA
    transaction, left open."""
    with conn.cursor() as cur:
        cur.execute(f"XA START '{xid}'")
        for statement in statements:
            cur.execute(statement)
        cur.execute(f"XA END '{xid}'")
        cur.execute(f"XA PREPARE '{xid}'")


@pytest.mark.timeout(30)
async def test_xa_transactions_publish_at_their_commit_and_never_after_a_rollback(
    my: My, unique: str
) -> None:
    # Before: the rows of a prepared XA transaction were published whatever came next, so a
    # refresh-mode consumer could cache a value that was rolled back and never committed.
    url = f"memory://{unique}"
    big = [f"INSERT INTO {my.table} VALUES ('B{i}', 1, 1)" for i in range(250)]  # > CHUNK
    async with Collector(url) as collector, _feed(my, url):
        _xa(my, f"r1{unique}", [f"INSERT INTO {my.table} VALUES ('RB1', 1, 1)"], "ROLLBACK")
        _xa(my, f"r2{unique}", big, "ROLLBACK")
        _xa(my, f"c1{unique}", [f"INSERT INTO {my.table} VALUES ('XC', 2, 2)"], "COMMIT")
        _xa(my, f"c2{unique}", [f"INSERT INTO {my.table} VALUES ('X1', 3, 3)"], "ONE PHASE")
        my.sql(f"INSERT INTO {my.table} VALUES ('PLAIN', 4, 4)")
        events = await collector.wait_changes(3)
    assert [(e.op, e.keys) for e in events] == [
        (Op.UPSERT, ("XC",)),
        (Op.UPSERT, ("X1",)),
        (Op.UPSERT, ("PLAIN",)),
    ]


@pytest.mark.timeout(30)
async def test_a_prepared_xa_transaction_holds_the_position_until_it_ends(
    my: My, unique: str
) -> None:
    # Interleaved: XA 'a' is prepared, other transactions commit, the feed restarts, then 'a'
    # commits. Its rows must not be lost with the restart, so the position stays before its
    # prepare until it ends (the transactions after it are published again: at least once).
    url = f"memory://{unique}"
    other = _connect(my.dsn)
    try:
        async with Collector(url) as collector:
            async with _feed(my, url) as feed:
                _prepare_xa(other, f"a{unique}", [f"INSERT INTO {my.table} VALUES ('HELD', 1, 1)"])
                my.sql(f"INSERT INTO {my.table} VALUES ('AFTER', 2, 2)")
                await collector.wait_changes(1)
                await feed.wait_caught_up(10)
            with other.cursor() as cur:
                cur.execute(f"XA COMMIT 'a{unique}'")
            async with _feed(my, url):
                await collector.wait_for(
                    lambda: any("HELD" in e.keys for e in collector.changes), timeout=15
                )
        keys = [e.keys[0] for e in collector.changes if e.keys]
        assert keys.count("HELD") == 1
        assert keys.index("AFTER") < keys.index("HELD")
    finally:
        with other.cursor() as cur, contextlib.suppress(pymysql.err.MySQLError):
            cur.execute(f"XA ROLLBACK 'a{unique}'")
        other.close()


@pytest.mark.timeout(30)
async def test_an_xa_commit_of_a_transaction_prepared_before_the_feed_began_flushes(
    my: My, unique: str
) -> None:
    url = f"memory://{unique}"
    other = _connect(my.dsn)
    try:
        _prepare_xa(other, f"e{unique}", [f"INSERT INTO {my.table} VALUES ('EARLY', 1, 1)"])
        async with Collector(url) as collector, _feed(my, url) as feed:
            await feed.wait_caught_up(10)  # its first start: from the server's position now
            with other.cursor() as cur:
                cur.execute(f"XA COMMIT 'e{unique}'")
            events = await collector.wait_changes(1)
        assert [(e.op, e.ns) for e in events] == [(Op.FLUSH, "fx")]  # its rows are unknown
    finally:
        with other.cursor() as cur, contextlib.suppress(pymysql.err.MySQLError):
            cur.execute(f"XA ROLLBACK 'e{unique}'")
        other.close()


@pytest.mark.timeout(30)
async def test_an_open_xa_transaction_shows_in_stats_and_is_logged(
    my: My, unique: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from cachesync.owner.feeds import binlog

    monkeypatch.setattr(binlog, "XA_WARN_AFTER", 0.0)
    url = f"memory://{unique}"
    other = _connect(my.dsn)
    other_table = f"{my.table}_other"
    my.sql(f"CREATE TABLE {other_table} (k INT PRIMARY KEY)")
    try:
        async with Collector(url) as collector, _feed(my, url) as feed:
            await feed.wait_caught_up(10)
            start = feed.stats()["position"]
            # Touches none of the feed's tables: holds nothing.
            _prepare_xa(other, f"o{unique}", [f"INSERT INTO {other_table} VALUES (1)"])
            my.sql(f"INSERT INTO {my.table} VALUES ('A', 1, 1)")
            await collector.wait_changes(1)
            await eventually(lambda: feed.stats()["position"] != start)  # not held by it
            assert feed.stats()["xa_open"] == 0
            with other.cursor() as cur:
                cur.execute(f"XA ROLLBACK 'o{unique}'")
            my.sql(f"INSERT INTO {my.table} VALUES ('A2', 1, 1)")
            await collector.wait_changes(2)
            await feed.wait_caught_up(10)
            moved = feed.stats()["position"]
            with caplog.at_level("WARNING", logger="cachesync.feeds"):
                _prepare_xa(other, f"h{unique}", [f"INSERT INTO {my.table} VALUES ('H', 1, 1)"])
                my.sql(f"INSERT INTO {my.table} VALUES ('B', 1, 1)")
                await collector.wait_changes(3)
                await eventually(lambda: feed.stats()["xa_open"] == 1)
                await eventually(
                    lambda: any("has not ended" in r.getMessage() for r in caplog.records)
                )
            stats = feed.stats()
            assert stats["xa_open_seconds"] is not None and stats["xa_open_seconds"] >= 0
            assert stats["position"] == moved  # held before the prepare
            assert f"h{unique}" in next(
                r.getMessage() for r in caplog.records if "has not ended" in r.getMessage()
            )
            with other.cursor() as cur:
                cur.execute(f"XA COMMIT 'h{unique}'")
            await collector.wait_changes(4)
            await eventually(lambda: feed.stats()["xa_open"] == 0)
            await eventually(lambda: feed.stats()["position"] != moved)
        assert [e.keys for e in collector.changes] == [("A",), ("A2",), ("B",), ("H",)]
    finally:
        with other.cursor() as cur, contextlib.suppress(pymysql.err.MySQLError):
            cur.execute(f"XA ROLLBACK 'h{unique}'")
        other.close()
        my.sql(f"DROP TABLE IF EXISTS {other_table}")
