"""A Flask app behind gunicorn, every worker with a coherent local cache.

Each worker reads prices through a cached plain function (SQLite is the "owner" here) and
publishes a change through the extension's blocking publisher after its commit; every other
worker drops its entry when the event arrives. With ``--preload`` the client starts in the
gunicorn master and follows the fork into each worker by itself::

    CACHESYNC_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/gunicorn --preload -w 4 --threads 8 'examples.flask_app:create_app()'
    curl -X PUT localhost:8000/prices/apple -H 'content-type: application/json' -d '{"price": 3}'
    curl localhost:8000/prices/apple      # 3 from whichever worker answers
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from flask import Flask, abort, request

from cachesync import CacheSync
from cachesync.contrib.flask import FlaskCacheSync

DATABASE = os.environ.get("PRICES_DB", "prices.db")
sync = CacheSync(os.environ.get("CACHESYNC_URL", "redis://127.0.0.1:6379/0"))


def _db() -> sqlite3.Connection:
    conn = sqlite3.connect(DATABASE)
    conn.execute("CREATE TABLE IF NOT EXISTS prices (item TEXT PRIMARY KEY, price REAL)")
    return conn


@sync.cached("prices", ttl=3600)
def get_price(item: str) -> float | None:
    with _db() as conn:
        row = conn.execute("SELECT price FROM prices WHERE item = ?", (item,)).fetchone()
    return None if row is None else float(row[0])


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config["CACHESYNC_PUBLISH_URL"] = sync.url  # this app also owns the prices
    app.config.update(config or {})
    ext = FlaskCacheSync(app, sync=sync)

    @app.get("/prices/<item>")
    def show(item: str) -> dict[str, Any]:
        price = get_price(item)
        if price is None:
            abort(404)
        return {"item": item, "price": price, "worker": os.getpid()}

    @app.put("/prices/<item>")
    def change(item: str) -> dict[str, Any]:
        price = float(request.get_json()["price"])
        with _db() as conn:  # commits on exit
            conn.execute("INSERT OR REPLACE INTO prices VALUES (?, ?)", (item, price))
        assert ext.publisher is not None
        ext.publisher.changed("prices", item)  # after the commit: every worker drops it
        return {"item": item, "price": price}

    return app
