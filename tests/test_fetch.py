"""HttpFetcher: status handling, retries, parsing, ETags, warm-up; httpx.MockTransport for the
unit tests and one real uvicorn server for the socket path."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Response
from pydantic import BaseModel, TypeAdapter

from cachesync import CacheSync, FetchError
from cachesync.fetch import HttpFetcher


class Currency(BaseModel):
    code: str
    rate: float
    version: int = 1


class Owner:
    """A scripted owner: per-request answers, and a log of what was asked."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.data: dict[str, dict[str, Any]] = {}
        self.script: list[Any] = []  # answers to hand out before falling back to ``data``

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            answer = self.script.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer  # type: ignore[no-any-return]
        code = request.url.path.rsplit("/", 1)[-1]
        if request.url.path == "/currencies":
            return httpx.Response(200, json=list(self.data.values()))
        item = self.data.get(code)
        if item is None:
            return httpx.Response(404, json={"detail": "not found"})
        etag = f'"{item.get("version", 1)}"'
        if request.headers.get("if-none-match") == etag:
            return httpx.Response(304, headers={"ETag": etag})
        return httpx.Response(200, json=item, headers={"ETag": etag})


def make(owner: Owner, **options: Any) -> tuple[HttpFetcher[Currency], httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(owner.handler))
    options.setdefault("backoff_initial", 0.001)
    options.setdefault("backoff_max", 0.002)
    fetcher = HttpFetcher(
        "http://owner", "/currencies/{key}", model=Currency, client=client, **options
    )
    return fetcher, client


@pytest.mark.timeout(5)
async def test_get_parses_into_the_model_and_404_is_absent() -> None:
    owner = Owner()
    owner.data["USD"] = {"code": "USD", "rate": 1.0, "version": 3}
    fetcher, client = make(owner)
    async with client:
        assert await fetcher.get("USD") == Currency(code="USD", rate=1.0, version=3)
        assert await fetcher("EUR") is None  # __call__ is get
        assert [r.url.path for r in owner.requests] == ["/currencies/USD", "/currencies/EUR"]


@pytest.mark.timeout(5)
async def test_key_is_url_quoted() -> None:
    owner = Owner()
    fetcher, client = make(owner)
    async with client:
        assert await fetcher.get("a/b?c") is None
    assert owner.requests[0].url.raw_path == b"/currencies/a%2Fb%3Fc"


@pytest.mark.timeout(5)
async def test_5xx_is_retried_then_succeeds() -> None:
    owner = Owner()
    owner.data["USD"] = {"code": "USD", "rate": 2.0}
    owner.script = [httpx.Response(503), httpx.Response(500)]
    fetcher, client = make(owner, retries=2)
    async with client:
        assert (await fetcher.get("USD")) == Currency(code="USD", rate=2.0)
    assert len(owner.requests) == 3
    assert fetcher.stats()["retried"] == 2


@pytest.mark.timeout(5)
async def test_5xx_past_the_retries_is_a_fetch_error_with_url_and_status() -> None:
    owner = Owner()
    owner.script = [httpx.Response(502)] * 10
    fetcher, client = make(owner, retries=3)
    async with client:
        with pytest.raises(FetchError) as info:
            await fetcher.get("USD")
    assert info.value.status == 502
    assert info.value.url == "http://owner/currencies/USD"
    assert len(owner.requests) == 4  # one try and three retries: bounded
    assert fetcher.stats()["errors"] == 1


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    "error",
    [httpx.ReadTimeout("slow"), httpx.ConnectError("refused"), httpx.RemoteProtocolError("eof")],
)
async def test_timeouts_and_connection_errors_are_retried_then_raised(error: Exception) -> None:
    owner = Owner()
    owner.script = [error] * 3
    fetcher, client = make(owner, retries=2)
    async with client:
        with pytest.raises(FetchError) as info:
            await fetcher.get("USD")
    assert info.value.status is None
    assert isinstance(info.value.__cause__, httpx.HTTPError)
    assert len(owner.requests) == 3


@pytest.mark.timeout(5)
async def test_a_timeout_then_success_returns_the_value() -> None:
    owner = Owner()
    owner.data["USD"] = {"code": "USD", "rate": 1.5}
    owner.script = [httpx.ConnectTimeout("slow")]
    fetcher, client = make(owner, retries=1)
    async with client:
        assert (await fetcher.get("USD")) is not None


