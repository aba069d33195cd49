"""The demo: in-process on memory://, and as the ``cachesync demo`` command."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachesync import CacheSync, Publisher
from cachesync.cache import LocalCache
from cachesync.demo import (
    PROBE_DEADLINE,
    DemoConfig,
    DemoResult,
    Progress,
    ProgressPrinter,
    Window,
    format_table,
    run_demo,
)
from cachesync.demo.owner import CURRENCY_NAMES, NAMESPACE, Owner, build_app, owner_client

ROOT = Path(__file__).resolve().parent.parent
# The demo's stale-read bound is 10 ms after the commit. That bound measures the machine as well
# as the library: a loaded CI runner that stops the process for 13 ms leaves reads waiting
# behind the listener. The tests widen it, and check the guarantee itself with the count that
# does not depend on timing (reads stale after their instance applied the event).
GRACE = 0.25
HEADINGS = ("reads", "hit rate", "owner calls", "events", "stale reads", "p50", "p99", "max")


def _check_sane(result: DemoResult) -> None:
    assert result.reads > 0
    assert all(instance.reads > 0 for instance in result.instances)
    assert result.hit_rate > 0.5
    assert result.updates > 0
    # Every update was seen by every instance, well within the probe deadline.
    assert result.staleness.count == result.updates
    assert result.staleness.timeouts == 0
    assert result.staleness.p99 is not None and result.staleness.p99 < 0.5
    # Guarantee 1, from each instance's point of view: never an old value after its event.
    assert result.stale_after_event == 0
    # By the clock, with the widened bound.
    assert result.stale_grace == GRACE
    assert result.stale_reads == 0
    for instance in result.instances:
        assert instance.events == result.updates
        assert instance.read_errors == instance.gaps == instance.reconnects == 0
        assert instance.heartbeat_misses == instance.bad_events == 0


@pytest.mark.timeout(30)
async def test_invalidate_mode_is_coherent_and_mostly_hits() -> None:
    seen: list[Progress] = []
    config = DemoConfig(
        duration=2.0, instances=3, readers=4, update_rate=10.0, stale_grace=GRACE, seed=7
    )
    result = await run_demo(config, on_progress=seen.append, progress_interval=0.5)

    _check_sane(result)
    assert result.mode == "invalidate"
    assert not result.interrupted
    assert 1.9 < result.duration < 3.0
    assert [i.name for i in result.instances] == ["consumer-1", "consumer-2", "consumer-3"]
    # An invalidation makes each instance fetch the changed row again, once.
    assert result.owner_calls >= result.updates * len(result.instances)
    assert result.url.startswith("memory://demo-")
    assert seen and seen[-1].reads > 0
    json.dumps(result.to_dict())  # machine-readable as promised


@pytest.mark.timeout(30)
async def test_refresh_mode_needs_no_owner_calls() -> None:
    config = DemoConfig(
        duration=1.5, instances=2, readers=2, update_rate=10.0, refresh=True, stale_grace=GRACE
    )
    result = await run_demo(config)

    _check_sane(result)
    assert result.mode == "refresh"
    assert result.owner_calls == 0
    assert result.hit_rate == 1.0


@pytest.mark.timeout(30)
async def test_the_measurements_catch_a_cache_that_ignores_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A checker that can only ever say "0 stale reads" proves nothing: break the cache.
    monkeypatch.setattr(LocalCache, "invalidate", lambda self, key, version=None: False)
    config = DemoConfig(duration=1.0, instances=1, readers=1, update_rate=4.0)
    result = await run_demo(config)

    assert result.updates > 0
    assert result.stale_after_event > 0
    assert result.stale_reads > 0
    assert result.staleness.timeouts == result.staleness.count == result.updates
    assert result.staleness.max is not None and result.staleness.max >= PROBE_DEADLINE
    assert "not seen within" in format_table(result)


@pytest.mark.timeout(30)
async def test_stop_ends_early_with_partial_results() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(1.0, stop.set)
    started = time.monotonic()
    result = await run_demo(DemoConfig(duration=30.0, instances=2, readers=2), stop=stop)

    assert time.monotonic() - started < 10
    assert result.interrupted
    assert result.duration < 5
    assert result.reads > 0
    assert "(interrupted)" in format_table(result)


@pytest.mark.timeout(30)
async def test_without_updates_there_is_no_window() -> None:
    result = await run_demo(DemoConfig(duration=0.5, instances=1, readers=1, update_rate=0))
    assert result.updates == 0
    assert result.staleness == Window(0, None, None, None)
    assert result.hit_rate == 1.0  # warmed up, and nothing ever changes
    assert "serves the new version" in format_table(result)


@pytest.mark.timeout(20)
async def test_owner_serves_updates_and_publishes_them(unique: str) -> None:
    url = f"memory://owner-{unique}"
    publisher = Publisher(url, "prices", heartbeat_interval=None)
    sync = CacheSync(url, "prices")

    @sync.cached(NAMESPACE)  # a consumer of the namespace, so that its events are counted
    async def currency(code: str) -> str:
        return code

    async with (
        publisher,
        sync,
        owner_client(build_app(Owner(publisher))) as http,
    ):
        before = (await http.get("/currencies/USD")).json()
        assert before == {"code": "USD", "name": "US Dollar", "rate": 1.0, "version": 1}
        changed = await http.put("/currencies/USD", json={"rate": 1.25})
        assert changed.status_code == 200
        assert changed.json() == {**before, "rate": 1.25, "version": 2}
        assert (await http.get("/currencies/USD")).json()["version"] == 2
        listed = (await http.get("/currencies")).json()
        assert len(listed) == len(CURRENCY_NAMES) and listed[0]["version"] == 2
        assert publisher.seq == 1
        assert (await http.get("/currencies/XXX")).status_code == 404
        assert (await http.put("/currencies/XXX", json={"rate": 1.0})).status_code == 404
        assert (await http.put("/currencies/USD", json={"rate": -1})).status_code == 422
        assert (await http.put("/currencies/USD", content=b"{")).status_code == 422
        assert (await http.delete("/currencies/USD")).status_code == 405
        assert (await http.get("/nowhere")).status_code == 404
        state = (await http.get("/cachesync/state")).json()
        assert state["source"] == publisher.source
        assert state["channels"]["prices"]["seq"] == 1
        await asyncio.sleep(0.05)
        assert sync.stats()["namespaces"][NAMESPACE]["events"] == 1


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="duration"):
        DemoConfig(duration=0)
    with pytest.raises(ValueError, match="instances"):
        DemoConfig(instances=0)
    with pytest.raises(ValueError, match="readers"):
        DemoConfig(readers=0)
    with pytest.raises(ValueError, match="update_rate"):
        DemoConfig(update_rate=-1)
    with pytest.raises(ValueError, match="stale_grace"):
        DemoConfig(stale_grace=-0.1)


def test_window_percentiles_are_nearest_rank() -> None:
    window = Window.of([float(n) for n in range(100, 0, -1)], timeouts=2)
    assert (window.count, window.p50, window.p99, window.max) == (100, 50.0, 99.0, 100.0)
    assert window.timeouts == 2
    assert Window.of([0.25]) == Window(1, 0.25, 0.25, 0.25)


def test_progress_lines_on_a_pipe_and_in_place_on_a_terminal() -> None:
    progress = Progress(1.0, 10.0, 1234, 0.99, 5, 2, 0.0015, 0)
    plain = io.StringIO()
    printer = ProgressPrinter(plain, tty=False)
    printer(progress)
    printer(progress)
    printer.done()
    assert plain.getvalue().count("\n") == 2
    assert "reads 1,234" in plain.getvalue()
    assert "\x1b" not in plain.getvalue()

    terminal = io.StringIO()
    printer = ProgressPrinter(terminal, tty=True)
    printer(progress)
    printer.done()
    assert "\n" not in terminal.getvalue()
    assert terminal.getvalue().startswith("\r\x1b[2K") and terminal.getvalue().endswith("\x1b[2K")


def _demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cachesync.cli", "demo", *args]


@pytest.mark.timeout(60)
def test_demo_command_prints_the_table() -> None:
    done = subprocess.run(
        _demo_command("--duration", "1", "--instances", "2", "--readers", "2"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    for heading in HEADINGS:
        assert heading in done.stdout
    assert "staleness window" in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(60)
def test_demo_command_json() -> None:
    done = subprocess.run(
        _demo_command("--duration", "1", "--instances", "2", "--readers", "2", "--json"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["reads"] > 0
    assert set(result["staleness"]) == {"count", "p50", "p99", "max", "timeouts"}
    assert len(result["instances"]) == 2


@pytest.mark.timeout(60)
def test_ctrl_c_stops_the_demo_with_partial_results() -> None:
    process = subprocess.Popen(
        _demo_command("--duration", "60", "--instances", "2", "--readers", "2"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        # The first progress line means the workload runs (and the handler is installed).
        while "reads" not in process.stderr.readline():
            assert process.poll() is None, "the demo ended before it began"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert "(interrupted)" in out
    assert "hit rate" in out
    assert "Traceback" not in err


@pytest.mark.timeout(60)
def test_demo_needs_no_web_framework() -> None:
    # A plain `pip install cachesync` has neither FastAPI nor uvicorn: block their import.
    code = (
        "import sys\n"
        "for name in ('fastapi', 'starlette', 'uvicorn'):\n"
        "    sys.modules[name] = None\n"
        "from cachesync.cli import main\n"
        "sys.exit(main(['demo', '--duration', '1', '--instances', '1', '--json']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reads"] > 0
