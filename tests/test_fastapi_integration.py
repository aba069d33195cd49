"""cachesync.contrib.fastapi: lifespans, the state router, the missing-extra message; and
the two example services wired together in one process over the memory bus."""

from __future__ import annotations

import asyncio
import importlib
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException
from sqlalchemy.ext.asyncio import create_async_engine

from cachesync import CacheSync, Publisher
from cachesync.client import ClientState
from cachesync.contrib.fastapi import (
    consumer_lifespan,
    consumer_router,
    owner_lifespan,
    state_router,
)
from cachesync.fetch import HttpFetcher
from cachesync.owner.outbox import Outbox, OutboxRelay

from .helpers import eventually


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan plus an in-process client (httpx's ASGI transport skips lifespans)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


@pytest.mark.timeout(5)
async def test_owner_lifespan_runs_a_publisher_and_the_router_reports_its_state(
    unique: str,
) -> None:
    publisher = Publisher(f"memory://{unique}", channel="prices", heartbeat_interval=0.5)
    app = FastAPI(lifespan=owner_lifespan(publisher))
    app.include_router(state_router(publisher))
    async with running(app) as client:
        await publisher.changed("currencies", "USD", version=1)
        await publisher.changed("currencies", "EUR", version=1)
        state = (await client.get("/cachesync/state")).json()
    assert state["source"] == publisher.source
    assert state["heartbeat_interval"] == 0.5
    assert state["channels"]["prices"]["seq"] == 2
    assert state["channels"]["prices"]["source"] == publisher.source
    assert state["outbox"] == {}
    with pytest.raises(Exception, match="not started"):
        await publisher.changed("currencies", "USD")  # stopped with the app


@pytest.mark.timeout(10)
async def test_owner_lifespan_runs_an_outbox_relay_and_nests_the_app_lifespan(
    tmp_path: Path, unique: str
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'owner.db'}")
    await Outbox.create_table(engine)
    relay = OutboxRelay(engine, f"memory://{unique}", poll_interval=0.05)
    order: list[str] = []

    @asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        await relay.wait_idle(5)  # the relay runs already: it answers
        order.append("app up")
        yield
        order.append("app down")

    app = FastAPI(lifespan=owner_lifespan(relay, app_lifespan=app_lifespan))
    app.include_router(state_router(relay, prefix="/internal"))
    try:
        async with running(app) as client:
            await eventually(lambda: relay.stats()["db_up"])
            state = (await client.get("/internal/state")).json()
        assert order == ["app up", "app down"]
        assert state["channels"]["cachesync"]["source"] == relay.publisher.source
        assert state["outbox"]["cachesync"]["db_up"] is True
        with pytest.raises(Exception, match="closed"):
            await relay.start()
    finally:
        await engine.dispose()


@pytest.mark.timeout(5)
async def test_consumer_lifespan_runs_cachesync_and_closes_the_fetchers(unique: str) -> None:
    sync = CacheSync(f"memory://{unique}")
    fetcher = HttpFetcher("http://owner.invalid", "/items/{key}")
    seen: dict[str, Any] = {}

    @asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        seen["listener_up"] = sync.listener_up
        seen["state"] = app.state.cachesync
        yield

    app = FastAPI(lifespan=consumer_lifespan(sync, fetchers=[fetcher], app_lifespan=app_lifespan))
    async with running(app):
        assert sync.state is ClientState.OPEN
    assert seen == {"listener_up": True, "state": sync}
    assert sync.state is ClientState.CLOSED
    assert fetcher._client.is_closed


async def operators_only(authorization: str | None = Header(default=None)) -> None:
    if authorization != "Bearer ops-token":
        raise HTTPException(status_code=401, detail="operators only")


@pytest.mark.timeout(5)
async def test_the_routers_take_dependencies_for_authentication(unique: str) -> None:
    publisher = Publisher(f"memory://{unique}", heartbeat_interval=None)
    sync = CacheSync(f"memory://{unique}")
    app = FastAPI(lifespan=owner_lifespan(publisher))
    app.include_router(state_router(publisher, dependencies=[Depends(operators_only)]))
    app.include_router(
        consumer_router(sync, prefix="/consumer", dependencies=[Depends(operators_only)])
    )
    async with running(app) as client, sync:
        for path in ("/cachesync/state", "/consumer/stats", "/consumer/explain?ns=a&key=b"):
            assert (await client.get(path)).status_code == 401, path
            granted = await client.get(path, headers={"Authorization": "Bearer ops-token"})
            assert granted.status_code in (200, 404), path  # 404: nothing cached under "a"
        answer = await client.get("/cachesync/state", headers={"Authorization": "Bearer ops-token"})
        assert answer.json()["source"] == publisher.source


class _Relay:
    """Stands for an OutboxRelay whose database refused it (what the router reads of one)."""

    def __init__(self, publisher: Publisher, error: str) -> None:
        self.publisher = publisher
        self.error = error

    def stats(self) -> dict[str, Any]:
        return {"published": 3, "db_up": False, "last_error": self.error}


DB_ERROR = (
    'database: OperationalError: connection to server at "db.internal" (10.1.2.3), port 5433 '
    'failed: FATAL: password authentication failed for user "billing" database "ledger"'
)


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (DB_ERROR, "database: OperationalError"),
        ("broker: cannot reach redis://app@cache.internal:6380/4", "broker"),
        ("ConnectionError: Error 111 connecting to 10.1.2.3:6380.", "ConnectionError"),
        ("could not connect to 10.1.2.3", "error"),
    ],
)
async def test_the_state_keeps_connection_details_out_by_default(
    unique: str, error: str, shown: str
) -> None:
    publisher = Publisher(f"memory://{unique}", heartbeat_interval=None)
    relay = _Relay(publisher, error)
    app = FastAPI(lifespan=owner_lifespan(publisher))
    app.include_router(state_router(relay))  # type: ignore[arg-type]
    app.include_router(state_router(relay, prefix="/ops", show_errors=True))  # type: ignore[arg-type]
    async with running(app) as client:
        default = await client.get("/cachesync/state")
        chosen = (await client.get("/ops/state")).json()
    assert default.json()["outbox"]["cachesync"] == {
        "published": 3,
        "db_up": False,
        "last_error": shown,
    }
    for detail in ("db.internal", "10.1.2.3", "5433", "6380", "billing", "ledger", "app@"):
        assert detail not in default.text
    assert chosen["outbox"]["cachesync"]["last_error"] == error


