"""gunicorn under load: requests/s and staleness with cachesync, with no cache, with a TTL cache.

For each mode, gunicorn (``--preload``, ``--workers`` x ``--threads`` gthread workers, on
loopback) serves :mod:`benchmarks.gunicorn_app`; client threads request random keys for a
bounded time while an owner thread changes one key every ``--change-every`` seconds (a new
version in the Redis hash, then an event through a :class:`~cachesync.BlockingPublisher`).

A reply is *stale* when its request started after the owner had published a newer version of
its key; its staleness is how long after that publish the request started. With cachesync a
stale reply is only possible while an event is in flight: the bound (``--bound``, 1 s) is the
staleness no reply may exceed.

    python -m benchmarks.gunicorn_load [--seconds 5] [--workers 4] [--threads 8]
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from cachesync import BlockingPublisher

ROOT = Path(__file__).resolve().parent.parent
URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")


@dataclass
class ModeResult:
    """One mode's run."""

    mode: str
    requests: int
    seconds: float
    errors: int
    stale: int
    past_bound: int
    staleness: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def p99(self) -> float:
        """p99 of the staleness over every reply (fresh replies count as 0)."""
        if not self.requests:
            return 0.0
        values = sorted(self.staleness)
        index = int(0.99 * self.requests)
        fresh = self.requests - len(values)
        return 0.0 if index < fresh else values[min(index - fresh, len(values) - 1)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_mode(mode: str, args: argparse.Namespace) -> ModeResult:
    """Start gunicorn for ``mode``, load it for ``args.seconds``, stop it by its PID."""
    tag = uuid.uuid4().hex[:8]
    db, channel = f"bench-gunicorn-db-{tag}", f"bench-gunicorn-{tag}"
    owner = redis.Redis.from_url(URL)
    keys = [f"k{i}" for i in range(args.keys)]
    owner.hset(db, mapping={k: 1 for k in keys})
    port = _free_port()
    env = {
        **os.environ,
        "BENCH_MODE": mode,
        "BENCH_REDIS": URL,
        "BENCH_DB": db,
        "BENCH_CHANNEL": channel,
        "BENCH_TTL": str(args.ttl),
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "gunicorn", "--preload", "--worker-class", "gthread"),
            *("--workers", str(args.workers), "--threads", str(args.threads)),
            *("--bind", f"127.0.0.1:{port}", "--log-level", "warning"),
            "benchmarks.gunicorn_app:app",
        ],
        cwd=ROOT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    published: dict[str, list[tuple[int, float]]] = {k: [(1, 0.0)] for k in keys}
    # Closed after gunicorn stopped: its workers never see the publisher go silent.
    pub = BlockingPublisher(URL, channel=channel, heartbeat_interval=0.5)
    try:
        _wait_up(base, process)
        pub.start()
        _load(base, keys, 1.0, 64, args)  # warm up every worker and key
        stop = threading.Event()
        owner_thread = threading.Thread(
            target=_owner, args=(owner, pub, db, keys, published, stop, args.change_every)
        )
        owner_thread.start()
        try:
            started = time.monotonic()
            replies, errors = _load(base, keys, args.seconds, args.clients, args)
            seconds = time.monotonic() - started
        finally:
            stop.set()
            owner_thread.join(10)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        pub.close()
        owner.delete(db)
    result = ModeResult(mode, len(replies), seconds, errors, 0, 0)
    for key, version, start in replies:
        history = published[key]
        # The first version newer than the reply's, and when it was published.
        index = bisect.bisect_right([v for v, _ in history], version)
        if index < len(history) and history[index][1] < start:
            late = start - history[index][1]
            result.stale += 1
            result.staleness.append(late)
            if late > args.bound:
                result.past_bound += 1
    return result


def _wait_up(base: str, process: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end and process.poll() is None:
        try:
            httpx.get(f"{base}/item/k0", timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("gunicorn did not start")


def _owner(
    owner: redis.Redis,
    pub: BlockingPublisher,
    db: str,
    keys: list[str],
    published: dict[str, list[tuple[int, float]]],
    stop: threading.Event,
    every: float,
) -> None:
    rng = random.Random(1)
    while not stop.wait(every):
        key = rng.choice(keys)
        version = published[key][-1][0] + 1
        owner.hset(db, key, version)
        pub.changed("items", key, version=version)
        # Published (the broker took it) from here on: replies to later requests must show it.
        published[key].append((version, time.monotonic()))


def _load(
    base: str, keys: list[str], seconds: float, clients: int, args: argparse.Namespace
) -> tuple[list[tuple[str, int, float]], int]:
    replies: list[tuple[str, int, float]] = []
    errors = [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[tuple[str, int, float]] = []
        # http.client with keep-alive: the lightest client, so the server is what is measured.
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5.0)
        try:
            for _ in range(args.max_requests):
                start = time.monotonic()
                if start >= end:
                    break
                key = rng.choice(keys)
                try:
                    conn.request("GET", f"/item/{key}")
                    body = conn.getresponse().read()
                    mine.append((key, int(json.loads(body)["version"]), start))
                except (OSError, http.client.HTTPException, ValueError, KeyError):
                    errors[0] += 1
                    conn.close()
        finally:
            conn.close()
        with lock:
            replies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    return replies, errors[0]


def main() -> None:
    """``python -m benchmarks.gunicorn_load``: print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="load time per mode")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16, help="client threads")
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--ttl", type=float, default=5.0, help="the TTL cache's TTL")
    parser.add_argument("--change-every", type=float, default=0.05)
    parser.add_argument("--bound", type=float, default=1.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="per client")
    parser.add_argument("--modes", default="none,ttl,cachesync")
    args = parser.parse_args()
    results = [run_mode(mode, args) for mode in args.modes.split(",")]
    print(
        f"gunicorn --preload, {args.workers} workers x {args.threads} threads (gthread), "
        f"{args.clients} client threads, {args.keys} keys, a change every {args.change_every}s"
    )
    print(
        f"{'mode':<10} {'req/s':>8} {'requests':>9} {'errors':>6} {'stale':>6} "
        f"{'p99 stale':>10} {'max stale':>10} {'>' + format(args.bound, 'g') + 's':>6}"
    )
    for r in results:
        worst = max(r.staleness, default=0.0)
        print(
            f"{r.mode:<10} {r.rps:>8.0f} {r.requests:>9} {r.errors:>6} {r.stale:>6} "
            f"{r.p99() * 1000:>8.1f}ms {worst * 1000:>8.1f}ms {r.past_bound:>6}"
        )


if __name__ == "__main__":
    main()
