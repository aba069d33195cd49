"""Tags: entries tagged at fill time, dropped together by an event or locally, with the same
race guard as keys (a fill in flight when a tag invalidation lands stores nothing)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cachesync import CacheSync, ChangeEvent, Publisher

from .helpers import eventually

pytestmark = pytest.mark.timeout(20)

PRODUCTS = {
    "P1": {"sku": "P1", "supplier": 42},
    "P2": {"sku": "P2", "supplier": 42},
    "P3": {"sku": "P3", "supplier": 7},
}


def supplier_tags(value: dict[str, Any]) -> list[str]:
    return [f"supplier:{value['supplier']}"]


@pytest.fixture
async def sync(unique: str) -> AsyncIterator[CacheSync]:
    async with CacheSync(f"memory://{unique}") as client:
        yield client


def _tag_event(seq: int, ns: str, *tags: str) -> bytes:
    return ChangeEvent(
        source="owner", seq=seq, ns=ns, op="upsert", tags=tags, ts=time.time()
    ).encode()


async def test_a_tag_event_drops_every_tagged_entry_of_every_function(unique: str) -> None:
    async with (
        CacheSync(f"memory://{unique}") as sync,
        Publisher(f"memory://{unique}", heartbeat_interval=None) as publisher,
    ):

        @sync.cached("products", ttl=3600, tags=supplier_tags)
        async def product(sku: str) -> dict[str, Any]:
            return PRODUCTS[sku]

        @sync.cached("products", ttl=3600, tags=lambda key, value: [f"sku:{key}"])
        async def price(sku: str) -> float:
            return 1.0

        for sku in PRODUCTS:
            await product(sku)
            await price(sku)
        await publisher.changed("products", tags=["supplier:42", "sku:P3"])
        await eventually(lambda: "P1" not in product.cache)
        assert "P2" not in product.cache and "P3" in product.cache
        assert "P3" not in price.cache and "P1" in price.cache
        assert sync.explain("products", "P3")["functions"][0]["tags"] == ["supplier:7"]


async def test_invalidate_tags_locally(sync: CacheSync) -> None:
    @sync.cached("products", ttl=3600, tags=supplier_tags)
    async def product(sku: str) -> dict[str, Any]:
        return PRODUCTS[sku]

    for sku in PRODUCTS:
        await product(sku)
    assert product.invalidate_tags("supplier:42") == 2
    assert list(product.cache.keys()) == ["P3"]
    assert sync.invalidate_tags("products", "supplier:7") == 1
    assert product.invalidate_tags("supplier:nobody") == 0
    assert len(product.cache.tag_index or ()) == 0


async def test_a_fill_in_flight_is_not_stored_after_a_tag_invalidation(sync: CacheSync) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()
    owner = {"P1": {"sku": "P1", "supplier": 42, "price": 1}}
    calls = 0

    @sync.cached("products", ttl=3600, tags=supplier_tags)
    async def product(sku: str) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        value = dict(owner[sku])  # read now ...
        started.set()
        await gate.wait()  # ... answered later
        return value

    old = asyncio.create_task(product("P1"))
    await started.wait()
    owner["P1"] = {"sku": "P1", "supplier": 42, "price": 2}
    sync.handle_message(_tag_event(1, "products", "supplier:42"))
    gate.set()
    assert (await old)["price"] == 1  # began before the event
    assert "P1" not in product.cache  # but was not stored as fresh
    assert (await product("P1"))["price"] == 2
    assert calls == 2


async def test_a_batch_fill_in_flight_is_voided_by_a_tag_invalidation(sync: CacheSync) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    @sync.cached_many("products", ttl=3600, tags=supplier_tags)
    async def products(skus: list[str]) -> dict[str, Any]:
        answer = {sku: PRODUCTS[sku] for sku in skus}
        started.set()
        await gate.wait()
        return answer

    task = asyncio.create_task(products(["P1", "P3"]))
    await started.wait()
    sync.handle_message(_tag_event(1, "products", "supplier:42"))
    gate.set()
    assert len(await task) == 2
    assert len(products.cache) == 0  # conservative: every fill in flight was voided


async def test_a_tags_function_that_fails_stores_nothing(sync: CacheSync) -> None:
    @sync.cached("products", ttl=3600, tags=lambda value: [value["missing"]])
    async def product(sku: str) -> dict[str, Any]:
        return PRODUCTS[sku]

    assert await product("P1") == PRODUCTS["P1"]
    assert "P1" not in product.cache
    assert sync.stats()["namespaces"]["products"]["errors"] == 1


async def test_refresh_events_retag(sync: CacheSync) -> None:
    @sync.cached("products", ttl=3600, mode="refresh", tags=supplier_tags)
    async def product(sku: str) -> dict[str, Any]:
        return PRODUCTS[sku]

    await product("P1")
    moved = {"sku": "P1", "supplier": 7}
    event = ChangeEvent(
        source="owner", seq=1, ns="products", op="upsert", keys=("P1",), value=moved, ts=0.0
    )
    sync.handle_message(event.encode())
    assert await product("P1") == moved
    assert product.invalidate_tags("supplier:42") == 0
    assert product.invalidate_tags("supplier:7") == 1
