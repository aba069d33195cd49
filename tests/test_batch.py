"""Batch reads: hits served locally, one owner call for the misses, single-flight shared with
single reads, the invalidation race, absent keys."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from cachesync import CacheSync, ChangeEvent, FetchError, HttpFetcher

from .helpers import FakeClock

pytestmark = pytest.mark.timeout(20)


class Currency(BaseModel):
    code: str
    rate: float


class BatchOwner:
    """The owner's data and a batch endpoint whose answer a test can hold back."""

    def __init__(self, **values: Any) -> None:
        self.values = dict(values)
        self.calls: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def fetch_many(self, keys: list[str]) -> dict[str, Any]:
        self.calls.append(list(keys))
        answer = {key: self.values[key] for key in keys if key in self.values}
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return answer

    async def fetch_one(self, key: str) -> Any:
        self.calls.append([key])
        value = self.values.get(key)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return value


class Events:
    """Deliver events straight to a client's listener path, one seq after another."""

    def __init__(self, sync: CacheSync) -> None:
        self.sync = sync
        self.seq = 0

    def send(self, ns: str, *keys: str, op: str = "upsert", **fields: Any) -> None:
        self.seq += 1
        event = ChangeEvent(
            source="owner", seq=self.seq, ns=ns, op=op, keys=keys, ts=time.time(), **fields
        )
        self.sync.handle_message(event.encode())


@pytest.fixture
async def sync(unique: str) -> AsyncIterator[CacheSync]:
    async with CacheSync(f"memory://{unique}") as client:
        yield client


async def test_hits_local_one_call_for_the_misses(sync: CacheSync) -> None:
    owner = BatchOwner(**{f"K{i}": i for i in range(100)})

    @sync.cached_many("items", ttl=60)
    async def get_many(keys: list[str]) -> dict[str, int]:
        return await owner.fetch_many(keys)

    first = await get_many([f"K{i}" for i in range(90)])
    assert first == {f"K{i}": i for i in range(90)}
    assert len(owner.calls) == 1
    result = await get_many([f"K{i}" for i in range(100)])
    assert list(result) == [f"K{i}" for i in range(100)]  # the order asked for
    assert owner.calls[1] == [f"K{i}" for i in range(90, 100)]  # one call, only the misses
    assert len(owner.calls) == 2
    counters = sync.stats()["namespaces"]["items"]
    assert counters["hits"] == 90 and counters["misses"] == 100 and counters["fetches"] == 2


async def test_missing_keys_cached_as_absent_with_negative_ttl(unique: str) -> None:
    clock = FakeClock()
    async with CacheSync(f"memory://{unique}", clock=clock) as sync:
        owner = BatchOwner(A=1)

        @sync.cached_many("items", ttl=60, negative_ttl=5, jitter=0)
        async def get_many(keys: list[str]) -> dict[str, int]:
            return await owner.fetch_many(keys)

        assert await get_many(["A", "GONE"]) == {"A": 1}
        assert await get_many(["A", "GONE"]) == {"A": 1}
        assert len(owner.calls) == 1  # the absent key was cached too
        clock.advance(6)
        assert await get_many(["A", "GONE"]) == {"A": 1}
        assert owner.calls[-1] == ["GONE"]  # only the negative entry expired


async def test_absent_not_cached_without_negative_ttl(sync: CacheSync) -> None:
    owner = BatchOwner(A=1)

    @sync.cached_many("items", ttl=60)
    async def get_many(keys: list[str]) -> dict[str, int]:
        return await owner.fetch_many(keys)

    await get_many(["A", "GONE"])
    await get_many(["A", "GONE"])
    assert owner.calls == [["A", "GONE"], ["GONE"]]


async def test_single_read_joins_a_batch_fill(sync: CacheSync) -> None:
    owner = BatchOwner(A=1, B=2)
    owner.gate = asyncio.Event()

    @sync.cached("items", ttl=60)
    async def get_one(key: str) -> int:
        return await owner.fetch_one(key)

    @sync.cached_many("items", shares=get_one)
    async def get_many(keys: list[str]) -> dict[str, int]:
        return await owner.fetch_many(keys)

    batch = asyncio.create_task(get_many(["A", "B"]))
    await owner.started.wait()
    single = asyncio.create_task(get_one("A"))
    await asyncio.sleep(0)
    owner.gate.set()
    assert await batch == {"A": 1, "B": 2}
    assert await single == 1
    assert owner.calls == [["A", "B"]]  # the single read joined the batch's flight
    assert await get_one("B") == 2 and len(owner.calls) == 1  # one cache for both


