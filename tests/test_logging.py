"""Logs: credentials in URLs never reach a log record or an error message, and a flood of bad
input makes a handful of records while every bad message is still counted."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator

import pytest

from cachesync import CacheSync, ChangeEvent, ConfigError, Op, Publisher, TransportError, from_url
from cachesync.logutil import RateLimitedLogger
from cachesync.transports.memory import bus_for

from .helpers import FakeClock, Owner, eventually

SECRET = "s3cret-Pa55"
FLOOD = 10_000
# The client allows one record per reason every 10 s; a test that runs for less than that
# makes one record per reason, and a few unrelated ones (listener up, ...) are allowed.
HANDFUL = 5


def leaks(record: logging.LogRecord) -> list[str]:
    """Every place in ``record`` (message, arguments, extra fields, traceback) that shows the
    secret."""
    found = []
    if SECRET in record.getMessage():
        found.append("message")
    for name, value in vars(record).items():
        if SECRET in repr(value) or SECRET in str(value):
            found.append(name)
    if SECRET in logging.Formatter().format(record):
        found.append("formatted")
    return found


def exception_leaks(exc: BaseException) -> list[str]:
    """Where the secret shows in ``exc`` or the exceptions it was raised from."""
    found = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if SECRET in str(current) or SECRET in repr(current):
            found.append(type(current).__name__)
        for arg in current.args:
            if SECRET in repr(arg):
                found.append(f"{type(current).__name__}.args")
        current = current.__cause__ or current.__context__
    return found


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog
    assert not [(r.name, r.msg, leaks(r)) for r in caplog.records if leaks(r)]


@pytest.mark.timeout(10)
async def test_client_and_publisher_logs_redact_the_password(
    logs: pytest.LogCaptureFixture, unique: str
) -> None:
    url = f"memory://user:{SECRET}@{unique}"
    owner = Owner(USD=1.0)
    async with (
        CacheSync(url, reconnect_initial=0.01) as sync,
        Publisher(url, heartbeat_interval=0.05) as pub,
    ):
        get = sync.cached("fx")(owner.fetch)
        await get("USD")
        await pub.changed("fx", "USD", version=2)
        await eventually(lambda: sync.stats()["namespaces"]["fx"]["events"] == 1)
        sync.handle_message(b"{not json")
        bus_for(url).disconnect_all()  # listener down, then up again: both are logged
        await eventually(lambda: sync.stats()["listener"]["reconnects"] == 1)
        await sync.wait_ready(5)
        assert repr(sync._transport) == f"MemoryTransport('memory://user:***@{unique}')"
    urls = [r.url for r in logs.records if hasattr(r, "url")]
    assert len(urls) >= 3  # client up, listener down, publisher started
    assert all(":***@" in u for u in urls)
    messages = " ".join(r.getMessage() for r in logs.records)
    assert "listener down" in messages and "publisher started" in messages


@pytest.mark.timeout(10)
def test_url_errors_redact_the_password(logs: pytest.LogCaptureFixture) -> None:
    bad_urls = [
        f"nosuch://user:{SECRET}@host/",  # unknown scheme
        f"memory://user:{SECRET}@[::1",  # unparseable
        f"nosuch://:{SECRET}@host:99999/",  # out-of-range port
    ]
    for url in bad_urls:
        for make in (from_url, CacheSync, Publisher):
            with pytest.raises(ConfigError) as info:
                make(url)
            assert not exception_leaks(info.value), (make, url)
            assert "://" in str(info.value) or "unparseable" in str(info.value)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"redis://user:{SECRET}@127.0.0.1:1/0", id="redis-refused"),
        pytest.param(f"amqp://guest:{SECRET}@127.0.0.1:1/", id="amqp-refused"),
    ],
)
async def test_connection_errors_redact_the_password(
    logs: pytest.LogCaptureFixture, url: str
) -> None:
    """Nothing listens on port 1: the client gives up after connect_timeout, and neither its
    error, the errors it was raised from, nor the logs on the way show the password."""
    scheme = url.split("://")[0]
    module = {"redis": "cachesync.transports.redis", "amqp": "cachesync.transports.amqp"}[scheme]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    sync = CacheSync(url, connect_timeout=0.5, reconnect_initial=0.01)
    with pytest.raises(TransportError) as info:
        await sync.start()
    assert not exception_leaks(info.value)
    assert sync.listener_up is False


@pytest.mark.timeout(20)
async def test_a_refused_password_is_not_logged(
    logs: pytest.LogCaptureFixture, redis_url: str
) -> None:
    """A real Redis refuses the credentials; its error must not echo them either."""
    if importlib.util.find_spec("cachesync.transports.redis") is None:
        pytest.skip("cachesync.transports.redis is not written yet")
    url = redis_url.replace("redis://", f"redis://nobody:{SECRET}@", 1)
    sync = CacheSync(url, connect_timeout=0.5, reconnect_initial=0.01)
    with pytest.raises(TransportError) as info:
        await sync.start()
    assert not exception_leaks(info.value)


def malformed(i: int) -> bytes:
    """Ten kinds of bad message, cycling."""
    kinds = [
        b"",
        b"{",
        b"null",
        b"[1, 2]",
        b'{"v": 1}',
        b'{"v": 2, "source": "", "seq": 1, "op": "upsert", "ts": 0}',
        b'{"v": 1, "source": "s", "seq": -1, "op": "upsert", "ts": 0}',
        b'{"v": 1, "source": "s", "seq": 1, "op": "explode", "ts": 0}',
        b'{"v": 1, "source": "s", "seq": "1", "op": "upsert", "ts": 0}',
        b"\xff\xfe" + str(i).encode(),
    ]
    return kinds[i % len(kinds)]


def cachesync_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("cachesync")]


@pytest.mark.timeout(20)
async def test_a_flood_of_malformed_events_logs_a_handful(
    logs: pytest.LogCaptureFixture, unique: str
) -> None:
    async with CacheSync(f"memory://{unique}") as sync:
        logs.clear()
        for i in range(FLOOD):
            sync.handle_message(malformed(i))
        listener = sync.stats()["listener"]
        assert listener["bad_events"] == FLOOD
        assert listener["messages"] == FLOOD
        assert sync.listener_up
    bad = [r for r in cachesync_records(logs) if getattr(r, "reason", None) == "bad_event"]
    assert len(bad) == 1
    assert len(cachesync_records(logs)) <= HANDFUL


@pytest.mark.timeout(20)
async def test_a_flood_through_the_bus_and_bad_signatures_log_a_handful(
    logs: pytest.LogCaptureFixture, unique: str
) -> None:
    """The same through the real listener, mixed with well-formed events that are unsigned
    (the client requires signatures): each reason logs once, every message is counted."""
    url = f"memory://{unique}"
    async with CacheSync(url, signing_keys=["k" * 32]) as sync:
        logs.clear()
        bus = bus_for(url)
        unsigned = ChangeEvent(source="s", seq=1, ns="fx", op=Op.FLUSH, ts=0.0).encode()
        for i in range(FLOOD):
            bus.publish("cachesync", unsigned if i % 2 else malformed(i))
        await eventually(lambda: sync.stats()["listener"]["messages"] == FLOOD)
        listener = sync.stats()["listener"]
        assert listener["bad_events"] == FLOOD // 2
        assert listener["bad_signatures"] == FLOOD // 2
        assert sync.listener_up
    records = cachesync_records(logs)
    reasons = [getattr(r, "reason", None) for r in records]
    assert reasons.count("bad_event") == 1
    assert reasons.count("bad_signature") == 1
    assert len(records) <= HANDFUL


@pytest.mark.timeout(5)
def test_rate_limited_logger_reports_what_it_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    clock = FakeClock()
    warn = RateLimitedLogger(logging.getLogger("cachesync.test"), per_seconds=10, clock=clock)
    for _ in range(1000):
        warn.warning("bad_event", "dropped a malformed event")
        warn.warning("other", "something else")
    clock.advance(10)
    warn.warning("bad_event", "dropped a malformed event")
    records = [r for r in caplog.records if r.name == "cachesync.test"]
    assert [(r.reason, r.suppressed) for r in records] == [  # type: ignore[attr-defined]
        ("bad_event", 0),
        ("other", 0),
        ("bad_event", 999),
    ]


async def test_a_flood_of_unknown_schema_events_logs_a_handful(
    logs: pytest.LogCaptureFixture, unique: str
) -> None:
    async with CacheSync(f"memory://{unique}") as sync:
        logs.clear()
        for i in range(1000):
            ns = '"fx"' if i % 2 else "7"
            sync.handle_message(b'{"v": 99, "seq": 1, "ns": %s}' % ns.encode())
        assert sync.stats()["listener"]["unknown_schema"] == 1000
        assert sync.listener_up
    assert len(cachesync_records(logs)) <= HANDFUL
