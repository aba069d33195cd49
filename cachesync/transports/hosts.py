"""What the multi-node transports share: a URL that names several hosts, whose turn it is to
be tried next, and one round over them with a fair share of the time each. Their query options
are declared and read like every transport's (``Option``, ``parse_options`` in ``base``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError
from .base import Connector, cut_userinfo, describe, redact_url

__all__ = ["HostTurns", "NodeUrl", "parse_node_url", "try_each_host"]

log = logging.getLogger("cachesync.transports")

H = TypeVar("H")
T = TypeVar("T")


@dataclass(frozen=True)
class NodeUrl:
    """A URL that names several nodes: ``scheme://[user[:password]@]h1:p1,h2:p2/path?query``."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    path: str


def parse_node_url(url: str, *, default_port: int) -> NodeUrl:
    """Split ``url`` into its nodes, credentials and path.

    Raises :class:`ConfigError` naming the (redacted) URL when a port is not a number, no host
    is given, an IPv6 address is not in brackets, or the password holds an unencoded ``/``,
    ``?`` or ``#``.
    """
    safe = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"malformed URL {safe!r}: {exc}") from None
    if cut_userinfo(url) is not None:
        # Read as written, the password's first part would be a port in the error below.
        raise ConfigError(
            f"the password in {safe!r} holds an unencoded '/', '?' or '#': percent-encode it "
            "(%2F, %3F, %23)"
        )
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, sep, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            # An IPv6 address, with or without a port: [::1], [::1]:5672.
            host, bracket, rest = item[1:].partition("]")
            if not bracket or rest[:1] not in ("", ":"):
                raise ConfigError(f"malformed host {item!r} in {safe!r}; write [address]:port")
            port_text = rest[1:]
        else:
            host, sep, port_text = item.rpartition(":")
            if not sep:
                host, port_text = item, ""
            elif ":" in host:
                raise ConfigError(
                    f"write the IPv6 address {item!r} in brackets in {safe!r}: [address]:port"
                )
        if not host:
            raise ConfigError(f"missing host name in {safe!r}")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ConfigError(f"port {port_text!r} in {safe!r} is not a number") from None
        if not 0 < port < 65536:
            raise ConfigError(f"port {port} in {safe!r} is out of range")
        if (host, port) not in hosts:  # named twice, a node would get two turns per round
            hosts.append((host, port))
    if not hosts:
        raise ConfigError(f"no host in {safe!r}; write {parts.scheme}://host:port,...")
    return NodeUrl(
        scheme=parts.scheme.lower(),
        hosts=tuple(hosts),
        username=username,
        password=password,
        path=parts.path,
    )


class HostTurns:
    """Whose turn it is in a host list: every connect attempt takes the node after the one
    used last, so a reconnect does not begin with the node that just failed."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def take(self, hosts: Sequence[H]) -> H:
        """The node of ``hosts`` whose turn it is."""
        host = hosts[self._next % len(hosts)]
        self._next += 1
        return host


async def try_each_host(
    hosts: Sequence[H],
    turns: HostTurns,
    attempt: Callable[[H, float], Awaitable[T]],
    *,
    deadline: float,
    failures: tuple[type[BaseException], ...],
    connector: Connector,
    url: str,
    refused: Callable[[BaseException], bool] = lambda _exc: False,
    label: Callable[[H], str] = str,
) -> T:
    """One round over ``hosts``, from whose turn it is, until ``attempt(host, share)`` returns.

    Each host gets an equal share of the time left until ``deadline`` (loop time), so one that
    never answers cannot use it all up, and one that fails at once leaves its share to the
    hosts after it. ``attempt`` is cancelled when its share is over (it must close what it
    opened then). A failure (``failures`` or the share running out) moves on to the next host;
    the last host's failure, and a ``refused`` one at once, is raised (for the connector to
    back off and try another round, or give up). When ``connector`` is closed meanwhile, the
    hosts after the one being tried are not tried. ``url`` (the transport's) is scrubbed from
    what is logged; ``label(host)`` names a host in the log without its password.
    """
    loop = asyncio.get_running_loop()
    epoch = connector.epoch
    caught: tuple[type[BaseException], ...] = (*failures, TimeoutError)
    left = len(hosts)
    while True:
        host = turns.take(hosts)
        share = max(deadline - loop.time(), 0.001) / left
        try:
            async with asyncio.timeout(share):
                return await attempt(host, share)
        except caught as exc:
            left -= 1
            if not left or refused(exc):
                raise
            if connector.closed_since(epoch):
                raise connector.closed_error() from exc
            log.debug("%s failed (%s); trying the next host", label(host), describe(exc, url))
