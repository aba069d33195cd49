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


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if not path.startswith("/item/"):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    key = path.removeprefix("/item/")
    # Read before the value: a reply that says "heard" was served after the first message.
    listener = sync.stats()["listener"]
    heard = listener["messages"] > 0
    value = get_item(key)
    body = json.dumps(
        {
            "pid": os.getpid(),
            "value": value,
            "live": sync.listener_up,
            # Heard the publisher: its first message may flush what was cached before it.
            "heard": heard,
            "lost": {k: listener[k] for k in ("gaps", "heartbeat_misses", "reconnects")},
            "fetches": sync.namespace("items").stats.fetches,
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