async def test_batch_joins_a_single_fill(sync: CacheSync) -> None:
    owner = BatchOwner(A=1, B=2)
    owner.gate = asyncio.Event()

    @sync.cached("items", ttl=60)
    async def get_one(key: str) -> int:
        return await owner.fetch_one(key)

    @sync.cached_many("items", shares=get_one)
    async def get_many(keys: list[str]) -> dict[str, int]:
        return await owner.fetch_many(keys)

    single = asyncio.create_task(get_one("A"))
    await owner.started.wait()
    batch = asyncio.create_task(get_many(["A", "B"]))
    await asyncio.sleep(0)
    owner.gate.set()
    assert await single == 1
    assert await batch == {"A": 1, "B": 2}
    assert owner.calls == [["A"], ["B"]]  # the batch fetched only B


async def test_overlapping_batches_fetch_each_key_once(sync: CacheSync) -> None:
    owner = BatchOwner(A=1, B=2, C=3)
    owner.gate = asyncio.Event()

    @sync.cached_many("items", ttl=60)
    async def get_many(keys: list[str]) -> dict[str, int]:
        return await owner.fetch_many(keys)

    first = asyncio.create_task(get_many(["A", "B"]))
    await owner.started.wait()
    second = asyncio.create_task(get_many(["B", "C"]))
    await asyncio.sleep(0)
    owner.gate.set()
    assert await first == {"A": 1, "B": 2}
    assert await second == {"B": 2, "C": 3}
    assert owner.calls == [["A", "B"], ["C"]]


async def test_batch_racing_an_invalidation_does_not_store_that_key(sync: CacheSync) -> None:
    owner = BatchOwner(A=1, B=2)
    owner.gate = asyncio.Event()
    events = Events(sync)

    @sync.cached_many("items", ttl=60)
    async def get_many(keys: list[str]) -> dict[str, int]:
        return await owner.fetch_many(keys)

    batch = asyncio.create_task(get_many(["A", "B"]))
    await owner.started.wait()  # the owner has read A=1 ...
    owner.values["A"] = 10
    events.send("items", "A")  # ... and the event for A=10 is applied before the answer lands
    owner.gate.set()
    assert await batch == {"A": 1, "B": 2}  # began before the event: may see the old value
    assert "A" not in get_many.cache and "B" in get_many.cache
    assert await get_many(["A", "B"]) == {"A": 10, "B": 2}  # a read after the event: new
    assert owner.calls[-1] == ["A"]


async def test_read_after_invalidation_does_not_join_the_old_fill(sync: CacheSync) -> None:
    owner = BatchOwner(A=1)
    owner.gate = asyncio.Event()
    events = Events(sync)

    @sync.cached_many("items", ttl=60)
    async def get_many(keys: list[str]) -> dict[str, int]:
        return await owner.fetch_many(keys)

    old = asyncio.create_task(get_many(["A"]))
    await owner.started.wait()
    owner.values["A"] = 2
    events.send("items", "A")
    new = asyncio.create_task(get_many(["A"]))
    await asyncio.sleep(0)
    owner.gate.set()
    assert await old == {"A": 1}
    assert await new == {"A": 2}
    assert len(owner.calls) == 2


async def test_one_reader_shares_the_batch_cache(sync: CacheSync) -> None:
    owner = BatchOwner(A=1)

    @sync.cached_many("items", ttl=60)
    async def get_many(keys: list[str]) -> dict[str, int]:
        return await owner.fetch_many(keys)

    assert await get_many.one("A") == 1
    assert await get_many(["A"]) == {"A": 1}
    assert owner.calls == [["A"]]


async def test_fetch_error_reaches_every_caller_and_stores_nothing(sync: CacheSync) -> None:
    calls = 0

    @sync.cached_many("items", ttl=60)
    async def get_many(keys: list[str]) -> dict[str, int]:
        nonlocal calls
        calls += 1
        raise RuntimeError("owner down")

    with pytest.raises(RuntimeError, match="owner down"):
        await get_many(["A", "B"])
    assert len(get_many.cache) == 0 and not get_many.cache.flights
    with pytest.raises(RuntimeError):
        await get_many(["A"])
    assert calls == 2


