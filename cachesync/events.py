"""The change event: one JSON object per broker message, and its codec.

Every transport carries these bytes and nothing else. :meth:`ChangeEvent.decode` turns any
bad payload into one :class:`EventDecodeError` with a short reason, so a listener can count
it, log it and go on.

The listener decodes with :func:`decode_event` instead: a msgspec struct with the same fields
and bounds reads a valid event about four times faster than the pydantic model, and anything
it does not accept as it is goes to :meth:`ChangeEvent.decode`, so a bad payload gets the same
error, and an unusual valid one the same values (``tests/test_events.py`` checks the two
against each other).
"""

from __future__ import annotations

import enum
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import EventDecodeError, UnknownSchemaError

__all__ = [
    "DEFAULT_CHANNEL",
    "MAX_EVENT_BYTES",
    "MAX_NS_LENGTH",
    "PREVIOUS_SCHEMA_VERSION",
    "READABLE_SCHEMAS",
    "SCHEMA_VERSION",
    "ChangeEvent",
    "EventDecodeError",
    "EventView",
    "Op",
    "UnknownSchemaError",
    "decode_event",
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

MAX_NS_LENGTH = 256
"""The longest namespace an event can name (characters)."""

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
    ns: str = Field(default="", max_length=MAX_NS_LENGTH)
    op: _OpField
    keys: tuple[str, ...] = ()
    version: int | None = None
    value: Any = None
    ts: float = Field(allow_inf_nan=False)
    sig: str | None = None
    tags: tuple[str, ...] | None = None

    def encode(self) -> bytes:
        """The event as compact JSON bytes (fields that are ``None`` are omitted)."""
        return encode_fields(
            v=self.v,
            source=self.source,
            seq=self.seq,
            ns=self.ns,
            op=self.op,
            keys=self.keys,
            version=self.version,
            value=self.value,
            ts=self.ts,
            sig=self.sig,
            tags=self.tags,
        )

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
    readable_ns = ns if isinstance(ns, str) and ns and len(ns) <= MAX_NS_LENGTH else None
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


class EventView(Protocol):
    """The fields of a decoded event, read-only: a :class:`ChangeEvent`, or what
    :func:`decode_event` returns for a common one."""

    @property
    def v(self) -> int: ...
    @property
    def source(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def ns(self) -> str: ...
    @property
    def op(self) -> str: ...
    @property
    def keys(self) -> tuple[str, ...]: ...
    @property
    def version(self) -> int | None: ...
    @property
    def value(self) -> Any: ...
    @property
    def ts(self) -> float: ...
    @property
    def sig(self) -> str | None: ...
    @property
    def tags(self) -> tuple[str, ...] | None: ...


class _Event(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """:class:`ChangeEvent`'s fields and bounds, for msgspec. What it accepts, the model
    accepts with the same values (``tests/test_events.py``); what it refuses goes to the
    model, which has the last word. Never collected by the GC: decoded JSON has no cycles."""

    source: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    seq: Annotated[int, msgspec.Meta(ge=0)]
    op: OpName
    ts: float
    v: Annotated[int, msgspec.Meta(ge=PREVIOUS_SCHEMA_VERSION, le=SCHEMA_VERSION)] = SCHEMA_VERSION
    ns: Annotated[str, msgspec.Meta(max_length=MAX_NS_LENGTH)] = ""
    keys: tuple[str, ...] = ()
    version: int | None = None
    value: Any = None
    sig: str | None = None
    tags: tuple[str, ...] | None = None


_decode_fast = msgspec.json.Decoder(_Event).decode


class _Wire(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """The fields in the model's order, for encoding: the ones that default to None are left
    out when None, as ``model_dump_json(exclude_none=True)`` does."""

    v: int
    source: str
    seq: int
    ns: str
    op: str
    keys: tuple[str, ...]
    version: int | None = None
    value: msgspec.Raw | None = None
    ts: float
    sig: str | None = None
    tags: tuple[str, ...] | None = None


_encode_wire = msgspec.json.Encoder().encode
# The value as the model's ``value: Any`` field writes it: each nested model by its own config
# (field names unless it says ``serialize_by_alias``, where pydantic_core.to_json would write
# every alias), NaN and infinities as null.
_value_json = TypeAdapter(Any).serializer.to_json


def encode_fields(
    *,
    v: int,
    source: str,
    seq: int,
    ns: str,
    op: str,
    keys: tuple[str, ...],
    version: int | None,
    value: Any,
    ts: float,
    sig: str | None = None,
    tags: tuple[str, ...] | None = None,
) -> bytes:
    """An event's JSON from fields already valid (as :class:`ChangeEvent` checks them): the
    same object :meth:`ChangeEvent.encode` writes. ``value`` is written by pydantic's own
    serializer, as the model writes it (a type it cannot write raises its error), the rest by
    msgspec, several times faster than the model's ``model_dump_json``."""
    raw = None if value is None else msgspec.Raw(_value_json(value, exclude_none=True))
    return _encode_wire(
        _Wire(
            v=v, source=source, seq=seq, ns=ns, op=op, keys=keys, version=version,
            value=raw, ts=ts, sig=sig, tags=tags,
        )
    )  # fmt: skip


# The model's JSON parser refuses nesting about 200 deep, msgspec's about 1,000 deep: a payload
# that could nest that far (as many brackets, or as many bytes for both of each pair) goes to
# the model. Events without deep values never come near.
_SHORT = 256
_MAX_BRACKETS = 128
_MAX_TS = 1e18  # seconds: a ts this far goes to the model, which decides


def decode_event(data: bytes | str, *, max_bytes: int = MAX_EVENT_BYTES) -> EventView:
    """:meth:`ChangeEvent.decode`, faster: the same values for a valid event, the same
    :class:`EventDecodeError` (or :class:`UnknownSchemaError`) for anything else, but a
    valid event may come back as a read-only struct rather than the model."""
    size = len(data)
    if (
        size <= max_bytes
        and type(data) is bytes
        and (size < _SHORT or data.count(b"[") + data.count(b"{") < _MAX_BRACKETS)
    ):
        try:
            event = _decode_fast(data)
        except Exception:
            # Invalid (msgspec.DecodeError; msgspec 0.18 raises UnicodeDecodeError for a
            # string that is not UTF-8), or valid in a way only the model reads: the model
            # decides, and gives the error.
            pass
        else:
            # Finite (msgspec reads no NaN, but say it here too), and short of 19 digits:
            # pydantic before 2.12 refuses an int that long for a float, msgspec reads it.
            if -_MAX_TS < event.ts < _MAX_TS:
                return event
    return ChangeEvent.decode(data, max_bytes=max_bytes)
