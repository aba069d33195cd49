"""Optional HMAC-SHA256 signatures on events, with a list of keys so keys can be rotated.

The publisher signs with the first key; a consumer accepts a signature made with any key of its
list. To rotate: add the new key to every consumer's list, then make it the publisher's key,
then drop the old one.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from .events import ChangeEvent

__all__ = ["Signer"]


def _as_bytes(key: bytes | str) -> bytes:
    return key.encode() if isinstance(key, str) else key


class Signer:
    """Signs and verifies events with HMAC-SHA256 over :meth:`ChangeEvent.signing_payload`."""

    def __init__(self, keys: Sequence[bytes | str]) -> None:
        if not keys:
            raise ValueError("signing needs at least one key")
        self._keys = [_as_bytes(k) for k in keys]
        if any(len(k) < 16 for k in self._keys):
            raise ValueError("signing keys must be at least 16 bytes long")

    def _digest(self, key: bytes, event: ChangeEvent) -> str:
        return hmac.new(key, event.signing_payload(), hashlib.sha256).hexdigest()

    def sign(self, event: ChangeEvent) -> ChangeEvent:
        """A copy of ``event`` carrying a signature made with the first key."""
        return event.model_copy(update={"sig": self._digest(self._keys[0], event)})

    def verify(self, event: ChangeEvent) -> bool:
        """True when ``event`` carries a signature made with one of the keys."""
        if event.sig is None:
            return False
        # Compared as bytes: compare_digest refuses str with non-ASCII characters.
        sig = event.sig.encode("utf-8", "replace")
        return any(hmac.compare_digest(sig, self._digest(k, event).encode()) for k in self._keys)
