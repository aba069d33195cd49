"""One publishing relay per table and channel: the election, and its fencing.

On PostgreSQL the relays of all owner instances compete for a session advisory lock keyed by
the table and the channel; the session that holds it leads. The lock is taken *in the same
statement* that selects the rows to publish (see :mod:`.postgresql`), so a relay re-checks
that it still leads before every publish round, at no extra round trip: a session that was
terminated (``pg_terminate_backend``, a database restart, a cut network) fails that statement
and publishes nothing more; its connection is dropped and the relay tries again, standing by
while another session holds the lock. Taking the lock again while holding it only counts.

A publish already on the wire when the session died cannot be recalled: it may land after the
new leader's events. Events carry the row's version, or else its commit stamp (see
:mod:`.model`), so such a late event is older than what consumers already applied and loses.

Other databases have no election: every relay leads, so run one relay per channel there.
"""

from __future__ import annotations

import hashlib
import logging

from .model import TABLE_NAME

__all__ = ["Leadership", "lock_key"]

log = logging.getLogger("cachesync.outbox")


def lock_key(schema: str, channel: str) -> int:
    """The advisory lock key (a signed 64-bit int) that elects one relay per table and channel."""
    digest = hashlib.sha1(f"cachesync-outbox:{schema}.{TABLE_NAME}:{channel}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leadership:
    """Whether this relay leads its channel (None: not known yet), and the log of changes."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.leading: bool | None = None

    def update(self, leads: bool) -> None:
        """Record the outcome of this round's election."""
        if leads and self.leading is not True:
            log.info("outbox relay leads its channel", extra={"channel": self.channel})
        elif not leads and self.leading is not False:
            log.info(
                "outbox relay stands by: another relay publishes this channel",
                extra={"channel": self.channel},
            )
        self.leading = leads

    def lost(self) -> None:
        """The session is gone, and with it any lock it held."""
        if self.leading:
            self.leading = False
