"""The Django app config: reads ``settings.CACHESYNC`` and starts the client once per process."""

from __future__ import annotations

import importlib
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from ...client import CacheSync, ClientState
from ...events import DEFAULT_CHANNEL
from ...publisher import BlockingPublisher

DEFAULTS: dict[str, Any] = {
    "CLIENT": None,
    "URL": "memory://",
    "CHANNEL": DEFAULT_CHANNEL,
    "CONNECT_TIMEOUT": 10.0,
    "START": True,
    "WAIT": True,
    "PUBLISH_URL": None,
    "HEARTBEAT_INTERVAL": 1.0,
    "OUTBOX": False,
    "RELAY": {},
}


class CacheSyncConfig(AppConfig):
    """``INSTALLED_APPS += ["cachesync.contrib.django"]``; see :mod:`cachesync.contrib.django`
    for the settings. Holds this process's client and publisher (no module globals)."""

    name = "cachesync.contrib.django"
    label = "cachesync"
    verbose_name = "cachesync"
    default_auto_field = "django.db.models.BigAutoField"

    options: dict[str, Any]
    _client: CacheSync | None = None
    _publisher: BlockingPublisher | None = None

    def ready(self) -> None:
        raw = getattr(settings, "CACHESYNC", {})
        if not isinstance(raw, dict):
            raise ImproperlyConfigured("settings.CACHESYNC must be a dict")
        unknown = set(raw) - set(DEFAULTS)
        if unknown:
            raise ImproperlyConfigured(
                f"unknown settings.CACHESYNC keys {sorted(unknown)}; known: {sorted(DEFAULTS)}"
            )
        self.options = {**DEFAULTS, **raw}
        if self.options["START"] and (self.options["CLIENT"] or raw.get("URL")):
            # Once per process: under gunicorn --preload the master starts it and every
            # worker restarts it after the fork by itself (cachesync.runner).
            client = self.client
            if client.state is ClientState.UNOPENED:
                client.start_in_background(wait=bool(self.options["WAIT"]))

    @property
    def client(self) -> CacheSync:
        """The consumer client: ``CACHESYNC["CLIENT"]`` (``"module:attribute"``) or one built
        from ``URL``, ``CHANNEL`` and ``CONNECT_TIMEOUT``."""
        if self._client is None:
            path = self.options["CLIENT"]
            if path:
                self._client = _import(path)
            else:
                self._client = CacheSync(
                    self.options["URL"],
                    self.options["CHANNEL"],
                    connect_timeout=float(self.options["CONNECT_TIMEOUT"]),
                )
        return self._client

    @property
    def publisher(self) -> BlockingPublisher:
        """The owner's publisher on ``PUBLISH_URL`` (or ``URL``), started on first use in each
        process."""
        if self._publisher is None:
            url = self.options["PUBLISH_URL"] or self.options["URL"]
            self._publisher = BlockingPublisher(
                url,
                self.options["CHANNEL"],
                heartbeat_interval=self.options["HEARTBEAT_INTERVAL"],
            )
        return self._publisher


def _import(path: str) -> CacheSync:
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    try:
        client = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ImproperlyConfigured(
            f'settings.CACHESYNC["CLIENT"] = {path!r} names no importable object: {exc}'
        ) from exc
    if not isinstance(client, CacheSync):
        raise ImproperlyConfigured(
            f'settings.CACHESYNC["CLIENT"] = {path!r} is a {type(client).__name__}, not a CacheSync'
        )
    return client
