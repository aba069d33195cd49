"""The transport contract, the choice of a transport by URL scheme, and what transports share.

A transport moves opaque bytes on named channels and reports the state of its connection. It
knows nothing of caches or events: the client decodes what it receives.

Contract every transport keeps (the contract tests in ``tests/test_transport_contract.py`` run
over each one):

- ``connect()`` opens the connection, retrying until ``connect_timeout`` passes, then raises
  :class:`~cachesync.errors.TransportError`; ``close()`` is idempotent. A failed ``connect()``
  is not a lifecycle error: ``publish`` then raises ``TransportError`` (and may reconnect by
  itself), and calling ``connect()`` again is how a caller waits for the broker to come back,
  however long it was gone.
- ``publish(channel, payload)`` sends one message, or raises ``TransportError``; before the
  first ``connect()`` and after ``close()`` it raises :class:`~cachesync.errors.StateError`.
- ``subscribe(channel, on_ready)`` is an async iterator of payloads. ``on_ready(resumed)`` is
  called from within the iteration once the subscription is live: for a live-only transport,
  before the first payload; for a transport that replays a log, after it has yielded the
  backlog missed since the previous subscription of this transport object. ``resumed`` is true
  only when that replay was complete (nothing was trimmed meanwhile); the client keeps reads
  away from its cache until ``on_ready`` and flushes when ``resumed`` is false.
  When the connection breaks the iterator raises :class:`~cachesync.errors.ConnectionLost`;
  it never reconnects on its own. Calling ``subscribe`` again (after ``connect()``) starts over.
  Reconnecting is the caller's job, so that the caller sees every break: the client's listener
  reconnects with backoff (flushing or replaying), and the :class:`~cachesync.Publisher`
  reconnects on its next publish. That is how "every publisher and consumer comes back by
  itself" holds while no transport reconnects behind the client's back.
- ``subscribe_many(channels, on_ready, on_channels)``: a transport whose subscription spans
  independent connections (``redis+cluster://``: one per shard) may, when the caller passes
  ``on_channels``, subscribe again by itself to the channels of one broken connection instead
  of ending the whole subscription. It calls ``on_channels(names, False)`` at once (events on
  ``names`` may be lost from now on) and ``on_channels(names, True)`` once they are live again
  (what was published on them meanwhile may be lost), while the other channels keep delivering.
  That is the one exception to "never reconnects on its own": it happens only after
  ``on_ready``, only with ``on_channels``, and a transport that cannot be live again within a
  bound of its own (``resubscribe_timeout`` on ``redis+cluster://``) ends the whole
  subscription with ``ConnectionLost`` as before. Every other transport ignores
  ``on_channels``. The client flushes the namespaces of ``names`` (and only those) and keeps
  reads away from them in between; a message of ``names`` already on its way when they were
  reported lost may still arrive, and is applied as usual.
- ``max_payload`` (set by the client to its ``max_event_bytes``): a transport drops a payload
  larger than this instead of yielding it, without buffering it whole where its client library
  allows, and counts it in ``oversized``. A transport that ignores it is still correct: the
  client drops and counts oversized payloads itself.

What a transport may use from here, so that every transport behaves alike:

- :class:`ConnectionState` and :class:`Connector`: the lifecycle states, and the one
  connect-with-retry loop (backoff, deadline, "closed while connecting", refusals that are not
  retried);
- :class:`Option` and :func:`parse_options`: URL query options declared once, with errors that
  name the option and what it expects;
- :func:`redact_url` and :func:`scrub`: passwords (in the user-info, also one cut short by an
  unencoded ``/``, ``?`` or ``#``, and in ``?password=``) never reach an error, a log line or a
  repr.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import functools
import importlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from ..backoff import Backoff
from ..errors import ConfigError, StateError, TransportError
from ..logutil import RateLimitedLogger

__all__ = [
    "ConnectionState",
    "Connector",
    "OnChannels",
    "OnReady",
    "Option",
    "Transport",
    "bool_option",
    "cut_userinfo",
    "describe",
    "duration_option",
    "float_option",
    "int_option",
    "from_url",
    "parse_duration",
    "parse_options",
    "redact_url",
    "register_scheme",
    "scrub",
    "secret_key",
    "text_option",
]

log = logging.getLogger("cachesync.transports")

OnReady = Callable[[bool], None]
"""Called with ``resumed`` once a subscription is live."""

OnChannels = Callable[[Sequence[str], bool], None]
"""Called with ``(channels, live)`` when part of a subscription broke (``live`` false) or is
live again (true); see ``subscribe_many``."""

T = TypeVar("T")

# scheme -> (module, class name, extra that provides its dependencies)
_SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "memory": ("cachesync.transports.memory", "MemoryTransport", None),
    "redis": ("cachesync.transports.redis.pubsub", "RedisPubSubTransport", "redis"),
    "rediss": ("cachesync.transports.redis.pubsub", "RedisPubSubTransport", "redis"),
    "redis+stream": ("cachesync.transports.redis.stream", "RedisStreamTransport", "redis"),
    "rediss+stream": ("cachesync.transports.redis.stream", "RedisStreamTransport", "redis"),
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

    oversized: int = 0
    """Payloads dropped for being larger than ``max_payload``."""

    _warn: RateLimitedLogger | None = None

    max_payload: int | None = None
    """Payloads larger than this many bytes are dropped (and counted in ``oversized``) rather
    than yielded; ``None`` keeps them all. The client sets it to its ``max_event_bytes``."""

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        if not connect_timeout > 0:  # NaN too: it would leave every attempt unbounded
            raise ValueError("connect_timeout must be positive")
        self.url = url
        self.connect_timeout = connect_timeout
        self.oversized = 0
        self._warn: RateLimitedLogger | None = None

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
        self,
        channels: Sequence[str],
        on_ready: OnReady | None = None,
        on_channels: OnChannels | None = None,
    ) -> AsyncIterator[bytes]:
        """Like :meth:`subscribe`, over several channels at once (``on_ready`` once all are
        live). Needed only where :meth:`channel_for` names several channels. A transport that
        can subscribe again to part of them reports it through ``on_channels`` (see the module
        docstring); the others ignore it."""
        if len(channels) == 1:
            return self.subscribe(channels[0], on_ready)
        raise NotImplementedError(f"{type(self).__name__} subscribes to one channel at a time")

    @property
    def safe_url(self) -> str:
        """The URL with any password replaced by ``***``, fit for logs and errors."""
        return redact_url(self.url)

    def too_big(self, size: int, what: str) -> bool:
        """Whether a payload of ``size`` bytes is over ``max_payload``; if so, counts it and
        logs it (at most one line per 10 s). ``what`` names it (a channel, a stream entry id)."""
        limit = self.max_payload
        if limit is None or size <= limit:
            return False
        self.oversized += 1
        if self._warn is None:  # a subclass may not call Transport.__init__
            self._warn = RateLimitedLogger(log)
        self._warn.warning(
            "oversized",
            "dropped a payload of %d bytes (max_payload is %d): %s",
            size,
            limit,
            what,
            url=self.safe_url,
        )
        return True

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


# -- connection state and the one connect loop ----------------------------------------------


class ConnectionState(enum.Enum):
    """Where a transport's connection is in its lifecycle."""

    NEW = "new"
    """Never connected: publishing is a lifecycle error (StateError)."""
    CONNECTING = "connecting"
    OPEN = "open"
    FAILED = "failed"
    """The last connect() gave up: publishing raises TransportError; connect() again retries."""
    CLOSED = "closed"
    """close() was called: publishing is a lifecycle error until connect() again."""


