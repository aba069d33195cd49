"""The background runner: a client without an event loop of the caller's, for sync apps."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

from cachesync import BlockingPublisher, CacheSync, StateError, TransportError

ROOT = Path(__file__).resolve().parent.parent


def _listener_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("cachesync-")]


def _applied(sync: CacheSync) -> threading.Event:
    """Set once the listener applied the next message (handle_message may be wrapped)."""
    done = threading.Event()
    handle = sync.handle_message

    def handle_and_tell(payload: bytes) -> None:
        handle(payload)
        if b'"heartbeat"' not in payload:
            done.set()

    sync.handle_message = handle_and_tell  # type: ignore[method-assign]
    return done


def test_plain_functions_work_from_threads_and_follow_events(redis_url: str, unique: str) -> None:
    owner = {"a": 1}
    sync = CacheSync(redis_url, channel=unique)

    @sync.cached("items")
    def get(key: str) -> int:
        return owner[key]

    assert not _listener_threads()
    with sync.running(), BlockingPublisher(redis_url, channel=unique) as pub:
        assert sync.listener_up
        results: list[int] = []
        readers = [threading.Thread(target=lambda: results.append(get("a"))) for _ in range(8)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(5)
        assert results == [1] * 8
        owner["a"] = 2
        assert get("a") == 1  # cached
        applied = _applied(sync)
        event = pub.changed("items", "a", version=2)
        assert event.seq == 1 and pub.publisher.seq == 1
        assert applied.wait(5)
        assert get("a") == 2
    assert not sync.listener_up
    assert not _listener_threads()
    with pytest.raises(StateError, match="closed"):
        sync.start_in_background()


def test_start_raises_transport_error_after_connect_timeout() -> None:
    sync = CacheSync("redis://127.0.0.1:1/0", connect_timeout=0.5)
    with pytest.raises(TransportError):
        sync.start_in_background()
    assert not sync.listener_up
    assert not _listener_threads()


def test_async_functions_get_a_clear_error(redis_url: str, unique: str) -> None:
    sync = CacheSync(redis_url, channel=unique)

    @sync.cached("items")
    async def get(key: str) -> str:
        return key

    with pytest.raises(StateError, match=r"async def .*get.*start_in_background"):
        sync.start_in_background()
    assert not _listener_threads()

    plain = CacheSync(redis_url, channel=unique)
    with plain.running():
        with pytest.raises(StateError, match="async def"):

            @plain.cached("other")
            async def other(key: str) -> str:
                return key


def test_a_forked_child_distrusts_at_once_and_restarts_its_listener(
    redis_url: str, unique: str
) -> None:
    # In a subprocess: forking pytest itself would copy its whole state.
    done = subprocess.run(
        [sys.executable, "-m", "tests.syncapps.fork_child", redis_url, unique],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_listener_stops_at_interpreter_exit(redis_url: str, unique: str) -> None:
    script = f"""
import atexit
from cachesync import CacheSync
sync = CacheSync({redis_url!r}, channel={unique!r})
# Registered first, so it runs after the runner's own exit handler.
atexit.register(lambda: print("state", sync.state.value, sync.listener_up))
sync.start_in_background()
print("live", sync.listener_up)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["live True", "state closed False"], done.stdout


def test_neither_exit_nor_fork_hooks_keep_a_client_alive(redis_url: str, unique: str) -> None:
    sync = CacheSync(redis_url, channel=unique)
    with sync.running():
        pass
    ref = weakref.ref(sync)
    del sync
    gc.collect()
    assert ref() is None


def test_without_waiting_it_keeps_trying_and_reads_go_to_the_owner(
    redis_url: str, unique: str
) -> None:
    calls: list[str] = []
    down = CacheSync("redis://127.0.0.1:1/0", connect_timeout=0.2)

    @down.cached("items")
    def get(key: str) -> str:
        calls.append(key)
        return key

    down.start_in_background(wait=False)  # returns at once, broker or not
    assert not down.listener_up
    assert get("a") == "a" and get("a") == "a"
    assert calls == ["a", "a"]  # nothing trusted: every read goes to the owner
    down.stop_background()
    assert not _listener_threads()

    up = CacheSync(redis_url, channel=unique)
    up.cached("items")(lambda key: key)
    up.start_in_background(wait=False)
    try:
        end = time.monotonic() + 5
        while not up.listener_up and time.monotonic() < end:
            time.sleep(0.01)
        assert up.listener_up
    finally:
        up.stop_background()
