"""cachesync and its peers under the same faults: how stale does each get, and for how long.

    .venv/bin/python -m benchmarks.faults [--seconds 8]

Each strategy caches 200 items that an owner changes every 10 ms (a random item, its version
+1), announcing each change the way the strategy needs (cachesync: a ``Publisher`` on
``redis://``; redis-py client-side caching: ``SET`` in Redis; cashews: ``cache.set``). One
reader reads a random item every millisecond and notes the version it got. The reader reaches
Redis through a TCP proxy (``tests/tcpproxy.py``); 2 s in, one fault:

- **kill**: ``CLIENT KILL`` of every connection the reader has open (found through the proxy's
  outbound ports: nobody else's connections are touched);
- **partition**: the proxy resets the reader's connections and refuses new ones for 2 s (what
  a broker restart or a network partition looks like from the reader), while the owner keeps
  committing and announcing.

Reported per strategy and fault, zero grace (a read is stale when a newer version had been
committed before it began): stale reads before and after the fault, how far behind the worst
was, when the last stale read happened after the fault, and how many reads of the final second
were more than 1 s behind (a cache that never heals), and the reads that failed (raised, or
took over 2 s): the price of staying fresh. The peers run their ``-fixed`` variants
(see RESULTS.md: as documented they do not run or do not invalidate on this machine).
Writes ``benchmarks/results/FAULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapters import Cashews, Reader, RedisClientSide
from .common import table
from .owner_app import CachesyncSink, CashewsSink, RedisSink, Sink
from .soak import local_ports

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.tcpproxy import TcpProxy, proxied_url  # noqa: E402

REDIS = "redis://127.0.0.1:6379/0"
RESULTS = ROOT / "benchmarks" / "results"
N_KEYS = 200
STRATEGIES = ("cachesync-invalidate-redis", "redis-py-csc-fixed", "cashews-fixed")
FAULTS = ("kill", "partition")


class _CachesyncReader(Reader):
    """``@sync.cached`` over the owner's dict (in process): only the invalidations travel."""

    def __init__(self, url: str, channel: str, truth: dict[str, dict[str, Any]]) -> None:
        from cachesync import CacheSync

        super().__init__()
        self.sync = CacheSync(url, channel)
        self.truth = truth

        async def fetch(key: str) -> dict[str, Any]:
            await asyncio.sleep(0)
            return dict(self.truth[key])

        self.fn = self.sync.cached(
            "items", ttl=3600, maxsize=N_KEYS * 2, version_of=lambda item: item["version"]
        )(fetch)

    async def start(self) -> None:
        await self.sync.start()
        deadline = time.monotonic() + 5.0  # the publisher's first heartbeat (see adapters)
        while self.sync.stats()["listener"]["messages"] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def get(self, key: str) -> tuple[int, bool]:
        item = await self.fn(key)
        return int(item["version"]), False

    async def stop(self) -> None:
        await self.sync.stop()


@dataclass
class Outcome:
    """What one strategy did under one fault."""

    strategy: str
    fault: str
    reads_before: int = 0
    stale_before: int = 0
    reads_after: int = 0
    stale_after: int = 0
    worst_behind_ms: float = 0.0
    last_stale_s: float | None = None  # after the fault
    final_second_stale: int = 0
    final_second_reads: int = 0
    failed_reads: int = 0  # raised or took over 2 s (after the fault)
    error: str = ""
    notes: list[str] = field(default_factory=list)


async def _kill(admin: Any, ports: set[int]) -> int:
    killed = 0
    for port in sorted(ports):
        with contextlib.suppress(Exception):
            killed += int(
                await admin.execute_command("CLIENT", "KILL", "ADDR", f"127.0.0.1:{port}")
            )
    return killed