@pytest.mark.timeout(5)
@pytest.mark.parametrize("status", [400, 401, 403, 422])
async def test_other_4xx_is_raised_at_once(status: int) -> None:
    owner = Owner()
    owner.script = [httpx.Response(status)] * 5
    fetcher, client = make(owner, retries=3)
    async with client:
        with pytest.raises(FetchError) as info:
            await fetcher.get("USD")
    assert info.value.status == status
    assert len(owner.requests) == 1


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    "body",
    [b"<html>oops</html>", b'{"code": "USD"}', b'{"code": "USD", "rate": "lots"}', b"[1, 2]"],
)
async def test_unparseable_bodies_are_fetch_errors_not_values(body: bytes) -> None:
    owner = Owner()
    owner.script = [httpx.Response(200, content=body)]
    fetcher, client = make(owner)
    async with client:
        with pytest.raises(FetchError) as info:
            await fetcher.get("USD")
    assert info.value.status == 200
    assert len(owner.requests) == 1  # a bad body is not retried: it would be bad again


@pytest.mark.timeout(5)
async def test_without_a_model_the_json_is_returned_and_bad_json_raises() -> None:
    owner = Owner()
    owner.script = [httpx.Response(200, json={"a": 1}), httpx.Response(200, content=b"{nope")]
    async with httpx.AsyncClient(transport=httpx.MockTransport(owner.handler)) as client:
        fetcher = HttpFetcher("http://owner", "/things/{key}", client=client)
        assert await fetcher.get("x") == {"a": 1}
        with pytest.raises(FetchError):
            await fetcher.get("y")


@pytest.mark.timeout(5)
async def test_type_adapter_model() -> None:
    owner = Owner()
    owner.script = [httpx.Response(200, json=[1, 2, 3])]
    async with httpx.AsyncClient(transport=httpx.MockTransport(owner.handler)) as client:
        fetcher = HttpFetcher(
            "http://owner", "/lists/{key}", model=TypeAdapter(list[int]), client=client
        )
        assert await fetcher.get("x") == [1, 2, 3]


@pytest.mark.timeout(5)
async def test_etag_sends_if_none_match_and_304_returns_the_remembered_value() -> None:
    owner = Owner()
    owner.data["USD"] = {"code": "USD", "rate": 1.0, "version": 1}
    fetcher, client = make(owner)
    async with client:
        first = await fetcher.get("USD")
        second = await fetcher.get("USD")
        assert second is first
        assert owner.requests[0].headers.get("if-none-match") is None
        assert owner.requests[1].headers["if-none-match"] == '"1"'
        assert fetcher.stats()["not_modified"] == 1
        owner.data["USD"] = {"code": "USD", "rate": 9.0, "version": 2}
        third = await fetcher.get("USD")
        assert third is not None and third.rate == 9.0
        del owner.data["USD"]
        assert await fetcher.get("USD") is None
        assert fetcher.stats()["etags"] == 0  # a 404 forgets the validator


@pytest.mark.timeout(5)
async def test_etag_map_is_bounded() -> None:
    owner = Owner()
    for code in ("AAA", "BBB", "CCC"):
        owner.data[code] = {"code": code, "rate": 1.0, "version": 1}
    fetcher, client = make(owner, etag_cache_size=2)
    async with client:
        for code in ("AAA", "BBB", "CCC", "AAA"):
            await fetcher.get(code)
    assert fetcher.stats()["etags"] == 2
    # AAA was evicted by CCC, so its second fetch is unconditional.
    assert owner.requests[3].headers.get("if-none-match") is None


@pytest.mark.timeout(5)
async def test_a_304_for_a_validator_forgotten_meanwhile_refetches_unconditionally() -> None:
    fetcher: HttpFetcher[Currency]
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("if-none-match"))
        if len(seen) == 2:
            fetcher._etags.clear()  # evicted by other fetches while this one was in flight
            return httpx.Response(304, headers={"ETag": '"1"'})
        return httpx.Response(200, json={"code": "USD", "rate": 1.0}, headers={"ETag": '"1"'})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        fetcher = HttpFetcher("http://owner", "/currencies/{key}", model=Currency, client=client)
        await fetcher.get("USD")
        value = await fetcher.get("USD")
    assert value == Currency(code="USD", rate=1.0)
    assert seen == [None, '"1"', None]


@pytest.mark.timeout(5)
async def test_owned_client_is_closed_and_a_passed_client_is_not() -> None:
    owner = Owner()
    fetcher, client = make(owner)
    async with fetcher:
        pass
    assert not client.is_closed
    await client.aclose()
    async with HttpFetcher("http://owner", "/x/{key}") as own:
        inner = own._client
    assert inner.is_closed
    with pytest.raises(FetchError):
        await own.get("USD")


@pytest.mark.timeout(5)
def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        HttpFetcher("http://owner", "/currencies")
    with pytest.raises(ValueError):
        HttpFetcher("", "/x/{key}")
    with pytest.raises(ValueError):
        HttpFetcher("http://owner", "/x/{key}", retries=-1)
    with pytest.raises(ValueError):
        HttpFetcher("http://owner", "/x/{key}", timeout=0)


