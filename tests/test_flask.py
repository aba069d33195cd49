"""The Flask extension, with Flask's test client, over the real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from cachesync import CacheSync
from cachesync.contrib.flask import FlaskCacheSync

from .test_runner import _applied


def _app(redis_url: str, channel: str, sync: CacheSync | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        CACHESYNC_URL=redis_url,
        CACHESYNC_CHANNEL=channel,
        CACHESYNC_PUBLISH_URL=redis_url,
        CACHESYNC_CONNECT_TIMEOUT=5.0,
    )
    return app


def test_config_keys_build_start_and_publish(redis_url: str, unique: str) -> None:
    db = {"USD": 1.0}
    app = _app(redis_url, unique)
    ext = FlaskCacheSync(app)
    assert app.extensions["cachesync"] is ext
    assert ext.sync.listener_up and ext.sync.channel == unique

    @ext.cached("rates")
    def rate(code: str) -> float:
        return db[code]

    @app.get("/rates/<code>")
    def show(code: str) -> dict[str, Any]:
        return {"rate": rate(code)}

    @app.put("/rates/<code>/<float:value>")
    def change(code: str, value: float) -> dict[str, Any]:
        db[code] = value
        assert ext.publisher is not None
        ext.publisher.changed("rates", code)
        return {"ok": True}

    try:
        client = app.test_client()
        assert client.get("/rates/USD").json == {"rate": 1.0}
        db["USD"] = 9.0  # behind the cache's back: still cached
        assert client.get("/rates/USD").json == {"rate": 1.0}
        applied = _applied(ext.sync)
        assert client.put("/rates/USD/2.5").json == {"ok": True}
        assert applied.wait(5)
        assert client.get("/rates/USD").json == {"rate": 2.5}
    finally:
        assert ext.publisher is not None
        ext.publisher.close()
        ext.sync.stop_background()


def test_app_factory_with_a_client_of_ones_own(redis_url: str, unique: str) -> None:
    sync = CacheSync(redis_url, channel=unique)
    ext = FlaskCacheSync(sync=sync)
    assert ext.sync is sync and not sync.listener_up
    app = _app(redis_url, unique)
    app.config["CACHESYNC_START"] = False
    app.config["CACHESYNC_PUBLISH_URL"] = None
    ext.init_app(app)
    assert not sync.listener_up and ext.publisher is None
    with sync.running():
        ext.init_app(_app(redis_url, unique))  # a second app: the client is not restarted
        assert sync.listener_up


def test_no_client_before_init_app() -> None:
    with pytest.raises(RuntimeError, match="init_app"):
        FlaskCacheSync().sync  # noqa: B018


def test_the_example_app(redis_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setenv("CACHESYNC_URL", redis_url)
    monkeypatch.setenv("PRICES_DB", str(tmp_path / "prices.db"))
    example = importlib.import_module("examples.flask_app")
    app = example.create_app()
    ext = app.extensions["cachesync"]
    try:
        client = app.test_client()
        assert client.get("/prices/apple").status_code == 404
        applied = _applied(ext.sync)
        assert client.put("/prices/apple", json={"price": 3}).json == {
            "item": "apple",
            "price": 3.0,
        }
        assert applied.wait(5)
        assert client.get("/prices/apple").json["price"] == 3.0
    finally:
        ext.publisher.close()
        ext.sync.stop_background()