async def run_one(strategy: str, fault: str, seconds: float, fault_at: float = 2.0) -> Outcome:
    """One strategy under one fault (bounded: ``seconds`` of reads, then everything stops)."""
    import redis.asyncio as aredis

    out = Outcome(strategy, fault)
    run_id = uuid.uuid4().hex[:8]
    channel, prefix = f"cachesync-faults-{run_id}", f"cachesync-faults:{run_id}:"
    truth: dict[str, dict[str, Any]] = {
        f"f{run_id}-{i}": {"key": f"f{run_id}-{i}", "version": 1} for i in range(N_KEYS)
    }
    keys = list(truth)
    commits: dict[str, list[int]] = {k: [] for k in keys}  # commit time of version 2, 3, ...
    admin = aredis.Redis.from_url(REDIS)
    sink: Sink
    reader: Reader
    async with TcpProxy("127.0.0.1", 6379) as proxy:
        via = proxied_url(REDIS, proxy)
        if strategy.startswith("cachesync"):
            sink = CachesyncSink(REDIS, channel, carry_value=False)
            reader = _CachesyncReader(via, channel, truth)
        elif strategy.startswith("redis-py-csc"):
            sink = RedisSink(REDIS, prefix)
            reader = RedisClientSide(via, prefix, fix=True)
        else:
            sink = CashewsSink(REDIS + "?client_side=true&protocol=2")
            reader = Cashews(via + "?client_side=true&protocol=2")
        await admin.ping()
        await sink.start({k: dict(v) for k, v in truth.items()})
        before = local_ports(os.getpid(), 6379)
        reads: list[tuple[int, str, int]] = []
        try:
            await reader.start()
            for key in keys:  # warm
                await reader.get(key)
            start = time.monotonic_ns()
            stop_at = start + int(seconds * 1e9)

            async def owner() -> None:
                rng = random.Random(1)
                while time.monotonic_ns() < stop_at:
                    key = rng.choice(keys)
                    item = truth[key]
                    item["version"] += 1
                    commits[key].append(time.monotonic_ns())
                    await sink.changed(key, dict(item))
                    await asyncio.sleep(0.01)

            async def read() -> None:
                rng = random.Random(2)
                while time.monotonic_ns() < stop_at:
                    key = rng.choice(keys)
                    t0 = time.monotonic_ns()
                    try:
                        version, _ = await asyncio.wait_for(reader.get(key), 2.0)
                    except Exception:
                        out.failed_reads += 1
                        await asyncio.sleep(0.001)
                        continue
                    reads.append((t0, key, version))
                    await asyncio.sleep(0.001)

            async def inject() -> None:
                await asyncio.sleep(fault_at)
                if fault == "kill":
                    ports = local_ports(os.getpid(), 6379) - before
                    out.notes.append(f"{await _kill(admin, ports)} connections killed")
                else:
                    proxy.refuse(True)
                    await proxy.cut()
                    await asyncio.sleep(2.0)
                    proxy.refuse(False)

            await asyncio.gather(owner(), read(), inject())
        except Exception as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await reader.stop()
            with contextlib.suppress(Exception):
                await sink.stop()
            await admin.aclose()
    if reads:
        _score(out, reads, commits, reads[0][0], fault_at, seconds)
    return out


def _score(
    out: Outcome,
    reads: list[tuple[int, str, int]],
    commits: dict[str, list[int]],
    start: int,
    fault_at: float,
    seconds: float,
) -> None:
    fault_ns = start + int(fault_at * 1e9)
    final = start + int((seconds - 1.0) * 1e9)
    for t0, key, version in reads:
        times = commits[key]
        # the version committed before t0 is 1 + the commits at or before it
        committed = 1 + sum(1 for t in times if t <= t0)
        stale = version < committed
        behind = (t0 - times[version - 1]) / 1e6 if stale else 0.0
        if t0 < fault_ns:
            out.reads_before += 1
            out.stale_before += stale
        else:
            out.reads_after += 1
            out.stale_after += stale
            if stale:
                out.worst_behind_ms = max(out.worst_behind_ms, behind)
                out.last_stale_s = (t0 - fault_ns) / 1e9
        if t0 >= final:
            out.final_second_reads += 1
            out.final_second_stale += stale and behind > 1000.0


HEADERS = [
    "strategy",
    "fault",
    "stale before (of reads)",
    "stale after",
    "worst behind (ms)",
    "last stale read (s after the fault)",
    "final second: reads > 1 s behind",
    "failed reads",
    "notes",
]


def row(o: Outcome) -> list[str]:
    """The table row of one outcome."""
    last = "-" if o.last_stale_s is None else f"{o.last_stale_s:.2f}"
    notes = "; ".join([*o.notes, o.error] if o.error else o.notes) or "-"
    return [
        o.strategy,
        o.fault,
        f"{o.stale_before:,} ({o.reads_before:,})",
        f"{o.stale_after:,} ({o.reads_after:,})",
        f"{o.worst_behind_ms:,.2f}",
        last,
        f"{o.final_second_stale:,} of {o.final_second_reads:,}",
        f"{o.failed_reads:,}",
        notes,
    ]


async def run_all(seconds: float) -> list[Outcome]:
    """Every strategy under every fault, one after the other."""
    outcomes = []
    for fault in FAULTS:
        for strategy in STRATEGIES:
            print(f"{strategy} under {fault}...", file=sys.stderr, flush=True)
            outcomes.append(await run_one(strategy, fault, seconds))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """Run, print the table and write FAULTS.md."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    outcomes = asyncio.run(run_all(args.seconds))
    text = table(HEADERS, [row(o) for o in outcomes])
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    method = "\n\n".join((__doc__ or "").split("\n\n")[1:])
    command = " ".join(["python -m benchmarks.faults", *argv])
    (out / "FAULTS.md").write_text(
        f"# Peers under faults\n\nCommand: `{command}` (load average at the end: {load}).\n\n"
        f"{method}\n\n{text}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
