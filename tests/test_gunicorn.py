"""The background runner under the real thing: gunicorn ``--preload`` with sync workers.

The client starts in the gunicorn master (at import, as a preloaded app does) and every
worker inherits it through a fork. Each worker must restart its listener, cache again, and
serve an owner's change within the bound; so must a worker that gunicorn respawns after the
test killed one.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cachesync import BlockingPublisher

ROOT = Path(__file__).resolve().parent.parent
BOUND = 2.0  # seconds from a publish to every worker serving the change
WORKERS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> set[int]:
    """The live (not zombie) child processes of ``pid``."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(name))
    return found


@dataclass
class Gunicorn:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    channel: str
    db: str

    def workers(self) -> set[int]:
        return _children(self.process.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def round(self, key: str, pool: concurrent.futures.Executor) -> list[dict[str, Any]]:
        """Concurrent requests, so that every sync worker takes some."""

        def one(_: int) -> dict[str, Any]:
            reply = httpx.get(f"{self.url}/item/{key}", timeout=5.0)
            reply.raise_for_status()
            return reply.json()  # type: ignore[no-any-return]

        return list(pool.map(one, range(2 * WORKERS)))

    def until_each(
        self,
        key: str,
        pool: concurrent.futures.Executor,
        ok: Callable[[dict[str, Any]], bool],
        what: str,
        deadline: float = 15.0,
        refuse: Callable[[dict[str, Any]], str | None] = lambda _: None,
    ) -> dict[int, dict[str, Any]]:
        """Request until every current worker gave a reply that satisfies ``ok``; a reply
        for which ``refuse`` returns a message fails the test at once."""
        seen: dict[int, dict[str, Any]] = {}
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            for reply in self.round(key, pool):
                problem = refuse(reply)
                assert problem is None, f"{problem}: {reply}\n{self.output()}"
                if ok(reply):
                    seen[reply["pid"]] = reply
            workers = self.workers()
            if len(workers) >= WORKERS and workers <= seen.keys():
                return seen
        pytest.fail(f"not every worker {what} within {deadline}s: {seen}\n{self.output()}")


@pytest.fixture
def gunicorn(redis_url: str, unique: str, tmp_path: Path) -> Iterator[Gunicorn]:
    port = _free_port()
    log = tmp_path / "gunicorn.log"
    env = {
        **os.environ,
        "CACHESYNC_TEST_URL": redis_url,
        "CACHESYNC_TEST_CHANNEL": f"gunicorn-{unique}",
        "CACHESYNC_TEST_DB": f"gunicorn-db-{unique}",
        "PYTHONPATH": str(ROOT),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "--preload"),
                *("--workers", str(WORKERS), "--worker-class", "sync"),
                *("--bind", f"127.0.0.1:{port}", "--graceful-timeout", "3"),
                "tests.syncapps.wsgi_app:app",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Gunicorn(
        process,
        f"http://127.0.0.1:{port}",
        log,
        env["CACHESYNC_TEST_CHANNEL"],
        env["CACHESYNC_TEST_DB"],
    )
    try:
        end = time.monotonic() + 15.0
        while time.monotonic() < end and process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail(f"gunicorn did not start:\n{server.output()}")
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        redis.Redis.from_url(redis_url).delete(env["CACHESYNC_TEST_DB"])


def _publish_and_check(
    server: Gunicorn,
    pool: concurrent.futures.Executor,
    pub: BlockingPublisher,
    owner: redis.Redis,
    old: str,
    new: str,
    version: int,
    before: dict[int, dict[str, Any]],
) -> None:
    # The owner changes the value without an event: every worker still serves its cached
    # copy, so what follows shows the event (not a miss) bringing the change. (Unless the
    # worker flushed meanwhile: a connection cut by another test's fault injection.)
    owner.hset(server.db, "k", new)

    def cached(reply: dict[str, Any]) -> bool:
        earlier = before.get(reply["pid"])
        return reply["value"] == old or (
            earlier is not None and reply["losses"] > earlier["losses"]
        )

    server.until_each("k", pool, cached, "served its cached copy")
    pub.changed("items", "k", version=version)
    published = time.monotonic()

    def stale_past_bound(reply: dict[str, Any]) -> str | None:
        late = time.monotonic() - published > BOUND
        return "stale past the bound" if late and reply["value"] != new else None

    server.until_each(
        "k", pool, lambda r: r["value"] == new, "served the change", refuse=stale_past_bound
    )


def test_preloaded_workers_follow_events_and_a_respawned_one_too(
    gunicorn: Gunicorn, redis_url: str
) -> None:
    owner = redis.Redis.from_url(redis_url)
    owner.hset(gunicorn.db, "k", "v1")
    with (
        concurrent.futures.ThreadPoolExecutor(2 * WORKERS) as pool,
        BlockingPublisher(redis_url, channel=gunicorn.channel, heartbeat_interval=1.0) as pub,
    ):
        # Every worker restarted its listener after the fork, then caches v1.
        gunicorn.until_each("k", pool, lambda r: r["live"], "restarted its listener")
        seen = gunicorn.until_each(
            "k", pool, lambda r: r["hit"] and r["heard"] and r["value"] == "v1", "cached v1"
        )
        first = gunicorn.workers()
        _publish_and_check(gunicorn, pool, pub, owner, "v1", "v2", 2, seen)

        victim = min(first)
        os.kill(victim, signal.SIGKILL)  # a worker of the gunicorn this test started
        end = time.monotonic() + 15.0
        while time.monotonic() < end and (
            victim in gunicorn.workers() or len(gunicorn.workers()) < WORKERS
        ):
            time.sleep(0.05)
        respawned = gunicorn.workers() - first
        assert respawned, f"gunicorn did not respawn the worker:\n{gunicorn.output()}"
        seen = gunicorn.until_each(
            "k", pool, lambda r: r["hit"] and r["heard"] and r["value"] == "v2", "cached v2"
        )
        _publish_and_check(gunicorn, pool, pub, owner, "v2", "v3", 3, seen)
