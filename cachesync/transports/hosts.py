"""URL pieces the multi-node transports share: a host list, durations, and typed options."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import ConfigError
from .base import redact_url

__all__ = ["NodeUrl", "parse_node_url", "parse_duration", "int_option", "float_option"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


@dataclass(frozen=True)
class NodeUrl:
    """A URL that names several nodes: ``scheme://[user[:password]@]h1:p1,h2:p2/path?query``."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    path: str
    options: Mapping[str, str]


def parse_node_url(
    url: str, *, default_port: int, known_options: frozenset[str] = frozenset()
) -> NodeUrl:
    """Split ``url`` into its nodes, credentials, path and options.

    Raises :class:`ConfigError` naming the (redacted) URL when a port is not a number, no host
    is given, or an option is not one of ``known_options``.
    """
    safe = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"malformed URL {safe!r}: {exc}") from None
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
        host, sep, port_text = item.rpartition(":")
        if not sep:
            host, port_text = item, ""
        if not host:
            raise ConfigError(f"missing host name in {safe!r}")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ConfigError(f"port {port_text!r} in {safe!r} is not a number") from None
        if not 0 < port < 65536:
            raise ConfigError(f"port {port} in {safe!r} is out of range")
        hosts.append((host.strip("[]"), port))
    if not hosts:
        raise ConfigError(f"no host in {safe!r}; write {parts.scheme}://host:port,...")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - known_options)
    if unknown:
        known = ", ".join(sorted(known_options)) or "none"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} in {safe!r}; known: {known}")
    return NodeUrl(
        scheme=parts.scheme.lower(),
        hosts=tuple(hosts),
        username=username,
        password=password,
        path=parts.path,
        options=options,
    )


def parse_duration(text: str, *, what: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"500ms"``, ``"15m"``, ``"1h"`` or ``"7d"``."""
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(f"{what}={text!r} is not a duration; write e.g. 90s, 15m, 1h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def int_option(options: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    """The integer option ``name``, or ``default``; a ConfigError when it is not one."""
    text = options.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"option {name}={text!r} must be an integer") from None
    if value < minimum:
        raise ConfigError(f"option {name}={value} must be at least {minimum}")
    return value


def float_option(options: Mapping[str, str], name: str, default: float) -> float:
    """The positive number option ``name`` (a duration such as ``5s`` too), or ``default``."""
    text = options.get(name)
    if text is None:
        return default
    value = parse_duration(text, what=name)
    if value <= 0:
        raise ConfigError(f"option {name}={text!r} must be positive")
    return value
