"""The exceptions cachesync raises.

    CacheSyncError
    ├── ConfigError           a bad URL, an unknown scheme, a missing extra
    ├── EventDecodeError      a message that is not a valid ChangeEvent (also a ValueError)
    │   └── UnknownSchemaError  an event of a schema version this consumer does not read
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
    "UnknownSchemaError",
]


class CacheSyncError(Exception):
    """Base class of every error cachesync raises on purpose."""


class ConfigError(CacheSyncError, ValueError):
    """A configuration cachesync cannot use; the message says what to change."""


class EventDecodeError(CacheSyncError, ValueError):
    """A broker message that is not a valid :class:`~cachesync.events.ChangeEvent`."""


class UnknownSchemaError(EventDecodeError):
    """An event written in a schema version this consumer does not read (a newer owner).

    ``version`` is the version it names; ``ns`` its namespace if it could be read (else
    None). The consumer treats it as a possible loss, never as nothing."""

    def __init__(self, message: str, *, version: object = None, ns: str | None = None) -> None:
        super().__init__(message)
        self.version = version
        self.ns = ns


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
