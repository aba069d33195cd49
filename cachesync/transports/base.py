"""The transport contract, and the choice of a transport by URL scheme.

A transport moves opaque bytes on named channels and reports the state of its connection. It
knows nothing of caches or events: the client decodes what it receives.

Contract every transport keeps (the contract tests in ``tests/test_transport_contract.py`` run
over each one):

- ``connect()`` opens the connection, retrying until ``connect_timeout`` passes, then raises
  :class:`~cachesync.errors.TransportError`; ``close()`` is idempotent.
- ``publish(channel, payload)`` sends one message, or raises ``TransportError``.
- ``subscribe(channel, on_ready)`` is an async iterator of payloads. ``on_ready(resumed)`` is
  called from within the iteration once the subscription is live: for a live-only transport,
  before the first payload; for a transport that replays a log, after it has yielded the
  backlog missed since the previous subscription of this transport object. ``resumed`` is true
  only when that replay was complete (nothing was trimmed meanwhile); the client keeps reads
  away from its cache until ``on_ready`` and flushes when ``resumed`` is false.
  When the connection breaks the iterator raises :class:`~cachesync.errors.ConnectionLost`;
  it never reconnects on its own. Calling ``subscribe`` again (after ``connect()``) starts over.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

from ..errors import ConfigError

__all__ = ["Transport", "OnReady", "from_url", "redact_url", "register_scheme"]

OnReady = Callable[[bool], None]
"""Called with ``resumed`` once a subscription is live."""

# scheme -> (module, class name, extra that provides its dependencies)
_SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "memory": ("cachesync.transports.memory", "MemoryTransport", None),
    "redis": ("cachesync.transports.redis", "RedisPubSubTransport", "redis"),
    "rediss": ("cachesync.transports.redis", "RedisPubSubTransport", "redis"),
    "redis+stream": ("cachesync.transports.redis_stream", "RedisStreamTransport", "redis"),
    "rediss+stream": ("cachesync.transports.redis_stream", "RedisStreamTransport", "redis"),
    "amqp": ("cachesync.transports.amqp", "AmqpTransport", "rabbitmq"),
    "amqps": ("cachesync.transports.amqp", "AmqpTransport", "rabbitmq"),
    "redis+sentinel": ("cachesync.transports.redis_sentinel", "RedisSentinelTransport", "redis"),
    "rediss+sentinel": ("cachesync.transports.redis_sentinel", "RedisSentinelTransport", "redis"),
    "redis+cluster": ("cachesync.transports.redis_cluster", "RedisClusterTransport", "redis"),
    "rediss+cluster": ("cachesync.transports.redis_cluster", "RedisClusterTransport", "redis"),
    "amqp+stream": ("cachesync.transports.amqp_stream", "AmqpStreamTransport", "rabbitmq"),
    "amqps+stream": ("cachesync.transports.amqp_stream", "AmqpStreamTransport", "rabbitmq"),
    "nats": ("cachesync.transports.nats", "NatsTransport", "nats"),
}


class Transport(abc.ABC):
    """Moves bytes on named channels over one broker connection."""

    url: str

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be positive")
        self.url = url
        self.connect_timeout = connect_timeout

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection; retry until ``connect_timeout``, then raise TransportError."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection and end every subscription. Safe to call twice."""

    @abc.abstractmethod
    async def publish(self, channel: str, payload: bytes) -> None:
        """Send one message to every subscriber of ``channel``."""

    async def publish_many(self, channel: str, payloads: Sequence[bytes]) -> None:
        """Send several messages in order; transports override it to batch round trips.
        On an error some of them may have been sent."""
        for payload in payloads:
            await self.publish(channel, payload)

    @abc.abstractmethod
    def subscribe(self, channel: str, on_ready: OnReady | None = None) -> AsyncIterator[bytes]:
        """Yield the payloads published on ``channel`` until the connection breaks or closes."""

    def channel_for(self, channel: str, namespace: str) -> str:
        """The channel that carries the events of ``namespace`` on ``channel``.

        ``channel`` itself by default. A transport that spreads namespaces over shards
        (``redis+cluster://``) names one channel per namespace; the publisher then keeps a
        ``seq`` per such channel and the client subscribes to those of its namespaces.
        """
        return channel

    def subscribe_many(
        self, channels: Sequence[str], on_ready: OnReady | None = None
    ) -> AsyncIterator[bytes]:
        """Like :meth:`subscribe`, over several channels at once (``on_ready`` once all are
        live). Needed only where :meth:`channel_for` names several channels."""
        if len(channels) == 1:
            return self.subscribe(channels[0], on_ready)
        raise NotImplementedError(f"{type(self).__name__} subscribes to one channel at a time")

    @property
    def safe_url(self) -> str:
        """The URL with any password replaced by ``***``, fit for logs and errors."""
        return redact_url(self.url)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.safe_url!r})"


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable url>"
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def register_scheme(scheme: str, module: str, class_name: str, extra: str | None = None) -> None:
    """Make ``from_url`` build ``module.class_name`` for URLs of ``scheme`` (for plug-ins)."""
    _SCHEMES[scheme] = (module, class_name, extra)


def from_url(url: str, **options: object) -> Transport:
    """Build the transport for ``url`` by its scheme.

    Raises :class:`ConfigError` naming the (redacted) URL for a malformed URL or an unknown
    scheme, and saying which extra to install when the broker's client library is missing.
    """
    if not isinstance(url, str):
        raise ConfigError(f"transport URL must be a string, got {type(url).__name__}")
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:
        raise ConfigError(f"malformed transport URL {redact_url(url)!r}: {exc}") from None
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        raise ConfigError(f"unknown transport scheme in {redact_url(url)!r}; use one of: {known}")
    module_name, class_name, extra = _SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name:
            raise ConfigError(f"{scheme}:// is not available in this installation") from exc
        hint = f"pip install 'cachesync[{extra}]'" if extra else "reinstall cachesync"
        raise ConfigError(
            f"{scheme}:// needs a library that is not installed ({exc.name}): {hint}"
        ) from exc
    cls: type[Transport] = getattr(module, class_name)
    return cls(url, **options)  # type: ignore[arg-type]