class Connector:
    """The connection state of one transport, and the loop that (re)connects it.

    ``await connector.open(attempt, ...)`` runs ``attempt()`` until it succeeds, with capped
    exponential backoff, for at most ``timeout`` seconds; a refusal (bad credentials) fails at
    once. ``close()`` may run at any time, without waiting: a connect in flight stops at once
    (the attempt under way is cancelled, a backoff cut short), throws away what it opened (an
    attempt that returns all the same) and raises ``TransportError``. The state moves
    ``NEW -> CONNECTING -> OPEN | FAILED``, and ``close()`` makes it ``CLOSED``.
    """

    def __init__(
        self, name: str, timeout: float, *, initial: float = 0.05, maximum: float = 1.0
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.state = ConnectionState.NEW
        self.epoch = 0
        """Bumped by every close(): work started before it must not outlive it."""
        self.deadline = 0.0
        """Loop time at which the connect in flight gives up (an attempt that tries several
        hosts shares out the time up to it)."""
        self._initial = initial
        self._maximum = maximum
        self._lock = asyncio.Lock()
        # What close() cuts short: the attempt under way, or the backoff after a failed one.
        self._woken: asyncio.Event | None = None
        self._late: set[asyncio.Future[None]] = set()  # discards of attempts that ended late

    @property
    def usable(self) -> bool:
        """Whether publishing is allowed (connect() was called, close() was not since)."""
        return self.state not in (ConnectionState.NEW, ConnectionState.CLOSED)

    def check_usable(self) -> None:
        """Raise StateError before the first connect() and after close()."""
        if not self.usable:
            raise StateError(f"{self.name} is not connected: call connect() first")

    def close(self) -> None:
        """Mark the transport closed; a connect() in flight gives up."""
        self.epoch += 1
        if self.state is not ConnectionState.NEW:
            self.state = ConnectionState.CLOSED
        if self._woken is not None:
            self._woken.set()

    def closed_since(self, epoch: int) -> bool:
        """Whether close() ran after ``epoch`` was read."""
        return self.epoch != epoch

    def closed_error(self) -> TransportError:
        """The error a connect() raises when close() ran while it was connecting."""
        return TransportError(f"{self.name} was closed while connecting")

    async def open(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        retryable: tuple[type[BaseException], ...],
        refused: Callable[[BaseException], TransportError | None],
        gave_up: Callable[[BaseException], TransportError],
        discard: Callable[[T], Awaitable[None]] | None = None,
    ) -> T:
        """Run ``attempt()`` until it returns, retrying ``retryable`` errors with backoff.

        ``refused(exc)`` returns the error to raise at once for an answer retrying cannot
        change (or None); ``gave_up(exc)`` the error to raise once ``timeout`` has passed.
        ``discard(result)`` throws away what an attempt opened if close() ran meanwhile.
        Concurrent calls run one at a time.
        """
        async with self._lock:
            epoch = self.epoch
            self.state = ConnectionState.CONNECTING
            try:
                result = await self._retry(attempt, epoch, retryable, refused, gave_up, discard)
            except BaseException:
                if not self.closed_since(epoch):
                    self.state = ConnectionState.FAILED
                raise
            if self.closed_since(epoch):
                if discard is not None:
                    await discard(result)
                raise self.closed_error()
            self.state = ConnectionState.OPEN
            return result

    async def _retry(
        self,
        attempt: Callable[[], Awaitable[T]],
        epoch: int,
        retryable: tuple[type[BaseException], ...],
        refused: Callable[[BaseException], TransportError | None],
        gave_up: Callable[[BaseException], TransportError],
        discard: Callable[[T], Awaitable[None]] | None,
    ) -> T:
        loop = asyncio.get_running_loop()
        deadline = self.deadline = loop.time() + self.timeout
        backoff = Backoff(initial=self._initial, maximum=self._maximum)
        retry_on: tuple[type[BaseException], ...] = (*retryable, TimeoutError)
        while True:
            try:
                return await self._attempt(attempt, max(deadline - loop.time(), 0.001), discard)
            except retry_on as exc:
                if self.closed_since(epoch):
                    raise self.closed_error() from exc
                refusal = refused(exc)
                if refusal is not None:
                    raise refusal from exc
                delay = backoff.next_delay()
                if loop.time() + delay >= deadline:
                    raise gave_up(exc) from exc
                log.debug("connect to %s failed, retrying in %.2fs", self.name, delay)
                await self._pause(delay, epoch)
                if self.closed_since(epoch):
                    raise self.closed_error() from exc
            except Exception as exc:
                if self.closed_since(epoch):
                    raise self.closed_error() from exc
                refusal = refused(exc)
                if refusal is not None:
                    raise refusal from exc
                raise

    async def _attempt(
        self,
        attempt: Callable[[], Awaitable[T]],
        timeout: float,
        discard: Callable[[T], Awaitable[None]] | None,
    ) -> T:
        """``attempt()`` in a task of its own, for at most ``timeout`` seconds or until close().

        Then it is cancelled, and given ``ATTEMPT_GRACE`` to end: a client library that loses
        the cancellation (seen with redis-py in the middle of its connect handshake) cannot
        hold the connect past its bound; what such an attempt opens later is discarded."""
        task = asyncio.ensure_future(attempt())
        woken = self._woken = asyncio.Event()
        closed = asyncio.ensure_future(woken.wait())
        try:
            await asyncio.wait({task, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await self._give_up(task, discard)
            raise
        finally:
            closed.cancel()
            self._woken = None
        if task.done():
            return task.result()
        await self._give_up(task, discard)
        raise TimeoutError(f"no answer within {timeout:.3g}s")

    async def _give_up(
        self, task: asyncio.Future[T], discard: Callable[[T], Awaitable[None]] | None
    ) -> None:
        """Cancel a connect attempt and wait ``ATTEMPT_GRACE`` at most for it to end; one that
        ends later, or returns all the same, has what it opened discarded."""
        task.cancel()
        await asyncio.wait({task}, timeout=ATTEMPT_GRACE)
        if task.done():
            self._discard_late(task, discard)
        else:
            log.debug("a cancelled connect attempt of %s is still running", self.name)
            task.add_done_callback(functools.partial(self._discard_late, discard=discard))

    def _discard_late(
        self, task: asyncio.Future[T], discard: Callable[[T], Awaitable[None]] | None
    ) -> None:
        if task.cancelled() or task.exception() is not None or discard is None:
            return
        closing = asyncio.ensure_future(discard(task.result()))
        self._late.add(closing)  # referenced until done
        closing.add_done_callback(self._late.discard)

    async def _pause(self, delay: float, epoch: int) -> None:
        """Sleep ``delay`` seconds, or less if close() runs meanwhile."""
        if self.closed_since(epoch):
            return
        woken = self._woken = asyncio.Event()
        try:
            async with asyncio.timeout(delay):
                await woken.wait()
        except TimeoutError:
            pass  # the whole delay
        finally:
            self._woken = None


ATTEMPT_GRACE = 0.5
"""Seconds a cancelled connect attempt is given to end before it is left to end by itself."""


def describe(exc: BaseException, url: str) -> str:
    """``Type: message`` for an error, never empty, with the URL's passwords scrubbed."""
    text = str(exc).strip()
    if not text:
        cause = exc.__cause__ or exc.__context__
        text = str(cause).strip() if cause is not None else ""
    name = type(exc).__name__
    return scrub(f"{name}: {text}" if text else f"{name} (no detail)", url)


# -- URL options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option(Generic[T]):
    """One query option of a transport URL: its name, default, how to read it, and what it
    expects (said in the error when a value does not fit)."""

    name: str
    default: T
    parse: Callable[[str], T]
    expected: str
    check: Callable[[T], bool] = lambda _value: True

    def read(self, scheme: str, text: str) -> T:
        """The value of ``text``, or a ConfigError naming the option and what it expects."""
        try:
            value = self.parse(text)
            ok = self.check(value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"{scheme}:// option {self.name}={text!r} is not valid: expected {self.expected}"
            )
        return value

    def validate(self, value: T) -> T:
        """``value`` given as a keyword argument, checked like a URL value."""
        if not self.check(value):
            raise ConfigError(f"{self.name}={value!r} is not valid: expected {self.expected}")
        return value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def int_option(name: str, default: int, *, minimum: int = 1) -> Option[int]:
    """An integer option of at least ``minimum``."""
    return Option(name, default, int, f"an integer >= {minimum}", lambda v: v >= minimum)


def float_option(
    name: str, default: float | None, *, positive: bool = False, zero_means: str = ""
) -> Option[Any]:
    """A number of seconds: positive, or (with ``zero_means``) not negative."""
    if positive:
        return Option(name, default, float, "a positive number of seconds", lambda v: v > 0)
    expected = "a number of seconds >= 0" + (f" (0 {zero_means})" if zero_means else "")
    return Option(name, default, float, expected, lambda v: v >= 0)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"500ms"``, ``"15m"``, ``"1h"`` or ``"7d"``."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def duration_option(name: str, default: float | None) -> Option[Any]:
    """A positive duration: seconds, or with a unit (``500ms``, ``5s``, ``15m``, ``1h``)."""
    return Option(
        name, default, parse_duration, "a positive duration such as 5s, 15m or 1h", lambda v: v > 0
    )


def text_option(name: str, default: str | None = None) -> Option[Any]:
    """Free text (a name); empty means the default."""
    return Option(name, default, lambda text: text or default, "text")


def bool_option(name: str, default: bool) -> Option[bool]:
    """A flag: 1/0, true/false, yes/no, on/off."""
    return Option(name, default, _parse_bool, "1 or 0 (true/false, yes/no, on/off)")


def parse_options(
    url: str,
    options: Iterable[Option[Any]],
    *,
    passthrough: bool = False,
    keywords: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Read the query options of ``url`` that ``options`` declare.

    Returns their values (the keyword argument of the same name wins when not None, then the
    URL, then the default) and the query pairs nobody declared. Those are an error naming the
    option and the known ones unless ``passthrough`` (the broker's client takes them).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower() or "transport"
    declared = {option.name: option for option in options}
    values: dict[str, Any] = {}
    rest: list[tuple[str, str]] = []
    for key, text in parse_qsl(parts.query, keep_blank_values=True):
        option = declared.get(key)
        if option is None:
            if not passthrough:
                known = ", ".join(sorted(declared)) or "none"
                raise ConfigError(
                    f"unknown option {key!r} in {redact_url(url)!r}; {scheme}:// knows: {known}"
                )
            rest.append((key, text))
            continue
        values[key] = option.read(scheme, text)
    for name, option in declared.items():
        given = (keywords or {}).get(name)
        if given is not None:
            values[name] = option.validate(given)
        elif name not in values:
            values[name] = option.default
    return values, rest


# -- passwords --------------------------------------------------------------------------------


def secret_key(key: str) -> bool:
    """Whether a query option of this name holds a secret."""
    lowered = key.lower()
    return "password" in lowered or lowered in ("pass", "passwd", "secret", "token")


def cut_userinfo(url: str) -> str | None:
    """The user-info of ``url`` when an unencoded ``/``, ``?`` or ``#`` in its password ended
    the host part early (``amqp://user:pa/ss@host/`` reads as host ``user``, port ``pa``): the
    text from ``//`` to the last ``@``, when that host part holds no ``@``, its (first) port is
    not a number and an ``@`` comes after it. None for a URL urlsplit reads as written (an
    ``@`` in an option, ``?name=me@web-1``, included)."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return None
    start, at = url.find("//") + 2, url.rfind("@")
    first = netloc.split(",")[0]
    if start < 2 or at < start + len(netloc) or "@" in netloc or first.startswith("["):
        return None
    _, colon, port = first.rpartition(":")
    if not colon or port.isdigit():
        return None
    return url[start:at]


def url_secrets(url: str) -> list[str]:
    """The passwords ``url`` carries (user-info and ``?password=``-like options), as written
    and decoded, longest first."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        return []
    userinfo = cut_userinfo(url) or parts.netloc.rpartition("@")[0]
    if ":" in userinfo:
        found.append(userinfo.partition(":")[2])
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if secret_key(key):
            found += [value, quote(value, safe=""), quote(value)]
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` with every password of ``url`` replaced by ``***`` (an error message from a
    broker client may quote it)."""
    for secret in url_secrets(url):
        text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """``url`` with its passwords (user-info and ``?password=``-like options) as ``***``."""
    cut = cut_userinfo(url)
    if cut is not None:
        start = url.find("//") + 2
        return redact_url(f"{url[:start]}{cut.partition(':')[0]}:***{url[start + len(cut) :]}")
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if password:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(secret_key(key) for key, _ in pairs):
            query = urlencode(
                [(key, "***" if secret_key(key) else value) for key, value in pairs], safe="*"
            )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


# -- choosing a transport ---------------------------------------------------------------------


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
