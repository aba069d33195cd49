"""Where a ``redis+stream://`` event's CPU goes: the raw client's read, ours, and each step of
applying it, measured in one process, round by round.

    .venv/bin/python -m benchmarks.stream_cost [--events 50000] [--rounds 5]

The apply-rate target of the transport benchmark (``benchmarks.latency``) asks that one consumer
apply at least 80% of the events per second that the raw client only receives: ours may spend at
most 1.25 times the raw client's CPU per event. This splits ours into steps, each measured as
the CPU time of this process (``time.process_time``) over a backlog of ``--events`` upserts
waiting in a stream (filled before the clock starts), the steps in turn within each round:

- **raw**: redis-py's ``xread(count=500, block=1000)`` loop (hiredis, RESP2), noting each
  payload: the raw side of ``benchmarks.latency``;
- **transport**: :class:`~cachesync.transports.redis.stream.RedisStreamTransport`'s
  subscription, noting each payload (XREAD and XINFO in one round trip, read without redis-py's
  reply callbacks);
- **+ decode**: the same, and each payload decoded by ``decode_event`` (msgspec);
- **+ invalidate**: the same, and each key dropped from a :class:`~cachesync.cache.LocalCache` with
  its version (``invalidate(key, version)``: every event carries a newer version than the one
  held, so each one writes a tombstone);
- **ours**: the same subscription feeding ``CacheSync.handle_message``, a started client with one
  namespace: the listener's whole work (sequence tracking, the guarantees' bookkeeping, stats).

Prints, and writes to ``benchmarks/results/STREAM_COST.md``, the median CPU per event of each
step (with the range over the rounds) and what the target leaves for decoding and applying.
Talks to Redis on 127.0.0.1 only; deletes its streams. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.common import table
from benchmarks.env import speed_index
from benchmarks.micro import encoded_events
from benchmarks.stats import median_spread

KEYS = 10_000
STREAM_BATCH = 500  # the transport's default batch, and benchmarks.latency's raw side
STEPS = ("raw", "transport", "+ decode", "+ invalidate", "ours")
OUT = os.path.join(os.path.dirname(__file__), "results", "STREAM_COST.md")

Consume = Callable[[bytes], Any]


def _fill(url: str, key: str, payloads: list[bytes]) -> None:
    """Append ``payloads`` to the stream ``key``, pipelined, before any clock starts."""
    import redis

    client = redis.Redis.from_url(url, protocol=2)
    try:
        pipe = client.pipeline(transaction=False)
        for payload in payloads:
            pipe.xadd(key, {"d": payload})
        pipe.execute()
    finally:
        client.close()


def _delete(url: str, key: str) -> None:
    import redis

    client = redis.Redis.from_url(url, protocol=2)
    try:
        client.delete(key)
    finally:
        client.close()


async def raw_cpu(url: str, payloads: list[bytes]) -> float:
    """CPU seconds per event of redis-py's own XREAD loop draining ``payloads``."""
    import redis.asyncio as aioredis

    key = f"stream-cost-{uuid.uuid4().hex}"
    _fill(url, key, payloads)
    client = aioredis.Redis.from_url(url, protocol=2)
    noted: list[bytes] = []
    try:
        gc.collect()
        last: Any = b"0-0"
        start = time.process_time()
        while len(noted) < len(payloads):
            reply: Any = await client.xread({key: last}, count=STREAM_BATCH, block=1000)
            for _key, entries in reply:
                for _id, fields in entries:
                    noted.append(fields[b"d"])
                last = entries[-1][0]
        return (time.process_time() - start) / len(payloads)
    finally:
        await client.aclose()
        _delete(url, key)


async def transport_cpu(url: str, payloads: list[bytes], consume: Consume) -> float:
    """CPU seconds per event of our stream subscription draining ``payloads`` into
    ``consume``."""
    from cachesync.transports.redis.stream import RedisStreamTransport

    key = f"stream-cost-{uuid.uuid4().hex}"
    transport = RedisStreamTransport(url.replace("redis://", "redis+stream://", 1))
    await transport.connect()
    ready = asyncio.Event()
    messages = transport.subscribe(key, lambda resumed: ready.set())
    first = asyncio.ensure_future(anext(messages))
    try:
        await ready.wait()
        _fill(url, key, payloads)  # the loop is held: the backlog waits in Redis
        gc.collect()
        start = time.process_time()
        consume(await first)
        count = 1
        if count < len(payloads):
            async for payload in messages:
                consume(payload)
                count += 1
                if count == len(payloads):
                    break
        return (time.process_time() - start) / len(payloads)
    finally:
        first.cancel()
        await messages.aclose()
        await transport.close()
        _delete(url, key)