async def test_not_a_mapping_is_a_clear_error(sync: CacheSync) -> None:
    @sync.cached_many("items", ttl=60)
    async def get_many(keys: list[str]) -> list[int]:
        return [1]

    with pytest.raises(TypeError, match="must return a mapping"):
        await get_many(["A"])
    with pytest.raises(TypeError, match="not one str"):
        await get_many("A")  # type: ignore[arg-type]


async def test_options_checked(sync: CacheSync) -> None:
    @sync.cached("items", ttl=60)
    async def get_one(key: str) -> int:
        return 1

    with pytest.raises(ValueError, match="options of the shared function"):
        sync.cached_many("items", shares=get_one, ttl=5)
    with pytest.raises(ValueError, match="not 'other'"):
        sync.cached_many("other", shares=get_one)
    with pytest.raises(ValueError, match="no key="):
        sync.cached_many("items", key=lambda k: k)
    with pytest.raises(TypeError, match="shares="):
        sync.cached_many("items", shares=print)


async def test_plain_batch_function_from_threads(sync: CacheSync) -> None:
    calls: list[list[str]] = []
    lock = threading.Lock()
    release = threading.Event()
    entered = threading.Event()

    @sync.cached("items", ttl=60)
    def get_one(key: str) -> str:
        with lock:
            calls.append([key])
        return key.lower()

    @sync.cached_many("items", shares=get_one)
    def get_many(keys: list[str]) -> dict[str, str]:
        with lock:
            calls.append(list(keys))
        entered.set()
        release.wait(5)
        return {key: key.lower() for key in keys if key != "GONE"}

    results: dict[str, Any] = {}

    def batch() -> None:
        results["batch"] = get_many(["A", "B", "GONE"])

    def single() -> None:
        results["single"] = get_one("A")

    t1 = threading.Thread(target=batch)
    t1.start()
    assert entered.wait(5)
    t2 = threading.Thread(target=single)
    t2.start()
    release.set()
    await asyncio.to_thread(t1.join, 5)
    await asyncio.to_thread(t2.join, 5)
    assert results == {"batch": {"A": "a", "B": "b"}, "single": "a"}
    assert calls == [["A", "B", "GONE"]]
    assert get_many(["A", "B"]) == {"A": "a", "B": "b"} and len(calls) == 1


async def test_plain_batch_racing_an_invalidation(sync: CacheSync) -> None:
    events = Events(sync)
    values = {"A": 1, "B": 2}

    @sync.cached_many("items", ttl=60)
    def get_many(keys: list[str]) -> dict[str, int]:
        answer = {key: values[key] for key in keys}
        values["A"] = 10
        events.send("items", "A")  # the change lands while the answer is on its way
        return answer

    assert get_many(["A", "B"]) == {"A": 1, "B": 2}
    assert "A" not in get_many.cache and "B" in get_many.cache


