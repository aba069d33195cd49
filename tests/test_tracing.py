"""OpenTelemetry spans: owner fetches on misses (none on hits), events with source, seq and
lag, flushes with their cause; the caller's trace is the parent of a fetch."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachesync import CacheSync, ChangeEvent

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _names(exporter: InMemorySpanExporter) -> list[str]:
    return [span.name for span in exporter.get_finished_spans()]


async def test_a_miss_makes_a_fetch_span_in_the_callers_trace_and_a_hit_none(
    unique: str, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("app")
    async with CacheSync(f"memory://{unique}", tracing=provider) as sync:

        @sync.cached("currencies", ttl=60)
        async def get_currency(code: str) -> str:
            return code

        @sync.cached("plain", ttl=60)
        def get_plain(code: str) -> str:
            return code

        @sync.cached_many("many", ttl=60)
        async def get_many(codes: list[str]) -> dict[str, str]:
            return {code: code for code in codes}

        with tracer.start_as_current_span("request") as request:
            await get_currency("USD")
        await get_currency("USD")  # a hit: no span
        get_plain("A")
        get_plain("A")
        await get_many(["A", "B"])
        await get_many(["A", "B"])
        fetches = [s for s in exporter.get_finished_spans() if s.name == "cachesync.fetch"]
        assert len(fetches) == 3
        first = fetches[0]
        assert first.attributes is not None
        assert first.attributes["cachesync.namespace"] == "currencies"
        assert str(first.attributes["cachesync.function"]).endswith("get_currency")
        assert first.parent is not None
        assert first.parent.span_id == request.get_span_context().span_id
        assert fetches[2].attributes is not None and fetches[2].attributes["cachesync.keys"] == 2
        assert get_currency.key_for("USD") == "USD"  # the key rules see through the span


async def test_events_and_flushes_make_spans(
    unique: str, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = traced
    async with CacheSync(f"memory://{unique}", tracing=provider) as sync:

        @sync.cached("currencies", ttl=60)
        async def get_currency(code: str) -> str:
            return code

        await get_currency("USD")
        exporter.clear()
        for seq in (1, 3):  # seq 2 is lost: a gap
            event = ChangeEvent(
                source="owner", seq=seq, ns="currencies", op="upsert", keys=("USD",),
                ts=time.time() - 0.5,
            )  # fmt: skip
            sync.handle_message(event.encode())
        spans = exporter.get_finished_spans()
        events = [s for s in spans if s.name == "cachesync.event"]
        assert [s.attributes["cachesync.seq"] for s in events if s.attributes] == [1, 3]
        attributes = events[0].attributes
        assert attributes is not None
        assert attributes["cachesync.source"] == "owner"
        assert attributes["cachesync.namespace"] == "currencies"
        assert 0.4 < float(attributes["cachesync.lag_seconds"]) < 10  # type: ignore[arg-type]
        (flush,) = [s for s in spans if s.name == "cachesync.flush"]
        assert flush.attributes is not None and flush.attributes["cachesync.cause"] == "gap"
        assert flush.parent is not None and flush.parent.span_id == events[1].context.span_id


async def test_without_tracing_fetch_functions_are_not_wrapped(unique: str) -> None:
    async with CacheSync(f"memory://{unique}") as sync:

        async def get_currency(code: str) -> str:
            return code

        cached = sync.cached("currencies", ttl=60)(get_currency)
        assert cached.__wrapped__ is get_currency  # type: ignore[attr-defined]
