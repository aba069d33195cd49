"""The change event: one JSON object per broker message, and its codec.

Every transport carries these bytes and nothing else. The consumer decodes with
:meth:`ChangeEvent.decode`, which turns any bad payload into one :class:`EventDecodeError`
with a short reason, so a listener can count it, log it and go on.
"""

from __future__ import annotations

import enum
import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import EventDecodeError, UnknownSchemaError

__all__ = [
    "DEFAULT_CHANNEL",
    "MAX_EVENT_BYTES",
    "PREVIOUS_SCHEMA_VERSION",
    "READABLE_SCHEMAS",
    "SCHEMA_VERSION",
    "ChangeEvent",
    "EventDecodeError",
    "Op",
    "UnknownSchemaError",
]

SCHEMA_VERSION = 2
"""The event schema this code writes by default. v2 adds ``tags``; everything else is v1's."""

PREVIOUS_SCHEMA_VERSION = 1
"""The schema before it, which this code still reads, and writes when told to
(``Publisher(..., schema_version=1)``) while older consumers are still running."""

READABLE_SCHEMAS = (PREVIOUS_SCHEMA_VERSION, SCHEMA_VERSION)
"""Every schema version a consumer of this code reads: the current one and the previous one."""

MAX_EVENT_BYTES = 1 << 20
"""Default upper bound for one encoded event (1 MiB)."""

DEFAULT_CHANNEL = "cachesync"
"""The channel events go on unless told otherwise: the one default of the client, the
publishers, the outbox, the change feeds and the command line."""


class Op(enum.StrEnum):
    """What happened to the keys of an event."""

    UPSERT = "upsert"
    DELETE = "delete"
    FLUSH = "flush"
    HEARTBEAT = "heartbeat"


OpName = Literal["upsert", "delete", "flush", "heartbeat"]

if TYPE_CHECKING:
    _OpField = Op | OpName
else:
    # Validated as a literal string: several times cheaper than an enum on the listener's hot
    # path. ``Op`` members are strings, so ``event.op == Op.UPSERT`` holds either way.
    _OpField = OpName


class ChangeEvent(BaseModel):
    """One "data changed" message from an owner.

    ``source`` is the publisher's id (new on every publisher start) and ``seq`` grows by one per
    event of that source, so a consumer can tell when it missed one. A heartbeat carries the
    source's last ``seq`` without consuming a new one. ``version`` is the owner's row version;
    ``value``, when present, is the new state (event-carried state transfer). ``ts`` is the
    owner's commit time in seconds since the epoch. ``tags`` (schema v2) name groups of
    entries to drop, whatever their keys.

    ``v`` is the schema: a consumer reads :data:`READABLE_SCHEMAS` and treats an event of any
    other version as a possible loss (:class:`~cachesync.errors.UnknownSchemaError`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    v: int = Field(default=SCHEMA_VERSION, ge=PREVIOUS_SCHEMA_VERSION, le=SCHEMA_VERSION)
    source: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=0)
    ns: str = Field(default="", max_length=256)
    op: _OpField
    keys: tuple[str, ...] = ()
    version: int | None = None
    value: Any = None
    ts: float = Field(allow_inf_nan=False)
    sig: str | None = None
    tags: tuple[str, ...] | None = None

    def encode(self) -> bytes:
        """The event as compact JSON bytes (fields that are ``None`` are omitted)."""
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def decode(cls, data: bytes | str, *, max_bytes: int = MAX_EVENT_BYTES) -> ChangeEvent:
        """Parse and validate one message.

        Raises :class:`EventDecodeError` with a short reason for anything that is not a valid
        event: too large, not JSON, wrong types, an unknown ``op`` or schema version.
        """
        if len(data) > max_bytes:
            raise EventDecodeError(f"event of {len(data)} bytes exceeds the limit of {max_bytes}")
        try:
            # The validator itself: model_validate_json adds a wrapper call per message.
            event: ChangeEvent = cls.__pydantic_validator__.validate_json(data)
            return event
        except ValidationError as exc:
            unknown = _unknown_schema(exc, data)
            if unknown is not None:
                raise unknown from None
            raise EventDecodeError(_short_reason(exc)) from None

    def signing_payload(self) -> bytes:
        """The bytes an HMAC signature covers: the encoded event without its ``sig``."""
        return self.model_dump_json(exclude_none=True, exclude={"sig"}).encode()


_READABLE = ", v".join(str(v) for v in READABLE_SCHEMAS)


def _unknown_schema(exc: ValidationError, data: bytes | str) -> UnknownSchemaError | None:
    """The error for an event of a schema this code does not read, with its namespace when
    the JSON says it; None if the message is bad for another reason."""
    if not any(error["loc"] == ("v",) for error in exc.errors(include_url=False)):
        return None
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    version = raw.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        return None  # not a version at all: a malformed event
    if PREVIOUS_SCHEMA_VERSION <= version <= SCHEMA_VERSION:
        return None  # a readable version, a bad field elsewhere
    ns = raw.get("ns")
    readable_ns = ns if isinstance(ns, str) and ns and len(ns) <= 256 else None
    return UnknownSchemaError(
        f"unknown schema version {version!r} (this consumer reads v{_READABLE})",
        version=version,
        ns=readable_ns,
    )


def _short_reason(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "message"
    if first["type"] == "json_invalid":
        return "not valid JSON"
    if where == "v":
        return f"unknown schema version (this consumer reads v{_READABLE})"
    if where == "op":
        return "unknown op (expected upsert, delete, flush or heartbeat)"
    return f"{where}: {first['msg']}"
