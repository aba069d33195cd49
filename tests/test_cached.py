"""The @cached decorator: keys, options, sync functions, revalidation, and its handle."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from typing import get_type_hints

import pytest

from cachesync import CacheSync
from cachesync.cached import CacheOptions, CacheOptionsDict

from .helpers import FakeClock, Owner, eventually

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def sync(unique: str) -> AsyncIterator[CacheSync]:
    async with CacheSync(f"memory://{unique}") as client:
        yield client


async def test_unhashable_argument_says_to_pass_key(sync: CacheSync) -> None:
    @sync.cached("ns", ttl=60)
    async def get(query: dict[str, str]) -> int:
        return 1

    with pytest.raises(TypeError, match="pass key="):
        await get({"a": "b"})


async def test_custom_key_function(sync: CacheSync) -> None:
    owner = Owner(USD=1.0)

    @sync.cached("fx", ttl=60, key=lambda query: query["code"])
    async def get(query: dict[str, str]) -> float:
        return await owner.fetch(query["code"])

    await get({"code": "USD"})
    await get({"code": "USD"})
    assert owner.calls == 1
    assert "USD" in sync.namespace("fx")


async def test_key_function_must_return_str(sync: CacheSync) -> None:
    @sync.cached("ns", ttl=60, key=lambda x: x)
    async def get(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="must return a str"):
        await get(5)


async def test_default_key_joins_arguments(sync: CacheSync) -> None:
    @sync.cached("rates", ttl=60)
    async def rate(base: str, quote: str, *, day: int = 0) -> str:
        return f"{base}{quote}{day}"

    assert rate.key_for("EUR", "USD", day=3) == "EUR:USD:day=3"
    assert rate.key_for("EUR", quote="USD") == "EUR:USD:day=0"
    with pytest.raises(TypeError, match="quote"):
        rate.key_for("EUR")  # the same TypeError the function itself would raise

    @sync.cached("items", ttl=60)
    async def item(item_id: int) -> int:
        return item_id

    assert item.key_for(42) == item.key_for(item_id=42) == "42"
    await rate("EUR", "USD", day=3)
    assert "EUR:USD:day=3" in sync.namespace("rates")


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -5}, "ttl"),
        ({"maxsize": 0}, "maxsize"),
        ({"mode": "eventually"}, "mode"),
        ({"negative_ttl": -1}, "negative_ttl"),
        ({"stale_if_error": -1}, "stale_if_error"),
    ],
)
def test_bad_options_raise_value_error_naming_the_argument(
    options: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        CacheSync("memory://bad-options").cached("ns", **options)  # type: ignore[arg-type]


# A value for each option, unlike its default: a new field of CacheOptions fails the tests
# below until it has one here.
OPTION_SAMPLES: dict[str, object] = {
    "ttl": 60.0,
    "maxsize": 5,
    "key": lambda code: code,
    "mode": "refresh",
    "stale_while_revalidate": 1.0,
    "stale_if_error": 2.0,
    "negative_ttl": 3.0,
    "jitter": 0.0,
    "from_event": lambda value: value,
    "version_of": lambda value: 1,
    "tags": lambda value: ["t"],
    "max_bytes": 1_000,
    "weigher": len,
}


def test_every_option_is_accepted_by_cached_and_cached_many() -> None:
    names = [field.name for field in dataclasses.fields(CacheOptions)]
    assert sorted(OPTION_SAMPLES) == sorted(names)
    sync = CacheSync("memory://all-options")
    for name in names:
        value = OPTION_SAMPLES[name]
        extra: dict[str, object] = {"max_bytes": 10} if name == "weigher" else {}
        decorator = sync.cached("ns", **{name: value, **extra})  # type: ignore[arg-type]
        assert getattr(decorator.options, name) == value, name
        assert getattr(decorator.options, name) != getattr(CacheOptions(), name), name
        if name != "key":  # batch keys are the owner's keys
            many = sync.cached_many("ns", **{name: value, **extra})  # type: ignore[arg-type]
            assert getattr(many.options, name) == value, name
    everything = sync.cached("ns", **OPTION_SAMPLES)  # type: ignore[arg-type]
    assert everything.options == CacheOptions(**OPTION_SAMPLES)  # type: ignore[arg-type]


def test_the_keywords_of_cached_are_the_fields_of_cache_options() -> None:
    # The TypedDict that types **options in cached() is kept identical to CacheOptions.
    assert get_type_hints(CacheOptionsDict) == get_type_hints(CacheOptions)
    assert CacheOptionsDict.__required_keys__ == frozenset()


def test_an_unknown_option_is_a_type_error_naming_it() -> None:
    sync = CacheSync("memory://unknown-option")
    with pytest.raises(TypeError, match=r"cached\(\) got unknown options \['tll'\].*ttl"):
        sync.cached("ns", tll=60)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"cached_many\(\) got unknown options \['size'\]"):
        sync.cached_many("ns", size=3)  # type: ignore[call-arg]


async def test_invalidate_and_cache_clear(sync: CacheSync) -> None:
    owner = Owner(A=1, B=2)
    get = sync.cached("ns", ttl=60)(owner.fetch)
    await get("A")
    await get("B")
    assert get.invalidate("A")
    await get("A")
    await get("B")
    assert owner.calls == 3
    get.cache_clear()
    await get("B")
    assert owner.calls == 4


async def test_negative_results_are_cached_only_with_negative_ttl(sync: CacheSync) -> None:
    owner = Owner()
    plain = sync.cached("plain", ttl=60)(owner.fetch)
    assert await plain("nope") is None
    assert await plain("nope") is None
    assert owner.calls == 2
    negative = sync.cached("negative", ttl=60, negative_ttl=5)(owner.fetch)
    await negative("nope")
    await negative("nope")
    assert owner.calls == 3


async def test_stale_while_revalidate_serves_stale_and_refreshes_once(unique: str) -> None:
    clock = FakeClock()
    async with CacheSync(f"memory://{unique}", clock=clock) as sync:
        owner = Owner(USD=1.0)
        get = sync.cached("fx", ttl=10, jitter=0, stale_while_revalidate=30)(owner.fetch)
        await get("USD")
        owner.values["USD"] = 1.1
        clock.advance(15)
        assert [await get("USD") for _ in range(5)] == [1.0] * 5
        await eventually(lambda: owner.calls == 2)
        await eventually(lambda: sync.namespace("fx").get_fresh("USD") is not None)
        assert await get("USD") == 1.1
        assert sync.stats()["namespaces"]["fx"]["stale_serves"] == 5


async def test_sync_function_caches_and_is_callable_from_threads(sync: CacheSync) -> None:
    calls = 0

    @sync.cached("ns", ttl=60)
    def square(x: int) -> int:
        nonlocal calls
        calls += 1
        return x * x

    assert square(3) == 9
    results = await asyncio.gather(*(asyncio.to_thread(square, 3) for _ in range(8)))
    assert results == [9] * 8
    assert calls == 1
    assert square.__name__ == "square"


async def test_sync_stale_while_revalidate_refreshes_in_background(unique: str) -> None:
    clock = FakeClock()
    async with CacheSync(f"memory://{unique}", clock=clock) as sync:
        values = {"a": 1}
        refreshed = threading.Event()

        @sync.cached("ns", ttl=10, jitter=0, stale_while_revalidate=30)
        def get(key: str) -> int:
            if values[key] == 2:
                refreshed.set()
            return values[key]

        get("a")
        values["a"] = 2
        clock.advance(15)
        assert get("a") == 1
        assert await asyncio.to_thread(refreshed.wait, 5)
        await eventually(lambda: sync.namespace("ns").get_fresh("a") is not None)
        assert get("a") == 2


async def test_sync_failure_reaches_caller_and_caches_nothing(sync: CacheSync) -> None:
    calls = 0

    @sync.cached("ns", ttl=60)
    def get(key: str) -> int:
        nonlocal calls
        calls += 1
        raise LookupError("owner says 503")

    for _ in range(2):
        with pytest.raises(LookupError):
            get("a")
    assert calls == 2
    assert sync.stats()["namespaces"]["ns"]["fetch_errors"] == 2


async def test_prime_stores_as_fresh(sync: CacheSync) -> None:
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=60)(owner.fetch)
    assert get.prime("USD", 0.9)
    assert await get("USD") == 0.9
    assert owner.calls == 0


async def test_reads_before_start_go_to_the_owner(unique: str) -> None:
    sync = CacheSync(f"memory://{unique}")
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=60)(owner.fetch)
    await get("USD")
    await get("USD")
    assert owner.calls == 2
    async with sync:
        await get("USD")
        await get("USD")
    assert owner.calls == 3


async def test_bulk_warm_up_refuses_keys_changed_while_the_list_was_read(
    sync: CacheSync,
) -> None:
    from cachesync import ChangeEvent, Op

    owner = Owner(USD=1.0, EUR=2.0)
    get = sync.cached("fx", ttl=3600)(owner.fetch)
    hello = ChangeEvent(source="o", seq=0, op=Op.HEARTBEAT, ts=0.0).encode()
    sync.handle_message(hello)
    with get.bulk() as warm:
        listing = dict(owner.values)  # the list endpoint answers with USD 1.0...
        owner.commit("USD", 1.1)  # ...then USD changes and its event lands
        event = ChangeEvent(source="o", seq=1, ns="fx", op=Op.UPSERT, keys=("USD",), ts=0.0)
        sync.handle_message(event.encode())
        stored = [key for key, value in listing.items() if warm.put(key, value)]
    assert stored == ["EUR"]
    assert await get("USD") == 1.1
    assert await get("EUR") == 2.0
    assert owner.calls == 1


async def test_keyword_and_positional_calls_share_an_entry(sync: CacheSync) -> None:
    owner = Owner(USD=1.0)

    @sync.cached("fx", ttl=60)
    async def get(code: str) -> float:
        return await owner.fetch(code)

    assert await get("USD") == await get(code="USD") == 1.0
    assert owner.calls == 1
    assert get.__name__ == "get"
    with pytest.raises(TypeError):
        await get("USD", "extra")  # type: ignore[call-arg]


async def test_distrust_hides_entries_and_resumed_trust_restores_them(sync: CacheSync) -> None:
    owner = Owner(USD=1.0, EUR=2.0)
    get = sync.cached("fx", ttl=60)(owner.fetch)
    await get("USD")
    await get("EUR")
    cache = sync.namespace("fx")
    cache.distrust()
    await get("USD")  # the listener is down: straight to the owner
    assert owner.calls == 3
    cache.invalidate("EUR")  # an event replayed while catching up
    cache.trust()  # resumed: nothing was lost
    await get("USD")
    assert owner.calls == 3  # a hit again
    await get("EUR")
    assert owner.calls == 4  # the replayed event dropped it
