"""The strategy comparison in one process: owner, readers and ``memory://`` bus on one loop.

Not a benchmark (every piece shares one core and one event loop), but the same owner, readers,
workload and analysis as the real runs, wired without sockets: the smoke test runs it, and it is
handy to try a change quickly.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

import httpx

from .analysis import StrategyResult, analyze
from .owner_app import Owner, create_app
from .reader_proc import collect, events_at, items_to_prefill, planned_keys
from .strategies import Settings, Strategy, make_reader, owner_config
from .workload import Schedule, run_reads


async def run_in_process(strategy: Strategy, settings: Settings) -> StrategyResult:
    """Run ``strategy`` with ``settings.readers`` readers on one event loop. A cachesync
    strategy runs over ``memory://`` whatever its scheme (only memory:// needs no broker)."""
    run_id = uuid.uuid4().hex[:8]
    if strategy.is_cachesync:
        strategy = replace(strategy, params={"url": f"memory://bench-{run_id}"})
    channel = f"bench-{run_id}"
    config = owner_config(strategy, settings, channel=channel, redis_prefix=f"bench:{run_id}:")
    owner = Owner(config)
    app = create_app(owner, manage_lifespan=False)
    base_url = "http://owner"
    result = StrategyResult(strategy.name, strategy.label, strategy.family)
    async with (
        owner,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as client,
    ):
        readers = [
            make_reader(
                strategy,
                settings,
                client=client,
                base_url=base_url,
                channel=channel,
                redis_prefix=config.redis_prefix,
                seed=index,
            )
            for index in range(settings.readers)
        ]
        plans = [planned_keys(settings, index) for index in range(settings.readers)]
        try:
            for reader, keys in zip(readers, plans, strict=True):
                await reader.start()
                await reader.prefill(items_to_prefill(list(owner.items.values()), keys))
            owner.start_updates()
            start = time.monotonic_ns() + 10_000_000
            measure = start + int(settings.warmup * 1e9)
            schedule = Schedule(start, measure, measure + int(settings.duration * 1e9))
            before = [asyncio.create_task(events_at(r, measure)) for r in readers]
            requests_before = asyncio.create_task(_requests_at(owner, measure))
            runs = await asyncio.gather(
                *(
                    run_reads(
                        reader.get,
                        keys=plans[index],
                        rate=settings.rate,
                        max_in_flight=settings.max_in_flight,
                        schedule=schedule,
                        probe_interval=settings.probe_interval
                        if strategy.family != "none"
                        else None,
                    )
                    for index, reader in enumerate(readers)
                )
            )
            await owner.stop_updates()
            results = [
                collect(reader, reads, probe, await events)
                for reader, (reads, probe), events in zip(readers, runs, before, strict=True)
            ]
            requests = owner.requests - await requests_before
        finally:
            for reader in readers:
                await reader.stop()
    return analyze(result, results, owner.log, schedule, requests)


async def _requests_at(owner: Owner, t_ns: int) -> int:
    await asyncio.sleep(max(0.0, (t_ns - time.monotonic_ns()) / 1e9))
    return owner.requests
