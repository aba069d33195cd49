"""PrometheusMetrics: per-instance registries, observer hooks, and the scrape-time collector."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, generate_latest

from cachesync import CacheSync, ChangeEvent, Op, Publisher
from cachesync.contrib.monitor import ConsistencyMonitor
from cachesync.contrib.prometheus import PrometheusMetrics, exported_names
from cachesync.transports.memory import bus_for

from .helpers import Owner, eventually


def value(metrics: PrometheusMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture
async def observed(unique: str) -> AsyncIterator[tuple[CacheSync, PrometheusMetrics]]:
    metrics = PrometheusMetrics()
    sync = CacheSync(f"memory://{unique}", observer=metrics, reconnect_initial=0.01)
    metrics.bind(sync)
    async with sync:
        yield sync, metrics


@pytest.mark.timeout(10)
def test_importing_the_module_does_not_import_prometheus_client() -> None:
    code = (
        "import sys, cachesync, cachesync.contrib.prometheus, cachesync.contrib.monitor;"
        "assert 'prometheus_client' not in sys.modules, 'imported at import time'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.timeout(5)
def test_missing_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'cachesync\[prometheus\]'"):
        PrometheusMetrics()


@pytest.mark.timeout(5)
def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="prefix"):
        PrometheusMetrics(prefix="")


@pytest.mark.timeout(10)
async def test_two_instances_have_separate_registries(unique: str) -> None:
    first, second = PrometheusMetrics(), PrometheusMetrics()
    assert first.registry is not second.registry
    owner = Owner(USD=1.0)
    async with (
        CacheSync(f"memory://{unique}-a", observer=first) as a,
        CacheSync(f"memory://{unique}-b", observer=second) as b,
    ):
        first.bind(a)
        second.bind(b)
        get_a = a.cached("fx")(owner.fetch)
        get_b = b.cached("fx")(owner.fetch)
        for _ in range(3):
            await get_a("USD")
        await get_b("USD")
        assert value(first, "cachesync_reads_total", namespace="fx", result="hit") == 2
        assert value(second, "cachesync_reads_total", namespace="fx", result="hit") == 0
        assert value(first, "cachesync_fetch_duration_seconds_count", namespace="fx", outcome="ok")
        assert value(first, "cachesync_listener_up") == 1
        assert value(second, "cachesync_listener_up") == 1
    assert value(first, "cachesync_listener_up") == 0


@pytest.mark.timeout(5)
def test_shared_registry_needs_distinct_prefixes() -> None:
    registry = CollectorRegistry()
    a = PrometheusMetrics(registry, prefix="svc_a")
    b = PrometheusMetrics(registry, prefix="svc_b")
    assert a.registry is b.registry is registry
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        PrometheusMetrics(registry, prefix="svc_a")


@pytest.mark.timeout(10)
async def test_reads_fetches_and_events_are_exported(unique: str) -> None:
    metrics = PrometheusMetrics()
    url = f"memory://{unique}"
    owner = Owner(USD=1.0, EUR=2.0)
    async with (
        CacheSync(url, observer=metrics) as sync,
        Publisher(url, heartbeat_interval=None) as pub,
    ):
        metrics.bind(sync)
        get = sync.cached("fx", ttl=3600, version_of=lambda _: 1)(owner.fetch)
        stats = sync.namespace("fx").stats
        # The first event of a publisher is only a hello while nothing is cached.
        await pub.changed("fx", "OTHER", version=1)
        await eventually(lambda: stats.events == 1)

        await get("USD")  # miss
        await get("USD")  # hit
        await get("USD")  # hit
        await get("EUR")  # miss
        owner.fail = RuntimeError("owner down")
        with pytest.raises(RuntimeError):
            await get("GBP")  # miss, fetch error
        owner.fail = None

        await pub.changed("fx", "USD", version=2)
        await pub.deleted("fx", "EUR", version=3)
        await pub.flush("fx")
        await pub.changed("unknown-ns", "X")
        await eventually(lambda: sync.stats()["listener"]["unknown_namespace"] == 1)
        sync.handle_message(b"not an event")

        def sample(name: str, **labels: str) -> float | None:
            return value(metrics, name, **labels)

        assert sample("cachesync_reads_total", namespace="fx", result="hit") == 2
        assert sample("cachesync_reads_total", namespace="fx", result="miss") == 3
        assert sample("cachesync_reads_total", namespace="fx", result="stale") == 0
        assert sample("cachesync_reads_total", namespace="fx", result="bypass") == 0
        assert sample("cachesync_fetches_total", namespace="fx") == 3
        assert sample("cachesync_fetch_errors_total", namespace="fx") == 1
        ok = "cachesync_fetch_duration_seconds_count"
        assert sample(ok, namespace="fx", outcome="ok") == 2
        assert sample(ok, namespace="fx", outcome="error") == 1
        assert sample("cachesync_events_total", namespace="fx") == 4
        lag = "cachesync_event_lag_seconds_count"
        assert sample(lag, namespace="fx", op="upsert") == 2
        assert sample(lag, namespace="fx", op="delete") == 1
        assert sample(lag, namespace="fx", op="flush") == 1
        # A flush retires entries in O(1); they are held (with their versions) until evicted.
        assert sample("cachesync_cache_entries", namespace="fx") == 2
        assert sample("cachesync_bad_events_total") == 1
        assert sample("cachesync_unknown_namespace_events_total") == 1
        assert sample("cachesync_messages_total") == 6
        assert (sample("cachesync_last_event_lag_seconds") or 0.0) >= 0.0

        # A read while the listener is down goes to the owner: a bypass.
        bus_for(url).disconnect_all()
        await eventually(lambda: not sync.listener_up)
        assert sample("cachesync_listener_up") == 0
        await get("USD")
        assert sample("cachesync_reads_total", namespace="fx", result="bypass") == 1
        await sync.wait_ready(5)
        assert sample("cachesync_listener_up") == 1


@pytest.mark.timeout(10)
async def test_lost_event_detections_by_cause(
    observed: tuple[CacheSync, PrometheusMetrics], unique: str
) -> None:
    sync, metrics = observed
    owner = Owner(USD=1.0)
    get = sync.cached("fx")(owner.fetch)

    def lost(cause: str) -> float | None:
        return value(metrics, "cachesync_lost_event_detections_total", cause=cause)

    for cause in ("gap", "source", "reconnect", "heartbeat"):
        assert lost(cause) == 0

    def event(source: str, seq: int, op: Op = Op.UPSERT, **kw: object) -> bytes:
        keys = ("X",) if op is Op.UPSERT else ()
        return ChangeEvent(source=source, seq=seq, ns="fx", op=op, keys=keys, ts=0.0, **kw).encode()

    sync.handle_message(event("s1", 1))  # hello: nothing cached, not a detection
    await get("USD")
    sync.handle_message(event("s1", 3))  # seq 2 lost
    assert lost("gap") == 1
    sync.handle_message(event("s2", 1))  # a restarted owner
    assert lost("source") == 1

    bus_for(f"memory://{unique}").disconnect_all()
    await eventually(lambda: lost("reconnect") == 1)
    await sync.wait_ready(5)

    # A source that announces a 20 ms heartbeat and then falls silent.
    sync.handle_message(event("s3", 1, op=Op.HEARTBEAT, value={"interval": 0.02}))
    await eventually(lambda: (lost("heartbeat") or 0) >= 1)
    assert lost("gap") == 1


@pytest.mark.timeout(5)
def test_event_lag_clamps_skew_and_ignores_forged_times() -> None:
    metrics = PrometheusMetrics()
    metrics.event_applied("fx", "upsert", -3.0)  # the owner's clock runs ahead of ours
    metrics.event_applied("fx", "upsert", float("inf"))
    metrics.event_applied("fx", "upsert", float("nan"))
    labels = {"namespace": "fx", "op": "upsert"}
    registry = metrics.registry
    assert registry.get_sample_value("cachesync_event_lag_seconds_count", labels) == 1
    assert registry.get_sample_value("cachesync_event_lag_seconds_sum", labels) == 0.0


@pytest.mark.timeout(10)
async def test_bind_once_and_unbind(unique: str) -> None:
    metrics = PrometheusMetrics()
    sync = CacheSync(f"memory://{unique}")
    metrics.bind(sync)
    with pytest.raises(ValueError, match="already bound"):
        metrics.bind(CacheSync(f"memory://{unique}"))
    sync.cached("fx")(Owner().fetch)
    assert b"cachesync_reads_total" in generate_latest(metrics.registry)
    metrics.unbind()
    assert b"cachesync_reads_total" not in generate_latest(metrics.registry)
    metrics.bind(sync)  # bindable again after unbind
    assert b'cachesync_cache_entries{namespace="fx"} 0.0' in generate_latest(metrics.registry)


@pytest.mark.timeout(10)
async def test_metrics_endpoint_in_fastapi(observed: tuple[CacheSync, PrometheusMetrics]) -> None:
    sync, metrics = observed
    owner = Owner(USD=1.0)
    get = sync.cached("fx")(owner.fetch)
    await get("USD")
    await get("USD")

    app = FastAPI()
    app.mount("/metrics", metrics.asgi_app())

    @app.get("/custom-metrics")
    def custom(request: Request) -> Response:
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(content=body, media_type=content_type)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        mounted = await client.get("/metrics/")
        custom_text = await client.get("/custom-metrics")
        openmetrics = await client.get(
            "/custom-metrics", headers={"accept": "application/openmetrics-text"}
        )
    for response in (mounted, custom_text):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert 'cachesync_reads_total{namespace="fx",result="hit"} 1.0' in response.text
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")


# -- every entry of stats() is exported -------------------------------------------------------


@pytest.mark.timeout(10)
async def test_every_entry_of_stats_is_exported(
    observed: tuple[CacheSync, PrometheusMetrics],
) -> None:
    sync, metrics = observed
    owner = Owner(USD=1.0)
    get = sync.cached("fx", ttl=60, max_bytes=10_000, version_of=lambda _: 1)(owner.fetch)
    await get("USD")

    async def current_version(key: str) -> int | None:
        return 1

    ConsistencyMonitor(sync, "fx", current_version)
    stats = sync.stats()
    assert {"namespaces", "listener", "consistency"} <= set(stats)
    scraped = {
        sample.name
        for family in metrics.registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }
    names = exported_names(stats)
    expected = {
        f"{section}.{field}"
        for section, value in stats.items()
        for field in (value if section == "listener" else next(iter(value.values())))
    }
    assert set(names) == expected
    # An entry with no value yet (None: no event so far) has its family, without a sample.
    families = {family.name for family in metrics.registry.collect()}

    def exported(entry: str, name: str) -> bool:
        section, field = entry.split(".")
        value = stats[section] if section == "listener" else next(iter(stats[section].values()))
        return name in scraped or (value[field] is None and name in families)

    missing = {entry: name for entry, name in names.items() if not exported(entry, name)}
    assert not missing, f"entries of stats() not exported to Prometheus: {missing}"


@pytest.mark.timeout(10)
async def test_a_new_counter_is_exported_without_a_change_to_the_exporter(
    observed: tuple[CacheSync, PrometheusMetrics], monkeypatch: pytest.MonkeyPatch
) -> None:
    sync, metrics = observed
    sync.cached("fx", ttl=60)(Owner(USD=1.0).fetch)
    stats = CacheSync.stats

    def with_new_counters(self: CacheSync) -> dict[str, Any]:
        result = stats(self)
        result["listener"]["brand_new"] = 3
        result["namespaces"]["fx"]["also_new"] = 4
        return result

    monkeypatch.setattr(CacheSync, "stats", with_new_counters)
    assert value(metrics, "cachesync_brand_new_total") == 3
    assert value(metrics, "cachesync_also_new_total", namespace="fx") == 4
    assert exported_names(sync.stats())["listener.brand_new"] == "cachesync_brand_new_total"


@pytest.mark.timeout(10)
async def test_the_monitor_section_is_held_by_the_client(unique: str) -> None:
    sync = CacheSync(f"memory://{unique}")

    async def current_version(key: str) -> int | None:
        return None

    first = ConsistencyMonitor(sync, "a", current_version)
    second = ConsistencyMonitor(sync, "b", current_version)
    assert set(sync.stats()["consistency"]) == {"a", "b"}
    assert first.counters is not second.counters
    sync.add_stats("other", dict)
    other = CacheSync(f"memory://{unique}")
    other.add_stats("consistency", dict)
    with pytest.raises(ValueError, match="taken"):
        ConsistencyMonitor(other, "a", current_version)
