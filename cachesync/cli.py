"""The ``cachesync`` command: a demo, and tools to watch and poke a running deployment.

    cachesync demo     run an owner and several consumer instances, and measure staleness
    cachesync listen   print the events on a channel as JSON lines
    cachesync publish  publish one event, as an owner would
    cachesync state    show an owner's publisher state (GET /cachesync/state)
    cachesync bench    run the benchmarks of a source checkout
    cachesync cdc      publish a database's committed changes (PostgreSQL, MySQL/MariaDB)

Exit status: 0 on success, 1 when the command failed (one line on stderr says why), 2 for a
usage error (the usage, then one line saying what is wrong), 130 when interrupted with Ctrl-C.
An unexpected error is one line too; ``CACHESYNC_DEBUG=1`` shows its traceback.

``publish --signing-key`` signs the event and ``listen --signing-key`` prints only the events
signed with one of the keys given, as a deployment with ``signing_key``/``signing_keys`` needs;
the key may also come from the ``CACHESYNC_SIGNING_KEY`` environment variable, which keeps it
out of the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__
from .errors import CacheSyncError, ConfigError, ConnectionLost, EventDecodeError
from .events import DEFAULT_CHANNEL, MAX_NS_LENGTH, ChangeEvent, Op
from .publisher import Publisher
from .signing import Signer
from .transports.base import from_url, redact_url, scrub

if TYPE_CHECKING:
    import httpx

    from .demo import DemoConfig, DemoResult, ProgressPrinter

__all__ = ["CommandError", "UsageError", "bench", "fetch_state", "listen", "main", "publish"]

SIGNING_KEY_ENV = "CACHESYNC_SIGNING_KEY"
DEBUG_ENV = "CACHESYNC_DEBUG"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A command failed for a reason the user can act on; reported in one line (exit 1)."""


class UsageError(Exception):
    """The arguments do not make sense together; reported with the usage (exit 2)."""


# -- the commands, callable in-process ------------------------------------------------------


