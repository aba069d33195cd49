"""CacheSync and Publisher lifecycles, stats and signing."""

from __future__ import annotations

import pytest

from cachesync import (
    CacheSync,
    ChangeEvent,
    ConfigError,
    Op,
    Publisher,
    StateError,
)
from cachesync.transports.memory import bus_for

from .helpers import Owner, eventually

pytestmark = pytest.mark.timeout(20)


async def test_a_closed_client_cannot_be_reopened(unique: str) -> None:
    sync = CacheSync(f"memory://{unique}")
    async with sync:
        with pytest.raises(StateError, match="already started"):
            await sync.start()
    with pytest.raises(StateError, match="create a new one"):
        await sync.start()
    await sync.stop()  # idempotent


async def test_stop_cancels_background_fetches(unique: str) -> None:
    import asyncio

    owner = Owner(USD=1.0)
    owner.gate = asyncio.Event()  # never opened
    sync = CacheSync(f"memory://{unique}")
    get = sync.cached("fx", ttl=60)(owner.fetch)
    await sync.start()
    reader = asyncio.create_task(get("USD"))
    await owner.started.wait()
    await sync.stop()
    with pytest.raises(asyncio.CancelledError):
        await reader


def test_unknown_scheme_is_a_config_error_with_password_redacted() -> None:
    with pytest.raises(ConfigError) as info:
        CacheSync("kafka://user:hunter2@localhost/")
    assert "hunter2" not in str(info.value)
    assert "kafka://user:***@localhost/" in str(info.value)
    assert "redis://" in str(info.value)


async def test_publisher_source_is_new_on_every_start_and_seq_grows_by_one(unique: str) -> None:
    url = f"memory://{unique}"
    received: list[ChangeEvent] = []
    bus = bus_for(url)
    publisher = Publisher(url, heartbeat_interval=None)
    async with CacheSync(url) as sync:
        sync.cached("fx", ttl=60)(Owner().fetch)
        original = sync.handle_message

        def spy(payload: bytes) -> None:
            received.append(ChangeEvent.decode(payload))
            original(payload)

        sync.handle_message = spy  # type: ignore[method-assign]
        async with publisher:
            first_source = publisher.source
            await publisher.changed("fx", "USD", version=3)
            await publisher.changed("fx", "EUR", "GBP")
            await publisher.deleted("fx", "CHF")
            await publisher.flush("fx")
        async with publisher:
            await publisher.changed("fx", "USD")
        await eventually(lambda: len(received) == 5)
    assert bus.published == 5
    assert [e.seq for e in received] == [1, 2, 3, 4, 1]
    assert [e.op for e in received] == [Op.UPSERT, Op.UPSERT, Op.DELETE, Op.FLUSH, Op.UPSERT]
    assert received[4].source != first_source == received[0].source
    assert received[1].keys == ("EUR", "GBP")


async def test_publisher_refuses_bad_arguments(unique: str) -> None:
    async with Publisher(f"memory://{unique}", heartbeat_interval=None) as pub:
        with pytest.raises(ValueError, match="exactly one key"):
            await pub.changed("fx", "A", "B", value={"x": 1})
        with pytest.raises(ValueError, match="at least one key"):
            await pub.changed("fx")
        with pytest.raises(TypeError, match="strings"):
            await pub.changed("fx", 5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="ns"):
            await pub.changed("", "A")
    with pytest.raises(StateError, match="not started"):
        await Publisher(f"memory://{unique}").changed("fx", "A")


async def test_signed_events_only(unique: str) -> None:
    url = f"memory://{unique}"
    key = b"k" * 32
    owner = Owner(USD=1.0)
    async with CacheSync(url, signing_keys=[b"new-key-0123456789", key]) as sync:
        get = sync.cached("fx", ttl=60)(owner.fetch)
        async with (
            Publisher(url, heartbeat_interval=None, signing_key=key) as signed,
            Publisher(url, heartbeat_interval=None) as unsigned,
            Publisher(url, heartbeat_interval=None, signing_key=b"x" * 32) as wrong,
        ):
            await signed.changed("fx", "A")
            await eventually(lambda: sync.stats()["listener"]["messages"] == 1)
            await get("USD")
            await unsigned.changed("fx", "USD")
            await wrong.changed("fx", "USD")
            await eventually(lambda: sync.stats()["listener"]["messages"] == 3)
            assert sync.stats()["listener"]["bad_signatures"] == 2
            await get("USD")
            assert owner.calls == 1  # forged invalidations were not applied
            await signed.changed("fx", "USD")
            await eventually(lambda: sync.stats()["namespaces"]["fx"]["invalidations"] == 1)


