"""``Publisher.send_batch`` (the change feeds' and the outbox relay's path) against
``send_many``: the same bytes, the same errors, without building the event models; and
``ChangeEvent.encode`` against the model's own ``model_dump_json``."""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import math
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field

from cachesync.events import ChangeEvent, Op
from cachesync.publisher import Change, Publisher
from cachesync.signing import Signer
from cachesync.transports.base import from_url

from .test_transport_contract import subscribed

pytestmark = pytest.mark.timeout(30)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    value=json_values,
    ts=st.floats(allow_nan=False, allow_infinity=False),
    version=st.none() | st.integers(min_value=-(2**63), max_value=2**63),
    tags=st.none() | st.lists(st.text(max_size=5), max_size=3).map(tuple),
    keys=st.lists(st.text(max_size=10), max_size=3).map(tuple),
    ns=st.text(max_size=30),
)
def test_encode_writes_the_object_the_model_writes(
    value: Any, ts: float, version: int | None, tags: tuple[str, ...] | None,
    keys: tuple[str, ...], ns: str,
) -> None:  # fmt: skip
    event = ChangeEvent(
        source="s", seq=3, ns=ns, op=Op.UPSERT, keys=keys, version=version, value=value,
        ts=ts, tags=tags,
    )  # fmt: skip
    ours, model = event.encode(), event.model_dump_json(exclude_none=True).encode()
    assert _loads(ours) == _loads(model)
    assert ChangeEvent.decode(ours) == ChangeEvent.decode(model)


def _loads(data: bytes) -> Any:
    # NaN != NaN: compare what the JSON holds, with NaN made comparable.
    return json.loads(data, parse_constant=lambda name: name)


class _Colour(enum.Enum):
    RED = "red"


class _Row(BaseModel):
    a: int | None = None
    b: str = "x"


class _Aliased(BaseModel):
    first_name: str = Field(default="x", alias="firstName")


class _WrittenByAlias(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)
    first_name: str = Field(default="y", alias="firstName")


@pytest.mark.parametrize(
    "value",
    [
        datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.UTC),
        datetime.date(2026, 1, 2),
        decimal.Decimal("1.10"),
        uuid.UUID(int=7),
        b"bytes",
        _Row(),
        _Aliased(),  # the model writes field names, not aliases
        _WrittenByAlias(),  # unless the value's model says otherwise
        {"both": [_Aliased(), _WrittenByAlias()]},
        _Colour.RED,
        {1: 2},
        (1, 2),
        frozenset({1}),
        {"nan": math.nan, "inf": [math.inf]},
        math.inf,
        "\u2028\x00é",
        1e300,
    ],
)
def test_encode_writes_what_the_model_writes_for_values_of_other_types(value: Any) -> None:
    event = ChangeEvent(source="s", seq=1, ns="n", op=Op.UPSERT, keys=("k",), value=value, ts=1.0)
    assert event.encode() == event.model_dump_json(exclude_none=True).encode()


def test_a_signed_event_with_a_model_value_verifies_once_received() -> None:
    # The signature covers the model's JSON; the bytes sent must hold the same object, or
    # every consumer rejects the event.
    signer = Signer([b"k" * 32])
    event = ChangeEvent(
        source="s", seq=1, ns="n", op=Op.UPSERT, keys=("k",), value=_Aliased(), ts=1.0
    )
    assert signer.verify(ChangeEvent.decode(signer.sign(event).encode()))


def test_encode_refuses_what_the_model_refuses() -> None:
    event = ChangeEvent(
        source="s", seq=1, ns="n", op=Op.UPSERT, keys=("k",), value=object(), ts=1.0
    )
    with pytest.raises(Exception) as ours:
        event.encode()
    with pytest.raises(Exception) as model:
        event.model_dump_json()
    assert type(ours.value) is type(model.value)


ODD_CHANGES = [
    Change(Op.UPSERT, "fx", ("USD",), 3, {"rate": 1.5}, 10.0),
    Change(Op.UPSERT, "fx", ("USD",), None, {"when": datetime.date(2026, 1, 2)}, 10.0),
    Change(Op.DELETE, "fx", ("EUR", "GBP"), 4, None, 11),  # an int ts: the model's path
    Change(Op.FLUSH, "fx", (), None, None, None),  # the publisher's clock
    Change(Op.UPSERT, "fx", (), None, None, 12.0, ("t1", "t2")),
    Change(Op.UPSERT, "fx", ["K"], None, None, 13.0),  # type: ignore[arg-type]
    Change("upsert", "fx", ("S",), None, None, 14.0),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("schema_version", [1, 2])
async def test_send_batch_sends_the_bytes_send_many_sends(
    unique: str, signed: bool, schema_version: int
) -> None:
    url = f"memory://{unique}"
    transport = from_url(url)
    async with (
        transport,
        subscribed(transport, "c") as sub,
        Publisher(
            url, "c", heartbeat_interval=None, clock=lambda: 99.0,
            signing_key=b"k" * 32 if signed else None, schema_version=schema_version,
        ) as publisher,
    ):  # fmt: skip
        events = await publisher.send_many(ODD_CHANGES)
        assert await publisher.send_batch(ODD_CHANGES) == len(ODD_CHANGES)
        received = await sub.wait_for(2 * len(ODD_CHANGES))
    n = len(ODD_CHANGES)
    if not signed:  # send_many returns the events as built, before signing
        assert received[:n] == [event.encode() for event in events]
    for many, batch in zip(received[:n], received[n:], strict=True):
        first, second = json.loads(many), json.loads(batch)
        assert second.pop("seq") == first.pop("seq") + n
        first.pop("sig", None), second.pop("sig", None)
        assert first == second
    if signed:
        signer = Signer([b"k" * 32])
        assert all(signer.verify(ChangeEvent.decode(payload)) for payload in received)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (Change(Op.UPSERT, "n" * 257, ("k",), None, None, 1.0), "ns"),
        (Change(Op.UPSERT, "fx", ("k",), "3", None, 1.0), "version"),  # type: ignore[arg-type]
        (Change(Op.UPSERT, "fx", ("k",), True, None, 1.0), "version"),
        (Change(Op.UPSERT, "fx", ("k",), None, None, math.nan), "ts"),
        (Change(Op.UPSERT, "fx", ("k",), None, None, math.inf), "ts"),
        (Change(Op.UPSERT, "fx", ("k",), None, object(), 1.0), "serialize"),
    ],
)
async def test_send_batch_refuses_what_send_many_refuses_and_publishes_nothing(
    unique: str, bad: Change, reason: str
) -> None:
    url = f"memory://{unique}"
    transport = from_url(url)
    good = Change(Op.UPSERT, "fx", ("k",), None, None, 1.0)
    async with (
        transport,
        subscribed(transport, "c") as sub,
        Publisher(url, "c", heartbeat_interval=None) as publisher,
    ):
        errors = []
        for send in (publisher.send_many, publisher.send_batch):
            with pytest.raises(ValueError) as info:
                await send([good, bad])
            errors.append(str(info.value))
        assert publisher.seq == 0
        await publisher.send_batch([good])
        assert [json.loads(p)["seq"] for p in await sub.wait_for(1)] == [1]
    assert errors[0] == errors[1]
    assert "change 1 of 2" in errors[0] and reason in errors[0]
