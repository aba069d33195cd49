from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachesync.events import (
    SCHEMA_VERSION,
    ChangeEvent,
    EventDecodeError,
    Op,
    UnknownSchemaError,
    decode_event,
)


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


# -- decode_event (the listener's fast path) against ChangeEvent.decode --------------------------

FIELDS = ("v", "source", "seq", "ns", "op", "keys", "version", "value", "ts", "sig", "tags")


def outcome(decode: Callable[[bytes], object], payload: bytes) -> tuple[object, ...]:
    """What decoding ``payload`` gives: each field's type and repr (so 1 and 1.0, -0.0 and 0.0,
    a list and a tuple differ), or the error's type, message, version and namespace."""
    try:
        decoded = decode(payload)
    except EventDecodeError as exc:
        schema = (exc.version, exc.ns) if isinstance(exc, UnknownSchemaError) else None
        return ("error", type(exc), str(exc), schema)
    return ("ok", *((type(getattr(decoded, f)), repr(getattr(decoded, f))) for f in FIELDS))


def assert_same(payload: bytes) -> None:
    assert outcome(decode_event, payload) == outcome(ChangeEvent.decode, payload), payload


wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.sampled_from([0, 1, 2, 3, -1, 0.0, -0.0, 1.5, 1e308, 2**63, 2**64])
    | st.text(max_size=8)
    | st.text(min_size=120, max_size=300)
    | st.sampled_from(["upsert", "delete", "flush", "heartbeat", "Upsert", "", "a"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)

valid_fields = st.fixed_dictionaries(
    {
        "source": st.text(max_size=130) | st.integers(126, 130).map("é".__mul__),
        "seq": st.integers(min_value=-1, max_value=2**66),
        "op": st.sampled_from(["upsert", "delete", "flush", "heartbeat"]),
        "ts": st.floats(allow_nan=False, allow_infinity=False) | st.integers(),
    },
    optional={
        "v": st.sampled_from([0, 1, 2, 3, True]),
        "ns": st.text(max_size=20) | st.integers(254, 258).map("ß".__mul__),
        "keys": st.lists(st.text(max_size=6), max_size=3),
        "version": st.none() | st.integers(min_value=-(2**65), max_value=2**65),
        "value": wire_values,
        "sig": st.none() | st.text(max_size=8),
        "tags": st.none() | st.lists(st.text(max_size=6), max_size=3),
    },
)


@settings(max_examples=400, deadline=None)
@given(valid_fields, st.dictionaries(st.sampled_from(FIELDS + ("extra",)), wire_values))
def test_decode_event_gives_what_the_model_gives(
    fields: dict[str, object], noise: dict[str, object]
) -> None:
    """Near-valid events (each field of a valid shape or close to it), and the same events
    with some fields replaced by any JSON value: the fast path's values or error are the
    model's."""
    assert_same(json.dumps(fields).encode())
    assert_same(json.dumps({**fields, **noise}).encode())


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(FIELDS), wire_values),
    st.sampled_from(["", " ", "\n", "x", "{}"]),
    st.booleans(),
)
def test_decode_event_agrees_on_any_json_object(
    obj: dict[str, object], suffix: str, as_text: bool
) -> None:
    text = json.dumps(obj, ensure_ascii=False) + suffix
    assert_same(text.encode())
    if as_text:  # a str payload too, as ChangeEvent.decode takes
        assert outcome(decode_event, text) == outcome(ChangeEvent.decode, text)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_decode_event_agrees_on_random_bytes(payload: bytes) -> None:
    assert_same(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"source":"a","seq":1,"op":"upsert","ts":1,"value":NaN}',  # the model reads NaN
        b'{"source":"a","seq":1,"op":"upsert","ts":1e999}',
        b'{"source":"a","seq":1,"seq":2,"op":"upsert","ts":1}',  # a repeated field
        b'{"source":"\\ud800","seq":1,"op":"upsert","ts":1}',  # a lone surrogate
        b'{"source":"a","seq":1,"op":"upsert","ts":1,"value":1e999}',
        b'{"source":"a","seq":1,"op":"upsert","ts":1,"value":123456789012345678901234567890}',
        b'{"v":3,"ns":"items","source":"a","seq":1,"op":"upsert","ts":1}',
        b'{"v":true,"source":"a","seq":1,"op":"upsert","ts":1}',
        b'\xef\xbb\xbf{"source":"a","seq":1,"op":"upsert","ts":1}',  # a BOM
        b' {"source":"a","seq":1,"op":"upsert","ts":1} ',
        b'{"source":"a","seq":1,"op":"upsert","ts":1,"keys":["a","b"],"tags":[]}',
        b'{"source":"a","seq":1,"op":"upsert","ts":1,"value":' + b"1" * 5000 + b"}",
        b'{"source":"a","seq":' + b"9" * 400 + b',"op":"upsert","ts":1}',
        b'{"source":"a","seq":1,"op":"upsert","ts":1,"value":1e-400}',
        b'{"source":"a","seq":1,"op":"upsert","ts":1,"value":"a\nb"}',  # a raw newline
        b'{"source":"a","seq":1,"op":"upsert","ts":1,"value":"\xff"}',  # not UTF-8
        b'{"source":"a","seq":1,"op":"upsert","ts":1,"value":[1,]}',
        b'{"source":"a","seq":1,"op":"upsert","ts":1,}',
        # A ts of 19 digits or more: pydantic before 2.12 refuses such an int for a float.
        b'{"source":"a","seq":1,"op":"upsert","ts":1000000000000000000}',
        b'{"source":"a","seq":1,"op":"upsert","ts":-1000000000000000000}',
        b'{"source":"a","seq":1,"op":"upsert","ts":18446744073709551616}',
        b'{"source":"a","seq":1,"op":"upsert","ts":1e18}',
        b'{"source":"a","seq":1,"op":"upsert","ts":999999999999999999}',
        *(
            json.dumps(
                {"source": "s" * n, "ns": "n" * m, "seq": 1, "op": "delete", "ts": 1}
            ).encode()
            for n, m in ((0, 0), (128, 256), (129, 0), (1, 257))
        ),
    ],
)
def test_decode_event_agrees_on_edge_cases(payload: bytes) -> None:
    assert_same(payload)


