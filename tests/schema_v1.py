"""The event decoder of the previous release (schema v1), frozen as it shipped: what a consumer
not yet upgraded runs during a rolling deploy. Tests decode with it what a publisher writes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cachesync.errors import EventDecodeError

SCHEMA_VERSION = 1


class ChangeEventV1(BaseModel):
    """Schema v1 exactly: no ``tags``, ``extra="forbid"``, ``v`` must be 1."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    v: int = Field(default=SCHEMA_VERSION, ge=SCHEMA_VERSION, le=SCHEMA_VERSION)
    source: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=0)
    ns: str = Field(default="", max_length=256)
    op: Literal["upsert", "delete", "flush", "heartbeat"]
    keys: tuple[str, ...] = ()
    version: int | None = None
    value: Any = None
    ts: float = Field(allow_inf_nan=False)
    sig: str | None = None

    @classmethod
    def decode(cls, data: bytes) -> ChangeEventV1:
        try:
            event: ChangeEventV1 = cls.__pydantic_validator__.validate_json(data)
            return event
        except ValidationError as exc:
            raise EventDecodeError(str(exc)) from None
