"""An outbox row as the event to publish: what it says, or the safest reduced form of it.

Rows may be written behind ``Outbox.add``'s back (raw SQL, another writer), so nothing is
trusted: a row that cannot be published as written goes out in a form that still tells
consumers something changed (without its value, or as a flush of its namespace), with a note;
a row with no usable namespace cannot be published at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from ...events import ChangeEvent, Op
from ...publisher import Change
from .model import MAX_NS, OPS

__all__ = ["BadRow", "Prepared", "prepare"]

Row = Mapping[str, Any]
"""One outbox row: id, ns, op, keys, version, value, created_at, and ``stamp``, its commit
stamp (None where the database path has none)."""


class BadRow(Exception):
    """A row that cannot be published in any form; the message says why."""


class Prepared(NamedTuple):
    """The change to publish for a row, and a note when it says less than the row."""

    change: Change
    note: str | None


def prepare(row: Row, max_value_bytes: int) -> Prepared:
    """The change to publish for ``row``; raises :class:`BadRow` if there is none.

    The event's ``version`` is the row's own, or else its commit stamp, so consumers keep the
    committed last value of a key whatever order its events arrive in.
    """
    try:
        op, keys, version, value, note = _event_args(row, max_value_bytes)
        if version is None and op is not Op.FLUSH:
            version = row["stamp"]
        change = Change(op, row["ns"], keys, version, value, _epoch(row["created_at"]))
        # Build the event once now, so a row the event model refuses fails alone instead of
        # failing its whole batch.
        ChangeEvent(
            source="check",
            seq=0,
            ns=change.ns,
            op=op,
            keys=keys,
            version=version,
            value=value,
            ts=change.ts or 0.0,
        )
    except (ValueError, TypeError) as exc:
        raise BadRow(str(exc)) from exc
    return Prepared(change, note)


def _event_args(
    row: Row, max_value_bytes: int
) -> tuple[Op, tuple[str, ...], int | None, Any, str | None]:
    """What to publish for ``row``, and a note if that is less than the row says."""
    ns = row["ns"]
    if not isinstance(ns, str) or not ns or len(ns) > MAX_NS:
        raise BadRow(f"ns {ns!r} is not a usable namespace; nothing could be published")
    keys = row["keys"]
    op_value = row["op"]
    if op_value not in OPS:
        return Op.FLUSH, (), None, None, f"unknown op {op_value!r}: flushed the namespace"
    op = Op(op_value)
    if op is Op.FLUSH:
        return op, (), None, None, None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        return Op.FLUSH, (), None, None, f"unusable keys {keys!r}: flushed the namespace"
    version = row["version"]
    value = row["value"] if op is Op.UPSERT else None
    note = None
    if value is not None:
        if len(keys) != 1:
            value, note = None, "a value with several keys: sent as an invalidation"
        else:
            size = len(json.dumps(value, separators=(",", ":")))
            if size > max_value_bytes:
                value = None
                note = f"value of {size} bytes exceeds {max_value_bytes}: sent as an invalidation"
    return op, tuple(keys), version, value, note


def _epoch(moment: datetime | None) -> float:
    if moment is None:
        return time.time()
    if moment.tzinfo is None:  # SQLite hands back naive datetimes; they were written in UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
