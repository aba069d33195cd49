"""What the change feed tests share: a feed run as a subprocess, and the raw event collector
of the outbox tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import pytest

from cachesync.events import ChangeEvent, Op

from .outbox_tools import Collector

__all__ = ["Collector", "FeedProcess", "assert_none_lost", "require_setting"]

CONFIGURE = "run .ci/configure-cdc (as root) to enable it"


def require_setting(ok: bool, what: str) -> None:
    """Fail under CI, skip elsewhere, when a server lacks a setting the feeds need."""
    message = f"{what}; {CONFIGURE}"
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class FeedProcess:
    """``cachesync cdc`` in a subprocess: started, waited for, killed with SIGKILL."""

    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        self.proc: asyncio.subprocess.Process | None = None
        self.started: dict[str, Any] = {}

    async def start(self, timeout: float = 15.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cachesync",
            "cdc",
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            error = await self.proc.stderr.read()
            raise AssertionError(f"the feed did not start: {error.decode()}")
        self.started = json.loads(line)

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> int:
        """SIGTERM, then wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                return await self.proc.wait()
        except TimeoutError:
            self.kill()
            return await self.proc.wait()

    async def reap(self) -> None:
        """Make sure the process is gone (SIGKILL if needed)."""
        if self.proc is not None and self.proc.returncode is None:
            self.kill()
            await self.proc.wait()


def assert_none_lost(
    events: Sequence[ChangeEvent], committed: dict[str, list[int]], ns: str
) -> int:
    """Every committed (key, version) reached the channel; returns how many were duplicates."""
    seen: dict[tuple[str, int], int] = {}
    for event in events:
        if event.ns == ns and event.op == Op.UPSERT and event.version is not None:
            seen[(event.keys[0], event.version)] = seen.get((event.keys[0], event.version), 0) + 1
    missing = [
        (key, version)
        for key, versions in committed.items()
        for version in versions
        if (key, version) not in seen
    ]
    assert not missing, f"{len(missing)} committed changes never published: {missing[:10]}"
    return sum(count - 1 for count in seen.values())
