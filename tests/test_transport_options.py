"""URL options parsed in one place with clear errors; passwords never shown; the shared
connection state. Pure tests, plus a few against the real Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from cachesync import CacheSync, Publisher
from cachesync.errors import ConfigError, StateError, TransportError
from cachesync.transports.base import (
    ConnectionState,
    Connector,
    from_url,
    int_option,
    parse_options,
    redact_url,
    scrub,
)

from .helpers import eventually

pytestmark = pytest.mark.timeout(20)


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "option", "expected"),
    [
        ("memory://x?max_backlog=abc", "max_backlog='abc'", "an integer >= 1"),
        ("memory://x?max_backlog=0", "max_backlog='0'", "an integer >= 1"),
        ("redis://h/0?health_check_interval=soon", "health_check_interval='soon'", ">= 0"),
        ("redis://h/0?socket_timeout=-1", "socket_timeout='-1'", "positive"),
        ("redis+stream://h/0?maxlen=lots", "maxlen='lots'", "an integer >= 1"),
        ("amqp://h/?confirm=maybe", "confirm='maybe'", "1 or 0"),
        ("amqp://h/?max_backlog=", "max_backlog=''", "an integer >= 1"),
    ],
)
def test_a_bad_option_names_itself_and_what_it_expects(
    url: str, option: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        from_url(url)
    message = str(caught.value)
    assert option in message and expected in message, message


def test_an_unknown_option_is_refused_where_nothing_else_takes_it() -> None:
    with pytest.raises(ConfigError, match="unknown option 'max_backlg'.*knows: max_backlog"):
        from_url("memory://x?max_backlg=5")


def test_keywords_win_over_the_url_and_are_checked_alike() -> None:
    values, rest = parse_options(
        "memory://x?n=5&other=1",
        [int_option("n", 1)],
        passthrough=True,
        keywords={"n": 7},
    )
    assert values == {"n": 7} and rest == [("other", "1")]
    with pytest.raises(ConfigError, match="n=0 is not valid: expected an integer >= 1"):
        parse_options("memory://x", [int_option("n", 1)], keywords={"n": 0})


# -- passwords --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://h:6379/0?password=s3cret", "redis://h:6379/0?password=***"),
        (
            "rediss://:s3cret@h/0?client_name=a&password=s3cret",
            "rediss://:***@h/0?client_name=a&password=***",
        ),
        ("amqp://guest:s3cret@h/?name=x", "amqp://guest:***@h/?name=x"),
        # An unencoded / ? or # ends the host part early: urlsplit reads host "guest", port
        # "s3" and no password.
        ("amqp://guest:s3/cret@h1,h2/vh", "amqp://guest:***@h1,h2/vh"),
        ("redis://:s3?cret@h/0", "redis://:***@h/0"),
        ("amqp://guest:s3#cret@h/?password=x", "amqp://guest:***@h/?password=***"),
        ("amqp://guest:guest@h:5672/?name=me@web-1", "amqp://guest:***@h:5672/?name=me@web-1"),
        ("amqp://u:s3cret@h1:5672,h2/?name=me@web-1", "amqp://u:***@h1:5672,h2/?name=me@web-1"),
        ("amqp://h1:5672,h2/?name=me@web-1", "amqp://h1:5672,h2/?name=me@web-1"),
        ("amqp://[::1],h2/?name=me@web-1", "amqp://[::1],h2/?name=me@web-1"),
        ("redis://h/0", "redis://h/0"),
    ],
)
def test_redact_url_hides_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    for secret in ("s3cret", "s3/cret", "s3?cret", "s3#cret"):
        if secret in url:
            assert secret not in scrub(f"error from {url}: AUTH {secret} failed", url)


@pytest.mark.parametrize(
    "scheme", ["amqp", "amqp+stream", "nats", "redis+sentinel", "redis", "redis+stream"]
)
def test_a_password_cut_by_an_unencoded_slash_is_refused_without_showing_it(scheme: str) -> None:
    with pytest.raises(ConfigError, match="percent-encode") as caught:
        from_url(f"{scheme}://guest:s3/cret@h1:1234,h2/")
    assert "s3" not in str(caught.value) and "cret" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0?password=s3cret",
        "redis+stream://user:s3cret@127.0.0.1:1/0",
        "amqp://guest:s3cret@127.0.0.1:1/?name=x",
        "amqp://guest:s3cret%40x@127.0.0.1:1,[::1]:2,127.0.0.1:3/?name=x",
    ],
)
async def test_no_password_in_errors_logs_reprs_or_stats(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    transport = from_url(url, connect_timeout=0.3)
    assert "s3cret" not in repr(transport) and "s3cret" not in transport.safe_url
    with pytest.raises(TransportError) as caught:
        await transport.connect()
    await transport.close()
    chain: list[BaseException] = []
    error: BaseException | None = caught.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert not any("s3cret" in str(e) for e in chain), chain

    sync = CacheSync(url, connect_timeout=0.3, reconnect_initial=0.01)
    with pytest.raises(TransportError) as caught_sync:
        await sync.start()
    assert "s3cret" not in str(caught_sync.value)
    assert "s3cret" not in repr(sync.stats())
    assert "s3cret" not in caplog.text


async def test_no_password_in_the_state_endpoint_or_relay_stats(
    tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pytest.importorskip("fastapi")
    pytest.importorskip("sqlalchemy")
    import httpx
    from fastapi import FastAPI
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from cachesync.contrib.fastapi import state_router
    from cachesync.owner.outbox import Outbox, OutboxRelay
    from cachesync.transports.memory import MemoryTransport

    # A broker whose client quotes the URL, password and all, in its errors.
    url = f"memory://user:s3cret@{unique}?max_backlog=10"

    class Leaky(MemoryTransport):
        async def publish(self, channel: str, payload: bytes) -> None:
            raise TransportError(f"cannot reach {self.url}")

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'owner.db'}")
    await Outbox.create_table(engine)
    pub = Publisher(
        url, "state", transport=Leaky(url), heartbeat_interval=0.05, publish_timeout=0.1
    )
    relay = OutboxRelay(engine, pub, poll_interval=0.05, backoff_max=0.05)
    async with AsyncSession(engine) as session, session.begin():
        Outbox.add(session, "items", "k", version=1, channel="state")
    app = FastAPI()
    app.include_router(state_router(relay))
    try:
        async with pub, relay:
            await eventually(lambda: relay.stats()["publish_errors"] >= 1, timeout=10)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test"
            ) as client:
                response = await client.get("/cachesync/state")
            assert response.status_code == 200
            assert "last_error" in response.text  # the error is there, its password is not
            assert "s3cret" not in response.text
            assert unique not in response.text  # nor the broker's host
            assert response.json()["outbox"]["state"]["last_error"] == "broker"
            assert "s3cret" not in repr(relay.stats())
            assert "s3cret" not in caplog.text
    finally:
        await engine.dispose()


# -- TLS against a plain port ----------------------------------------------------------------


async def test_rediss_against_a_plain_port_says_so(redis_url: str) -> None:
    transport = from_url(redis_url.replace("redis://", "rediss://", 1), connect_timeout=1.0)
    with pytest.raises(TransportError) as caught:
        await transport.connect()
    await transport.close()
    message = str(caught.value)
    assert "TLS" in message and "redis://" in message, message
    assert "TimeoutError: )" not in message and not message.endswith("TimeoutError: ")


# -- the shared connection state ------------------------------------------------------------


async def test_the_connector_moves_through_its_states() -> None:
    connector = Connector("thing", 0.3)
    assert connector.state is ConnectionState.NEW
    with pytest.raises(StateError):
        connector.check_usable()
    attempts = 0

    async def failing() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("down")

    with pytest.raises(TransportError, match="gave up"):
        await connector.open(
            failing,
            retryable=(ConnectionError,),
            refused=lambda _exc: None,
            gave_up=lambda exc: TransportError(f"gave up: {exc}"),
        )
    assert attempts > 1  # retried with backoff
    # A failed connect is not a lifecycle error: publishing may go on trying.
    assert connector.state is ConnectionState.FAILED
    connector.check_usable()

    async def working() -> str:
        return "conn"

    assert (
        await connector.open(working, retryable=(), refused=lambda _e: None, gave_up=TransportError)
        == "conn"
    )
    assert connector.state is ConnectionState.OPEN
    connector.close()
    assert connector.state is ConnectionState.CLOSED
    with pytest.raises(StateError):
        connector.check_usable()


async def test_close_during_open_cancels_the_attempt_and_discards_what_it_opened() -> None:
    # The attempt is cancelled at once; one that returns all the same (a client library that
    # lost the cancellation) has what it opened thrown away.
    connector = Connector("thing", 30.0)
    waiting = asyncio.Event()
    discarded: list[str] = []

    async def stubborn() -> str:
        waiting.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # lost, as redis-py sometimes does
        return "conn"

    async def discard(conn: str) -> None:
        discarded.append(conn)

    opening = asyncio.create_task(
        connector.open(
            stubborn, retryable=(), refused=lambda _e: None, gave_up=TransportError, discard=discard
        )
    )
    await waiting.wait()
    started = time.monotonic()
    connector.close()
    with pytest.raises(TransportError, match="closed while connecting"):
        await opening
    assert time.monotonic() - started < 1.0
    assert discarded == ["conn"] and connector.state is ConnectionState.CLOSED


async def test_close_during_open_ends_an_attempt_that_hangs() -> None:
    # A node that takes the connection and never answers: close() does not wait for it.
    connector = Connector("thing", 30.0)
    waiting = asyncio.Event()
    cleaned_up: list[str] = []

    async def hanging() -> str:
        waiting.set()
        try:
            await asyncio.sleep(30)
        finally:
            cleaned_up.append("socket")
        return "conn"

    opening = asyncio.create_task(
        connector.open(hanging, retryable=(), refused=lambda _e: None, gave_up=TransportError)
    )
    await waiting.wait()
    connector.close()
    with pytest.raises(TransportError, match="closed while connecting"):
        await asyncio.wait_for(opening, 1.0)
    assert cleaned_up == ["socket"] and connector.state is ConnectionState.CLOSED


async def test_close_during_open_ends_an_attempt_that_loses_the_cancellation_and_hangs() -> None:
    # A client library that loses the cancellation and goes on waiting for a node that never
    # answers (seen with redis-py in its connect handshake): close() ends the connect all the
    # same, within the grace it gives the attempt, and what the attempt opens later is
    # thrown away.
    from cachesync.transports import base

    connector = Connector("thing", 30.0)
    waiting, answer = asyncio.Event(), asyncio.Event()
    discarded: list[str] = []

    async def deaf() -> str:
        waiting.set()
        while True:
            try:
                await answer.wait()
                return "conn"
            except asyncio.CancelledError:
                continue  # lost

    async def discard(conn: str) -> None:
        discarded.append(conn)

    opening = asyncio.create_task(
        connector.open(
            deaf, retryable=(), refused=lambda _e: None, gave_up=TransportError, discard=discard
        )
    )
    await waiting.wait()
    started = time.monotonic()
    connector.close()
    with pytest.raises(TransportError, match="closed while connecting"):
        await asyncio.wait_for(opening, 5.0)
    assert time.monotonic() - started < base.ATTEMPT_GRACE + 0.5
    assert connector.state is ConnectionState.CLOSED
    answer.set()  # the node answers at last
    await eventually(lambda: discarded == ["conn"])


async def test_close_during_the_backoff_ends_it() -> None:
    connector = Connector("thing", 30.0, initial=20.0, maximum=20.0)
    failed = asyncio.Event()

    async def failing() -> None:
        failed.set()
        raise ConnectionError("down")

    opening = asyncio.create_task(
        connector.open(
            failing, retryable=(ConnectionError,), refused=lambda _e: None, gave_up=TransportError
        )
    )
    await failed.wait()
    await asyncio.sleep(0)  # into the backoff of 10 to 20 s
    connector.close()
    with pytest.raises(TransportError, match="closed while connecting"):
        await asyncio.wait_for(opening, 1.0)
    assert connector.state is ConnectionState.CLOSED