def _batch_owner(data: dict[str, dict[str, Any]], requests: list[httpx.Request]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        codes = request.url.params["codes"].split(",")
        if request.url.params.get("as") == "list":
            return httpx.Response(200, json=[data[c] for c in codes if c in data])
        return httpx.Response(200, json={c: data[c] for c in codes if c in data})

    return handler


async def test_http_fetcher_batch_form_as_the_body(sync: CacheSync) -> None:
    data = {"USD": {"code": "USD", "rate": 1.0}, "EUR": {"code": "EUR", "rate": 0.9}}
    requests: list[httpx.Request] = []
    client = httpx.AsyncClient(transport=httpx.MockTransport(_batch_owner(data, requests)))
    fetcher = HttpFetcher(
        "http://owner", "/currencies/{key}", model=Currency, client=client,
        many_path="/currencies?codes={keys}",
    )  # fmt: skip
    get_many = sync.cached_many("currencies", ttl=60)(fetcher.get_many)
    result = await get_many(["USD", "EUR", "a/b"])
    assert result == {"USD": Currency(code="USD", rate=1.0), "EUR": Currency(code="EUR", rate=0.9)}
    assert requests[0].url.params["codes"] == "USD,EUR,a/b"
    assert "a%2Fb" in str(requests[0].url)  # each key is quoted: a key cannot change the path
    await get_many(["USD", "EUR"])
    assert len(requests) == 1
    await client.aclose()


async def test_http_fetcher_batch_array_chunks_and_errors() -> None:
    data = {f"C{i}": {"code": f"C{i}", "rate": float(i)} for i in range(5)}
    requests: list[httpx.Request] = []
    client = httpx.AsyncClient(transport=httpx.MockTransport(_batch_owner(data, requests)))
    fetcher = HttpFetcher(
        "http://owner", "/currencies/{key}", model=Currency, client=client,
        many_path="/currencies?as=list&codes={keys}", many_key=lambda c: c.code, many_max=2,
    )  # fmt: skip
    found = await fetcher.get_many([f"C{i}" for i in range(6)])
    assert sorted(found) == [f"C{i}" for i in range(5)]
    assert len(requests) == 3  # 6 keys, 2 per request
    no_key = HttpFetcher(
        "http://owner",
        "/currencies/{key}",
        client=client,
        many_path="/currencies?as=list&codes={keys}",
    )
    with pytest.raises(FetchError, match="many_key"):
        await no_key.get_many(["C1"])
    with pytest.raises(FetchError, match="no batch endpoint"):
        await HttpFetcher("http://owner", "/c/{key}", client=client).get_many(["C1"])
    with pytest.raises(ValueError, match="{keys}"):
        HttpFetcher("http://owner", "/c/{key}", many_path="/currencies")
    await client.aclose()


@pytest.mark.parametrize("plain", [False, True])
async def test_stale_while_revalidate_and_stale_if_error(unique: str, plain: bool) -> None:
    clock = FakeClock()
    values = {"A": 1, "B": 2}
    calls: list[list[str]] = []
    fail = False

    def answer(keys: list[str]) -> dict[str, int]:
        calls.append(list(keys))
        if fail:
            raise RuntimeError("owner down")
        return {key: values[key] for key in keys}

    async with CacheSync(f"memory://{unique}", clock=clock) as sync:
        options: dict[str, Any] = {
            "ttl": 10, "jitter": 0, "stale_while_revalidate": 5, "stale_if_error": 60,
        }  # fmt: skip
        if plain:
            get_many: Any = sync.cached_many("items", **options)(answer)

            async def read(keys: list[str]) -> dict[str, int]:
                return await asyncio.to_thread(get_many, keys)
        else:

            async def fetch(keys: list[str]) -> dict[str, int]:
                return answer(keys)

            get_many = sync.cached_many("items", **options)(fetch)

            async def read(keys: list[str]) -> dict[str, int]:
                return await get_many(keys)  # type: ignore[no-any-return]

        assert await read(["A", "B"]) == {"A": 1, "B": 2}
        values.update(A=10, B=20)
        clock.advance(12)  # expired, within stale_while_revalidate
        assert await read(["A", "B"]) == {"A": 1, "B": 2}  # served stale ...
        cache = get_many.cache
        flight = (cache.thread_flights if plain else cache.flights).get("A")
        if flight is not None:  # ... while one background batch refreshes both
            await (asyncio.wrap_future(flight.waiter) if plain else flight.waiter)
        assert cache.get_fresh("A") is not None
        assert calls == [["A", "B"], ["A", "B"]]
        assert await read(["A", "B"]) == {"A": 10, "B": 20}
        fail = True
        clock.advance(20)  # past stale_while_revalidate: a fetch, which fails
        assert await read(["A", "B"]) == {"A": 10, "B": 20}  # stale_if_error
        assert sync.stats()["namespaces"]["items"]["fetch_errors"] == 1


async def test_a_batch_fill_cancelled_before_it_ran_releases_its_keys() -> None:
    """A fill task cancelled before it started (the client stopped, the loop ended) must not
    leave its keys reserved: later reads of them would wait for it forever."""
    from cachesync.batch import wrap_many_async
    from cachesync.cache import LocalCache

    cache = LocalCache("ns", ttl=60.0)
    cache.trust()

    async def fetch(keys: list[str]) -> dict[str, str]:
        return {key: key.upper() for key in keys}

    def spawn_cancelled(coro: Any) -> asyncio.Future[None]:
        task = asyncio.get_running_loop().create_task(coro)
        task.cancel()
        return task

    def spawn(coro: Any) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_task(coro)

    first = wrap_many_async(fetch, cache, version_of=None, spawn=spawn_cancelled)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(first(["a", "b"]), 2)
    assert not cache.flights
    again = wrap_many_async(fetch, cache, version_of=None, spawn=spawn)
    assert await asyncio.wait_for(again(["a", "b"]), 2) == {"a": "A", "b": "B"}