async def test_stats_shape(unique: str) -> None:
    async with CacheSync(f"memory://{unique}") as sync:
        get = sync.cached("fx", ttl=60)(Owner(USD=1).fetch)
        await get("USD")
        await get("USD")
        stats = sync.stats()
    fx = stats["namespaces"]["fx"]
    assert (fx["hits"], fx["misses"], fx["fetches"], fx["size"]) == (1, 1, 1, 1)
    for name in ("stale_serves", "events", "errors", "fetch_errors"):
        assert fx[name] == 0
    for name in ("gaps", "source_changes", "reconnects", "heartbeat_misses", "bad_events"):
        assert name in stats["listener"]


def test_public_names_are_pinned() -> None:
    import cachesync

    assert set(cachesync.__all__) >= {
        "CacheSync",
        "Publisher",
        "ChangeEvent",
        "EventDecodeError",
        "ConfigError",
        "TransportError",
        "FetchError",
    }
    for name in cachesync.__all__:
        assert hasattr(cachesync, name)


@pytest.mark.parametrize("kind", ["memory", "redis", "redis+stream"])
async def test_send_many_publishes_consecutive_seqs_in_order(
    kind: str, request: pytest.FixtureRequest, unique: str
) -> None:
    from cachesync.publisher import Change

    if kind == "memory":
        url = f"memory://{unique}"
    else:
        url = str(request.getfixturevalue("redis_url"))
        url = url.replace("redis://", "redis+stream://") if kind == "redis+stream" else url
    received: list[ChangeEvent] = []
    async with CacheSync(url, channel=unique) as sync:
        original = sync.handle_message

        def spy(payload: bytes) -> None:
            received.append(ChangeEvent.decode(payload))
            original(payload)

        sync.handle_message = spy  # type: ignore[method-assign]
        async with Publisher(url, channel=unique, heartbeat_interval=None) as pub:
            changes = [Change(Op.UPSERT, "fx", (f"K{i}",), version=i) for i in range(50)]
            events = await pub.send_many(changes)
            assert [e.seq for e in events] == list(range(1, 51))
            assert await pub.send_many([]) == []
            await eventually(lambda: len(received) == 50)
    assert [e.keys[0] for e in received] == [f"K{i}" for i in range(50)]
    assert sync.stats()["listener"]["gaps"] == 0


async def test_every_long_running_object_has_one_lifecycle_and_one_stats_shape(
    unique: str,
) -> None:
    """start()/stop(), ``async with`` (``with`` for the blocking publisher), and a ``stats()``
    that returns a plain dict."""
    from cachesync import BlockingPublisher, ConsistencyMonitor, HttpFetcher
    from cachesync.lifecycle import Service

    url = f"memory://{unique}"
    sync = CacheSync(url)

    async def current_version(key: str) -> int | None:
        return None

    async with Publisher(url, heartbeat_interval=None) as publisher, sync:
        await publisher.changed("fx", "USD")
        monitor = ConsistencyMonitor(sync, "fx", current_version)
        async with monitor:
            for service in (publisher, sync, monitor):
                assert isinstance(service, Service)
                assert isinstance(service.stats(), dict)
        assert publisher.stats()["published"] == 1
    async with HttpFetcher("http://owner.invalid", "/x/{key}") as fetcher:
        assert isinstance(fetcher.stats(), dict)
    with BlockingPublisher(url, heartbeat_interval=None) as blocking:
        blocking.changed("fx", "EUR")
        assert blocking.stats()["published"] == 1
    assert blocking.close == blocking.stop
