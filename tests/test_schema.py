"""Rolling deploys: publishers and consumers of different event schema versions side by side.

The rules: a consumer reads the current schema and the previous one; an owner told
``schema_version=1`` writes what a consumer of the previous release reads (tags become a flush
of the namespace); an event of a schema a consumer does not know is counted and flushes its
namespace (every namespace if the namespace cannot be read), never dropped as nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from cachesync import CacheSync, ChangeEvent, EventDecodeError, Publisher
from cachesync.errors import UnknownSchemaError
from cachesync.events import READABLE_SCHEMAS, SCHEMA_VERSION
from cachesync.transports.base import OnReady, Transport

from .helpers import eventually
from .schema_v1 import ChangeEventV1

pytestmark = pytest.mark.timeout(20)


class Recording(Transport):
    """A transport that keeps what is published (the bytes an old consumer would receive)."""

    def __init__(self) -> None:
        super().__init__("memory://recording")
        self.payloads: list[bytes] = []

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def publish(self, channel: str, payload: bytes) -> None:
        self.payloads.append(payload)

    async def publish_many(self, channel: str, payloads: Sequence[bytes]) -> None:
        self.payloads.extend(payloads)

    def subscribe(self, channel: str, on_ready: OnReady | None = None) -> Any:
        raise NotImplementedError


async def _publish_everything(publisher: Publisher) -> None:
    await publisher.changed("currencies", "USD", version=3)
    await publisher.changed("currencies", "EUR", value={"rate": 0.9}, version=2)
    await publisher.deleted("currencies", "GBP")
    await publisher.flush("currencies")
    await publisher.changed("products", tags=["supplier:42"])


async def test_an_old_consumer_reads_everything_a_schema_1_publisher_writes() -> None:
    recording = Recording()
    async with Publisher(transport=recording, schema_version=1, heartbeat_interval=60) as pub:
        await _publish_everything(pub)
    decoded = [ChangeEventV1.decode(payload) for payload in recording.payloads]
    assert all(event.v == 1 for event in decoded)
    ops = [event.op for event in decoded if event.op != "heartbeat"]
    assert ops == ["upsert", "upsert", "delete", "flush", "flush"]  # tags -> a namespace flush
    assert decoded[-1].ns == "products"
    assert [e.seq for e in decoded if e.op != "heartbeat"] == [1, 2, 3, 4, 5]  # no gap


async def test_an_old_consumer_cannot_read_tags_so_owners_wait() -> None:
    recording = Recording()
    async with Publisher(transport=recording, heartbeat_interval=None) as publisher:
        await publisher.changed("currencies", "USD")
        await publisher.changed("products", tags=["supplier:42"])
    assert json.loads(recording.payloads[0])["v"] == SCHEMA_VERSION == 2
    with pytest.raises(EventDecodeError):
        ChangeEventV1.decode(recording.payloads[0])  # why schema_version=1 exists


@pytest.fixture
async def consumer(unique: str) -> AsyncIterator[tuple[CacheSync, dict[str, int]]]:
    calls: dict[str, int] = {}
    async with CacheSync(f"memory://{unique}") as sync:

        @sync.cached("currencies", ttl=3600)
        async def get_currency(code: str) -> str:
            calls[code] = calls.get(code, 0) + 1
            return f"{code}-{calls[code]}"

        @sync.cached("products", ttl=3600, tags=lambda value: ["supplier:42"])
        async def get_product(sku: str) -> str:
            calls[sku] = calls.get(sku, 0) + 1
            return f"{sku}-{calls[sku]}"

        sync.test_reads = (get_currency, get_product)  # type: ignore[attr-defined]
        yield sync, calls


@pytest.mark.parametrize("schema_version", READABLE_SCHEMAS)
async def test_a_new_consumer_reads_both_schemas(
    unique: str, consumer: tuple[CacheSync, dict[str, int]], schema_version: int
) -> None:
    sync, calls = consumer
    get_currency, get_product = sync.test_reads  # type: ignore[attr-defined]
    assert await get_currency("USD") == "USD-1"
    assert await get_product("P1") == "P1-1"
    async with Publisher(
        f"memory://{unique}", schema_version=schema_version, heartbeat_interval=None
    ) as publisher:
        await publisher.changed("currencies", "USD", version=2)
        await eventually(lambda: "USD" not in get_currency.cache)
        assert await get_currency("USD") == "USD-2"
        await publisher.changed("products", tags=["supplier:42"])
        await eventually(lambda: "P1" not in get_product.cache)
        assert await get_product("P1") == "P1-2"
    listener = sync.stats()["listener"]
    assert listener["bad_events"] == 0 and listener["unknown_schema"] == 0
    assert listener["gaps"] == 0


def _future_event(**fields: Any) -> bytes:
    raw = {"v": SCHEMA_VERSION + 1, "source": "next", "seq": 1, "op": "upsert", "ts": time.time()}
    raw.update(fields)
    return json.dumps(raw).encode()


def test_an_unknown_schema_is_its_own_error_with_the_namespace() -> None:
    with pytest.raises(UnknownSchemaError) as info:
        ChangeEvent.decode(_future_event(ns="currencies", keys=["USD"], shiny=True))
    assert info.value.ns == "currencies" and info.value.version == SCHEMA_VERSION + 1
    with pytest.raises(UnknownSchemaError) as info:
        ChangeEvent.decode(_future_event(ns=7))
    assert info.value.ns is None
    with pytest.raises(EventDecodeError) as plain:
        ChangeEvent.decode(_future_event(v=1, seq="x"))  # a readable version, a bad field
    assert not isinstance(plain.value, UnknownSchemaError)


async def test_a_newer_schema_flushes_its_namespace_and_is_counted(
    consumer: tuple[CacheSync, dict[str, int]],
) -> None:
    sync, calls = consumer
    get_currency, get_product = sync.test_reads  # type: ignore[attr-defined]
    await get_currency("USD")
    await get_product("P1")
    sync.handle_message(_future_event(ns="currencies", keys=["USD"], shiny=True))
    assert "USD" not in get_currency.cache  # a possible loss in its namespace
    assert "P1" in get_product.cache  # another namespace keeps its entries
    assert sync.stats()["listener"]["unknown_schema"] == 1
    assert sync.listener_up
    assert await get_currency("USD") == "USD-2"


async def test_a_newer_schema_without_a_readable_namespace_flushes_everything(
    consumer: tuple[CacheSync, dict[str, int]],
) -> None:
    sync, calls = consumer
    get_currency, get_product = sync.test_reads  # type: ignore[attr-defined]
    await get_currency("USD")
    await get_product("P1")
    sync.handle_message(_future_event(ns=["not", "a", "name"]))
    assert "USD" not in get_currency.cache and "P1" not in get_product.cache
    assert sync.stats()["listener"]["unknown_schema"] == 1
    await asyncio.sleep(0)
    assert sync.listener_up


def test_publisher_schema_version_is_checked() -> None:
    with pytest.raises(ValueError, match="schema_version"):
        Publisher("memory://x", schema_version=3)
