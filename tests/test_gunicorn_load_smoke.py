"""The gunicorn load benchmark runs (one tiny round of the cachesync mode; measures nothing)."""

from __future__ import annotations

import argparse

from benchmarks.gunicorn_load import run_mode


def test_gunicorn_load_runs(redis_url: str) -> None:
    args = argparse.Namespace(
        seconds=0.5,
        workers=2,
        threads=2,
        clients=2,
        keys=5,
        ttl=5.0,
        change_every=0.05,
        bound=1.0,
        max_requests=10_000,
    )
    result = run_mode("cachesync", args)
    assert result.requests > 0 and result.errors == 0
    assert result.past_bound == 0