def escaped(name: str) -> str:
    """``name`` as JSON text with each of its characters written as a ``\\u`` escape."""
    return "".join(f"\\u{ord(c):04x}" for c in name)


raw_names = st.sampled_from(FIELDS + ("Seq", "SOURCE", "extra", "")).flatmap(
    lambda name: st.sampled_from([json.dumps(name), f'"{escaped(name)}"'])
)
odd_values = r"""1.0 1e0 -0 -0.0 1E+2 true null [] {} "1" ["a","a"] 1e400 NaN 18446744073709551616
    9999999999999999999 -9999999999999999999 1000000000000000000 "\ud800" "\udc00x" ["\ud800"]
    "\ud83d\ude00" "\u0075psert" {"a":1,"a":2} "a\u0000b" "upsert" "flush" ["k"]""".split()
raw_values = st.one_of(
    wire_values.map(json.dumps),
    wire_values.map(lambda value: json.dumps(value, ensure_ascii=False)),
    st.sampled_from(odd_values),
)
valid_members = st.sampled_from(
    [("source", '"s"'), ("source", '"t"'), ("seq", "3"), ("seq", "4"), ("op", '"delete"')]
    + [("op", '"upsert"'), ("ts", "1.5"), ("ts", "2"), ("keys", '["a"]'), ("v", "1")]
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(valid_members, min_size=4, max_size=8),
    st.lists(st.tuples(raw_names, raw_values), max_size=4),
    st.randoms(use_true_random=False),
    st.sampled_from(["", " ", "\t", "\r\n"]),
)
def test_decode_event_agrees_on_hand_written_json(
    base: list[tuple[str, str]],
    fields: list[tuple[str, str]],
    rng: random.Random,
    space: str,
) -> None:
    """JSON no json.dumps writes: repeated fields, names written with escapes, numbers
    written as 1.0 or with 19 digits, lone surrogates, odd whitespace."""
    members = [(json.dumps(name), value) for name, value in base] + fields
    rng.shuffle(members)
    body = f",{space}".join(f"{name}{space}:{space}{value}" for name, value in members)
    assert_same(f"{{{space}{body}{space}}}".encode())


@pytest.mark.parametrize("depth", [50, 127, 128, 198, 199, 200, 201, 1_000, 100_000])
def test_decode_event_agrees_on_deeply_nested_values(depth: int) -> None:
    """The model refuses nesting about 200 deep, msgspec about 1,000 deep (with a
    RecursionError of its own): the fast path leaves anything that deep to the model."""
    head = b'{"source":"a","seq":1,"op":"upsert","ts":1,"value":'
    assert_same(head + b"[" * depth + b"]" * depth + b"}")
    assert_same(head + b"[" * depth + b"1" + b"]" * depth + b"}")
    assert_same(head + b'{"a":' * depth + b"1" + b"}" * depth + b"}")
    assert_same(head + b'[{"a":' * (depth // 2) + b"1" + b"}]" * (depth // 2) + b"}")


def test_decode_event_reads_values_with_many_brackets_through_the_model() -> None:
    head = b'{"source":"a","seq":1,"op":"upsert","ts":1,"value":'
    many = head + b"[" + b",".join([b'{"a":[1]}'] * 100) + b"]}"  # wide, not deep
    assert_same(many)
    assert type(decode_event(many)) is ChangeEvent


def test_decode_event_refuses_oversized_payloads_as_the_model_does() -> None:
    big = event(value="x" * 2_000).encode()
    assert_same(big)
    with pytest.raises(EventDecodeError, match="exceeds the limit"):
        decode_event(big, max_bytes=1_000)
    assert decode_event(big, max_bytes=len(big)).value == "x" * 2_000


def test_decode_event_reads_what_publishers_write() -> None:
    for original in (
        event(),
        event(version=7, value={"rate": 1.25}),
        event(op=Op.FLUSH, keys=()),
        event(op=Op.HEARTBEAT, value={"interval": 1.0}, keys=()),
        event(tags=("a", "b"), sig="00ff"),
        ChangeEvent(v=1, source="s", seq=3, op=Op.DELETE, ts=2.0),
    ):
        payload = original.encode()
        assert_same(payload)
        decoded = decode_event(payload)
        assert type(decoded) is not ChangeEvent  # the fast path read it
        assert all(getattr(decoded, f) == getattr(original, f) for f in FIELDS)
