"""Arguments -> cache key: the text the owner's events name.

The rules, which an owner can follow to compute the key of any call:

- **One argument**: the key is its text: a ``str`` as it is, an ``int``, ``float``,
  ``Decimal`` or ``UUID`` as ``str()`` gives it, an ``Enum`` as the text of its value, a date
  or time in ISO 8601. So ``get("USD")`` is key ``USD`` and ``get(7)`` is key ``7`` (the same
  entity as ``get("7")``: keys are text, as events are).
- **Several arguments**: the text of each, *escaped* (``\\`` -> ``\\\\``, ``:`` -> ``\\:``,
  ``=`` -> ``\\=``; ``None`` -> ``\\N``), joined by ``:``: the positional parameters in
  the order of the function's signature, then the keyword-only ones and any ``**kwargs`` as
  ``name=text``, by name.
  ``rate("a", "b:c")`` is ``a:b\\:c`` and ``rate("a:b", "c")`` is ``a\\:b:c``: distinct
  arguments never share a key. :func:`encode_key` does it for an owner in Python.
- A function of **one parameter** takes the first rule whether its argument is passed
  positionally or by name, keyword-only included: ``get(*, code)`` keys ``get(code="USD")``
  as ``USD``.
- A function with ``*args`` or ``**kwargs`` (or with no signature to read) escapes even a lone
  argument, since it may be called with several: ``get("a:b")`` is ``a\\:b`` and
  ``get("a", "b")`` is ``a:b``. Keys without ``\\``, ``:`` or ``=`` are the same either way.
- Defaults are bound: ``get()`` and ``get("USD")`` name one entry when ``code="USD"`` is the
  default, and ``get(code="USD")`` is the same call.
- A function that takes ``*args`` or ``**kwargs`` may be called with one argument or with
  several, so its keys are always escaped, a lone argument too: ``tags("a:b")`` is ``a\\:b``
  and ``tags("a", "b")`` is ``a:b`` (a key without ``\\``, ``:`` or ``=`` reads the same).
- A method's ``self`` or ``cls`` (a first parameter of that name) is not part of the key.
- Anything else (a list, a dict, an arbitrary object) has no key text: the call raises a
  ``TypeError`` that says to pass ``key=`` to ``cached()``.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import inspect
import uuid
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["KeyBuilder", "KeyFunc", "encode_key", "key_text"]

KeyFunc = Callable[..., str]
"""Builds the cache key (the owner's key for the entity, as its events name it) from the
arguments of the cached function."""

_ESCAPES = str.maketrans({"\\": "\\\\", ":": "\\:", "=": "\\="})
_NONE = "\\N"
_TEXT_TYPES = (int, float, decimal.Decimal, uuid.UUID)
_ISO_TYPES = (datetime.date, datetime.time)  # datetime is a date


def key_text(value: object) -> str:
    """The text of one key argument (see the module docstring); TypeError if it has none."""
    if type(value) is str:
        return value
    if isinstance(value, enum.Enum):
        return key_text(value.value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, _TEXT_TYPES):
        return str(value)
    if isinstance(value, _ISO_TYPES):
        return value.isoformat()
    raise TypeError(
        f"cannot build a cache key from an argument of type {type(value).__name__}: keys are "
        "text (str, int, float, Decimal, UUID, Enum, date, time); pass key= to cached() "
        "to build the key yourself"
    )


def _part(value: object) -> str:
    if value is None:
        return _NONE
    return key_text(value).translate(_ESCAPES)


def encode_key(*args: object, **kwargs: object) -> str:
    """The key of a call with these arguments: what an owner computes for its events.

    One positional argument gives its text as is; otherwise each argument is escaped and
    joined by ``:``, keyword arguments last as ``name=text`` in name order.
    """
    if len(args) == 1 and not kwargs:
        if args[0] is None:
            raise TypeError("None cannot be a cache key on its own; pass key= to cached()")
        return key_text(args[0])
    parts = [_part(arg) for arg in args]
    parts += [f"{name}={_part(kwargs[name])}" for name in sorted(kwargs)]
    return ":".join(parts)


def _is_receiver(param: inspect.Parameter) -> bool:
    return param.name in ("self", "cls") and param.kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


class KeyBuilder:
    """The key of each call of one function, by the rules of the module docstring.

    ``lone_name`` is the name of the function's one parameter when it has exactly one, with
    no default, so that a ``str`` argument *is* the key (the wrappers' fastest path).
    """

    __slots__ = ("_custom", "_signature", "_params", "_skip", "_fast", "_variadic", "lone_name")

    def __init__(self, fn: Callable[..., Any], custom: KeyFunc | None = None) -> None:
        if custom is not None and not callable(custom):
            raise TypeError("key= must be a function that returns the cache key as a str")
        self._custom = custom
        self.lone_name: str | None = None
        self._signature: inspect.Signature | None = None
        self._params: tuple[inspect.Parameter, ...] = ()
        self._skip = 0
        self._fast = False
        self._variadic = True  # until a signature says how many arguments a call has
        if custom is not None:
            return
        try:
            self._signature = inspect.signature(fn)
        except (TypeError, ValueError):  # some builtins and C callables have none
            return
        self._params = tuple(self._signature.parameters.values())
        if self._params and _is_receiver(self._params[0]):
            self._skip = 1
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        plain = all(p.kind in positional for p in self._params)
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        self._variadic = any(p.kind in variadic for p in self._params)
        # A call that passes every parameter positionally needs no binding.
        self._fast = plain
        if plain and len(self._params) == 1 and not self._skip:
            if self._params[0].default is inspect.Parameter.empty:
                self.lone_name = self._params[0].name

    def __call__(self, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
        """The key of the call ``fn(*args, **kwargs)``."""
        if self._custom is not None:
            key = self._custom(*args, **kwargs)
            if type(key) is not str:
                raise TypeError(f"the key= function must return a str, got {type(key).__name__}")
            return key
        signature = self._signature
        if signature is None:
            return _variadic_key(args, kwargs)
        if self._fast and not kwargs and len(args) == len(self._params):
            return encode_key(*args[self._skip :])
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"cannot build a cache key: {exc}") from None
        bound.apply_defaults()
        parts: list[Any] = []
        extra: dict[str, Any] = {}
        for param in self._params[self._skip :]:
            value = bound.arguments[param.name]
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                parts.extend(value)
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                extra.update(value)
            elif param.kind is inspect.Parameter.KEYWORD_ONLY:
                extra[param.name] = value
            else:
                parts.append(value)
        if self._variadic:
            return _variadic_key(parts, extra)
        if len(parts) + len(extra) == 1:  # one parameter, keyword-only included: its text
            return encode_key(*parts, *extra.values())
        return encode_key(*parts, **extra)


def _variadic_key(args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """The key of a call of a function that may take any number of arguments: a lone one is
    escaped too, so that it never reads as several."""
    if len(args) == 1 and not kwargs:
        return _part(args[0])
    return encode_key(*args, **kwargs)