@pytest.mark.timeout(5)
def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        owner_lifespan()
    with pytest.raises(TypeError):
        owner_lifespan(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        consumer_lifespan(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        state_router()


@pytest.mark.timeout(5)
def test_without_fastapi_the_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # makes "import fastapi" fail
    monkeypatch.delitem(sys.modules, "cachesync.contrib.fastapi")
    with pytest.raises(ImportError, match=r"pip install 'cachesync\[fastapi\]'"):
        importlib.import_module("cachesync.contrib.fastapi")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done())
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 5)


@pytest.mark.timeout(15)
async def test_the_examples_in_one_process_over_the_memory_bus(tmp_path: Path, unique: str) -> None:
    from examples import consumer_service, owner_service

    bus = f"memory://{unique}"
    owner_app = owner_service.create_app(
        database_url=f"sqlite:///{tmp_path / 'owner.db'}", cachesync_url=bus
    )
    async with serve(owner_app) as owner_url, httpx.AsyncClient(base_url=owner_url) as owner:
        put = await owner.put("/currencies/USD", json={"name": "US dollar", "rate": 1.0})
        assert put.status_code == 200 and put.headers["etag"] == '"1"'
        consumer_app = consumer_service.create_app(owner_url=owner_url, cachesync_url=bus)
        async with (
            serve(consumer_app) as consumer_url,
            httpx.AsyncClient(base_url=consumer_url) as consumer,
        ):
            assert (await consumer.get("/currencies/USD")).json()["rate"] == 1.0
            assert (await consumer.get("/currencies/XXX")).status_code == 404
            hits = consumer_app.state.cachesync.stats()["namespaces"]["currencies"]["hits"]
            assert (await consumer.get("/currencies/USD")).json()["rate"] == 1.0
            stats = (await consumer.get("/stats")).json()
            assert stats["cachesync"]["namespaces"]["currencies"]["hits"] == hits + 1

            await owner.put("/currencies/USD", json={"name": "US dollar", "rate": 2.0})
            await eventually(
                lambda: (
                    consumer_app.state.cachesync.stats()["namespaces"]["currencies"]["refreshes"]
                    >= 1
                )
            )
            body = (await consumer.get("/currencies/USD")).json()
            assert (body["rate"], body["version"]) == (2.0, 2)

            assert (await owner.delete("/currencies/USD")).status_code == 204
            assert (await owner.get("/currencies/USD")).status_code == 404
            etag = (await owner.put("/customers/c1", json={"name": "A", "email": "a@x"})).headers[
                "etag"
            ]
            not_modified = await owner.get("/customers/c1", headers={"If-None-Match": etag})
            assert not_modified.status_code == 304
            state = (await owner.get("/cachesync/state")).json()
            assert state["channels"]["cachesync"]["seq"] >= 4
