"""The example services end to end: both under uvicorn as subprocesses, over the real Redis.

An update at the owner must show in the consumer's reads within a bound (5 s here; in practice
a few milliseconds), a delete too, without the consumer's TTL (an hour) playing any part.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 5.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """One uvicorn subprocess; its output goes to a log file shown when a check fails."""

    def __init__(self, app: str, env: dict[str, str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._out = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1"]
            + ["--port", str(self.port), "--log-level", "warning"],
            cwd=ROOT,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._out.close()


@contextmanager
def service(app: str, env: dict[str, str], log: Path) -> Iterator[Service]:
    running = Service(app, env, log)
    try:
        yield running
    finally:
        running.stop()


def wait_until(what: str, check: Callable[[], bool], *services: Service, timeout: float) -> float:
    """Poll ``check`` until it holds; return how long that took; fail with the logs if not."""
    started = time.monotonic()
    while True:
        for svc in services:
            if svc.process.poll() is not None:
                pytest.fail(f"{svc.log.name} exited early:\n{svc.output()}")
        try:
            if check():
                return time.monotonic() - started
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() - started > timeout:
            logs = "\n".join(f"--- {s.log.name}\n{s.output()}" for s in services)
            pytest.fail(f"{what} not within {timeout} s\n{logs}")
        time.sleep(0.02)


def _json(client: httpx.Client, url: str) -> Any:
    response = client.get(url)
    return response.json() if response.status_code == 200 else response.status_code


@pytest.mark.redis
@pytest.mark.timeout(40)
def test_an_update_at_the_owner_shows_in_the_consumer_within_the_bound(
    redis_url: str, unique: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'owner.db'}",
        "CACHESYNC_URL": redis_url,
        "CACHESYNC_CHANNEL": f"e2e-{unique}",  # never shares events with another test run
        "OUTBOX_POLL_INTERVAL": "0.2",
        "CACHE_TTL": "3600",
    }
    with (
        httpx.Client(timeout=5.0) as http,
        service("examples.owner_service:app", env, tmp_path / "owner.log") as owner,
    ):
        wait_until(
            "owner healthy", lambda: http.get(f"{owner.url}/healthz").is_success, owner, timeout=15
        )
        put = http.put(f"{owner.url}/currencies/USD", json={"name": "US dollar", "rate": 1.0})
        assert put.status_code == 200, put.text

        consumer_env = {**env, "OWNER_URL": owner.url}
        with service(
            "examples.consumer_service:app", consumer_env, tmp_path / "consumer.log"
        ) as consumer:
            wait_until(
                "consumer listening",
                lambda: http.get(f"{consumer.url}/healthz").json()["listener_up"],
                owner,
                consumer,
                timeout=15,
            )
            usd = f"{consumer.url}/currencies/USD"
            assert _json(http, usd)["rate"] == 1.0
            assert _json(http, usd)["rate"] == 1.0

            put = http.put(f"{owner.url}/currencies/USD", json={"name": "US dollar", "rate": 2.5})
            assert put.status_code == 200 and put.headers["etag"] == '"2"'
            took = wait_until(
                "the consumer reads the new rate",
                lambda: _json(http, usd)["rate"] == 2.5,
                owner,
                consumer,
                timeout=DEADLINE,
            )
            assert took < DEADLINE

            assert http.delete(f"{owner.url}/currencies/USD").status_code == 204
            wait_until(
                "the consumer sees the delete",
                lambda: _json(http, usd) == 404,
                owner,
                consumer,
                timeout=DEADLINE,
            )

            stats = http.get(f"{consumer.url}/stats").json()
            currencies = stats["cachesync"]["namespaces"]["currencies"]
            assert currencies["events"] >= 2, stats
            assert stats["cachesync"]["listener"]["listener_up"] is True
            state = http.get(f"{owner.url}/cachesync/state").json()
            assert state["channels"][f"e2e-{unique}"]["seq"] >= 3
