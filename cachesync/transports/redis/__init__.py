"""The Redis transports, on redis-py's public API (with hiredis, its C parser).

- :mod:`.connection`: URL options, connections, ``connect()`` and publishing, shared by both;
- :mod:`.pubsub`: ``redis://`` and ``rediss://`` (pub/sub, at-most-once);
- :mod:`.stream`: ``redis+stream://`` and ``rediss+stream://`` (a stream per channel, with
  replay after a reconnect).
"""

from __future__ import annotations

from .connection import DEFAULT_HEALTH_CHECK_INTERVAL, RedisTransportBase
from .pubsub import RedisPubSubTransport
from .stream import DEFAULT_BATCH, DEFAULT_BLOCK_MS, DEFAULT_MAXLEN, RedisStreamTransport

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_BLOCK_MS",
    "DEFAULT_HEALTH_CHECK_INTERVAL",
    "DEFAULT_MAXLEN",
    "RedisPubSubTransport",
    "RedisStreamTransport",
    "RedisTransportBase",
]
