"""The WSGI app that :mod:`benchmarks.gunicorn_load` serves under gunicorn.

``GET /item/<key>`` returns ``{"key", "version"}`` read from the owner (a Redis hash) in one of
three ways, chosen by ``BENCH_MODE``: ``cachesync`` (a cached plain function, the client
started at import so that ``--preload`` starts it in the master and every worker restarts it
after the fork), ``ttl`` (``cachetools.cached(TTLCache)`` behind a lock) or ``none``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import cachetools
import redis

from cachesync import CacheSync

MODE = os.environ.get("BENCH_MODE", "cachesync")
URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
DB = os.environ.get("BENCH_DB", "bench-gunicorn")
TTL = float(os.environ.get("BENCH_TTL", "5"))

owner = redis.Redis.from_url(URL)


def fetch(key: str) -> int:
    raw = owner.hget(DB, key)
    return 0 if raw is None else int(raw)


read: Callable[[str], int]
if MODE == "cachesync":
    sync = CacheSync(URL, channel=os.environ.get("BENCH_CHANNEL", "bench-gunicorn"))
    read = sync.cached("items", ttl=3600)(fetch)
    sync.start_in_background()
elif MODE == "ttl":
    read = cachetools.cached(cachetools.TTLCache(maxsize=10_000, ttl=TTL), lock=threading.Lock())(
        fetch
    )
else:
    read = fetch


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    key = environ.get("PATH_INFO", "").removeprefix("/item/")
    body = json.dumps({"key": key, "version": read(key)}).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]
