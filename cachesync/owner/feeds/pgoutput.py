"""A decoder for PostgreSQL's built-in ``pgoutput`` logical decoding plugin (protocol 1).

Only what a change feed needs: transactions (``B``egin / ``C``ommit), relations (``R``), rows
(``I``nsert, ``U``pdate, ``D``elete) and ``T``runcate; origins, types and logical messages are
read past. Column values arrive in PostgreSQL's text form and are turned into JSON values
by type: integers and floats become numbers, booleans booleans, ``json``/``jsonb`` their
JSON, and everything else (``numeric``, dates, UUIDs, arrays...) stays the text PostgreSQL
prints, so nothing loses precision. The format is described in the PostgreSQL manual,
"Logical Replication Message Formats".
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "UNCHANGED",
    "Begin",
    "Commit",
    "DecodeError",
    "Decoder",
    "Relation",
    "RowMessage",
    "Truncate",
    "lsn_to_str",
]

PG_EPOCH: Final = 946_684_800  # 2000-01-01T00:00:00Z in Unix seconds


class _Unchanged:
    """The value of a TOASTed column an UPDATE did not touch: PostgreSQL does not send it."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()


class DecodeError(ValueError):
    """A message the decoder cannot read (truncated, or a relation it was never told of)."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """A table as the stream describes it; sent again after every change of its schema."""

    oid: int
    schema: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_ts: float
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_ts: float


@dataclass(frozen=True, slots=True)
class RowMessage:
    """An insert, update or delete. ``new`` is the row after the change (None for a delete);
    ``old`` the old key or row, when the server sent it (deletes, and updates that changed
    the replica identity or run with ``REPLICA IDENTITY FULL``)."""

    kind: Literal["insert", "update", "delete"]
    relation: Relation
    new: dict[str, Any] | None
    old: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Truncate:
    relations: tuple[Relation, ...]


Message = Begin | Commit | RowMessage | Truncate | Relation | None

_Q = struct.Struct(">Q")
_I = struct.Struct(">I")
_H = struct.Struct(">H")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")


def _integer(text: str) -> Any:
    return int(text)


def _boolean(text: str) -> Any:
    return text == "t"


def _floating(text: str) -> Any:
    number = float(text)
    # NaN and infinities have no JSON form: keep PostgreSQL's text.
    return number if number - number == 0 else text


_CONVERTERS: dict[int, Callable[[str], Any]] = {
    16: _boolean,  # bool
    20: _integer,  # int8
    21: _integer,  # int2
    23: _integer,  # int4
    26: _integer,  # oid
    700: _floating,  # float4
    701: _floating,  # float8
    114: json.loads,  # json
    3802: json.loads,  # jsonb
}


def lsn_to_str(lsn: int) -> str:
    """``0/16B3748`` form of a log sequence number."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _ts(micros: int) -> float:
    return PG_EPOCH + micros / 1_000_000


class Decoder:
    """Turns the payloads of one replication stream into messages; keeps the relations the
    stream announced, so it must see every message of the stream, in order."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}

    def decode(self, data: bytes) -> Message:
        """One payload -> one message, or None for the kinds a feed has no use for."""
        try:
            return self._decode(data)
        except (struct.error, IndexError, UnicodeDecodeError, ValueError) as exc:
            if isinstance(exc, DecodeError):
                raise
            kind = chr(data[0]) if data else "?"
            raise DecodeError(f"unreadable pgoutput message {kind!r}: {exc}") from exc

    def _decode(self, data: bytes) -> Message:
        kind = data[0]
        if kind == 0x49:  # I
            relation = self._relation(_I.unpack_from(data, 1)[0])
            new, _ = self._tuple(relation, data, 6)  # byte 5 is 'N'
            return RowMessage("insert", relation, new, None)
        if kind == 0x55:  # U
            relation = self._relation(_I.unpack_from(data, 1)[0])
            pos = 5
            old = None
            if data[pos] in (0x4B, 0x4F):  # K: old key, O: old row
                old, pos = self._tuple(relation, data, pos + 1)
            new, _ = self._tuple(relation, data, pos + 1)  # skip 'N'
            return RowMessage("update", relation, new, old)
        if kind == 0x44:  # D
            relation = self._relation(_I.unpack_from(data, 1)[0])
            old, _ = self._tuple(relation, data, 6)
            return RowMessage("delete", relation, None, old)
        if kind == 0x42:  # B
            final_lsn, ts, xid = _BEGIN.unpack_from(data, 1)
            return Begin(final_lsn, _ts(ts), xid)
        if kind == 0x43:  # C
            _flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(data, 1)
            return Commit(commit_lsn, end_lsn, _ts(ts))
        if kind == 0x52:  # R
            relation = self._parse_relation(data)
            self.relations[relation.oid] = relation
            return relation
        if kind == 0x54:  # T
            (count,) = _I.unpack_from(data, 1)
            oids = struct.unpack_from(f">{count}I", data, 6)
            return Truncate(tuple(self._relation(oid) for oid in oids))
        return None  # O(rigin), Y (type), M(essage): nothing to act on

    def _relation(self, oid: int) -> Relation:
        relation = self.relations.get(oid)
        if relation is None:
            raise DecodeError(f"pgoutput named relation {oid} before describing it")
        return relation

    @staticmethod
    def _string(data: bytes, pos: int) -> tuple[str, int]:
        end = data.index(0, pos)
        return data[pos:end].decode(), end + 1

    def _parse_relation(self, data: bytes) -> Relation:
        (oid,) = _I.unpack_from(data, 1)
        schema, pos = self._string(data, 5)
        name, pos = self._string(data, pos)
        identity = chr(data[pos])
        (count,) = _H.unpack_from(data, pos + 1)
        pos += 3
        columns = []
        for _ in range(count):
            flags = data[pos]
            column, pos = self._string(data, pos + 1)
            type_oid, _typmod = struct.unpack_from(">Ii", data, pos)
            pos += 8
            columns.append(Column(column, type_oid, bool(flags & 1)))
        return Relation(oid, schema, name, identity, tuple(columns))

    @staticmethod
    def _tuple(relation: Relation, data: bytes, pos: int) -> tuple[dict[str, Any], int]:
        (count,) = _H.unpack_from(data, pos)
        pos += 2
        columns = relation.columns
        if count > len(columns):
            raise DecodeError(
                f"a row of {relation.qualified} has {count} columns, its relation {len(columns)}"
            )
        row: dict[str, Any] = {}
        for index in range(count):
            column = columns[index]
            kind = data[pos]
            pos += 1
            if kind == 0x74:  # t: text
                (size,) = _I.unpack_from(data, pos)
                pos += 4
                text = data[pos : pos + size].decode()
                pos += size
                convert = _CONVERTERS.get(column.type_oid)
                row[column.name] = text if convert is None else convert(text)
            elif kind == 0x6E:  # n: null
                row[column.name] = None
            elif kind == 0x75:  # u: unchanged TOAST value
                row[column.name] = UNCHANGED
            else:  # b: binary, only with the binary option, which the feed never asks for
                raise DecodeError(f"unexpected column kind {chr(kind)!r} in {relation.qualified}")
        return row, pos
