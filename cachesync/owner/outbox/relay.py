"""OutboxRelay: publishes the committed outbox rows of one channel, at least once, in commit order.

What it guarantees (guarantees 6 and 14 of the design): every committed row is published at
least once, in commit order per key, even if the broker or the database is down for a while
(however long) or the owner restarts in between; a row is marked sent only after the broker
took it, and no row is ever stranded. It never keeps a "last id" cursor: each round selects
the lowest unsent rows again, so a row that commits late is never skipped. Events carry the
row's version, or else its commit stamp, so consumers end on the committed last value of a key
even when events arrive out of order (see :mod:`.model` and :mod:`.election`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from ...backoff import Backoff
from ...errors import StateError, TransportError
from ...events import MAX_EVENT_BYTES
from ...lifecycle import Service
from ...publisher import Change, Publisher
from ...transports.base import from_url, redact_url
from .database import database_for
from .election import Leadership
from .model import DEFAULT_CHANNEL
from .rows import BadRow, prepare

__all__ = ["OutboxRelay"]

log = logging.getLogger("cachesync.outbox")


# Broker failures in a row after which an owned publisher is replaced even though it still
# claims to be connected (a failed start, or a closed transport, replaces it at once).
_FAILURES_BEFORE_REPLACING = 3


class _RelayState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class OutboxRelay(Service):
    """Publishes committed outbox rows of one channel, in commit order, at least once.

    ``url_or_publisher`` is a broker URL (the relay then owns a :class:`Publisher`, with
    heartbeats, starts it, and replaces it with a fresh one after a broker failure, so it
    publishes again whenever the broker is back) or a started ``Publisher`` the caller owns
    (and keeps alive). Each round selects up to ``batch_size`` unsent rows in commit order,
    publishes them as one batch and marks them sent. On PostgreSQL with asyncpg a NOTIFY
    trigger wakes the relay at once; otherwise, and as a fallback, it polls every
    ``poll_interval`` seconds.

    Faults: while the broker or the database is down the relay logs, counts (``stats()``),
    backs off (up to ``backoff_max`` seconds) and tries again, for ever; no row is skipped.
    A row that cannot be published as written is published in the safest form that still
    tells consumers something changed (without its value, or as a flush of its namespace),
    and once the broker took it the reason goes to ``failed_reason``; a row with no usable
    namespace is marked failed and left unsent. Sent rows older than ``retention`` seconds
    are deleted (``None`` keeps them).

    One relay per owner instance is the usual deployment. On PostgreSQL (asyncpg) they elect
    one: the relay whose session holds an advisory lock for the table and channel publishes,
    the others stand by (``stats()["leading"]`` is False) and try to take over at every
    wake-up. The leader re-checks its lock in every round's select, and a leader deposed while
    a publish was on the wire loses to the new one's events by version. Other databases have
    no election: run one relay per channel there.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        url_or_publisher: str | Publisher = "memory://",
        channel: str | None = None,
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        retention: float | None = 3600.0,
        listen: bool = True,
        heartbeat_interval: float | None = 1.0,
        connect_timeout: float = 2.0,
        publish_timeout: float = 2.0,
        max_value_bytes: int = MAX_EVENT_BYTES - 4096,
        backoff_max: float = 5.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise TypeError("engine must be an AsyncEngine (sqlalchemy.ext.asyncio)")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        if retention is not None and retention < 0:
            raise ValueError("retention must be >= 0 seconds, or None to keep sent rows")
        self._url: str | None = None
        if isinstance(url_or_publisher, Publisher):
            if channel is not None and channel != url_or_publisher.channel:
                raise ValueError(
                    f"channel {channel!r} differs from the publisher's {url_or_publisher.channel!r}"
                )
            self.publisher = url_or_publisher
        elif isinstance(url_or_publisher, str):
            self._url = url_or_publisher
            self._publisher_options: dict[str, Any] = {
                "heartbeat_interval": heartbeat_interval,
                "publish_timeout": publish_timeout,
            }
            self._connect_timeout = connect_timeout
            self.publisher = self._new_publisher(channel or DEFAULT_CHANNEL)
        else:
            raise TypeError("url_or_publisher must be a broker URL or a Publisher")
        self._owns_publisher = self._url is not None
        self.engine = engine
        self.channel = self.publisher.channel
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention = retention
        self.max_value_bytes = max_value_bytes
        self.stop_timeout = stop_timeout
        self._wakeup = asyncio.Event()
        self._db = database_for(
            engine, self.channel, batch_size, listen=listen, on_wake=self._wakeup.set
        )
        self._leadership = Leadership(self.channel)
        self._in_round = False
        self._backoff = Backoff(initial=0.05, maximum=backoff_max)
        self._state = _RelayState.NEW
        self._task: asyncio.Task[None] | None = None
        self._publisher_started = not self._owns_publisher
        self._broker_failures = 0
        self._next_prune = 0.0
        self._progress = asyncio.Condition()
        self._rounds_started = 0
        self._last_empty_round = 0
        self._stats: dict[str, Any] = {
            "published": 0,
            "rounds": 0,
            "degraded": 0,
            "failed": 0,
            "publish_errors": 0,
            "publisher_restarts": 0,
            "db_errors": 0,
            "pruned": 0,
            "broker_up": False,
            "db_up": False,
            "last_error": None,
            "last_published_id": None,
            "lag_seconds": None,
        }

    def _new_publisher(self, channel: str) -> Publisher:
        assert self._url is not None  # only for a relay that owns its publisher
        # A new transport each time: whatever state a failed one was left in stays behind.
        transport = from_url(self._url, connect_timeout=self._connect_timeout)
        return Publisher(self._url, channel, transport=transport, **self._publisher_options)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the relay task. Returns at once: an unreachable broker or DB is retried."""
        if self._state is not _RelayState.NEW:
            raise StateError(f"this OutboxRelay is {self._state.value}; create a new one")
        self._state = _RelayState.RUNNING
        self._task = asyncio.create_task(self._run(), name="cachesync-outbox-relay")

    async def stop(self) -> None:
        """Stop the relay and, if it owns it, the publisher. Unsent rows stay for the next run.

        A round in progress may finish first (up to ``stop_timeout`` seconds), so rows it
        published are marked sent rather than published again by the next relay.
        """
        if self._state is _RelayState.CLOSED:
            return
        self._state = _RelayState.CLOSED
        task, self._task = self._task, None
        if task is not None:
            # Only a healthy round is worth waiting for; one stuck retrying a dead broker or
            # database has nothing to finish.
            healthy = self._stats["broker_up"] and self._stats["db_up"]
            if self._in_round and healthy:
                self._wakeup.set()
                await asyncio.wait({task}, timeout=self.stop_timeout)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._db.close()
        self._leadership.lost()
        if self._owns_publisher:
            await self.publisher.stop()

    # -- the API ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Start a round now instead of at the next poll (e.g. right after a commit)."""
        self._wakeup.set()

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until a round that started after this call found no unsent rows.

        So every row committed before the call has been published (or marked failed). Raises
        ``TimeoutError`` after ``timeout`` seconds.
        """
        if self._state is not _RelayState.RUNNING:
            raise StateError("the relay is not running")
        threshold = self._rounds_started
        self.wake()
        async with asyncio.timeout(timeout):
            async with self._progress:
                await self._progress.wait_for(lambda: self._last_empty_round > threshold)

    def stats(self) -> dict[str, Any]:
        """Counters and state: published, failed, degraded, errors, broker/db up, leading, lag…"""
        return {
            **self._stats,
            "leading": self._leadership.leading,
            "listening": self._db.listening,
            "notifies": self._db.notifies,
            "channel": self.channel,
            "source": self.publisher.source,
            "seq": self.publisher.seq,
        }

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        db_errors = self._db.errors
        while self._state is _RelayState.RUNNING:
            self._in_round = True
            try:
                await self._ensure_publisher()
                # Cleared before the query: a NOTIFY that lands during the round wakes the next.
                self._wakeup.clear()
                more = await self._round()
                self._backoff.reset()
                if not more:
                    await self._maybe_prune()
            except (TransportError, StateError) as exc:
                # StateError: a publisher the caller has not started (yet), or a transport
                # left closed by a failed reconnect.
                self._broker_down(exc)
                self._broker_failures += 1
                if (
                    isinstance(exc, StateError)
                    or not self._publisher_started
                    or self._broker_failures >= _FAILURES_BEFORE_REPLACING
                ):
                    await self._replace_publisher()
                await self._pause()
                continue
            except db_errors as exc:
                self._db_down(exc)
                await self._db.close()
                self._leadership.lost()
                await self._pause()
                continue
            except Exception as exc:  # noqa: BLE001 - the relay must outlive any surprise
                self._stats["last_error"] = f"{type(exc).__name__}: {exc}"
                log.exception("outbox relay round failed", extra={"channel": self.channel})
                await self._db.close()
                self._leadership.lost()
                await self._pause()
                continue
            finally:
                self._in_round = False
            if more or self._state is not _RelayState.RUNNING:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wakeup.wait()

    async def _pause(self) -> None:
        self._in_round = False
        if self._state is _RelayState.RUNNING:
            await asyncio.sleep(self._backoff.next_delay())

    async def _ensure_publisher(self) -> None:
        if self._publisher_started:
            return
        await self.publisher.start()
        self._publisher_started = True
        self._stats["broker_up"] = True
        log.info(
            "outbox relay connected to the broker",
            extra={"url": redact_url(self.publisher.url), "channel": self.channel},
        )

    async def _replace_publisher(self) -> None:
        """Start over with a fresh publisher (if this relay owns it): after a failed start, a
        transport left closed, or several broker failures in a row.

        Whatever state the failed connection was left in (closed by a reconnect that timed
        out, half open), the next round connects anew; consumers see a new source and know
        events may be missing. A relay never gives up: an outage of any length ends with the
        broker's return.
        """
        if not self._owns_publisher:
            return
        # The old one first (bounded: its broker may be unreachable), so a stop() that lands
        # meanwhile still finds it in self.publisher and closes it.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.stop_timeout):
                await self.publisher.stop()
        self.publisher = self._new_publisher(self.channel)
        self._publisher_started = False
        self._broker_failures = 0
        self._stats["publisher_restarts"] += 1

    async def _round(self) -> bool:
        """Publish one batch; True if there may be more rows waiting."""
        self._rounds_started += 1
        round_no = self._rounds_started
        self._stats["rounds"] += 1
        batch = await self._db.next_batch()
        self._db_up()
        self._leadership.update(batch.leads)
        if not batch.leads:
            return False  # standing by; not an empty round, so wait_idle() keeps waiting
        rows = batch.rows
        if not rows:
            async with self._progress:
                self._last_empty_round = round_no
                self._progress.notify_all()
            return False
        notes: dict[int, str] = {}
        failed: dict[int, str] = {}
        ready: list[tuple[int, Change]] = []
        for row in rows:
            row_id: int = row["id"]
            try:
                change, note = prepare(row, self.max_value_bytes)
            except BadRow as exc:
                failed[row_id] = str(exc)
                self._stats["failed"] += 1
                log.error(
                    "outbox row cannot be published, marked failed",
                    extra={"id": row_id, "reason": str(exc), "channel": self.channel},
                )
                continue
            ready.append((row_id, change))
            if note is not None:
                notes[row_id] = note
        try:
            # One batch, one broker round trip where the transport can (a Redis pipeline).
            await self.publisher.send_batch([change for _, change in ready])
        except (TransportError, StateError):
            # None of the batch is marked sent (some may have gone out: at least once), and
            # no note is written: a row with a failed_reason is never selected again, so a
            # note belongs only to a row the broker took. Unpublishable rows are marked failed.
            with contextlib.suppress(*self._db.errors):
                await self._db.mark((), {}, failed, ready[0][0] if ready else None)
            raise
        if ready:
            self._broker_failures = 0
            self._broker_up()
            last_id, last = ready[-1]
            self._stats["published"] += len(ready)
            self._stats["degraded"] += len(notes)
            self._stats["last_published_id"] = last_id
            self._stats["lag_seconds"] = max(0.0, time.time() - (last.ts or time.time()))
            for row_id, note in notes.items():
                log.warning(
                    "outbox row published in a reduced form", extra={"id": row_id, "reason": note}
                )
        await self._db.mark([row_id for row_id, _ in ready], notes, failed, None)
        return len(rows) == self.batch_size

    async def _maybe_prune(self) -> None:
        if self.retention is None or not self._leadership.leading:
            return
        now = time.monotonic()
        if now < self._next_prune:
            return
        # Prune at most every minute (or every retention period, if shorter): cheap enough.
        self._next_prune = now + min(60.0, max(self.retention, 1.0))
        cutoff = datetime.now(UTC) - timedelta(seconds=self.retention)
        self._stats["pruned"] += await self._db.prune(cutoff)

    # -- bookkeeping -----------------------------------------------------------------------

    def _broker_down(self, exc: BaseException) -> None:
        self._stats["publish_errors"] += 1
        self._stats["broker_up"] = False
        self._stats["last_error"] = f"broker: {exc}"
        log.warning(
            "outbox relay cannot publish, will retry",
            extra={"url": redact_url(self.publisher.url), "error": str(exc)},
        )

    def _broker_up(self) -> None:
        if not self._stats["broker_up"]:
            self._stats["broker_up"] = True
            log.info("outbox relay publishes again", extra={"channel": self.channel})

    def _db_down(self, exc: BaseException) -> None:
        self._stats["db_errors"] += 1
        self._stats["db_up"] = False
        self._stats["last_error"] = f"database: {type(exc).__name__}: {exc}"
        log.warning("outbox relay cannot read the outbox, will retry", extra={"error": str(exc)})

    def _db_up(self) -> None:
        if not self._stats["db_up"]:
            self._stats["db_up"] = True
            log.info("outbox relay reads the outbox", extra={"channel": self.channel})
