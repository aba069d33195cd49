"""cachesync: coherent local caches for many service instances.

An owner publishes change events; every consumer instance keeps a local TTL cache that drops or
refreshes entries as events arrive, notices lost events, and falls back to the owner on a miss.
"""

from .cache import LocalCache
from .client import CacheSync
from .errors import (
    CacheSyncError,
    ConfigError,
    ConnectionLost,
    EventDecodeError,
    FetchError,
    StateError,
    TransportError,
)
from .events import ChangeEvent, Op
from .publisher import Publisher
from .transports.base import Transport, from_url

__all__ = [
    "CacheSync",
    "CacheSyncError",
    "ChangeEvent",
    "ConfigError",
    "ConnectionLost",
    "EventDecodeError",
    "FetchError",
    "LocalCache",
    "Op",
    "Publisher",
    "StateError",
    "Transport",
    "TransportError",
    "from_url",
]

__version__ = "0.1.0"
