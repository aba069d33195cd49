"""Weighing cached values for ``max_bytes``: a cheap estimate of the memory a value holds.

:func:`estimate_size` is the default weigher: ``sys.getsizeof`` of the value and of what it
holds, a few levels deep and a bounded number of objects, so it stays cheap on big values (it
runs once per store, never on a hit). It is an estimate: pass ``weigher=`` to ``cached()``
when you know better (``len(value.raw)``, a serialised size).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["ENTRY_OVERHEAD", "TOMBSTONE_WEIGHT", "estimate_size"]

ENTRY_OVERHEAD = 160
"""Bytes counted per entry besides its value and key (the entry object and its dict slot)."""

TOMBSTONE_WEIGHT = ENTRY_OVERHEAD
"""What a tombstone (an entry that only remembers a version) weighs besides its key."""

_MAX_DEPTH = 4
_MAX_OBJECTS = 2_000
_ATOMS = (str, bytes, bytearray, int, float, bool, type(None), complex)


def estimate_size(value: Any) -> int:
    """Roughly how many bytes ``value`` holds: itself and its contents (containers, pydantic
    models and objects with a ``__dict__`` or ``__slots__``), up to a bounded depth and count;
    shared objects are counted once."""
    seen: set[int] = set()
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack and len(seen) < _MAX_OBJECTS:
        obj, depth = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        try:
            total += sys.getsizeof(obj)
        except TypeError:
            total += 64
        if isinstance(obj, _ATOMS) or depth >= _MAX_DEPTH:
            continue
        if isinstance(obj, dict):
            for k, v in obj.items():
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend((item, depth + 1) for item in obj)
        else:
            attrs = getattr(obj, "__dict__", None)
            if isinstance(attrs, dict):
                stack.append((attrs, depth + 1))
            for name in getattr(type(obj), "__slots__", ()):
                if isinstance(name, str) and hasattr(obj, name):
                    stack.append((getattr(obj, name), depth + 1))
    return total
