"""The strategy comparison harness: one owner process (uvicorn) and N reader processes per run.

Each run: start the owner (it loads its data and, for Redis-backed peers, writes it to Redis),
start the readers (each subscribes and prefills its cache), wait until all are ready, start the
owner's updater, run ``warmup`` seconds unmeasured then ``duration`` seconds measured, collect
every reader's recording and the owner's update log, stop every process, analyse.

Processes come from a ``forkserver`` that has imported the heavy modules once, so starting a
process costs a fork, not an interpreter start. Every process started is stopped before a run
returns, also on Ctrl-C (KeyboardInterrupt goes through the ``finally``).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import socket
import time
import traceback
import uuid
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import httpx

from . import owner_app, reader_proc
from .analysis import StrategyResult, analyze
from .common import stop_processes
from .progress import Progress
from .reader_proc import ReaderJob
from .strategies import Settings, Strategy, owner_config
from .workload import Schedule

PRELOAD = [
    "benchmarks.reader_proc",
    "benchmarks.owner_app",
    "cachesync",
    "cachesync.fetch",
    "cachesync.transports.redis",
    "cachesync.transports.redis.stream",
    "cachesync.transports.amqp",
    "redis",
    "redis.asyncio",
    "cashews",
    "aio_pika",
    "fastapi",
    "uvicorn",
    "httpx",
]
"""Imported once by the forkserver (a missing one is skipped), so no process imports them."""

READY_TIMEOUT = 120.0
"""Seconds a reader may take to connect and prefill (redis-py's prefill is 10,000 GETs)."""


CURVE_BIN = 0.5
"""Seconds per point of the cold-start curve (runs that start empty)."""


class RunFailed(Exception):
    """A strategy could not run; the message says why."""


@dataclass
class _Procs:
    owner: BaseProcess | None = None
    readers: list[BaseProcess] | None = None

    def all(self) -> list[BaseProcess]:
        return [p for p in [*(self.readers or []), self.owner] if p is not None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _close(pipes: list[multiprocessing.connection.Connection]) -> None:
    for pipe in pipes:
        pipe.close()


def _stop(procs: list[BaseProcess], grace: float = 5.0) -> None:
    """Readers end by themselves; the owner (uvicorn) is stopped by SIGTERM."""
    stop_processes(procs, grace=grace, wait_for=lambda p: not p.name.startswith("owner"))


class Harness:
    """Runs strategies one after the other with the same workload settings."""

    def __init__(self, settings: Settings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.progress = progress or Progress(quiet=True)
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)

    def run(self, strategy: Strategy) -> StrategyResult:
        """Run ``strategy``; a run that cannot start comes back with status ``failed``."""
        result = StrategyResult(strategy.name, strategy.label, strategy.family)
        try:
            return self._run(strategy, result)
        except RunFailed as exc:
            result.status = "failed"
            result.reason = str(exc)
        except Exception as exc:  # a bug here must not lose the other strategies' results
            traceback.print_exc()
            result.status = "failed"
            result.reason = f"harness error: {type(exc).__name__}: {exc}"
        return result

    def _run(self, strategy: Strategy, result: StrategyResult) -> StrategyResult:
        settings = self.settings
        run_id = uuid.uuid4().hex[:8]
        channel = f"cachesync-bench-{run_id}"
        prefix = f"cachesync-bench:{run_id}:"
        port = _free_port()
        base_url = f"http://127.0.0.1:{port}"
        procs = _Procs()
        began = time.monotonic()
        pipes: list[multiprocessing.connection.Connection] = []
        try:
            config = owner_config(strategy, settings, channel=channel, redis_prefix=prefix)
            procs.owner = self.ctx.Process(
                target=owner_app.serve,
                args=(config, port),
                name=f"owner-{strategy.name}",
                daemon=True,
            )
            procs.owner.start()
            no_reuse = httpx.Limits(max_keepalive_connections=0)
            with httpx.Client(base_url=base_url, timeout=10.0, limits=no_reuse) as http:
                procs.readers = []  # they wait for the owner themselves
                for index in range(settings.readers):
                    job = ReaderJob(index, strategy, settings, base_url, channel, prefix)
                    parent, child = self.ctx.Pipe()
                    proc = self.ctx.Process(
                        target=reader_proc.main,
                        args=(job, child),
                        name=f"reader-{index}",
                        daemon=True,
                    )
                    proc.start()
                    child.close()
                    procs.readers.append(proc)
                    pipes.append(parent)
                self._wait_healthy(http, procs.owner)
                for pipe in pipes:
                    self._expect(pipe, "ready", READY_TIMEOUT)
                self.progress.say(
                    f"    owner and {len(pipes)} readers ready in {time.monotonic() - began:.1f} s"
                )
                http.post("/control/start").raise_for_status()
                start = time.monotonic_ns() + 50_000_000
                measure = start + int(settings.warmup * 1e9)
                schedule = Schedule(start, measure, measure + int(settings.duration * 1e9))
                for pipe in pipes:
                    pipe.send(("go", schedule))
                self.progress.wait(measure / 1e9, "warm-up")
                before = http.get("/stats").json()
                self.progress.wait(schedule.end / 1e9, "measuring")
                after = http.get("/stats").json()
                readers = [self._expect(pipe, "done", 60.0) for pipe in pipes]
                http.post("/control/stop").raise_for_status()
                log = http.get("/log").json()["log"]
            if after["publish_errors"]:
                result.notes.append(f"the owner failed to publish {after['publish_errors']} events")
        except BaseException:
            # Failed or interrupted: nothing to wait for.
            _close(pipes)
            _stop(procs.all(), grace=0.0)
            raise
        _close(pipes)
        _stop(procs.all())
        return analyze(
            result,
            readers,
            log,
            schedule,
            after["requests"] - before["requests"],
            curve_bin=None if settings.prefill else CURVE_BIN,
            flush_at=settings.flush_at,
        )

    def _wait_healthy(self, http: httpx.Client, owner: BaseProcess) -> None:
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if not owner.is_alive():
                raise RunFailed(f"the owner process exited with code {owner.exitcode}")
            try:
                if http.get("/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RunFailed("the owner did not answer /health within 30 s")

    @staticmethod
    def _expect(pipe: multiprocessing.connection.Connection, kind: str, timeout: float) -> Any:
        if not pipe.poll(timeout):
            raise RunFailed(f"a reader sent nothing within {timeout:g} s (waiting for {kind!r})")
        try:
            got, payload = pipe.recv()
        except EOFError:
            raise RunFailed(f"a reader exited before {kind!r}") from None
        if got == "error":
            raise RunFailed(f"a reader failed: {payload}")
        if got != kind:
            raise RunFailed(f"a reader sent {got!r}, expected {kind!r}")
        return payload
