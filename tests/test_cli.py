"""The ``cachesync`` command: help, usage and runtime errors, and each command's work."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from cachesync import Publisher, cli
from cachesync.cli import CommandError, UsageError, bench, fetch_state, listen, main, publish
from cachesync.demo.owner import Owner, build_app
from cachesync.transports import base
from cachesync.transports.base import from_url
from cachesync.transports.memory import bus_for

from .asgiserver import AsgiServer
from .helpers import eventually

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["demo", "listen", "publish", "state", "bench"]


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cachesync.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- help and usage -------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cachesync {command}")


@pytest.mark.timeout(10)
def test_top_level_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.timeout(10)
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("cachesync 0.")


@pytest.mark.timeout(10)
def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: cachesync" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_help_through_the_module_entry_point() -> None:
    done = _cli("publish", "--help")
    assert done.returncode == 0
    assert "--op {upsert,delete,flush}" in done.stdout


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["publish", "memory://x", "ns"], "needs at least one KEY"),
        (["publish", "memory://x", "ns", "k", "--op", "flush"], "give no KEY"),
        (["publish", "memory://x", "ns", "a", "b", "--value", "1"], "exactly one KEY"),
        (["publish", "memory://x", "ns", "k", "--value", "{bad"], "not valid JSON"),
        (["publish", "memory://x", "ns", "k", "--op", "move"], "invalid choice"),
        (["demo", "--duration", "0"], "must be a positive number"),
        (["demo", "--instances", "two"], "not a whole number"),
        (["demo", "--update-rate", "nan"], "finite"),
        (["listen", "memory://x", "--count", "0"], ">= 1"),
        (["state", "localhost:8000"], "base URL, like http://"),
        (["listen", "memory://x", "--bogus"], "unrecognized arguments: --bogus"),
        (["publish", "memory://x", "", "k"], "non-empty namespace"),
        (["publish", "memory://x", "n" * 257, "k"], "at most 256 characters"),
        (["listen", "memory://x", "--ns", ""], "non-empty namespace"),
        (["publish", "memory://x", "ns", "k", "--channel", ""], "non-empty channel"),
        (["listen", "memory://x", "--channel", ""], "non-empty channel"),
        (["cdc", "postgresql://h/db", "--channel", ""], "non-empty channel"),
        (["publish", "memory://x", "ns", "k", "--value", "NaN"], "NaN is not a JSON number"),
        (["publish", "memory://x", "ns", "k", "--value", "[-Infinity]"], "not a JSON number"),
        (["publish", "memory://x", "ns", "k", "--signing-key", "short"], "at least 16 bytes"),
        (["listen", "memory://x", "--signing-key", "short"], "at least 16 bytes"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: cachesync" in err
    [error] = [line for line in err.splitlines() if "error:" in line]
    assert message in error


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://x?max_backlog=0", "max_backlog='0' is not valid"),
        ("redis+stream://127.0.0.1:1/0?maxlen=0", "maxlen='0' is not valid"),
        ("memory://x?maxlen=0", "unknown option 'maxlen'"),
    ],
)
@pytest.mark.parametrize("command", ["publish", "listen"])
def test_bad_url_options_are_one_line(
    url: str, message: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, url, "ns", "k"] if command == "publish" else [command, url]
    assert main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("cachesync: note:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


@pytest.mark.timeout(10)
def test_a_value_error_from_the_library_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("first line\n  second line")

    monkeypatch.setattr(cli, "publish", refuse)
    assert main(["publish", "memory://x", "ns", "k"]) == 1
    err = capsys.readouterr().err
    assert "cachesync: error: first line second line\n" in err
    assert "Traceback" not in err


# -- runtime errors -------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "argv",
    [
        ["listen", "foo://user:s3cret@broker/"],
        ["publish", "foo://user:s3cret@broker/", "ns", "k"],
        ["demo", "--url", "foo://user:s3cret@broker/"],
    ],
)
def test_unknown_scheme_is_one_line_with_the_password_hidden(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert len(error_lines) == 1
    assert "foo://user:***@broker/" in error_lines[0]
    assert "unknown transport scheme" in error_lines[0]
    assert "s3cret" not in err
    assert "Traceback" not in err


@pytest.mark.timeout(30)
def test_unknown_scheme_in_a_real_process_has_no_traceback() -> None:
    done = _cli("listen", "foo://user:s3cret@broker/")
    assert done.returncode == 1
    assert done.stderr.startswith("cachesync: error: unknown transport scheme")
    assert "s3cret" not in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(10)
def test_a_missing_transport_module_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What a user sees while a scheme's transport is not part of their installation.
    monkeypatch.setitem(
        base._SCHEMES, "nosuch", ("cachesync.transports.nosuch", "NoSuchTransport", "nosuch")
    )
    assert main(["publish", "nosuch://user:s3cret@host/", "ns", "k"]) == 1
    err = capsys.readouterr().err
    assert "cachesync.transports.nosuch" in err
    assert "nosuch://user:***@host/" in err
    assert "s3cret" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.timeout(20)
def test_state_of_an_unreachable_owner(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["state", "http://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cachesync: error: could not reach the owner at http://127.0.0.1:1/")
    assert "Traceback" not in err


@pytest.mark.timeout(30)
def test_ctrl_c_stops_listen_quietly() -> None:
    listener = subprocess.Popen(
        [sys.executable, "-m", "cachesync.cli", "listen", "memory://cli-ctrl-c"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stderr is not None
        while not listener.stderr.readline().startswith("listening on"):
            assert listener.poll() is None, "listen ended before it subscribed"
        listener.send_signal(signal.SIGINT)
        out, err = listener.communicate(timeout=20)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    assert listener.returncode == 130
    assert out == ""
    assert "Traceback" not in err


# -- listen and publish, in-process over memory:// ------------------------------------------


async def _listening(
    url: str, out: io.StringIO, err: io.StringIO, **options: object
) -> asyncio.Task[int]:
    ready = asyncio.Event()
    task = asyncio.create_task(
        listen(url, out=out, err=err, on_ready=ready.set, **options)  # type: ignore[arg-type]
    )
    try:
        await asyncio.wait_for(ready.wait(), 5)
    except BaseException:
        task.cancel()
        raise
    return task


async def _finish(task: asyncio.Task[int]) -> int:
    try:
        return await asyncio.wait_for(task, 5)
    finally:
        task.cancel()


@pytest.mark.timeout(20)
async def test_publish_and_listen_round_trip_over_memory(unique: str) -> None:
    url = f"memory://cli-{unique}"
    out, err, printed = io.StringIO(), io.StringIO(), io.StringIO()
    task = await _listening(url, out, err, channel="prices", count=3)
    async with from_url(url) as raw:
        await raw.publish("prices", b"{not json")

    upsert = await publish(
        url, "currencies", ["USD"], channel="prices", version=7, value={"rate": 1.1}, out=printed
    )
    await publish(url, "currencies", ["EUR", "GBP"], channel="prices", op="delete", out=printed)
    await publish(url, "currencies", channel="prices", op="flush", out=printed)
    assert await _finish(task) == 0

    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["op"], e["keys"] if "keys" in e else []) for e in events] == [
        ("upsert", ["USD"]),
        ("delete", ["EUR", "GBP"]),
        ("flush", []),
    ]
    assert events[0]["version"] == 7 and events[0]["value"] == {"rate": 1.1}
    assert all(e["ns"] == "currencies" and e["seq"] == 1 for e in events)
    assert json.loads(printed.getvalue().splitlines()[0]) == events[0]
    assert upsert.source == events[0]["source"]

    errors = [json.loads(line) for line in err.getvalue().splitlines() if line.startswith("{")]
    assert errors == [{"error": "not valid JSON", "payload": "{not json"}]
    assert "listening on memory://cli-" in err.getvalue()


@pytest.mark.timeout(20)
async def test_listen_filters_by_namespace(unique: str) -> None:
    url = f"memory://cli-{unique}"
    out, err = io.StringIO(), io.StringIO()
    task = await _listening(url, out, err, ns="tariffs", count=1)
    async with Publisher(url, heartbeat_interval=0.05) as publisher:
        await asyncio.sleep(0.2)  # a few heartbeats, which --ns leaves out
        await publisher.changed("currencies", "USD")
        await publisher.changed("tariffs", "basic", version=2)
        assert await _finish(task) == 0
    [event] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (event["ns"], event["keys"], event["version"]) == ("tariffs", ["basic"], 2)


@pytest.mark.timeout(20)
async def test_listen_reports_a_lost_subscription(unique: str) -> None:
    url = f"memory://cli-{unique}"
    task = await _listening(url, io.StringIO(), io.StringIO())
    bus_for(url).disconnect_all()
    with pytest.raises(CommandError, match="lost the subscription on memory://cli-"):
        await _finish(task)


@pytest.mark.timeout(10)
async def test_publish_refuses_arguments_that_do_not_go_together() -> None:
    with pytest.raises(UsageError):
        await publish("memory://x", "ns", [], op="delete")
    with pytest.raises(UsageError):
        await publish("memory://x", "ns", ["a"], op="delete", value={"v": 1})


@pytest.mark.timeout(10)
def test_an_unexpected_error_is_one_line_and_the_traceback_is_on_demand(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot talk to redis://app:s3cret@cache:6379\nsecond line")

    monkeypatch.setattr(cli, "publish", broken)
    argv = ["publish", "redis://app:s3cret@cache:6379/0", "ns", "k"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unexpected RuntimeError: cannot talk to redis://app:***@cache:6379 second line" in err
    assert "CACHESYNC_DEBUG=1" in err and "s3cret" not in err and "Traceback" not in err
    monkeypatch.setenv("CACHESYNC_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(argv)


# -- signing --------------------------------------------------------------------------------

KEY = "k" * 16
OLD_KEY = "o" * 16


@pytest.mark.timeout(20)
async def test_publish_signs_and_listen_verifies(unique: str) -> None:
    url = f"memory://cli-{unique}"
    out, err, printed = io.StringIO(), io.StringIO(), io.StringIO()
    task = await _listening(url, out, err, ns="items", count=2, signing_keys=[KEY, OLD_KEY])
    await publish(url, "items", ["unsigned"], out=printed)
    await publish(url, "items", ["forged"], signing_key="x" * 16, out=printed)
    await publish(url, "items", ["a"], signing_key=KEY, out=printed)
    await publish(url, "items", ["b"], signing_key=OLD_KEY, out=printed)
    assert await _finish(task) == 0
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["keys"] for e in events] == [["a"], ["b"]]
    assert all(e["sig"] for e in events)
    errors = [json.loads(line) for line in err.getvalue().splitlines() if line.startswith("{")]
    assert [e["error"] for e in errors] == ["not signed", "bad signature"]


@pytest.mark.timeout(20)
async def test_a_signed_event_reaches_a_client_with_the_key(unique: str) -> None:
    from cachesync import CacheSync

    url = f"memory://cli-{unique}"
    async with CacheSync(url, signing_keys=[KEY]) as sync:
        await publish(url, "items", ["a"], signing_key="x" * 16, out=io.StringIO())
        await publish(url, "items", ["a"], signing_key=KEY, out=io.StringIO())
        await eventually(lambda: sync.stats()["listener"]["messages"] >= 2, timeout=5)
        assert sync.stats()["listener"]["bad_signatures"] == 1


@pytest.mark.timeout(10)
def test_the_signing_key_may_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CACHESYNC_SIGNING_KEY", KEY)
    assert main(["publish", f"memory://cli-{unique}", "items", "a"]) == 0
    event = json.loads(capsys.readouterr().out)
    assert event["sig"]


# -- state ----------------------------------------------------------------------------------


@pytest.fixture
async def owner_url(unique: str) -> AsyncIterator[tuple[str, Publisher]]:
    publisher = Publisher(f"memory://cli-{unique}", "prices", heartbeat_interval=None)
    async with publisher, AsgiServer(build_app(Owner(publisher))) as server:
        yield server.url, publisher


@pytest.mark.timeout(20)
async def test_state_reads_the_owner_state(owner_url: tuple[str, Publisher]) -> None:
    url, publisher = owner_url
    await publisher.changed("currencies", "USD")
    state = await fetch_state(url + "/")
    assert state["source"] == publisher.source
    assert state["channels"]["prices"]["seq"] == 1


@pytest.mark.timeout(20)
async def test_state_of_something_that_is_not_an_owner() -> None:
    async with AsgiServer(FastAPI()) as server:
        with pytest.raises(CommandError, match="answered 404"):
            await fetch_state(server.url)


# -- bench ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_bench_forwards_its_arguments(tmp_path: Path) -> None:
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "__main__.py").write_text(
        "import pathlib, sys\n"
        "pathlib.Path('argv.json').write_text(__import__('json').dumps(sys.argv[1:]))\n"
        "sys.exit(3)\n"
    )
    assert bench(["--full", "-n", "2"], root=tmp_path) == 3
    assert json.loads((tmp_path / "argv.json").read_text()) == ["--full", "-n", "2"]


@pytest.mark.timeout(10)
def test_bench_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="no benchmarks/"):
        bench([], root=tmp_path)
    (tmp_path / "benchmarks").mkdir()
    with pytest.raises(CommandError, match="has no __main__.py"):
        bench([], root=tmp_path)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("argv", "forwarded"),
    [
        (["bench"], []),
        (["bench", "--full", "-n", "2", "x"], ["--full", "-n", "2", "x"]),
        (["bench", "--", "--help"], ["--help"]),
    ],
)
def test_bench_command_line(
    argv: list[str], forwarded: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_bench(args: list[str]) -> int:
        calls.append(list(args))
        return 0

    monkeypatch.setattr(cli, "bench", fake_bench)
    assert main(argv) == 0
    assert calls == [forwarded]


# -- across processes, over real brokers ----------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("server", "module"),
    [("redis", "cachesync.transports.redis"), ("rabbitmq", "cachesync.transports.amqp")],
)
def test_listen_and_publish_across_processes(
    server: str, module: str, unique: str, request: pytest.FixtureRequest
) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not part of this installation")
    url: str = request.getfixturevalue("redis_url" if server == "redis" else "amqp_url")
    channel = f"cli-{unique}"
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cachesync.cli",
            "listen",
            url,
            "--channel",
            channel,
            "--count",
            "2",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stderr is not None
        first = listener.stderr.readline()
        assert first.startswith("listening on"), first + listener.stderr.read()
        asyncio.run(_publish_raw(url, channel, b"\x00garbage"))
        published = _cli(
            "publish", url, "currencies", "USD", "--channel", channel,
            "--version", "3", "--value", '{"rate": 0.92}',
        )  # fmt: skip
        assert published.returncode == 0, published.stderr
        assert (
            _cli("publish", url, "currencies", "--channel", channel, "--op", "flush").returncode
            == 0
        )
        out, err = listener.communicate(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    assert listener.returncode == 0, err
    upsert, flush = (json.loads(line) for line in out.splitlines())
    assert upsert == json.loads(published.stdout)
    assert (upsert["op"], upsert["keys"], upsert["version"]) == ("upsert", ["USD"], 3)
    assert upsert["value"] == {"rate": 0.92}
    assert (flush["op"], flush["ns"]) == ("flush", "currencies")
    assert json.loads(err.strip().splitlines()[-1])["error"] == "not valid JSON"


async def _publish_raw(url: str, channel: str, payload: bytes) -> None:
    async with from_url(url) as transport:
        await transport.publish(channel, payload)
