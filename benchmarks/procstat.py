"""CPU time of processes, read from ``/proc/<pid>/stat`` (Linux), and the PIDs of the brokers.

Read-only: nothing here signals or changes a process. A broker the benchmark started is known
by the PID it started; the machine's own servers are found by asking them (Redis: ``INFO
server`` gives ``process_id``) or by name (``pgrep -x beam.smp``, ``pgrep -x nats-server``),
keeping the process that listens on the server's port when several match (other test runs on
the machine start nats-server too).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["CpuMeter", "broker_pids", "cpu_seconds", "wait_seconds"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (every thread; a PID that is gone
    counts 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                text = handle.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ")".
        fields = text[text.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _TICK


def wait_seconds(pids: Iterable[int]) -> float:
    """Seconds the threads of ``pids`` spent runnable but waiting for a CPU (the run queue,
    ``/proc/<pid>/task/<tid>/schedstat``): how much the machine held them back."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                    total += int(handle.read().split()[1])  # nanoseconds
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


@dataclass
class CpuMeter:
    """Percent of one core used by ``pids`` between ``start()`` and ``stop()``, and in
    ``waited`` the percent of the time they spent waiting for a CPU (summed over them)."""

    pids: Sequence[int]
    waited: float = float("nan")
    _cpu: float = 0.0
    _wait: float = 0.0
    _wall: float = 0.0

    def start(self) -> None:
        self._cpu, self._wait = cpu_seconds(self.pids), wait_seconds(self.pids)
        self._wall = time.monotonic()

    def stop(self) -> float:
        """Percent of a core since ``start()`` (NaN when no PID is known)."""
        if not self.pids:
            return float("nan")
        wall = max(time.monotonic() - self._wall, 1e-9)
        self.waited = 100.0 * (wait_seconds(self.pids) - self._wait) / wall
        return 100.0 * (cpu_seconds(self.pids) - self._cpu) / wall


def _pgrep(name: str) -> list[int]:
    try:
        out = subprocess.run(
            ["pgrep", "-x", name], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(word) for word in out.split()]


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            parts = row.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    return inodes


def _listens_on(pid: int, inodes: set[str]) -> bool:
    try:
        links = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in links:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _by_name(name: str, port: int) -> list[int]:
    candidates = _pgrep(name)
    if len(candidates) <= 1:
        return candidates
    inodes = _listening_inodes(port)
    listening = [pid for pid in candidates if _listens_on(pid, inodes)]
    return listening or candidates


def _redis_pid(url: str) -> list[int]:
    import redis

    parts = urlsplit(url)
    client = redis.Redis(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)
    try:
        return [int(client.info("server")["process_id"])]
    except (redis.RedisError, KeyError, ValueError):
        return []
    finally:
        client.close()


def broker_pids(url: str) -> list[int]:
    """The PIDs of the machine's broker behind ``url`` (empty when it cannot be told)."""
    scheme = urlsplit(url).scheme
    port = urlsplit(url).port
    if scheme in ("redis", "rediss"):
        return _redis_pid(url)
    if scheme.startswith("amqp"):
        return _by_name("beam.smp", port or 5672)
    if scheme.startswith("nats"):
        return _by_name("nats-server", port or 4222)
    return []
