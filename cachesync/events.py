"""The change event: one JSON object per broker message, and its codec.

Every transport carries these bytes and nothing else. The consumer decodes with
:meth:`ChangeEvent.decode`, which turns any bad payload into one :class:`EventDecodeError`
with a short reason, so a listener can count it, log it and go on.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import EventDecodeError

__all__ = ["SCHEMA_VERSION", "MAX_EVENT_BYTES", "ChangeEvent", "EventDecodeError", "Op"]

SCHEMA_VERSION = 1
"""The event schema this code writes and reads."""

MAX_EVENT_BYTES = 1 << 20
"""Default upper bound for one encoded event (1 MiB)."""


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
    owner's commit time in seconds since the epoch.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    v: int = Field(default=SCHEMA_VERSION, ge=SCHEMA_VERSION, le=SCHEMA_VERSION)
    source: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=0)
    ns: str = Field(default="", max_length=256)
    op: _OpField
    keys: tuple[str, ...] = ()
    version: int | None = None
    value: Any = None
    ts: float = Field(allow_inf_nan=False)
    sig: str | None = None

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
            raise EventDecodeError(_short_reason(exc)) from None

    def signing_payload(self) -> bytes:
        """The bytes an HMAC signature covers: the encoded event without its ``sig``."""
        return self.model_dump_json(exclude_none=True, exclude={"sig"}).encode()


def _short_reason(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "message"
    if first["type"] == "json_invalid":
        return "not valid JSON"
    if where == "v":
        return "unknown schema version (this consumer reads v1)"
    if where == "op":
        return "unknown op (expected upsert, delete, flush or heartbeat)"
    return f"{where}: {first['msg']}"