async def listen(
    url: str,
    *,
    channel: str = DEFAULT_CHANNEL,
    ns: str | None = None,
    count: int | None = None,
    signing_keys: Sequence[bytes | str] = (),
    out: TextIO | None = None,
    err: TextIO | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Print every event on ``channel`` to ``out`` as one JSON line, until cancelled.

    With ``ns``, only events of that namespace are printed (so no heartbeats). With ``count``,
    returns after printing that many. A message that is not a valid event is printed to ``err``
    as a JSON line with an ``"error"`` field. ``on_ready`` is called once the subscription is
    live. With ``signing_keys``, an event without a signature made with one of them is not
    printed: it goes to ``err`` as a JSON line with an ``"error"`` field, as a consumer with
    those ``signing_keys`` would drop it. Raises :class:`CommandError` when the connection is
    lost.
    """
    signer = Signer(signing_keys) if signing_keys else None
    output = out or sys.stdout
    errors = err or sys.stderr
    printed = 0

    def ready(resumed: bool) -> None:
        errors.write(f"listening on {redact_url(url)}, channel {channel!r} (Ctrl-C to stop)\n")
        errors.flush()
        if on_ready is not None:
            on_ready()

    async with from_url(url) as transport:
        payloads = transport.subscribe(channel, ready)
        try:
            async for payload in payloads:
                try:
                    event = ChangeEvent.decode(payload)
                except EventDecodeError as exc:
                    _write_line(errors, {"error": str(exc), "payload": _preview(payload)})
                    continue
                if signer is not None and not signer.verify(event):
                    reason = "bad signature" if event.sig else "not signed"
                    _write_line(errors, {"error": reason, "payload": _preview(payload)})
                    continue
                if ns is not None and event.ns != ns:
                    continue
                _write_line(output, event.encode().decode())
                printed += 1
                if count is not None and printed >= count:
                    return 0
        except ConnectionLost as exc:
            raise CommandError(f"lost the subscription on {redact_url(url)}: {exc}") from None
        finally:
            # Leaving the loop early leaves the subscription suspended; close it now rather
            # than whenever the generator happens to be collected.
            aclose = getattr(payloads, "aclose", None)
            if aclose is not None:
                await aclose()
    raise CommandError(f"the subscription on {redact_url(url)} ended")


async def publish(
    url: str,
    ns: str,
    keys: Sequence[str] = (),
    *,
    channel: str = DEFAULT_CHANNEL,
    op: str = "upsert",
    version: int | None = None,
    value: Any = None,
    signing_key: bytes | str | None = None,
    out: TextIO | None = None,
) -> ChangeEvent:
    """Publish one event with a fresh :class:`~cachesync.Publisher` (no heartbeats), print it
    to ``out`` as a JSON line, and return it.

    ``op`` is ``upsert`` (``changed``, optionally carrying ``value`` for one key), ``delete``
    or ``flush`` (the whole namespace). ``signing_key`` signs the event. Raises
    :class:`UsageError` for arguments that do not go together.
    """
    _check_publish(op, keys, version, value)
    try:
        publisher = Publisher(url, channel, heartbeat_interval=None, signing_key=signing_key)
    except ConfigError:
        raise  # the URL: a runtime error, as for listen
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    async with publisher:
        if op == Op.UPSERT:
            event = await publisher.changed(ns, *keys, version=version, value=value)
        elif op == Op.DELETE:
            event = await publisher.deleted(ns, *keys, version=version)
        else:
            event = await publisher.flush(ns)
    if signing_key is not None:
        event = Signer([signing_key]).sign(event)  # print it as it went on the wire
    _write_line(out or sys.stdout, event.encode().decode())
    return event


def _check_publish(name: str, keys: Sequence[str], version: int | None, value: Any) -> None:
    if name not in (Op.UPSERT, Op.DELETE, Op.FLUSH):
        raise UsageError(f"--op must be upsert, delete or flush, not {name!r}")
    op = Op(name)
    if op in (Op.UPSERT, Op.DELETE) and not keys:
        raise UsageError(f"--op {op.value} needs at least one KEY")
    if op is Op.FLUSH and (keys or version is not None):
        raise UsageError("--op flush drops the whole namespace: give no KEY and no --version")
    if value is not None and (op is not Op.UPSERT or len(keys) != 1):
        raise UsageError("--value goes with --op upsert and exactly one KEY")


async def fetch_state(owner_url: str, *, timeout: float = 5.0) -> Any:
    """``GET {owner_url}/cachesync/state``: what the owner's publishers have sent.

    Raises :class:`CommandError` when the owner cannot be reached or does not answer JSON.
    """
    if not owner_url.startswith(("http://", "https://")):
        raise UsageError(
            f"give the owner's base URL, like http://127.0.0.1:8000 (got {owner_url!r})"
        )
    target = owner_url.rstrip("/") + "/cachesync/state"
    response = await _get(target, "the owner", timeout)
    if response.status_code != 200:
        raise CommandError(
            f"{redact_url(target)} answered {response.status_code}; is "
            f"{redact_url(owner_url)} the base URL of an owner that serves the cachesync "
            "state route?"
        )
    return _json(response, target)


async def fetch_explain(url: str, ns: str, key: str, *, timeout: float = 5.0) -> Any:
    """``GET {url}/cachesync/explain?ns=NS&key=KEY`` of a running consumer instance (one that
    mounts ``consumer_router``); ``url`` may also be the full explain URL."""
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"give the instance's base URL, like http://127.0.0.1:8001 (got {url!r})")
    base = url.rstrip("/")
    target = base if base.endswith("/explain") else base + "/cachesync/explain"
    shown = redact_url(target)
    response = await _get(target, "the instance", timeout, {"ns": ns, "key": key})
    if response.status_code == 404:
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):
            detail = None
        raise CommandError(
            f"{shown} answered 404: "
            + (
                str(detail)
                if detail and detail != "Not Found"
                else "does the instance mount consumer_router(sync)?"
            )
        )
    if response.status_code != 200:
        raise CommandError(f"{shown} answered {response.status_code}")
    return _json(response, target)


async def _get(
    target: str, who: str, timeout: float, params: dict[str, str] | None = None
) -> httpx.Response:
    """``GET target``; CommandError naming ``who`` when it cannot be reached."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await client.get(target, params=params)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        reason = str(exc) or type(exc).__name__
        raise CommandError(f"could not reach {who} at {redact_url(target)}: {reason}") from None


def _json(response: httpx.Response, target: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise CommandError(f"{redact_url(target)} did not answer JSON") from None


def bench(args: Sequence[str], *, root: Path | None = None) -> int:
    """Run ``python -m benchmarks ARGS`` in the source checkout at ``root`` (by default the
    directory that holds this package) and return its exit status."""
    root = root if root is not None else Path(__file__).resolve().parent.parent
    folder = root / "benchmarks"
    if not folder.is_dir():
        raise CommandError(
            f"no benchmarks/ next to the cachesync package (in {root}); `cachesync bench` "
            "runs the benchmarks of a source checkout: clone the repository and install it "
            "with `pip install -e '.[bench]'`"
        )
    if not (folder / "__main__.py").is_file():
        raise CommandError(
            f"{folder} has no __main__.py, so `python -m benchmarks` cannot run it; "
            "run a benchmark script from that folder directly"
        )
    try:
        status = subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=root).returncode
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 128 - status if status < 0 else status  # killed by signal N: 128 + N, as shells do


# -- argument parsing -----------------------------------------------------------------------


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def _json_value(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None


def _namespace(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must be a non-empty namespace name")
    if len(text) > MAX_NS_LENGTH:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_NS_LENGTH} characters long, got {len(text)}"
        )
    return text


def _channel(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must be a non-empty channel name")
    return text


def _signing_key(text: str) -> str:
    if len(text.encode()) < 16:
        raise argparse.ArgumentTypeError("a signing key must be at least 16 bytes long")
    return text


def _env_signing_keys() -> list[str]:
    key = os.environ.get(SIGNING_KEY_ENV)
    return [key] if key else []


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cachesync`` command."""
    parser = argparse.ArgumentParser(
        prog="cachesync",
        description="Coherent local caches for many service instances: a demo, and tools to "
        "watch and poke a deployment.",
        epilog="Run `cachesync COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"cachesync {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run an owner and several cached instances, and measure staleness",
        description="Start an owner service (FastAPI, served in this process) with an embedded "
        "publisher, and several consumer instances that cache its currencies; read and update "
        "them for a while, then print reads, hit rate, owner calls, events and the staleness "
        "window. Needs no server unless --url names one. Ctrl-C stops early with the results "
        "so far.",
    )
    demo.add_argument(
        "--duration",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="how long to run the workload (default: %(default)s)",
    )
    demo.add_argument(
        "--instances",
        type=_positive_int,
        default=4,
        metavar="N",
        help="consumer instances (default: %(default)s)",
    )
    demo.add_argument(
        "--readers",
        type=_positive_int,
        default=8,
        metavar="N",
        help="concurrent readers per instance (default: %(default)s)",
    )
    demo.add_argument(
        "--update-rate",
        type=_non_negative_float,
        default=5.0,
        metavar="PER_S",
        help="owner updates per second (default: %(default)s)",
    )
    demo.add_argument(
        "--url",
        metavar="URL",
        help="broker URL: memory://NAME, redis://HOST:PORT/DB, "
        "redis+stream://HOST:PORT/DB or amqp://USER:PASS@HOST/ "
        "(default: a fresh in-process memory:// bus)",
    )
    demo.add_argument(
        "--refresh",
        action="store_true",
        help="events carry the new value and consumers store it (mode='refresh') "
        "instead of dropping their copy and fetching it again",
    )
    demo.add_argument("--seed", type=int, metavar="N", help="seed the workload's randomness")
    demo.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    demo.set_defaults(parser=demo, handler=_cmd_demo)

    listen_ = commands.add_parser(
        "listen",
        help="print the events on a channel as JSON lines",
        description="Subscribe to CHANNEL on the broker at URL and print every event as one "
        "JSON line until Ctrl-C. Messages that are not valid events go to stderr as JSON "
        'lines with an "error" field.',
    )
    listen_.add_argument("url", metavar="URL", help="broker URL, e.g. redis://127.0.0.1:6379/0")
    listen_.add_argument(
        "--channel",
        type=_channel,
        default=DEFAULT_CHANNEL,
        help="channel to listen on (default: %(default)s)",
    )
    listen_.add_argument(
        "--ns",
        type=_namespace,
        metavar="NS",
        help="print only the events of this namespace (no heartbeats)",
    )
    listen_.add_argument(
        "--signing-key",
        dest="signing_keys",
        type=_signing_key,
        action="append",
        metavar="KEY",
        help="print only the events signed with KEY (repeat for several keys, as during a "
        f"rotation); default: ${SIGNING_KEY_ENV} when set. Others go to stderr",
    )
    listen_.add_argument(
        "--count", type=_positive_int, metavar="N", help="exit after printing N events"
    )
    listen_.set_defaults(parser=listen_, handler=_cmd_listen)

    publish_ = commands.add_parser(
        "publish",
        help="publish one event, as an owner would",
        description="Publish one change event on CHANNEL and print it. Every run is a new "
        "publisher (a new source), so consumers also flush their caches, as they do when an "
        "owner restarts.",
    )
    publish_.add_argument("url", metavar="URL", help="broker URL, e.g. redis://127.0.0.1:6379/0")
    publish_.add_argument("ns", metavar="NS", type=_namespace, help="namespace, e.g. items")
    publish_.add_argument(
        "keys", metavar="KEY", nargs="*", help="keys that changed (none for --op flush)"
    )
    publish_.add_argument(
        "--channel",
        type=_channel,
        default=DEFAULT_CHANNEL,
        help="channel to publish on (default: %(default)s)",
    )
    publish_.add_argument(
        "--signing-key",
        type=_signing_key,
        metavar="KEY",
        help=f"sign the event with KEY (at least 16 bytes); default: ${SIGNING_KEY_ENV} when set",
    )
    publish_.add_argument(
        "--op",
        choices=["upsert", "delete", "flush"],
        default="upsert",
        help="what happened (default: %(default)s)",
    )
    publish_.add_argument(
        "--version", type=int, metavar="V", help="the owner's version of the changed row"
    )
    publish_.add_argument(
        "--value",
        type=_json_value,
        metavar="JSON",
        help="the new value, for consumers in refresh mode (one KEY only)",
    )
    publish_.set_defaults(parser=publish_, handler=_cmd_publish)

    state = commands.add_parser(
        "state",
        help="show an owner's publisher state",
        description="GET OWNER_URL/cachesync/state and print the JSON it answers: what the "
        "owner's publishers have sent (source id and last seq per channel, heartbeat "
        "interval), to compare with what consumers have seen.",
    )
    state.add_argument(
        "owner_url", metavar="OWNER_URL", help="the owner's base URL, e.g. http://127.0.0.1:8000"
    )
    state.set_defaults(parser=state, handler=_cmd_state)

    explain = commands.add_parser(
        "explain",
        help="ask a running consumer why a key is or is not served from its cache",
        description="GET URL/cachesync/explain?ns=NS&key=KEY of a consumer instance that "
        "mounts consumer_router(sync), and print its answer: per function whether the key "
        "is cached, its version, age and expiry; the last event applied to it; the last "
        "flush of its namespace and why; the sources heard, their last seq and lag.",
    )
    explain.add_argument("url", metavar="URL", help="the instance's base URL")
    explain.add_argument("ns", metavar="NS", type=_namespace, help="the namespace")
    explain.add_argument("key", metavar="KEY", help="the key")
    explain.set_defaults(parser=explain, handler=_cmd_explain)

    bench_ = commands.add_parser(
        "bench",
        help="run the benchmarks (python -m benchmarks) of a source checkout",
        description="Run `python -m benchmarks` from the source checkout this cachesync comes "
        "from, passing every further argument on (put `--` first to pass --help).",
        usage="cachesync bench [-h] [-- ARGS ...]",
    )
    bench_.set_defaults(parser=bench_, handler=_cmd_bench)

    cdc = commands.add_parser(
        "cdc",
        help="publish a database's committed changes (PostgreSQL, MySQL/MariaDB)",
        description="Read the committed changes of the given tables from the database's own "
        "log (PostgreSQL logical decoding with pgoutput, or the MySQL/MariaDB row binlog) and "
        "publish them as cachesync events, until stopped with Ctrl-C or SIGTERM. Restarted, it "
        "resumes where it stopped: nothing committed is lost. Prints one JSON line when "
        "started, then its stats every --stats-interval seconds. Needs the cdc extra: "
        "pip install 'cachesync[cdc]'.",
    )
    cdc.add_argument(
        "dsn",
        metavar="DSN",
        help="postgresql://USER@HOST:PORT/DB or mysql://USER:PASS@HOST:PORT/DB",
    )
    cdc.add_argument(
        "--table",
        dest="tables",
        action="append",
        default=[],
        metavar="SPEC",
        help="TABLE:KEY[,KEY...][:version=COL][:value=*|COL,...][:ns=NAME], e.g. "
        "currencies:code or currencies:code:version=version:value=*; repeat for more tables",
    )
    cdc.add_argument("--to", dest="url", metavar="URL", help="broker URL, e.g. redis://HOST:6379/0")
    cdc.add_argument(
        "--channel", type=_channel, default=DEFAULT_CHANNEL, help="channel (default: %(default)s)"
    )
    cdc.add_argument(
        "--name",
        default="cachesync",
        help="what the feed keeps on the server: PostgreSQL slot and publication, MySQL "
        "position row (default: %(default)s); one running feed per name",
    )
    cdc.add_argument(
        "--stats-interval",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="print the feed's stats (lag included) every SECONDS; 0: never (the default)",
    )
    cdc.add_argument(
        "--drop-slot",
        action="store_true",
        help="remove what feed --name keeps on the server (slot and publication, stored "
        "position) and exit; for a feed retired for good",
    )
    cdc.set_defaults(parser=cdc, handler=_cmd_cdc)
    return parser


# -- the command handlers -------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    config = demo.DemoConfig(
        url=args.url,
        duration=args.duration,
        instances=args.instances,
        readers=args.readers,
        update_rate=args.update_rate,
        refresh=args.refresh,
        seed=args.seed,
    )
    printer = None
    if not args.json or sys.stderr.isatty():
        printer = demo.ProgressPrinter(sys.stderr)
        where = redact_url(args.url) if args.url else "an in-process memory:// bus"
        sys.stderr.write(
            f"cachesync demo: an owner and {config.instances} instances on {where}, "
            f"for {config.duration:g} s (Ctrl-C to stop early)\n"
        )
        sys.stderr.flush()
    result = asyncio.run(_run_demo(config, printer))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(demo.format_table(result))
    return EXIT_INTERRUPTED if result.interrupted else 0


async def _run_demo(config: DemoConfig, printer: ProgressPrinter | None) -> DemoResult:
    from .demo import run_demo

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        stop.set()
        # The first Ctrl-C ends the workload and reports; a second one stops at once.
        loop.remove_signal_handler(signal.SIGINT)

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        return await run_demo(
            config,
            stop=stop,
            on_progress=printer,
            progress_interval=0.25 if printer is not None and printer.tty else 1.0,
        )
    finally:
        if printer is not None:
            printer.done()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)


def _cmd_listen(args: argparse.Namespace) -> int:
    _warn_if_in_process(args.url, "nothing outside this process can publish to it")
    keys = args.signing_keys or _env_signing_keys()
    return asyncio.run(
        listen(args.url, channel=args.channel, ns=args.ns, count=args.count, signing_keys=keys)
    )


def _cmd_publish(args: argparse.Namespace) -> int:
    _warn_if_in_process(args.url, "no subscriber outside this process will see the event")
    asyncio.run(
        publish(
            args.url,
            args.ns,
            args.keys,
            channel=args.channel,
            op=args.op,
            version=args.version,
            value=args.value,
            signing_key=args.signing_key or next(iter(_env_signing_keys()), None),
        )
    )
    return 0


def _cmd_state(args: argparse.Namespace) -> int:
    state = asyncio.run(fetch_state(args.owner_url))
    print(json.dumps(state, indent=2))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    answer = asyncio.run(fetch_explain(args.url, args.ns, args.key))
    print(json.dumps(answer, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    return bench(args.extra)


def _cmd_cdc(args: argparse.Namespace) -> int:
    if not args.tables and not args.drop_slot:
        raise UsageError("name at least one --table")
    if not args.drop_slot and not args.url:
        raise UsageError("--to URL is required")
    try:
        from .owner.feeds import ChangeFeed, Table
    except ImportError as exc:  # pragma: no cover - only without the extra
        raise CommandError(str(exc)) from None
    try:
        tables = [Table.parse(spec) for spec in args.tables] or [Table("unused", ("unused",))]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        feed = ChangeFeed(
            args.dsn, tables, args.url or "memory://", channel=args.channel, name=args.name
        )
    except ImportError as exc:
        raise CommandError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.drop_slot:
        asyncio.run(feed.drop())
        _write_line(sys.stdout, {"dropped": args.name})
        return 0
    _warn_if_in_process(args.url, "no subscriber outside this process will see the events")
    return asyncio.run(_run_feed(feed, args.stats_interval))


async def _run_feed(feed: Any, stats_interval: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
    async with feed:
        _write_line(sys.stdout, {"started": feed.name, **feed.stats()})
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), stats_interval or None)
            if not stop.is_set():
                _write_line(sys.stdout, feed.stats())
    return 0


def _warn_if_in_process(url: str, consequence: str) -> None:
    if url.lower().startswith("memory:"):
        sys.stderr.write(f"cachesync: note: memory:// is a bus inside one process; {consequence}\n")


# -- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cachesync`` command with ``argv`` (default: ``sys.argv[1:]``); return the
    exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command == "bench":
            args.extra = extra[1:] if extra[:1] == ["--"] else extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
    except SystemExit as exc:  # argparse has printed the usage or the help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="cachesync: %(levelname)s: %(message)s")
    try:
        status: int = args.handler(args)
        return status
    except UsageError as exc:
        args.parser.print_usage(sys.stderr)
        _fail(f"{args.parser.prog}: error: {_one_line(str(exc))}")
        return EXIT_USAGE
    except (CommandError, CacheSyncError) as exc:
        _fail(f"cachesync: error: {_one_line(_explain(exc, getattr(args, 'url', None)))}")
        return EXIT_FAILED
    except ValueError as exc:
        # A value the library refused (ValueError is its "fix the argument" error): still
        # one line, whatever the message looks like.
        _fail(f"cachesync: error: {_one_line(str(exc))}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        # Anything else is a bug or an environment the command did not expect: still one
        # line (passwords redacted), and the traceback on demand.
        if os.environ.get(DEBUG_ENV):
            raise
        message = _one_line(str(exc))
        for url in (getattr(args, "url", None), getattr(args, "dsn", None)):
            if isinstance(url, str):
                message = scrub(message, url)
        _fail(
            f"cachesync: error: unexpected {type(exc).__name__}"
            + (f": {message}" if message else "")
            + f" (set {DEBUG_ENV}=1 for the traceback)"
        )
        return EXIT_FAILED


def _explain(exc: Exception, url: str | None) -> str:
    cause = exc.__cause__
    if (
        isinstance(exc, ConfigError)
        and isinstance(cause, ImportError)
        and (cause.name or "").startswith("cachesync.")
    ):
        # from_url blames a missing broker library, but here the transport itself is absent.
        return (
            f"cannot use {redact_url(url or '')!r}: its transport ({cause.name}) is missing "
            "from this installation of cachesync; use another URL scheme, e.g. memory://"
        )
    return str(exc)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _fail(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _write_line(stream: TextIO, line: str | dict[str, Any]) -> None:
    stream.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    stream.flush()


def _preview(payload: bytes, limit: int = 200) -> str:
    text = payload[:limit].decode("utf-8", errors="replace")
    return text + ("..." if len(payload) > limit else "")


if __name__ == "__main__":
    sys.exit(main())
