from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachesync.events import SCHEMA_VERSION, ChangeEvent, EventDecodeError, Op


def event(**overrides: object) -> ChangeEvent:
    fields: dict[str, object] = dict(
        source="abc", seq=1, ns="currencies", op=Op.UPSERT, keys=("USD",), ts=1.5
    )
    fields.update(overrides)
    return ChangeEvent(**fields)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    original = event(version=7, value={"rate": 1.25, "name": "dollar"})
    assert ChangeEvent.decode(original.encode()) == original


def test_encoding_is_compact_json_with_schema_version() -> None:
    data = json.loads(event().encode())
    assert data["v"] == SCHEMA_VERSION == 2
    assert "tags" not in data
    assert "version" not in data and "value" not in data


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "object"),
        (b'{"v":3,"source":"a","seq":1,"op":"upsert","ts":1}', "schema version"),
        (b'{"source":"a","seq":1,"op":"explode","ts":1}', "unknown op"),
        (b'{"source":"a","seq":"1","op":"upsert","ts":1}', "seq"),
        (b'{"source":"a","seq":-1,"op":"upsert","ts":1}', "seq"),
        (b'{"source":"a","seq":1,"op":"upsert","ts":1,"keys":[1]}', "keys"),
        (b'{"source":"a","seq":1,"op":"upsert"}', "ts"),
        (b'{"source":"a","seq":1,"op":"upsert","ts":1,"extra":true}', "extra"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_payloads_raise_one_error_with_a_short_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(EventDecodeError) as info:
        ChangeEvent.decode(payload)
    assert reason.lower() in str(info.value).lower()
    assert len(str(info.value)) < 200


def test_oversized_payload_is_refused_before_parsing() -> None:
    big = event(value="x" * 2_000_000).encode()
    with pytest.raises(EventDecodeError, match="exceeds the limit"):
        ChangeEvent.decode(big)
    assert ChangeEvent.decode(big, max_bytes=4_000_000).value == "x" * 2_000_000


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoding_random_bytes_never_raises_anything_else(payload: bytes) -> None:
    try:
        ChangeEvent.decode(payload)
    except EventDecodeError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["v", "source", "seq", "ns", "op", "keys", "version", "value", "ts", "sig"]
        ),
        json_values,
    )
)
def test_decoding_random_json_objects_never_raises_anything_else(obj: dict[str, object]) -> None:
    try:
        ChangeEvent.decode(json.dumps(obj).encode())
    except EventDecodeError:
        pass
