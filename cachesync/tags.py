"""Tags: groups of entries that one event (or one call) drops together, whatever their keys.

``cached(..., tags=lambda value: [f"supplier:{value.supplier_id}"])`` computes an entry's tags
when it is stored (filled, primed or refreshed by an event); ``tags=lambda key, value: ...``
gets the key too. ``Publisher.changed(ns, tags=["supplier:42"])`` then drops, in every
consumer, every entry of ``ns`` stored with that tag, and ``fn.invalidate_tags("supplier:42")``
does it in this instance.

The race guard is the one keys have, made conservative: a fill in flight when a tag
invalidation arrives might get that tag once its value is known, so every fill of the cache in
flight is voided (it stores nothing; reads after the invalidation fetch again).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["TagFunc", "TagIndex", "tagger_of"]

TagFunc = Callable[..., Iterable[str]]
"""``tags(value)`` or ``tags(key, value)`` -> the tags of an entry."""


def tagger_of(fn: TagFunc) -> Callable[[str, Any], Iterable[str]]:
    """``fn`` as a function of ``(key, value)``, whether it takes the value only or both."""
    if not callable(fn):
        raise TypeError("tags= must be a function of the value (or of key and value)")
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    if len(params) >= 2:
        return fn
    return lambda key, value: fn(value)


class TagIndex:
    """Which keys carry which tags, for one cache (kept under the cache's lock)."""

    __slots__ = ("by_tag", "by_key")

    def __init__(self) -> None:
        self.by_tag: dict[str, set[str]] = {}
        self.by_key: dict[str, tuple[str, ...]] = {}

    def assign(self, key: str, tags: Iterable[str]) -> None:
        """``key`` now carries exactly ``tags``."""
        self.discard(key)
        unique = tuple(dict.fromkeys(tags))
        if not unique:
            return
        self.by_key[key] = unique
        for tag in unique:
            self.by_tag.setdefault(tag, set()).add(key)

    def discard(self, key: str) -> None:
        """``key`` carries no tag any more."""
        tags = self.by_key.pop(key, None)
        if tags is None:
            return
        for tag in tags:
            keys = self.by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_tag[tag]

    def keys_for(self, tags: Iterable[str]) -> set[str]:
        """Every key that carries one of ``tags``."""
        found: set[str] = set()
        for tag in tags:
            found.update(self.by_tag.get(tag, ()))
        return found

    def tags_of(self, key: str) -> tuple[str, ...]:
        """The tags ``key`` carries."""
        return self.by_key.get(key, ())

    def __len__(self) -> int:
        return len(self.by_key)
