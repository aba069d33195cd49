"""The Flask extension: the client started with the app, configured from ``app.config``.

::

    sync = CacheSync("redis://localhost:6379/0")     # or let the extension build it

    @sync.cached("currencies", ttl=3600)
    def get_currency(code: str) -> dict: ...

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config.from_prefixed_env()              # FLASK_CACHESYNC_URL=redis://...
        FlaskCacheSync(app, sync=sync)              # starts the listener in the background
        return app

Config keys (defaults in brackets): ``CACHESYNC_URL`` [``memory://``], ``CACHESYNC_CHANNEL``
[``cachesync``], ``CACHESYNC_CONNECT_TIMEOUT`` [10.0] build the client when none is given;
``CACHESYNC_START`` [True] starts its listener on a background thread in ``init_app`` (set it to
False to call ``sync.start_in_background()`` yourself, e.g. in gunicorn's ``post_fork``);
``CACHESYNC_WAIT`` [True] waits for the subscription (a broker down at startup raises
:class:`~cachesync.errors.TransportError`); False starts at once and keeps trying, reads going
to the owner meanwhile;
``CACHESYNC_PUBLISH_URL`` [None], in an owner app, makes ``ext.publisher`` a
:class:`~cachesync.publisher.BlockingPublisher` on that broker, with
``CACHESYNC_HEARTBEAT_INTERVAL`` [1.0]. Under gunicorn ``--preload`` the client follows the fork
into every worker by itself (see :mod:`cachesync.runner`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Unpack

from ..cached import CacheOptionsDict, Decorator
from ..client import CacheSync, ClientState
from ..events import DEFAULT_CHANNEL
from ..publisher import BlockingPublisher

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["FlaskCacheSync"]

DEFAULTS: dict[str, Any] = {
    "CACHESYNC_URL": "memory://",
    "CACHESYNC_CHANNEL": DEFAULT_CHANNEL,
    "CACHESYNC_CONNECT_TIMEOUT": 10.0,
    "CACHESYNC_START": True,
    "CACHESYNC_WAIT": True,
    "CACHESYNC_PUBLISH_URL": None,
    "CACHESYNC_HEARTBEAT_INTERVAL": 1.0,
}


class FlaskCacheSync:
    """Binds a :class:`~cachesync.client.CacheSync` (and optionally a blocking publisher) to a
    Flask app; ``app.extensions["cachesync"]`` is this object. Use it directly
    (``FlaskCacheSync(app)``) or with an app factory (``ext = FlaskCacheSync()``, then
    ``ext.init_app(app)``)."""

    def __init__(self, app: Flask | None = None, *, sync: CacheSync | None = None) -> None:
        self._sync = sync
        self.publisher: BlockingPublisher | None = None
        if app is not None:
            self.init_app(app)

    @property
    def sync(self) -> CacheSync:
        """The client (built from the config by :meth:`init_app` when none was given)."""
        if self._sync is None:
            raise RuntimeError(
                "FlaskCacheSync has no client yet: pass sync= or call init_app(app) first"
            )
        return self._sync

    def init_app(self, app: Flask) -> None:
        """Read the config, build what is missing and start the listener (once per
        process: a client already started is left as it is)."""
        for name, default in DEFAULTS.items():
            app.config.setdefault(name, default)
        config = app.config
        if self._sync is None:
            self._sync = CacheSync(
                config["CACHESYNC_URL"],
                config["CACHESYNC_CHANNEL"],
                connect_timeout=float(config["CACHESYNC_CONNECT_TIMEOUT"]),
            )
        if config["CACHESYNC_PUBLISH_URL"] and self.publisher is None:
            self.publisher = BlockingPublisher(
                config["CACHESYNC_PUBLISH_URL"],
                config["CACHESYNC_CHANNEL"],
                heartbeat_interval=config["CACHESYNC_HEARTBEAT_INTERVAL"],
            )
        app.extensions["cachesync"] = self
        if config["CACHESYNC_START"] and self._sync.state is ClientState.UNOPENED:
            self._sync.start_in_background(wait=bool(config["CACHESYNC_WAIT"]))

    def cached(self, ns: str, **options: Unpack[CacheOptionsDict]) -> Decorator:
        """``sync.cached(ns, **options)`` of the client (see :meth:`CacheSync.cached`; the
        options are those of :class:`~cachesync.cached.CacheOptions`)."""
        return self.sync.cached(ns, **options)
