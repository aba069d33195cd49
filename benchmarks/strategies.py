"""The strategies compared, the workload settings, and how each strategy builds its owner sink
and its readers."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from .adapters import Cachesync, Cashews, NoCache, Reader, RedisClientSide, TtlOnly
from .owner_app import OwnerConfig

REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True)
class Settings:
    """The workload and the length of each run. Defaults are the short run's."""

    n_keys: int = 10_000
    zipf_s: float = 1.1
    readers: int = 4
    rate: float = 2000.0  # reads/s per reader process
    max_in_flight: int = 32  # outstanding reads per reader process
    update_rate: float = 5.0  # workload updates/s at the owner
    update_dist: str = "zipf"
    probe_rate: float = 50.0  # probe-key updates/s
    probe_interval: float = 0.001  # s between two probe polls in each reader
    warmup: float = 0.5  # s of workload before measuring (after the prefill)
    duration: float = 2.0  # s measured, per round
    rounds: int = 5  # every strategy runs this many times, in a shuffled order each round
    prefill: bool = True  # load each cache before the run (False: start empty)
    flush_at: float | None = None  # s after the start: each reader empties its cache once
    value_bytes: int = 100
    seed: int = 1
    redis_url: str = REDIS_URL
    amqp_url: str = AMQP_URL


FULL = Settings(warmup=5.0, duration=45.0, rounds=5)
"""The documented long run (``--full``): 5 rounds x 44 s counted x 50 probe updates/s = 11,000
probe updates per strategy (44,000 windows over 4 instances), enough for a p99.9."""


@dataclass(frozen=True)
class Strategy:
    """One way of reading the owner's data, with what it needs to run."""

    name: str
    family: str  # none | ttl | cachesync | redis-csc | cashews
    label: str
    ttl: float | None = None
    mode: str | None = None  # cachesync
    scheme: str | None = None  # cachesync transport scheme
    fixed: bool = False  # peers: run with the smallest fix
    needs: tuple[str, ...] = ()
    note: str = ""
    params: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_cachesync(self) -> bool:
        return self.family == "cachesync"


def transport_url(scheme: str, settings: Settings) -> str:
    """The cachesync URL of ``scheme`` on this machine's servers."""
    if scheme == "amqp":
        return settings.amqp_url
    rest = settings.redis_url.split("://", 1)[1]
    return f"{scheme}://{rest}"


def cashews_url(settings: Settings, fixed: bool) -> str:
    """cashews' documented client-side URL; the fix adds ``protocol=2``."""
    url = f"{settings.redis_url}?client_side=true"
    return url + "&protocol=2" if fixed else url


CACHESYNC_SCHEMES = ("redis", "redis+stream", "amqp")


def all_strategies() -> list[Strategy]:
    """Every strategy, in report order."""
    out = [Strategy("no-cache", "none", "no cache (every read asks the owner)")]
    for ttl in (1.0, 10.0, 60.0):
        out.append(Strategy(f"ttl-{ttl:g}s", "ttl", f"TTL only, cachetools {ttl:g} s", ttl=ttl))
    for scheme in CACHESYNC_SCHEMES:
        needs = ("rabbitmq",) if scheme == "amqp" else ("redis",)
        for mode in ("invalidate", "refresh"):
            out.append(
                Strategy(
                    f"cachesync-{mode}-{scheme}",
                    "cachesync",
                    f"cachesync {mode}, {scheme}://",
                    mode=mode,
                    scheme=scheme,
                    needs=needs,
                )
            )
    out += [
        Strategy(
            "redis-py-csc-documented",
            "redis-csc",
            "redis-py client-side cache, as documented",
            needs=("redis",),
        ),
        Strategy(
            "redis-py-csc-fixed",
            "redis-csc",
            "redis-py client-side cache, version gate lowered",
            fixed=True,
            needs=("redis",),
        ),
        Strategy(
            "cashews-documented",
            "cashews",
            "cashews client_side=true, as documented",
            needs=("redis",),
        ),
        Strategy(
            "cashews-fixed",
            "cashews",
            "cashews client_side=true&protocol=2",
            fixed=True,
            needs=("redis",),
        ),
    ]
    return out


SHORT_DEFAULT = (
    "no-cache",
    "ttl-1s",
    "ttl-60s",
    "cachesync-invalidate-*",
    "redis-py-csc-*",
    "cashews-*",
)
"""What ``python -m benchmarks`` runs: every peer, every transport of ours in invalidate mode,
the TTL bounds the targets need (every strategy runs under ``--full``)."""


def select(patterns: tuple[str, ...] | list[str]) -> list[Strategy]:
    """The strategies whose names match any of the glob ``patterns``, in report order."""
    chosen = [s for s in all_strategies() if any(fnmatch.fnmatch(s.name, p) for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatch(s.name, p) for s in all_strategies())]
    if unknown:
        names = ", ".join(s.name for s in all_strategies())
        raise ValueError(f"no strategy matches {', '.join(unknown)}; known: {names}")
    return chosen


def owner_config(
    strategy: Strategy, settings: Settings, *, channel: str, redis_prefix: str
) -> OwnerConfig:
    """How the owner announces changes for ``strategy``."""
    base = OwnerConfig(
        n_keys=settings.n_keys,
        value_bytes=settings.value_bytes,
        channel=channel,
        redis_prefix=redis_prefix,
        update_rate=settings.update_rate,
        update_dist=settings.update_dist,
        zipf_s=settings.zipf_s,
        probe_rate=settings.probe_rate,
        seed=settings.seed,
    )
    if strategy.family == "cachesync":
        assert strategy.scheme is not None
        return replace(
            base,
            sink="cachesync",
            url=strategy.params.get("url") or transport_url(strategy.scheme, settings),
            carry_value=strategy.mode == "refresh",
        )
    if strategy.family == "redis-csc":
        return replace(base, sink="redis", url=settings.redis_url)
    if strategy.family == "cashews":
        return replace(base, sink="cashews", url=cashews_url(settings, fixed=True))
    return base


def make_reader(
    strategy: Strategy,
    settings: Settings,
    *,
    client: httpx.AsyncClient,
    base_url: str,
    channel: str,
    redis_prefix: str,
    seed: int,
) -> Reader:
    """A reader for ``strategy``; ``client`` talks to the owner at ``base_url``."""
    family = strategy.family
    if family == "none":
        return NoCache(client)
    if family == "ttl":
        assert strategy.ttl is not None
        return TtlOnly(client, strategy.ttl, seed=seed)
    if family == "cachesync":
        assert strategy.scheme is not None and strategy.mode is not None
        url = strategy.params.get("url") or transport_url(strategy.scheme, settings)
        return Cachesync(url, channel, strategy.mode, client, base_url)
    if family == "redis-csc":
        return RedisClientSide(settings.redis_url, redis_prefix, fix=strategy.fixed)
    if family == "cashews":
        return Cashews(cashews_url(settings, strategy.fixed))
    raise ValueError(f"unknown strategy family {family!r}")
