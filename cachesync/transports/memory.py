"""``memory://NAME``: an in-process bus, the embedded default.

Every transport object opened on the same URL in one process shares one :class:`MemoryBus`, so
a ``Publisher`` and several ``CacheSync`` instances see each other's events (tests, the demo).
Like Redis pub/sub it is at-most-once: a subscriber that falls more than ``max_backlog``
messages behind is disconnected (``ConnectionLost``), as Redis does with a slow client, and
:meth:`MemoryBus.disconnect_all` cuts every subscription, for fault tests.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from ..errors import ConnectionLost
from .base import ConnectionState, Connector, OnReady, Transport, int_option, parse_options
from .inbox import Inbox

__all__ = ["MemoryBus", "MemoryTransport"]

DEFAULT_MAX_BACKLOG = 1_000_000

_OPTIONS = (int_option("max_backlog", DEFAULT_MAX_BACKLOG),)


class _Subscription(Inbox[bytes]):
    __slots__ = ("channel",)

    def __init__(self, channel: str, max_backlog: int) -> None:
        super().__init__(max_backlog)
        self.channel = channel


class MemoryBus:
    """The shared state of one ``memory://NAME`` URL: who subscribes to which channel."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._subscriptions: dict[str, set[_Subscription]] = {}
        self.published = 0

    def publish(self, channel: str, payload: bytes) -> int:
        """Deliver ``payload`` to every live subscription of ``channel``; return how many."""
        self.published += 1
        subs = self._subscriptions.get(channel)
        if not subs:
            return 0
        for sub in subs:
            sub.deliver(payload)
        return len(subs)

    def subscriber_count(self, channel: str) -> int:
        """How many subscriptions ``channel`` has now."""
        return len(self._subscriptions.get(channel, ()))

    def disconnect_all(self) -> None:
        """Cut every subscription, as a broker restart would: events in flight are lost."""
        for subs in self._subscriptions.values():
            for sub in subs:
                sub.cut("the bus was cut")

    def _add(self, sub: _Subscription) -> None:
        self._subscriptions.setdefault(sub.channel, set()).add(sub)

    def _remove(self, sub: _Subscription) -> None:
        subs = self._subscriptions.get(sub.channel)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscriptions[sub.channel]


class _BusRegistry:
    """Buses by name, alive while some transport holds them."""

    def __init__(self) -> None:
        self._buses: weakref.WeakValueDictionary[str, MemoryBus] = weakref.WeakValueDictionary()

    def get(self, name: str) -> MemoryBus:
        bus = self._buses.get(name)
        if bus is None:
            bus = MemoryBus(name)
            self._buses[name] = bus
        return bus


# The lookup that makes "same URL, same bus" true inside one process. It holds no
# configuration, only weak references, so a bus disappears with its last transport.
_registry = _BusRegistry()


def bus_for(url: str) -> MemoryBus:
    """The bus that ``url`` (``memory://NAME``) names in this process."""
    parts = urlsplit(url)
    return _registry.get(parts.netloc + parts.path)


class MemoryTransport(Transport):
    """Transport over a :class:`MemoryBus` in this process. No server needed.

    ``memory://NAME?max_backlog=N`` (or ``max_backlog=`` as a keyword) bounds how far a
    subscriber may fall behind.
    """

    def __init__(
        self,
        url: str = "memory://",
        *,
        connect_timeout: float = 10.0,
        max_backlog: int | None = None,
    ) -> None:
        super().__init__(url, connect_timeout=connect_timeout)
        values, _ = parse_options(url, _OPTIONS, keywords={"max_backlog": max_backlog})
        self.max_backlog: int = values["max_backlog"]
        self.bus = bus_for(url)
        self._connector = Connector(repr(self), connect_timeout)
        self._subscriptions: set[_Subscription] = set()

    @property
    def state(self) -> ConnectionState:
        """Where the transport is in its lifecycle."""
        return self._connector.state

    @property
    def connected(self) -> bool:
        """Whether ``connect()`` ran and ``close()`` has not since."""
        return self._connector.state is ConnectionState.OPEN

    async def connect(self) -> None:
        """Join the bus (nothing can fail)."""
        self._connector.state = ConnectionState.OPEN

    async def close(self) -> None:
        """Leave the bus; live subscriptions end with ConnectionLost."""
        self._connector.close()
        for sub in list(self._subscriptions):
            sub.cut("the transport was closed")

    async def publish(self, channel: str, payload: bytes) -> None:
        """Deliver ``payload`` to every live subscription of ``channel`` on the bus."""
        self._connector.check_usable()
        self.bus.publish(channel, payload)

    async def subscribe(
        self, channel: str, on_ready: OnReady | None = None
    ) -> AsyncIterator[bytes]:
        """Yield what is published on ``channel`` until the transport closes or the
        subscriber falls ``max_backlog`` behind (then ConnectionLost)."""
        if self._connector.state is not ConnectionState.OPEN:
            raise ConnectionLost(f"{self!r} is not connected")
        sub = _Subscription(channel, self.max_backlog)
        self.bus._add(sub)
        self._subscriptions.add(sub)
        try:
            if on_ready is not None:
                on_ready(False)
            buffer = sub.buffer
            what = f"subscription to {channel!r} on {self!r}"
            while True:
                while buffer:
                    # No max_payload check: the payload is in memory already, and the client
                    # counts and drops an oversized one itself.
                    yield buffer.popleft()
                await sub.refill(what)
        finally:
            self.bus._remove(sub)
            self._subscriptions.discard(sub)
