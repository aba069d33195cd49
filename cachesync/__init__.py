"""cachesync: coherent local caches for many service instances.

An owner publishes change events; every consumer instance keeps a local TTL cache that drops or
refreshes entries as events arrive, notices lost events, and falls back to the owner on a miss.
"""

from typing import TYPE_CHECKING, Any

from .cache import LocalCache
from .client import CacheSync
from .contrib.monitor import ConsistencyMonitor
from .contrib.prometheus import PrometheusMetrics
from .errors import (
    CacheSyncError,
    ConfigError,
    ConnectionLost,
    EventDecodeError,
    FetchError,
    StateError,
    TransportError,
    UnknownSchemaError,
)
from .events import DEFAULT_CHANNEL, ChangeEvent, Op
from .fetch import HttpFetcher
from .owner.feeds import ChangeFeed, FeedError
from .publisher import BlockingPublisher, Change, Publisher
from .transports.base import Transport, from_url

if TYPE_CHECKING:
    from .owner.outbox import Outbox, OutboxRelay

__all__ = [
    "DEFAULT_CHANNEL",
    "BlockingPublisher",
    "CacheSync",
    "CacheSyncError",
    "Change",
    "ChangeFeed",
    "ConsistencyMonitor",
    "ChangeEvent",
    "ConfigError",
    "ConnectionLost",
    "EventDecodeError",
    "FeedError",
    "FetchError",
    "HttpFetcher",
    "LocalCache",
    "Op",
    "Outbox",
    "OutboxRelay",
    "PrometheusMetrics",
    "Publisher",
    "StateError",
    "Transport",
    "TransportError",
    "UnknownSchemaError",
    "from_url",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The outbox needs SQLAlchemy (the `outbox` extra): import it only when asked for.
    if name in ("Outbox", "OutboxRelay"):
        try:
            from .owner import outbox
        except ImportError as exc:
            raise ImportError(
                f"cachesync.{name} needs SQLAlchemy: pip install 'cachesync[outbox]'"
            ) from exc
        return getattr(outbox, name)
    raise AttributeError(f"module 'cachesync' has no attribute {name!r}")
