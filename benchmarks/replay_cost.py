"""Consumer CPU per message of a replaying transport's subscription, alone (no client).

    .venv/bin/python -m benchmarks.replay_cost [--transports nats,redis+stream]
        [--messages 5000] [--rounds 5]

For ``nats://`` and ``redis+stream://``, in turn within each round: a subscription takes one
message and ends; ``--messages`` more are published; a new subscription of the same transport
object replays them. The CPU time of this process (``time.process_time``) over that replay,
divided by the messages, is what reading one message through the transport costs. Prints the
median and the range over the rounds.
Talks to the local servers on 127.0.0.1 only (one that is down is skipped); deletes the
streams it made. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

from cachesync.errors import TransportError
from cachesync.transports.base import from_url

URLS = {
    "nats": "nats://127.0.0.1:4222",
    "redis+stream": "redis+stream://127.0.0.1:6379/0",
}
PAYLOAD = b"x" * 150  # about an invalidation event's size


async def one_round(url: str, messages: int) -> float:
    """CPU seconds per message of a subscription of ``url`` replaying ``messages``."""
    channel = f"replay-cost-{uuid.uuid4().hex[:12]}"
    reader, writer = from_url(url), from_url(url)
    await reader.connect()
    await writer.connect()
    try:
        ready = asyncio.Event()
        first = reader.subscribe(channel, lambda resumed: ready.set())
        taken = asyncio.ensure_future(anext(first))
        await ready.wait()
        await writer.publish(channel, b"0")
        await taken
        await first.aclose()  # type: ignore[attr-defined]
        await writer.publish_many(channel, [PAYLOAD] * messages)
        again = reader.subscribe(channel)
        start, count = time.process_time(), 0
        async for _ in again:
            count += 1
            if count == messages:
                break
        cpu = time.process_time() - start
        await again.aclose()  # type: ignore[attr-defined]
        return cpu / messages
    finally:
        await reader.close()
        await writer.close()
        await _forget(url, channel)


async def _forget(url: str, channel: str) -> None:
    """Delete the stream the round made."""
    if url.startswith("nats://"):
        import nats

        from cachesync.transports.nats import stream_name

        nc = await nats.connect(url)
        try:
            await nc.jetstream().delete_stream(stream_name(channel))
        finally:
            await nc.close()
    else:
        import redis.asyncio as aioredis

        client: Any = aioredis.Redis.from_url(url.replace("redis+stream://", "redis://", 1))
        try:
            await client.delete(channel)
        finally:
            await client.aclose()


async def _reachable(url: str) -> str | None:
    """None if a transport of ``url`` connects, else why not."""
    transport = from_url(url, connect_timeout=3.0)
    try:
        await transport.connect()
    except TransportError as exc:
        return str(exc)
    finally:
        await transport.close()
    return None


async def run(names: list[str], messages: int, rounds: int) -> dict[str, list[float]]:
    """CPU seconds per message, round by round, of each transport in ``names``."""
    out: dict[str, list[float]] = {}
    for name in names:
        problem = await _reachable(URLS[name])
        if problem is not None:
            print(f"{name}: skipped: {problem}")
            continue
        out[name] = []
    for i in range(rounds):
        for name in out:
            cpu = await one_round(URLS[name], messages)
            out[name].append(cpu)
            print(f"round {i + 1}/{rounds}: {name} {cpu * 1e6:.1f} us/message", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", default=",".join(URLS))
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    names = [n.strip() for n in args.transports.split(",") if n.strip()]
    unknown = [n for n in names if n not in URLS]
    if unknown or args.messages < 1 or args.rounds < 1:
        parser.error(f"transports are {', '.join(URLS)}; --messages and --rounds >= 1")
    results = asyncio.run(run(names, args.messages, args.rounds))
    for name, cpus in results.items():
        us = [c * 1e6 for c in cpus]
        print(
            f"{name}: {statistics.median(us):.1f} us of CPU per message, median of "
            f"{len(us)} rounds (range {min(us):.1f}-{max(us):.1f})"
        )


if __name__ == "__main__":
    main()
