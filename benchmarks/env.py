"""The machine, the servers, and which cachesync transports can run here."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from cachesync.transports.base import from_url

PACKAGES = (
    "cachesync",
    "redis",
    "hiredis",
    "cashews",
    "xxhash",
    "bitarray",
    "aiormq",
    "cachetools",
    "aio-pika",
    "fastapi",
    "uvicorn",
    "httpx",
    "pydantic",
    "numpy",
    "matplotlib",
)


@dataclass(frozen=True)
class Service:
    """A server the comparison needs, and how to start it."""

    name: str
    host: str
    port: int

    @property
    def how_to_start(self) -> str:
        return f"docker compose up -d {self.name}"


def services(redis_url: str, amqp_url: str) -> dict[str, Service]:
    """The servers behind the URLs in use."""
    out = {}
    for name, url, port in (("redis", redis_url, 6379), ("rabbitmq", amqp_url, 5672)):
        parts = urlsplit(url)
        out[name] = Service(name, parts.hostname or "127.0.0.1", parts.port or port)
    return out


def reachable(service: Service, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to the service opens."""
    try:
        with socket.create_connection((service.host, service.port), timeout=timeout):
            return True
    except OSError:
        return False


def down_message(service: Service, needed_by: str) -> str:
    """What to tell the user when ``service`` is down."""
    return (
        f"{service.name} is not reachable on {service.host}:{service.port}, so {needed_by} "
        f"will be skipped. Start it with `{service.how_to_start}` and run again."
    )


TRANSPORT_MODULES = {
    "redis": "cachesync.transports.redis",
    "redis+stream": "cachesync.transports.redis.stream",
    "amqp": "cachesync.transports.amqp",
}


async def _roundtrip(url: str, timeout: float) -> None:
    channel = f"bench-probe-{os.getpid()}-{time.monotonic_ns()}"
    sub, pub = from_url(url, connect_timeout=timeout), from_url(url, connect_timeout=timeout)
    ready = asyncio.Event()
    try:
        await sub.connect()
        await pub.connect()
        iterator = sub.subscribe(channel, lambda resumed: ready.set())
        first = asyncio.ensure_future(iterator.__anext__())
        done, _ = await asyncio.wait(
            [first, asyncio.ensure_future(ready.wait())],
            timeout=timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not ready.is_set():
            first.cancel()
            raise TimeoutError("the subscription did not become ready")
        await pub.publish(channel, b"ping")
        got = await asyncio.wait_for(first, timeout)
        if got != b"ping":
            raise RuntimeError(f"received {got!r} instead of the message sent")
        with contextlib.suppress(Exception):
            await iterator.aclose()  # type: ignore[attr-defined]
    finally:
        for transport in (sub, pub):
            with contextlib.suppress(Exception):
                await transport.close()


def transport_problem(scheme: str, url: str, timeout: float = 5.0) -> str | None:
    """None if cachesync's ``scheme`` transport delivers a message here, else why not."""
    module = TRANSPORT_MODULES[scheme]
    if importlib.util.find_spec(module) is None:
        return f"{module} does not exist (yet)"
    try:
        asyncio.run(asyncio.wait_for(_roundtrip(url, timeout), timeout * 2))
    except Exception as exc:  # any failure means: do not benchmark it
        return f"{scheme}:// does not deliver a message: {type(exc).__name__}: {exc}"
    return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _redis_version(url: str) -> str:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2, protocol=2)
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def _rabbitmq_version(url: str) -> str:
    async def ask() -> str:
        import aio_pika

        connection = await aio_pika.connect(url, timeout=3)
        try:
            props = connection.transport.connection.server_properties  # type: ignore[union-attr]
            version = props.get("version", "?")
            return version.decode() if isinstance(version, bytes) else str(version)
        finally:
            await connection.close()

    try:
        return asyncio.run(ask())
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def package_versions() -> str:
    """``name version`` of every package the benchmarks use."""
    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def _redis_parser() -> str:
    """The parser redis-py picked (hiredis when it is installed)."""
    try:
        import redis.connection
    except ImportError:
        return "redis-py not installed"
    return redis.connection.DefaultParser.__name__


def speed_index() -> str:
    """How fast this process runs plain Python right now (best of 5 timings of a fixed loop):
    on a shared machine, compare it at the start and at the end of a run."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        total = 0
        for i in range(200_000):
            total += i & 7
        best = min(best, time.perf_counter() - start)
    return f"{best * 1e3:.1f} ms for a 200k-iteration loop"


def machine(redis_url: str, amqp_url: str, up: dict[str, bool]) -> dict[str, str]:
    """What the results were measured on."""
    load = os.getloadavg()
    return {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": _memory(),
        "OS": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": package_versions(),
        "redis-py parser": _redis_parser(),
        "Redis server": _redis_version(redis_url) if up.get("redis") else "not running",
        "RabbitMQ server": _rabbitmq_version(amqp_url) if up.get("rabbitmq") else "not running",
        "load average at start (1/5/15 min)": f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "Python speed at start": speed_index(),
    }
