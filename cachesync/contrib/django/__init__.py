"""The Django app: ``INSTALLED_APPS += ["cachesync.contrib.django"]``, configured from settings.

::

    CACHESYNC = {
        "URL": "redis://localhost:6379/0",   # the broker (consumer and owner)
        "CLIENT": "catalog.cache:sync",      # your CacheSync with its @sync.cached functions
        "OUTBOX": True,                       # owner: events go through the outbox table
    }

Keys (defaults in brackets): ``CLIENT`` [None: a client built from ``URL``, ``CHANNEL``
[``cachesync``] and ``CONNECT_TIMEOUT`` [10.0], see :func:`get_client`]; ``START`` [True]:
start the client's listener on a background thread when Django is ready, once per process
(under gunicorn ``--preload`` each worker restarts it after the fork by itself); ``WAIT``
[True]: wait for the subscription at startup (a broker down raises ``TransportError``; False:
start at once and keep trying, reads going to the owner meanwhile); ``PUBLISH_URL``
[``URL``] and ``HEARTBEAT_INTERVAL`` [1.0]: the owner's :class:`~cachesync.BlockingPublisher`;
``OUTBOX`` [False]: :func:`publish_on_commit` writes an :class:`~.models.OutboxEvent` row in the
transaction instead of publishing after the commit, and ``manage.py cachesync_relay`` publishes
the rows (guarantee 6: no event lost to a broker outage or a crash); ``RELAY`` [{}]: keyword
arguments of :class:`~cachesync.OutboxRelay`.

Owner side: :func:`publish_on_commit` / :func:`delete_on_commit` / :func:`flush_on_commit` in
your write paths, or :func:`publish_changes` on a model to publish its saves and deletes.
A rolled-back transaction publishes nothing; a committed one publishes once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ...events import Op

if TYPE_CHECKING:
    from ...client import CacheSync
    from ...publisher import BlockingPublisher
    from .apps import CacheSyncConfig

__all__ = [
    "delete_on_commit",
    "flush_on_commit",
    "get_client",
    "get_publisher",
    "publish_changes",
    "publish_on_commit",
]

M = TypeVar("M")


def _config() -> CacheSyncConfig:
    from django.apps import apps

    from .apps import CacheSyncConfig

    config = apps.get_app_config("cachesync")
    if not isinstance(config, CacheSyncConfig):  # pragma: no cover - another app took the label
        raise RuntimeError('add "cachesync.contrib.django" to INSTALLED_APPS')
    return config


def get_client() -> CacheSync:
    """This process's consumer client (see the module docstring)."""
    return _config().client


def get_publisher() -> BlockingPublisher:
    """This process's owner publisher (see the module docstring)."""
    return _config().publisher


def publish_on_commit(
    ns: str,
    *keys: str,
    version: int | None = None,
    value: Any = None,
    using: str | None = None,
) -> None:
    """Announce that ``keys`` of ``ns`` changed, once the current transaction (of database
    ``using``) commits; nothing if it rolls back. Outside a transaction: at once.

    With ``OUTBOX`` the change is written to the outbox table inside the transaction and the
    relay publishes it; otherwise it is published after the commit (an event lost to a broker
    outage at that moment is logged; consumers see the gap at the next event and flush).
    """
    _on_commit(Op.UPSERT, ns, keys, version, value, using)


def delete_on_commit(
    ns: str, *keys: str, version: int | None = None, using: str | None = None
) -> None:
    """As :func:`publish_on_commit`, for keys that no longer exist."""
    _on_commit(Op.DELETE, ns, keys, version, None, using)


def flush_on_commit(ns: str, using: str | None = None) -> None:
    """As :func:`publish_on_commit`, to drop all of ``ns`` at every consumer."""
    _on_commit(Op.FLUSH, ns, (), None, None, using)


def _on_commit(
    op: Op,
    ns: str,
    keys: tuple[str, ...],
    version: int | None,
    value: Any,
    using: str | None,
) -> None:
    from django.db import transaction

    from ...publisher import Change, _check

    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"event keys must be strings, got {type(key).__name__}")
    if value is not None and len(keys) != 1:
        raise ValueError("an event that carries a value must name exactly one key")
    change = Change(op, ns, keys, version, value, None)
    _check(change)
    config = _config()
    if config.options["OUTBOX"]:
        from .models import OutboxEvent

        OutboxEvent.objects.using(using).create(
            channel=config.options["CHANNEL"],
            ns=ns,
            op=op.value,
            keys=list(keys),
            version=version,
            value=value,
        )
        return
    publisher = config.publisher
    transaction.on_commit(
        functools.partial(publisher.send_many, [change]), using=using, robust=True
    )


def publish_changes(
    ns: str,
    *,
    key: str | Callable[[Any], str] = "pk",
    version: str | Callable[[Any], int | None] | None = None,
    value: Callable[[Any], Any] | None = None,
) -> Callable[[type[M]], type[M]]:
    """Class decorator for a model: publish each save as a change and each delete as a
    deletion of ``key`` in ``ns``, on commit (the "after commit hook").

    ``key`` and ``version`` are field names or functions of the instance; ``value(instance)``
    (optional) is the JSON the event carries for consumers in refresh mode. Bulk paths that
    send no signals (``QuerySet.update``, ``bulk_create``) need :func:`publish_on_commit`.
    """

    def field(spec: str | Callable[[Any], Any] | None, instance: Any) -> Any:
        if spec is None:
            return None
        return spec(instance) if callable(spec) else getattr(instance, spec)

    def register(model: type[M]) -> type[M]:
        from django.db.models.signals import post_delete, post_save

        def saved(sender: Any, instance: Any, raw: bool = False, **kwargs: Any) -> None:
            if raw:  # loading fixtures
                return
            publish_on_commit(
                ns,
                str(field(key, instance)),
                version=field(version, instance),
                value=field(value, instance),
                using=kwargs.get("using"),
            )

        def deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
            delete_on_commit(
                ns,
                str(field(key, instance)),
                version=field(version, instance),
                using=kwargs.get("using"),
            )

        label = getattr(getattr(model, "_meta", None), "label", model.__qualname__)
        post_save.connect(saved, sender=model, weak=False, dispatch_uid=f"cachesync:{ns}:{label}")
        post_delete.connect(
            deleted, sender=model, weak=False, dispatch_uid=f"cachesync:{ns}:{label}"
        )
        return model

    return register