@pytest.mark.timeout(5)
async def test_warm_primes_a_cached_function_so_reads_do_not_fetch(unique: str) -> None:
    owner = Owner()
    for code, rate in (("USD", 1.0), ("EUR", 0.9)):
        owner.data[code] = {"code": code, "rate": rate, "version": 4}
    fetcher, client = make(owner)
    sync = CacheSync(f"memory://{unique}")

    @sync.cached("currencies", ttl=60)
    async def get_currency(code: str) -> Currency | None:
        return await fetcher.get(code)

    async with client, sync:
        stored = await fetcher.warm(
            get_currency, "/currencies", key=lambda c: c.code, version=lambda c: c.version
        )
        assert stored == 2
        before = len(owner.requests)
        usd = await get_currency("USD")
        assert usd is not None and usd.rate == 1.0
        assert len(owner.requests) == before  # served from the primed cache


@pytest.mark.timeout(5)
async def test_warm_leaves_alone_a_key_changed_while_the_list_was_read(unique: str) -> None:
    sync = CacheSync(f"memory://{unique}")
    get_currency: Any = None

    async def owner(request: httpx.Request) -> httpx.Response:
        # The list is read at v1; before it arrives, an event says USD changed.
        listing = [{"code": "USD", "rate": 1.0, "version": 1}, {"code": "EUR", "rate": 0.9}]
        get_currency.invalidate("USD")
        return httpx.Response(200, json=listing)

    @sync.cached("currencies", ttl=60)
    async def get_currency_fn(code: str) -> Currency | None:
        return Currency(code=code, rate=2.0, version=2)  # the owner's value now

    get_currency = get_currency_fn
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(owner)) as client,
        HttpFetcher("http://owner", "/currencies/{key}", model=Currency, client=client) as fetcher,
        sync,
    ):
        assert (
            await fetcher.warm(get_currency, "/currencies", key=lambda c: c.code) == 1
        )  # EUR only
        usd = await get_currency("USD")
        assert usd is not None and usd.rate == 2.0  # fetched, not the stale listed value


@pytest.mark.timeout(5)
async def test_warm_with_a_bad_list_raises() -> None:
    owner = Owner()
    owner.script = [httpx.Response(200, json={"not": "a list"})]
    fetcher, client = make(owner)

    class Recorder:
        def prime(self, key: str, value: Any, *, version: int | None = None) -> bool:
            raise AssertionError("nothing should be primed")

    async with client:
        with pytest.raises(FetchError):
            await fetcher.warm(Recorder(), "/currencies", key=lambda c: c.code)
        owner.script = [httpx.Response(200, json=[{"code": "USD"}])]
        with pytest.raises(FetchError):
            await fetcher.warm(Recorder(), "/currencies", key=lambda c: c.code)


@pytest.mark.timeout(5)
async def test_as_the_body_of_a_cached_function_nothing_is_cached_on_error(unique: str) -> None:
    owner = Owner()
    owner.data["USD"] = {"code": "USD", "rate": 1.0, "version": 1}
    fetcher, client = make(owner, retries=0)
    sync = CacheSync(f"memory://{unique}")

    @sync.cached("currencies", ttl=60)
    async def get_currency(code: str) -> Currency | None:
        return await fetcher.get(code)

    async with client, sync:
        owner.script = [httpx.Response(500)]
        with pytest.raises(FetchError):
            await get_currency("USD")
        usd = await get_currency("USD")  # the error was not cached: this one fetches
        assert usd is not None and usd.rate == 1.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(10)
async def test_against_a_real_uvicorn_server() -> None:
    app = FastAPI()
    versions = {"USD": 1}
    hits: list[str | None] = []

    @app.get("/currencies/{code}")
    async def read(code: str, response: Response) -> Any:
        if code not in versions:
            return Response(status_code=404)
        etag = f'"{versions[code]}"'
        hits.append(None)
        response.headers["ETag"] = etag
        return {"code": code, "rate": 1.0, "version": versions[code]}

    @app.get("/boom/{code}")
    async def boom(code: str) -> Response:
        return Response(status_code=503, content=json.dumps({"detail": "down"}))

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        async with HttpFetcher(
            f"http://127.0.0.1:{port}", "/currencies/{key}", model=Currency
        ) as fetcher:
            usd = await fetcher.get("USD")
            assert usd == Currency(code="USD", rate=1.0, version=1)
            assert await fetcher.get("XXX") is None
        async with HttpFetcher(
            f"http://127.0.0.1:{port}", "/boom/{key}", retries=1, backoff_initial=0.001
        ) as broken:
            with pytest.raises(FetchError) as info:
                await broken.get("USD")
            assert info.value.status == 503
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 5)
