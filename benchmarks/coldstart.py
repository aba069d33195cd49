"""Hit rate from an empty cache and after a flush, beside the trace-driven ideal.

    .venv/bin/python -m benchmarks.coldstart [--full] [--strategies ttl-60s,cachesync-*]

The strategy comparison measures caches loaded before the run (its hit rates are those of a
warm cache). Here nothing is loaded: each strategy starts empty on the same workload (4
readers x 2,000 reads/s, 10,000 keys, Zipf 1.1, 5 updates/s), and halfway through every reader
empties its local cache once (what a flush on a lost event or a restart does). Per 0.5 s:
the hit rate, the **ideal** hit rate on the same trace (a coherent cache of unbounded size:
a read hits when its instance read the key before and no change was committed in between,
nor a flush), and the misses per second, the load a flush puts on the owner (for redis-py and
cashews: on Redis). The steady-state hit rate without any prefill is the last quarter before
the flush, with the ideal beside it: the ratio tells the cache's own losses apart from the
run's length (the ideal itself still grows with time: the tail of a Zipf is read rarely).

Writes ``benchmarks/results/COLDSTART.md`` and ``coldstart.png``. Short: 10 s per strategy
(~1 minute); ``--full``: 120 s each.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

from . import env
from .analysis import StrategyResult
from .common import pyplot, table
from .comparison import CURVE_BIN, Harness
from .progress import Progress
from .strategies import Settings, select

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = "ttl-60s,cachesync-invalidate-redis,redis-py-csc-fixed,cashews-fixed"


def settings_for(full: bool) -> Settings:
    """Start empty, log from the first read, flush halfway."""
    seconds = 120.0 if full else 10.0
    return dataclasses.replace(
        Settings(), prefill=False, warmup=0.0, duration=seconds, flush_at=seconds / 2, rounds=1
    )


def summary(r: StrategyResult, flush_at: float) -> list[str]:
    """One row: the first second, the last quarter before the flush (measured, ideal), the
    second after it, and the misses/s before and right after the flush."""
    c = r.curve
    t = np.array(c["t"])
    hit, ideal, misses = (np.array(c[k]) for k in ("hit_rate", "ideal", "misses_per_s"))
    first = t < 1.0
    steady = (t >= 0.75 * flush_at) & (t < flush_at)
    after = (t >= flush_at) & (t < flush_at + 1.0)
    ratio = hit[steady].mean() / ideal[steady].mean() if ideal[steady].mean() else float("nan")
    return [
        r.name,
        f"{hit[first].mean():.1%}",
        f"{hit[steady].mean():.2%}",
        f"{ideal[steady].mean():.2%}",
        f"{ratio:.3f}",
        f"{hit[after].mean():.1%}",
        f"{misses[steady].mean():,.0f}",
        f"{misses[after].max():,.0f}",
    ]


HEADERS = [
    "strategy",
    "hit rate, first 1 s",
    "before the flush (last quarter)",
    "ideal, same reads",
    "measured / ideal",
    "first 1 s after the flush",
    "misses/s before",
    "misses/s peak after",
]


def plot(results: list[StrategyResult], flush_at: float, path: Path) -> None:
    """Hit rate (solid) and the ideal (dotted) over time; misses/s below."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in results:
        line = top.plot(r.curve["t"], r.curve["hit_rate"], label=r.name)[0]
        top.plot(r.curve["t"], r.curve["ideal"], ls=":", color=line.get_color())
        bottom.plot(r.curve["t"], r.curve["misses_per_s"], color=line.get_color())
    for ax in (top, bottom):
        ax.axvline(flush_at, color="grey", lw=0.7, ls="--")
    top.set_ylabel("hit rate (dotted: ideal)")
    top.legend(fontsize=7)
    bottom.set_ylabel("misses/s (4 readers)")
    bottom.set_yscale("log")
    bottom.set_xlabel(f"s since the start (flush at {flush_at:g} s; {CURVE_BIN:g} s bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write COLDSTART.md and the plot."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--full", action="store_true", help="120 s per strategy")
    parser.add_argument("--strategies", default=DEFAULT, help="comma-separated name globs")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    settings = settings_for(args.full)
    svcs = env.services(settings.redis_url, settings.amqp_url)
    up = {name: env.reachable(svc) for name, svc in svcs.items()}
    harness = Harness(settings, Progress(quiet=False))
    results = []
    for strategy in select([p.strip() for p in args.strategies.split(",") if p.strip()]):
        if any(not up.get(n) for n in strategy.needs):
            print(f"skipping {strategy.name}: a server it needs is down", file=sys.stderr)
            continue
        print(f"{strategy.name}: {settings.duration:g} s from empty", file=sys.stderr)
        result = harness.run(strategy)
        if result.status == "ok" and result.curve:
            results.append(result)
        else:
            print(f"  {result.status}: {result.reason}", file=sys.stderr)
    assert settings.flush_at is not None
    text = table(HEADERS, [summary(r, settings.flush_at) for r in results])
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.coldstart", *argv])
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    method = (__doc__ or "").split("\n\n")[2]
    (out / "COLDSTART.md").write_text(
        f"# Cold start and flush\n\nCommand: `{command}` (load average at the end: {load}; "
        f"the machine is described in RESULTS.md).\n\n{method}\n\n{text}\n\n"
        "![cold start](coldstart.png)\n"
    )
    try:
        plot(results, settings.flush_at, out / "coldstart.png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
