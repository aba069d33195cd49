"""The exceptions cachesync raises.

    CacheSyncError
    ├── ConfigError           a bad URL, an unknown scheme, a missing extra
    ├── EventDecodeError      a message that is not a valid ChangeEvent (also a ValueError)
    ├── FetchError            the owner could not answer a fetch (carries url and status)
    ├── StateError            a lifecycle misuse: reopening a closed client, publishing before start
    └── TransportError        the broker could not be reached or the connection broke
        └── ConnectionLost    an open connection or subscription was lost

Lower-level errors are re-raised as these with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "CacheSyncError",
    "ConfigError",
    "ConnectionLost",
    "EventDecodeError",
    "FetchError",
    "StateError",
    "TransportError",
]


class CacheSyncError(Exception):
    """Base class of every error cachesync raises on purpose."""


class ConfigError(CacheSyncError, ValueError):
    """A configuration cachesync cannot use; the message says what to change."""


class EventDecodeError(CacheSyncError, ValueError):
    """A broker message that is not a valid :class:`~cachesync.events.ChangeEvent`."""


class StateError(CacheSyncError, RuntimeError):
    """An object was used in the wrong lifecycle state (not started, or already closed)."""


class FetchError(CacheSyncError):
    """The owner could not answer: connection error, timeout, 5xx, or an unreadable body."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class TransportError(CacheSyncError):
    """The broker could not be reached, or refused an operation."""


class ConnectionLost(TransportError):
    """An established connection or subscription broke; events may have been missed."""
