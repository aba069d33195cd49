"""Change feeds (PostgreSQL pgoutput, MariaDB binlog) beside the outbox relay, in one run.

    .venv/bin/python -m benchmarks.cdc [--pg DSN] [--mysql DSN] [--broker URL]
        [--latency-n 300] [--rows 100000] [--kill-seconds 30] [--only latency,drain,kill]
        [--dbs postgres,mysql] [--shapes one-tx,single] [--rounds 1] [--out FILE]

(``make bench-cdc`` runs it with the defaults.)

Latency: a feed (or the outbox relay) runs idle in this process; a child process commits one
row at a time and subscribes to the broker; a sample runs from the moment the commit returns
to the moment the child has the event. Targets for the feeds: p50 <= 5 ms, p99 <= 20 ms.

Backlog drain: with the feed stopped, ``--rows`` rows are committed in one transaction, then
``--rows`` single-row commits (a server-side loop, so the writer is not the bottleneck); the
rate is rows over the time from the feed's start to the moment a subscriber on the broker has
the last one. Target: >= 10,000 rows/s per feed. ``--shapes`` picks the backlogs (``one-tx``,
``single``), ``--rounds`` repeats each (the range and median are reported). For MariaDB, each
round then reads the same backlog with mysql-replication alone (counting rows, with the feed's
options): the library's own rate, which bounds any feed built on it, and the feed's share of it.

``--out FILE`` also writes the table as Markdown (``benchmarks/results/CDC.md``).

Kill loop: ``cachesync cdc`` runs as a subprocess and is killed with SIGKILL every 1-4 s for
``--kill-seconds`` while a writer commits versions of 50 keys; then a last feed catches up.
Reported: changes committed, lost (must be 0), duplicates, kills, and whether a refresh-mode
consumer ends on every committed last value.

Needs PostgreSQL with wal_level=logical, MariaDB with the row binlog (``.ci/configure-cdc``)
and the broker. Works in tables of its own, dropped afterwards with the slots. Not a test:
never run it in CI as one.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import random
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pymysql

from benchmarks.outbox_relay import Subscriber
from benchmarks.outbox_relay import latency as outbox_latency
from benchmarks.stats import percentile
from cachesync import CacheSync
from cachesync.events import ChangeEvent, Op
from cachesync.owner.feeds import ChangeFeed, Table
from cachesync.transports.base import from_url

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_MYSQL = "mysql://root@127.0.0.1:3306/test"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def _mysql(dsn: str) -> Any:
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    return pymysql.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        database=parts.path.lstrip("/"),
        autocommit=True,
    )


class Db:
    """One database of the run: a table of its own, its writes, its cleanup."""

    def __init__(self, kind: str, dsn: str) -> None:
        self.kind = kind
        self.dsn = dsn
        self.table = f"cs_bench_{uuid.uuid4().hex[:8]}"
        self.name = self.table

    async def create(self) -> None:
        await self.sql(
            f"CREATE TABLE {self.table} (code VARCHAR(16) PRIMARY KEY, version INT NOT NULL, "
            "rate FLOAT)"
        )

    async def sql(self, *statements: str) -> None:
        """Run ``statements`` in turn on one connection (autocommit)."""
        if self.kind == "postgres":
            conn = await asyncpg.connect(self.dsn)
            try:
                for statement in statements:
                    await conn.execute(statement)
            finally:
                await conn.close()
        else:

            def run() -> None:
                conn = _mysql(self.dsn)
                try:
                    with conn.cursor() as cur:
                        for statement in statements:
                            cur.execute(statement)
                finally:
                    conn.close()

            await asyncio.to_thread(run)

    async def one_transaction(self, rows: int) -> None:
        if self.kind == "postgres":
            await self.sql(
                f"INSERT INTO {self.table} SELECT 'T' || i, 1, i FROM generate_series(1, {rows}) i"
            )
        else:
            await self.sql(
                f"INSERT INTO {self.table} SELECT CONCAT('T', seq), 1, seq FROM seq_1_to_{rows}"
            )

    async def single_commits(self, rows: int) -> None:
        if self.kind == "postgres":
            await self.sql(
                f"CREATE PROCEDURE {self.table}_p(n int) LANGUAGE plpgsql AS $$ BEGIN "
                f"FOR i IN 1..n LOOP INSERT INTO {self.table} VALUES ('S' || i, 1, i); COMMIT; "
                "END LOOP; END $$"
            )
            await self.sql("SET synchronous_commit = off", f"CALL {self.table}_p({rows})")
        else:
            await self.sql(
                f"CREATE PROCEDURE {self.table}_p(n INT) BEGIN DECLARE i INT DEFAULT 0; "
                f"WHILE i < n DO SET i = i + 1; INSERT INTO {self.table} VALUES "
                "(CONCAT('S', i), 1, i); END WHILE; END"
            )
            await self.sql(f"CALL {self.table}_p({rows})")

    def feed(self, broker: str, channel: str, *, batch_size: int = 1000) -> ChangeFeed:
        return ChangeFeed(
            self.dsn,
            [Table(self.table, ("code",), ns="fx", version="version", value=True)],
            broker,
            channel=channel,
            name=self.name,
            batch_size=batch_size,
        )

    async def drop(self) -> None:
        with contextlib.suppress(Exception):
            await ChangeFeed(self.dsn, [f"{self.table}:code"], "memory://", name=self.name).drop()
        await self.sql(f"DROP PROCEDURE IF EXISTS {self.table}_p")
        await self.sql(f"DROP TABLE IF EXISTS {self.table}")


@contextlib.asynccontextmanager
async def database(kind: str, dsn: str) -> AsyncIterator[Db]:
    db = Db(kind, dsn)
    await db.create()
    try:
        yield db
    finally:
        await db.drop()


# -- latency --------------------------------------------------------------------------------


async def _write_and_watch(
    kind: str, dsn: str, table: str, broker: str, channel: str, n: int
) -> list[float]:
    samples: list[float] = []
    pg = await asyncpg.connect(dsn) if kind == "postgres" else None
    my = _mysql(dsn) if kind == "mysql" else None
    try:
        async with Subscriber(broker, channel) as sub:
            for i in range(n + 20):  # the first 20 warm up connections and caches
                key = f"L{i}"
                if pg is not None:
                    await pg.execute(f"INSERT INTO {table} VALUES ($1, $2, 1.5)", key, i)
                else:
                    with my.cursor() as cur:
                        cur.execute(f"INSERT INTO {table} VALUES (%s, %s, 1.5)", (key, i))
                committed = time.perf_counter()
                await sub.wait(lambda k=key: k in sub.arrived, timeout=10)
                if i >= 20:
                    samples.append(sub.arrived[key] - committed)
                await asyncio.sleep(random.uniform(0.002, 0.01))
    finally:
        if pg is not None:
            await pg.close()
        if my is not None:
            my.close()
    return samples


def _write_and_watch_process(*args: Any) -> list[float]:
    return asyncio.run(_write_and_watch(*args))


async def feed_latency(db: Db, broker: str, n: int) -> list[float]:
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    async with db.feed(broker, channel) as feed:
        await feed.wait_caught_up(10)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            args = (db.kind, db.dsn, db.table, broker, channel, n)
            return await asyncio.get_running_loop().run_in_executor(
                pool, _write_and_watch_process, *args
            )


# -- backlog drain --------------------------------------------------------------------------


class Counter:
    """Counts change events on a channel without decoding them (cheap beside the feed)."""

    def __init__(self, broker: str, channel: str) -> None:
        self.transport = from_url(broker)
        self.channel = channel
        self.count = 0
        self.last = 0.0
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Counter:
        await self.transport.connect()
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.transport.close()

    async def _run(self) -> None:
        async for payload in self.transport.subscribe(self.channel, lambda _: self._ready.set()):
            if b'"heartbeat"' not in payload:
                self.count += 1
                self.last = time.perf_counter()

    async def wait(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while self.count < count:
                await asyncio.sleep(0.01)


def _count_process(broker: str, channel: str, rows: int, out: Any) -> None:
    """A consumer in a process of its own: says when it listens, then when the last row came."""

    async def run() -> None:
        async with Counter(broker, channel) as counter:
            out.put("ready")
            await counter.wait(rows, timeout=900)
            out.put(time.time() - (time.perf_counter() - counter.last))

    asyncio.run(run())


async def drain(db: Db, broker: str, rows: int, *, single: bool) -> dict[str, float]:
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    async with db.feed(broker, channel):
        pass  # creates the slot (PostgreSQL) or the stored position (MariaDB)
    await db.sql(f"DELETE FROM {db.table}")
    start = await asyncio.to_thread(_binlog_position, db.dsn) if db.kind == "mysql" else None
    if single:
        await db.single_commits(rows)
    else:
        await db.one_transaction(rows)
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    child = context.Process(target=_count_process, args=(broker, channel, rows, out))
    child.start()
    try:
        assert await asyncio.to_thread(out.get, True, 60) == "ready"
        started = time.time()
        async with db.feed(broker, channel):
            last = await asyncio.to_thread(out.get, True, 900)
        elapsed = float(last) - started
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    result = {"rows": rows, "seconds": elapsed, "rate": rows / elapsed}
    if start is not None:
        result["bare"] = await asyncio.to_thread(_bare_binlog_rate, db, start, rows)
    return result


def _binlog_position(dsn: str) -> tuple[str, int]:
    conn = _mysql(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW MASTER STATUS")
            log_file, log_pos = cur.fetchone()[:2]
            return str(log_file), int(log_pos)
    finally:
        conn.close()


def _bare_binlog_rate(db: Db, start: tuple[str, int], rows: int) -> float:
    """mysql-replication alone over the same backlog, doing nothing with a row but counting
    it, with the options the feed uses (``freeze_schema``, ``only_tables``): the library's
    own rate, the ceiling of any feed built on it."""
    from urllib.parse import urlsplit

    from pymysqlreplication import BinLogStreamReader
    from pymysqlreplication.event import MariadbGtidEvent, XidEvent
    from pymysqlreplication.row_event import WriteRowsEvent

    parts = urlsplit(db.dsn)
    stream = BinLogStreamReader(
        connection_settings={
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 3306,
            "user": parts.username or "root",
            "password": parts.password or "",
        },
        server_id=0x3FFFFFF0,
        blocking=False,
        resume_stream=True,
        log_file=start[0],
        log_pos=start[1],
        only_events=[WriteRowsEvent, XidEvent, MariadbGtidEvent],
        only_schemas=[parts.path.lstrip("/")],
        only_tables=[db.table],
        freeze_schema=True,
    )
    seen = 0
    started = time.perf_counter()
    try:
        for event in stream:
            if isinstance(event, WriteRowsEvent):
                seen += len(event.rows)
                if seen >= rows:
                    break
    finally:
        stream.close()
    return seen / (time.perf_counter() - started)


# -- kill loop ------------------------------------------------------------------------------


async def _feed_process(db: Db, broker: str, channel: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cachesync",
        "cdc",
        db.dsn,
        "--table",
        f"{db.table}:code:version=version:value=*:ns=fx",
        "--to",
        broker,
        "--channel",
        channel,
        "--name",
        db.name,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        json.loads(await proc.stdout.readline())
    return proc


async def kill_loop(db: Db, broker: str, seconds: float, bound: float = 5.0) -> dict[str, Any]:
    """Kill the feed every 1-4 s while a writer commits; a refresh-mode consumer reads all the
    while (fetching from the database on a miss) and each read's staleness is measured."""
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    keys = [f"K{i}" for i in range(50)]
    history: dict[str, list[tuple[float, int]]] = {key: [] for key in keys}
    seen: dict[tuple[str, int], int] = {}
    pg = await asyncpg.connect(db.dsn) if db.kind == "postgres" else None
    my = _mysql(db.dsn) if db.kind == "mysql" else None
    reader_pg = await asyncpg.connect(db.dsn) if db.kind == "postgres" else None
    reader_my = _mysql(db.dsn) if db.kind == "mysql" else None

    async def fetch(key: str) -> Any:
        if reader_pg is not None:
            row = await reader_pg.fetchrow(f"SELECT version FROM {db.table} WHERE code = $1", key)
            return None if row is None else {"code": key, "version": row["version"]}
        version = await asyncio.to_thread(_my_version, reader_my, db.table, key)
        return None if version is None else {"code": key, "version": version}

    sync = CacheSync(broker, channel)
    get = sync.cached("fx", ttl=3600, mode="refresh")(fetch)
    transport = from_url(broker)
    await transport.connect()
    ready = asyncio.Event()

    async def collect() -> None:
        async for payload in transport.subscribe(channel, lambda _: ready.set()):
            event = ChangeEvent.decode(payload)
            if event.op == Op.UPSERT and event.version is not None:
                pair = (event.keys[0], event.version)
                seen[pair] = seen.get(pair, 0) + 1

    collector = asyncio.create_task(collect())
    await asyncio.wait_for(ready.wait(), 10)
    kills = 0
    stop = asyncio.Event()
    version = 0
    staleness: list[float] = []

    async def write() -> None:
        nonlocal version
        while not stop.is_set():
            version += 1
            key = keys[version % len(keys)]
            if pg is not None:
                await pg.execute(
                    f"INSERT INTO {db.table} VALUES ($1, $2, 1) "
                    "ON CONFLICT (code) DO UPDATE SET version = EXCLUDED.version",
                    key,
                    version,
                )
            else:
                await asyncio.to_thread(_my_upsert, my, db.table, key, version)
            history[key].append((time.monotonic(), version))
            await asyncio.sleep(0.002)

    async def read() -> None:
        while not stop.is_set():
            key = random.choice(keys)
            value = await get(key)
            now = time.monotonic()
            got = -1 if value is None else value["version"]
            # Stale for as long as a newer version than the one read has been committed.
            newer = [t for t, v in history[key] if v > got]
            staleness.append(now - newer[0] if newer else 0.0)
            await asyncio.sleep(0.005)

    async with sync:
        proc = await _feed_process(db, broker, channel)
        writer = asyncio.create_task(write())
        reader = asyncio.create_task(read())
        deadline = time.monotonic() + seconds
        caught_up = True
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(random.uniform(1.0, 4.0))
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                kills += 1
                proc = await _feed_process(db, broker, channel)
            stop.set()
            await writer
            await reader
            # The last feed catches up: every committed version must reach the broker.
            try:
                async with asyncio.timeout(60):
                    while any(
                        (key, v) not in seen
                        for key, versions in history.items()
                        for _, v in versions
                    ):
                        await asyncio.sleep(0.05)
            except TimeoutError:
                caught_up = False
            on_last = True
            for key, versions in history.items():
                if versions:
                    value = await get(key)
                    on_last = on_last and value is not None and value["version"] == versions[-1][1]
        finally:
            stop.set()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            await proc.wait()
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
            await transport.close()
            for conn in (pg, reader_pg):
                if conn is not None:
                    await conn.close()
            for conn in (my, reader_my):
                if conn is not None:
                    conn.close()
    lost = sum(1 for key, vs in history.items() for _, v in vs if (key, v) not in seen)
    return {
        "committed": version,
        "lost": lost,
        "caught_up": caught_up,
        "duplicates": sum(c - 1 for c in seen.values()),
        "kills": kills,
        "consumer_on_last_value": on_last,
        "reads": len(staleness),
        "reads_over_bound": sum(1 for s in staleness if s > bound),
        "max_staleness": max(staleness, default=0.0),
        "bound": bound,
    }