def _primed_cache() -> Any:
    from cachesync.cache import LocalCache

    cache = LocalCache("items", ttl=3600, maxsize=2 * KEYS)
    for i in range(KEYS):
        cache.prime(f"k{i}", f"v{i}", 1)
    return cache


async def ours_cpu(url: str, source: str, payloads: list[bytes]) -> float:
    """CPU seconds per event of our subscription feeding a started ``CacheSync``."""
    from cachesync import CacheSync
    from cachesync.events import ChangeEvent, Op

    sync = CacheSync(f"memory://stream-cost-{uuid.uuid4().hex}", channel="bench")

    @sync.cached("items", ttl=3600, maxsize=2 * KEYS)
    async def fetch(key: str) -> str:
        return key

    async with sync:
        for i in range(KEYS):
            fetch.prime(f"k{i}", f"v{i}", version=1)
        sync.handle_message(
            ChangeEvent(source=source, seq=0, op=Op.HEARTBEAT, ts=time.time()).encode()
        )
        cpu = await transport_cpu(url, payloads, sync.handle_message)
        if sync.stats()["listener"]["gaps"]:
            raise RuntimeError("the client saw a gap: the measurement is void")
        return cpu


async def one_round(url: str, events: int) -> dict[str, float]:
    """Each step once, over a backlog of ``events`` upserts of a new source."""
    from cachesync.events import decode_event

    source = uuid.uuid4().hex
    payloads = encoded_events(source, 1, events, KEYS)
    noted: list[bytes] = []
    cache = _primed_cache()

    def decode(payload: bytes) -> None:
        noted.append(payload)
        decode_event(payload)

    def invalidate(payload: bytes) -> None:
        noted.append(payload)
        event = decode_event(payload)
        for key in event.keys:
            cache.invalidate(key, event.version)

    steps: dict[str, Callable[[], Awaitable[float]]] = {
        "raw": lambda: raw_cpu(url, payloads),
        "transport": lambda: transport_cpu(url, payloads, noted.append),
        "+ decode": lambda: transport_cpu(url, payloads, decode),
        "+ invalidate": lambda: transport_cpu(url, payloads, invalidate),
        "ours": lambda: ours_cpu(url, source, payloads),
    }
    out = {}
    for name in STEPS:
        noted.clear()
        out[name] = await steps[name]()
    return out


def report(rounds: list[dict[str, float]], command: str, events: int) -> str:
    """The Markdown report of ``rounds``."""
    medians = {name: median_spread([r[name] * 1e6 for r in rounds]) for name in STEPS}
    rows = []
    previous: float | None = None
    for name in STEPS:
        median, low, high = medians[name]
        added = "" if previous is None or name == "transport" else f"{median - previous:+.2f}"
        if name == "ours":
            added = f"{median - medians['transport'][0]:+.2f} over the transport"
        rows.append([name, f"{median:.2f} ({low:.2f}-{high:.2f})", added])
        previous = median
    raw, transport, ours = medians["raw"][0], medians["transport"][0], medians["ours"][0]
    allowed = raw / 0.8
    per_round = [r["raw"] / r["ours"] for r in rounds]
    ratio, ratio_low, ratio_high = median_spread(per_round)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Where a redis+stream event's CPU goes",
        "",
        f"Measured with `{command}` on {when}; {len(rounds)} rounds of {events:,} events, the "
        f"steps in turn within each round; speed index {speed_index()}.",
        "",
        "CPU microseconds per event, median over the rounds (range):",
        "",
        table(["step", "CPU us/event", "added us"], rows),
        "",
        f"- Ours against raw, CPU per event, round by round: {ratio:.2f}x of raw's rate "
        f"(range {ratio_low:.2f}-{ratio_high:.2f}); the target is 0.80x.",
        f"- The target allows ours {allowed:.2f} us per event (1.25 x raw's {raw:.2f}). Our "
        f"transport reads an event for {transport:.2f} us, which leaves "
        f"{allowed - transport:.2f} us to decode and apply it; the listener spends "
        f"{ours - transport:.2f}.",
        "",
    ]
    return "\n".join(lines)


async def run(url: str, events: int, rounds: int) -> list[dict[str, float]]:
    out = []
    for i in range(rounds):
        result = await one_round(url, events)
        out.append(result)
        figures = ", ".join(f"{name} {result[name] * 1e6:.2f}" for name in STEPS)
        print(f"round {i + 1}/{rounds}: CPU us/event: {figures}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--markdown", default=OUT, help="write the report here")
    args = parser.parse_args()
    if args.events < 1 or args.rounds < 1:
        parser.error("--events and --rounds must be at least 1")
    rounds = asyncio.run(run(args.redis_url, args.events, args.rounds))
    command = f"python -m benchmarks.stream_cost --events {args.events} --rounds {args.rounds}"
    text = report(rounds, command, args.events)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as out:
            out.write(text)
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
