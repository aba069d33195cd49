"""sync.explain(ns, key): what one instance knows about one key, and why; over HTTP and the CLI."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from fastapi import FastAPI

from cachesync import CacheSync, ChangeEvent
from cachesync.cli import CommandError, fetch_explain, main
from cachesync.contrib.fastapi import consumer_router

from .asgiserver import AsgiServer
from .helpers import FakeClock

pytestmark = pytest.mark.timeout(20)


def _event(seq: int, ns: str, *keys: str, source: str = "owner", **fields: Any) -> bytes:
    fields.setdefault("op", "upsert")
    return ChangeEvent(
        source=source, seq=seq, ns=ns, keys=keys, ts=time.time() - 0.25, **fields
    ).encode()


async def test_explain_a_fresh_then_invalidated_key(unique: str) -> None:
    clock = FakeClock()
    async with CacheSync(f"memory://{unique}", clock=clock) as sync:

        @sync.cached("currencies", ttl=60, jitter=0, version_of=lambda v: v["version"])
        async def get_currency(code: str) -> dict[str, Any]:
            return {"code": code, "version": 3}

        await get_currency("USD")
        clock.advance(5)
        report = sync.explain("currencies", "USD")
        (fn,) = report["functions"]
        assert fn["function"].endswith("get_currency")
        assert fn["cached"] and fn["state"] == "fresh"
        assert fn["version"] == 3 and fn["age"] == 5 and fn["expires_in"] == 55
        assert report["last_event"] is None and report["listener_up"]

        sync.handle_message(_event(1, "currencies", "USD", version=4))
        report = sync.explain("currencies", "USD")
        (fn,) = report["functions"]
        assert not fn["cached"] and fn["state"] == "invalidated" and fn["version"] == 4
        last = report["last_event"]
        assert last["op"] == "upsert" and last["source"] == "owner" and last["seq"] == 1
        assert last["version"] == 4 and 0 <= last["ago"] < 5
        (source,) = report["sources"]
        assert source["source"] == "owner" and source["last_seq"] == 1 and source["live"]
        assert 0.2 < source["lag"] < 5
        json.dumps(report)  # JSON-ready


async def test_explain_names_the_last_flush_and_its_cause(unique: str) -> None:
    async with CacheSync(f"memory://{unique}") as sync:

        @sync.cached("currencies", ttl=60)
        async def get_currency(code: str) -> str:
            return code

        @sync.cached("currencies", ttl=60)
        async def name(code: str) -> str:
            return code.lower()

        await get_currency("USD")
        sync.handle_message(_event(1, "currencies", "EUR"))
        sync.handle_message(_event(3, "currencies", "EUR"))  # seq 2 was lost
        report = sync.explain("currencies", "USD")
        assert report["last_flush"]["cause"] == "gap"
        assert report["last_flush"]["details"]["expected"] == 2
        states = [fn["state"] for fn in report["functions"]]
        assert states == ["flushed", "not cached"]

        await get_currency("USD")
        sync.handle_message(_event(4, "currencies", op="flush"))
        report = sync.explain("currencies", "USD")
        assert report["last_flush"]["cause"] == "flush"
        assert report["functions"][0]["state"] == "flushed"

        sync.handle_message(_event(1, "currencies", "X", source="restarted"))
        assert sync.explain("currencies", "USD")["last_flush"]["cause"] == "source"
        with pytest.raises(KeyError):
            sync.explain("unknown", "USD")


async def test_explain_over_http_and_the_cli(
    unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with CacheSync(f"memory://{unique}") as sync:

        @sync.cached("currencies", ttl=60)
        async def get_currency(code: str) -> str:
            return code

        await get_currency("a/b")
        app = FastAPI()
        app.include_router(consumer_router(sync))
        async with AsgiServer(app) as server:
            report = await fetch_explain(server.url, "currencies", "a/b")
            assert report["functions"][0]["state"] == "fresh"
            with pytest.raises(CommandError, match="nothing is cached under"):
                await fetch_explain(server.url, "nope", "USD")
            status = await asyncio.to_thread(main, ["explain", server.url, "currencies", "a/b"])
            assert status == 0
            assert json.loads(capsys.readouterr().out)["key"] == "a/b"
    async with AsgiServer(FastAPI()) as server:
        with pytest.raises(CommandError, match="consumer_router"):
            await fetch_explain(server.url, "currencies", "USD")


async def test_the_history_holds_no_values_and_is_bounded(
    unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cachesync import client as client_module

    monkeypatch.setattr(client_module, "MAX_RECENT_KEYS", 10)
    async with CacheSync(f"memory://{unique}") as sync:

        @sync.cached("currencies", ttl=60, mode="refresh")
        async def get_currency(code: str) -> Any:
            return code

        await get_currency("USD")
        big = {"blob": "x" * 10_000}
        sync.handle_message(_event(1, "currencies", "USD", value=big, version=2))
        last = sync.explain("currencies", "USD")["last_event"]
        assert last["carried_value"] and last["version"] == 2 and "value" not in last
        for seq in range(2, 30):
            sync.handle_message(_event(seq, "currencies", f"K{seq}"))
        assert sync.explain("currencies", "USD")["last_event"] is None  # dropped, oldest first
        assert sync.explain("currencies", "K29")["last_event"]["seq"] == 29
