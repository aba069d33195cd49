"""The key rules of cachesync.keys: distinct calls, distinct keys; the owner can compute them."""

from __future__ import annotations

import datetime
import decimal
import enum
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachesync.keys import KeyBuilder, encode_key, key_text

parts = st.one_of(st.none(), st.text(max_size=8), st.integers())


@given(st.lists(parts, min_size=2, max_size=4), st.lists(parts, min_size=2, max_size=4))
def test_distinct_argument_lists_give_distinct_keys(a: list[object], b: list[object]) -> None:
    # Keys are text: 7 and "7" name one entity. Otherwise distinct lists never collide.
    def text(values: list[object]) -> list[object]:
        return [v if v is None else str(v) for v in values]

    if text(a) != text(b):
        assert encode_key(*a) != encode_key(*b)


def test_separators_are_escaped() -> None:
    assert encode_key("a", "b:c") == "a:b\\:c"
    assert encode_key("a:b", "c") == "a\\:b:c"
    assert encode_key("a", None) == "a:\\N"
    assert encode_key("a", "\\N") == "a:\\\\N"
    assert encode_key("a=b", "c") != encode_key("a", b="c")


def test_one_argument_is_its_text() -> None:
    class Code(enum.Enum):
        USD = "USD"

    ident = uuid.UUID(int=1)
    assert encode_key("US:D") == "US:D"
    assert encode_key(7) == "7"
    assert encode_key(Code.USD) == "USD"
    assert encode_key(ident) == str(ident)
    assert encode_key(decimal.Decimal("1.50")) == "1.50"
    assert encode_key(datetime.date(2026, 1, 2)) == "2026-01-02"


@pytest.mark.parametrize("bad", [[1, 2], {"a": 1}, object(), b"bytes", (1, 2)])
def test_arguments_without_text_are_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="pass key="):
        key_text(bad)


def test_none_alone_is_refused() -> None:
    with pytest.raises(TypeError, match="None cannot be a cache key"):
        encode_key(None)


def test_defaults_are_bound_and_keywords_bind_to_positions() -> None:
    def get(code: str = "USD") -> None: ...

    def rate(base: str, quote: str = "EUR", *, day: int = 0) -> None: ...

    key = KeyBuilder(get)
    assert key((), {}) == key(("USD",), {}) == key((), {"code": "USD"}) == "USD"
    assert key.lone_name is None  # a default: not the one-str shortcut
    rate_key = KeyBuilder(rate)
    assert rate_key(("GBP",), {}) == rate_key((), {"base": "GBP", "quote": "EUR"})
    assert rate_key(("GBP",), {}) == "GBP:EUR:day=0"


def test_self_and_cls_are_left_out() -> None:
    class Repo:
        def get(self, code: str) -> None: ...

        @classmethod
        def load(cls, code: str, region: str) -> None: ...

    repo = Repo()
    assert KeyBuilder(Repo.get)((repo, "USD"), {}) == "USD"
    assert KeyBuilder(Repo.__dict__["load"].__func__)((Repo, "USD", "eu"), {}) == "USD:eu"


def test_variadic_arguments() -> None:
    def f(a: str, *rest: str, **extra: str) -> None: ...

    key = KeyBuilder(f)
    assert key(("x",), {}) == "x"
    assert key(("x", "y"), {}) == "x:y"
    assert key(("x",), {"y": "z"}) == "x:y=z"
    assert key(("x", "y=z"), {}) != key(("x",), {"y": "z"})


def test_a_custom_key_must_return_a_str() -> None:
    key = KeyBuilder(lambda code: None, custom=lambda code: 5)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="must return a str"):
        key(("USD",), {})
