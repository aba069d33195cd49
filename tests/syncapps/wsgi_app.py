"""A plain WSGI app for the gunicorn tests: ``GET /item/<key>`` reads a cached function whose
owner is a Redis hash (``CACHESYNC_TEST_DB``); the reply says which worker answered, whether
its listener is live and how many fetches it made. The client is started at import, so under
``gunicorn --preload`` it starts in the master and every worker inherits it through a fork.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import redis

from cachesync import CacheSync

URL = os.environ["CACHESYNC_TEST_URL"]
DB = os.environ["CACHESYNC_TEST_DB"]

owner = redis.Redis.from_url(URL)
sync = CacheSync(URL, channel=os.environ["CACHESYNC_TEST_CHANNEL"], connect_timeout=5.0)


@sync.cached("items", ttl=3600)
def get_item(key: str) -> str | None:
    raw = owner.hget(DB, key)
    return None if raw is None else raw.decode()


sync.start_in_background()

# The counters a worker inherits from the master (whose listener runs too): a worker has heard
# the publisher once it counted a heartbeat of its own.
_inherited = {"heartbeats": 0}


def _forked() -> None:
    _inherited["heartbeats"] = sync.stats()["listener"]["heartbeats"]


os.register_at_fork(after_in_child=_forked)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if not path.startswith("/item/"):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    key = path.removeprefix("/item/")
    stats = sync.namespace("items").stats
    fetches = stats.fetches
    # Read before the value: a reply that says "heard" was served after the publisher's first
    # message, which may flush what was cached before it (a heartbeat is counted once it was
    # checked against its source, that flush included).
    heard = sync.stats()["listener"]["heartbeats"] > _inherited["heartbeats"]
    value = get_item(key)
    listener = sync.stats()["listener"]
    body = json.dumps(
        {
            "pid": os.getpid(),
            "value": value,
            "live": sync.listener_up,
            "fetches": stats.fetches,
            "heard": heard,
            # Served from the cache (a sync worker serves one request at a time).
            "hit": stats.fetches == fetches,
            # Anything that flushed the cache (another test's CLIENT KILL, say).
            "losses": sum(
                listener[name]
                for name in ("reconnects", "gaps", "source_changes", "heartbeat_misses")
            ),
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