def _my_version(conn: Any, table: str, key: str) -> int | None:
    with conn.cursor() as cur:
        cur.execute(f"SELECT version FROM {table} WHERE code = %s", (key,))
        row = cur.fetchone()
    return None if row is None else int(row[0])


def _my_upsert(conn: Any, table: str, key: str, version: int) -> None:
    with conn.cursor() as cur:
        cur.execute(
            f"INSERT INTO {table} VALUES (%s, %s, 1) "
            "ON DUPLICATE KEY UPDATE version = VALUES(version)",
            (key, version),
        )


# -- main -----------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    only = set(args.only.split(","))
    lines: list[tuple[str, str, str]] = []

    def add(name: str, value: str, target: str = "") -> None:
        lines.append((name, value, target))
        print(f"  {name}: {value}", flush=True)

    dbs = [(k, {"postgres": args.pg, "mysql": args.mysql}[k]) for k in args.dbs.split(",")]
    if "latency" in only:
        for kind, dsn in dbs:
            async with database(kind, dsn) as db:
                ms = [x * 1000 for x in await feed_latency(db, args.broker, args.latency_n)]
            add(f"{kind} CDC commit->event p50 (ms)", f"{statistics.median(ms):.2f}", "<= 5")
            add(f"{kind} CDC commit->event p99 (ms)", f"{percentile(ms, 99):.2f}", "<= 20")
        asyncpg_dsn = args.pg.replace("postgresql://", "postgresql+asyncpg://", 1)
        ms = [
            x * 1000
            for x in await outbox_latency(asyncpg_dsn, args.broker, args.latency_n, listen=True)
        ]
        add("outbox relay (PostgreSQL) commit->event p50 (ms)", f"{statistics.median(ms):.2f}")
        add("outbox relay (PostgreSQL) commit->event p99 (ms)", f"{percentile(ms, 99):.2f}")
    if "drain" in only:
        shapes = args.shapes.split(",")
        for kind, dsn in dbs:
            for single in (False, True):
                if ("single" if single else "one-tx") not in shapes:
                    continue
                rates = []
                bare: list[float] = []
                for _ in range(args.rounds):
                    async with database(kind, dsn) as db:
                        result = await drain(db, args.broker, args.rows, single=single)
                    rates.append(result["rate"])
                    if "bare" in result:
                        bare.append(result["bare"])
                    print(
                        f"    {kind} {'single' if single else 'one-tx'}: "
                        f"{result['rate']:,.0f} rows/s"
                        + (f" (mysql-replication alone: {bare[-1]:,.0f})" if bare else ""),
                        flush=True,
                    )
                shape = (
                    f"{args.rows:,} single-row commits" if single else f"1 tx of {args.rows:,} rows"
                )
                value = f"{statistics.median(rates):,.0f}"
                if len(rates) > 1:
                    value += f" ({min(rates):,.0f}-{max(rates):,.0f}, {len(rates)} rounds)"
                add(f"{kind} drain, {shape} (rows/s)", value, ">= 10,000")
                if bare:
                    ratios = [rate / ceiling for rate, ceiling in zip(rates, bare, strict=True)]
                    add(
                        "  mysql-replication alone, same backlog (rows/s; feed/alone)",
                        f"{statistics.median(bare):,.0f} ({min(bare):,.0f}-{max(bare):,.0f}); "
                        f"{statistics.median(ratios):.2f}x",
                    )
    if "kill" in only:
        for kind, dsn in dbs:
            async with database(kind, dsn) as db:
                result = await kill_loop(db, args.broker, args.kill_seconds)
            add(
                f"{kind} kill loop ({args.kill_seconds:g} s)",
                f"{result['kills']} kills, {result['committed']} committed, "
                f"{result['lost']} lost, {result['duplicates']} dup",
                "0 lost",
            )
            add(
                f"{kind} kill loop: consumer reads over {result['bound']:g} s stale",
                f"{result['reads_over_bound']} of {result['reads']} "
                f"(max {result['max_staleness']:.2f} s), ends on last: "
                f"{result['consumer_on_last_value']}",
                "0",
            )
    table = [f"change feeds -> {args.broker}", f"{'measure':<58}{'value':>40}{'target':>12}"]
    table += [f"{name:<58}{value:>40}{target:>12}" for name, value, target in lines]
    print("\n" + "\n".join(table))
    if args.out:
        _write(args, table)


def _write(args: argparse.Namespace, table: list[str]) -> None:
    import os
    import pathlib

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python -m benchmarks.cdc " + " ".join(sys.argv[1:])
    text = (
        f"# Change feeds\n\nCommand: `{command}` ({stamp}, load average {load}).\n\n"
        "```\n" + "\n".join(table) + "\n```\n"
    )
    pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default=DEFAULT_PG)
    parser.add_argument("--mysql", default=DEFAULT_MYSQL)
    parser.add_argument("--broker", default=DEFAULT_BROKER)
    parser.add_argument("--latency-n", type=int, default=300)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--kill-seconds", type=float, default=30.0)
    parser.add_argument("--only", default="latency,drain,kill")
    parser.add_argument("--dbs", default="postgres,mysql")
    parser.add_argument("--shapes", default="one-tx,single")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default="")
    asyncio.run(main(parser.parse_args()))
