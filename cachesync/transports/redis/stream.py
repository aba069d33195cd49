"""``redis+stream://`` and ``rediss+stream://``: a Redis stream per channel, with replay.

The publisher appends ``{"d": payload}`` to the stream whose key is the channel name
(``XADD channel MAXLEN ~ maxlen * d payload``). A subscriber reads it with ``XREAD`` from the id
of the last entry it yielded, so after a lost connection it can pick up where it left off: the
stream is a log of the last ``maxlen`` (or a few more) events.

When ``on_ready(resumed)`` is called
    First ``subscribe()`` of a channel on this transport object: once the current end of the
    stream is known (any entry added after that is delivered), with ``resumed=False``, before the
    first payload. The stream's older entries are not replayed.

    A later ``subscribe()`` of the same channel on the same object (after ``ConnectionLost``, or
    ``close()`` and ``connect()``):

    - nothing missed and nothing new since the last entry yielded: ``on_ready(True)`` at once;
    - entries were added since, and all of them are still in the stream: they are yielded first
      (the backlog, up to the end of the stream as it was when the subscription started), and
      ``on_ready(True)`` is called only after the consumer has taken the last of them, i.e.
      when it has caught up (entries added since, read in the same round trip, come after
      it). Until then the consumer keeps treating its cache as untrusted;
    - some were lost (trimmed by ``MAXLEN`` or deleted before this subscriber read them, the
      key deleted or recreated, or a previous subscription already detected a loss): the
      backlog is skipped and ``on_ready(False)`` is called at once; reading goes on from the
      current end of the stream. The consumer flushes on ``resumed=False``, which makes every
      older entry redundant, so replaying what is left of the backlog would only cost time. A
      loss found in the middle of the backlog, or at its end (its last entry missing, or the
      count there not matching), is handled the same way, then.

    A subscription that has called ``on_ready`` and then finds that entries it had not read yet
    were trimmed (it fell more than about ``maxlen`` entries behind) raises ``ConnectionLost``;
    the next ``subscribe()`` reports ``resumed=False``.

How losses are detected. Trimming does not move ``max-deleted-entry-id`` (only ``XDEL`` does),
so the subscriber counts: it knows the ``entries-added`` counter (Redis 7+) at its position, adds
one per entry read, and compares with ``XINFO STREAM`` sent in the same round trip as each
``XREAD``. Whenever the stream's last entry is the one just read, the counts must match; and when
trimming has passed the subscriber's position, every entry added after it must still be there.
Either mismatch means something was missed. On Redis before 7 (no counter) a later subscription
is never reported as resumed, and trimming past the position read counts as a loss.

Blocking reads last at most ``block_ms`` (so an idle subscriber polls about once a second, and a
socket that goes silent is noticed after ``block_ms`` plus ``health_check_interval``);
``close()`` also shuts the reading connection, so it ends a subscription at once.

URL options (query string; keyword arguments of the same name win):

``maxlen=100000``
    Approximate length the publisher trims the stream to: how long an outage a subscriber can
    bridge without a flush (at 100 events/s, about 15 minutes).
``block_ms=1000``, ``batch=500``
    Longest blocking ``XREAD``, and most entries read per round trip.
``health_check_interval=15``, and everything redis-py takes
    As for ``redis://``, see :mod:`cachesync.transports.redis.connection`.

An entry larger than ``max_payload`` is skipped by its id and counted (``oversized``): the
cursor moves past it, so it is never read again, after a reconnect either. redis-py has no
way to leave part of a reply unread, so it is read once (one linear parse by hiredis) first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final, NamedTuple

from ...errors import ConnectionLost, TransportError
from ..base import OnReady, Option, int_option
from .connection import FAILURES, FAILURES_OR_TIMEOUT, REFUSALS, RedisTransportBase, read_replies

try:
    import redis.exceptions as redis_errors
    from redis.asyncio.connection import AbstractConnection
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "redis+stream:// needs redis-py: pip install 'cachesync[redis]'", name=exc.name
    ) from exc

__all__ = ["RedisStreamTransport", "DEFAULT_MAXLEN", "DEFAULT_BLOCK_MS", "DEFAULT_BATCH"]

log = logging.getLogger("cachesync.transports.redis_stream")

DEFAULT_MAXLEN: Final = 100_000
DEFAULT_BLOCK_MS: Final = 1000
DEFAULT_BATCH: Final = 500

FIELD: Final = b"d"
"""The stream entry field that holds the payload."""
# Appends every ARGV from the third on to the stream KEYS[1], in order, as the XADD of
# _command does (ARGV[1] is maxlen, ARGV[2] the field): publish_many's batches.
_XADD_ALL: Final = (
    b"local maxlen, field = ARGV[1], ARGV[2] "
    b"for i = 3, #ARGV do redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', field, ARGV[i]) "
    b"end return #ARGV - 2"
)

StreamId = tuple[int, int]
_ZERO: StreamId = (0, 0)


def _parse_id(raw: object) -> StreamId:
    if not isinstance(raw, bytes | str):
        raise ValueError(f"not a stream id: {raw!r}")
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _format_id(stream_id: StreamId) -> bytes:
    return b"%d-%d" % stream_id


class _Info(NamedTuple):
    """The parts of ``XINFO STREAM`` that loss detection needs."""

    length: int
    last_id: StreamId
    first_id: StreamId  # (0, 0) when empty
    max_deleted: StreamId
    entries_added: int | None  # None before Redis 7


def _parse_info(raw: object) -> _Info:
    if not isinstance(raw, list):
        raise ValueError(f"unexpected XINFO STREAM reply: {raw!r:.80}")
    fields: dict[str, Any] = {
        (k.decode() if isinstance(k, bytes) else str(k)): v
        for k, v in zip(raw[::2], raw[1::2], strict=False)
    }
    first = fields.get("recorded-first-entry-id")
    if first is None:
        entry = fields.get("first-entry")
        first = entry[0] if isinstance(entry, list) and entry else b"0-0"
    added = fields.get("entries-added")
    return _Info(
        length=int(fields["length"]),
        last_id=_parse_id(fields["last-generated-id"]),
        first_id=_parse_id(first),
        max_deleted=_parse_id(fields.get("max-deleted-entry-id", b"0-0")),
        entries_added=None if added is None else int(added),
    )


def _gap(position: StreamId, count: int | None, info: _Info | None) -> bool:
    """Whether an entry after ``position`` is gone, or one before it was never read.

    ``count`` is the stream's ``entries-added`` value as of the entry at ``position``, if the
    reader has read every entry up to it. ``info`` is a snapshot taken after that entry was read.
    """
    if info is None:  # the key is gone (or never was)
        return count > 0 if count is not None else position != _ZERO
    added = info.entries_added
    if count is None or added is None:
        # Redis < 7: no counter. Trimming past the position means entries may be gone.
        return position != _ZERO and info.length > 0 and info.first_id > position
    if added < count:  # the key was deleted and created again
        return True
    if info.max_deleted > position:  # XDEL of an entry not read yet
        return True
    if info.length == 0 or info.first_id > position:
        # Trimming passed the position: all that is left comes after it, and every entry
        # added after it must still be there.
        return info.length != added - count
    if info.last_id == position:
        return added != count
    return False  # cannot tell yet; a later snapshot will


class _Cursor:
    """Where the subscriptions of one channel on one transport object have got to.

    The position is kept as the id Redis sent (``raw``), set once per entry read; it is parsed
    only where it is compared, once per round trip.
    """

    __slots__ = ("raw", "count", "lost")

    def __init__(self, raw: bytes, count: int | None, lost: bool = False) -> None:
        self.raw = raw
        self.count = count  # entries-added as of raw, when known
        self.lost = lost

    @property
    def last_id(self) -> StreamId:
        return _parse_id(self.raw)

    @classmethod
    def at_end(cls, info: _Info | None) -> _Cursor:
        if info is None:
            return cls(_format_id(_ZERO), 0)
        return cls(_format_id(info.last_id), info.entries_added)

    def jump_to_end(self, info: _Info | None) -> None:
        end = _Cursor.at_end(info)
        self.raw, self.count, self.lost = end.raw, end.count, False


def _entries(reply: object, key: bytes) -> list[tuple[bytes, bytes | None]]:
    """``(raw id, payload)`` pairs from a RESP2 ``XREAD`` reply (payload None if no ``d``
    field)."""
    if reply is None:
        return []
    if not isinstance(reply, list):
        raise ValueError(f"unexpected XREAD reply: {reply!r:.80}")
    out: list[tuple[bytes, bytes | None]] = []
    for stream_key, items in reply:
        if stream_key != key:
            continue
        for entry_id, values in items:
            if values and values[0] == FIELD:  # the publisher's one field: the common case
                out.append((entry_id, values[1]))
                continue
            payload = None
            if values:
                for name, value in zip(values[::2], values[1::2], strict=False):
                    if name == FIELD:
                        payload = value
                        break
            out.append((entry_id, payload))
    return out


class RedisStreamTransport(RedisTransportBase):
    """Transport over Redis streams: like pub/sub, but a subscriber that lost its connection
    can replay what it missed, as long as the stream still holds it.

    See the module docstring for exactly when ``on_ready`` is called, and the URL options.
    """

    schemes: Mapping[str, str] = {"redis+stream": "redis", "rediss+stream": "rediss"}
    options: tuple[Option[Any], ...] = (
        *RedisTransportBase.options,
        int_option("maxlen", DEFAULT_MAXLEN),
        int_option("block_ms", DEFAULT_BLOCK_MS),
        int_option("batch", DEFAULT_BATCH),
    )

    def __init__(
        self,
        url: str = "redis+stream://localhost:6379/0",
        *,
        connect_timeout: float = 10.0,
        health_check_interval: float | None = None,
        socket_timeout: float | None = None,
        maxlen: int | None = None,
        block_ms: int | None = None,
        batch: int | None = None,
    ) -> None:
        super().__init__(
            url,
            connect_timeout=connect_timeout,
            health_check_interval=health_check_interval,
            socket_timeout=socket_timeout,
            maxlen=maxlen,
            block_ms=block_ms,
            batch=batch,
        )
        self.maxlen: int = self._values["maxlen"]
        self.block_ms: int = self._values["block_ms"]
        self.batch: int = self._values["batch"]
        self._cursors: dict[str, _Cursor] = {}

    @property
    def _read_timeout(self) -> float | None:
        # A blocking XREAD answers within block_ms; silence well beyond that is a stall.
        if not self.health_check_interval:
            return None
        return self.block_ms / 1000 + self.health_check_interval

    def _command(self, channel: str, payload: bytes) -> tuple[bytes, ...]:
        # Append one entry, trimming the stream to about maxlen.
        maxlen = b"%d" % self.maxlen
        return (b"XADD", channel.encode(), b"MAXLEN", b"~", maxlen, b"*", FIELD, payload)

    def _batch_script(self, channel: bytes) -> tuple[bytes, ...] | None:
        return _XADD_ALL, b"1", channel, b"%d" % self.maxlen, FIELD

    async def subscribe(
        self, channel: str, on_ready: OnReady | None = None
    ) -> AsyncIterator[bytes]:
        """Yield the payloads appended to the stream ``channel``; replay after a reconnect.

        See the module docstring for when ``on_ready`` is called. Raises ConnectionLost when
        the connection breaks or stalls, when the transport is closed, or when entries this
        subscription had not read yet were trimmed; it never reconnects by itself.
        """
        key = channel.encode()
        what = f"stream subscription to {channel!r}"
        conn = self._new_connection()

        def report(resumed: bool) -> None:
            if on_ready is not None:
                on_ready(resumed)

        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await conn.connect()  # type: ignore[no-untyped-call]
                    await conn.send_packed_command(conn.pack_command(b"XINFO", b"STREAM", key))
                    (raw_info,), _ = await read_replies(conn, 1)
                    info = _info_from(raw_info)
            except REFUSALS as exc:
                raise self._refused(what, exc) from exc
            except FAILURES_OR_TIMEOUT as exc:
                raise self._lost(conn, what, exc) from exc

            # The end of the stream to replay up to before on_ready(True), and the id of its
            # last entry as Redis sends it; None once on_ready has been called.
            catch_up: _Info | None = None
            catch_up_end: bytes | None = None
            cursor = self._cursors.get(channel)
            if cursor is None:
                cursor = self._cursors[channel] = _Cursor.at_end(info)
                report(False)
            elif cursor.lost or cursor.count is None or _gap(cursor.last_id, cursor.count, info):
                log.info(
                    "cannot replay the stream: entries were lost (or, before Redis 7, cannot be "
                    "counted); going on from its end",
                    extra={"channel": channel, "url": self.safe_url},
                )
                cursor.jump_to_end(info)
                report(False)
            elif info is None or cursor.last_id >= info.last_id:
                report(True)
            else:
                catch_up, catch_up_end = info, _format_id(info.last_id)

            while True:
                try:
                    async with asyncio.timeout(self._read_timeout):
                        entries, info = await self._read(conn, key, cursor, catch_up is None)
                except TimeoutError:
                    raise ConnectionLost(
                        f"{what} on {self.safe_url}: no reply within {self._read_timeout:g}s; "
                        "the network or server stalled"
                    ) from None
                except REFUSALS as exc:
                    raise TransportError(
                        f"Redis error on the {what}: {self._describe(exc)}"
                    ) from exc
                except FAILURES as exc:
                    raise self._lost(conn, what, exc) from exc
                count = cursor.count
                if entries:
                    if count is not None:
                        count += len(entries)
                    lost = _gap(_parse_id(entries[-1][0]), count, info)
                else:
                    # Nothing after the position, though the backlog is not done: deleted.
                    lost = catch_up is not None
                if lost:
                    if catch_up is None:
                        cursor.lost = True
                        raise ConnectionLost(
                            f"{what} on {self.safe_url} fell behind: entries it had not read "
                            f"yet were trimmed (maxlen={self.maxlen})"
                        )
                    cursor.jump_to_end(info)
                    catch_up = catch_up_end = None
                    report(False)
                    continue
                position = cursor.count
                limit = self.max_payload
                for entry_id, payload in entries:
                    # The cursor moves past every entry, yielded or not: an oversized one is
                    # skipped by its id, once, and never read again.
                    cursor.raw = entry_id
                    if position is not None:
                        position += 1
                        cursor.count = position
                    if payload is not None and not (
                        limit is not None
                        and len(payload) > limit
                        and self.too_big(
                            len(payload), f"stream entry {entry_id.decode()} of {channel!r}"
                        )
                    ):
                        yield payload
                    if entry_id == catch_up_end and catch_up is not None:
                        # The backlog's last entry is taken. The same read may go on past it
                        # (entries added since the snapshot), so the counts are compared here,
                        # at the entry where the snapshot took its count.
                        if position != catch_up.entries_added:
                            break  # some of the backlog was deleted: below
                        catch_up = catch_up_end = None
                        report(True)
                if catch_up is not None and cursor.last_id >= catch_up.last_id:
                    # The backlog's end is reached, and entries of it are gone (its last one
                    # too, if it was not met): as for a loss found before replaying.
                    cursor.jump_to_end(info)
                    catch_up = catch_up_end = None
                    report(False)
        finally:
            await self._release_connection(conn)

    async def _read(
        self, conn: AbstractConnection, key: bytes, cursor: _Cursor, block: bool
    ) -> tuple[list[tuple[bytes, bytes | None]], _Info | None]:
        """One round trip: XREAD from the cursor, and XINFO STREAM right after it."""
        args: list[bytes] = [b"XREAD", b"COUNT", b"%d" % self.batch]
        if block:
            args += [b"BLOCK", b"%d" % self.block_ms]
        args += [b"STREAMS", key, cursor.raw]
        await conn.send_packed_command(
            conn.pack_commands([args, [b"XINFO", b"STREAM", key]]), False
        )
        # Both replies are read before either error is raised, so the connection stays in step.
        (reply, raw_info), _ = await read_replies(conn, 2)
        info = _info_from(raw_info)
        if isinstance(reply, redis_errors.ResponseError):
            raise reply
        return _entries(reply, key), info


def _info_from(raw: object) -> _Info | None:
    """An ``XINFO STREAM`` reply: None when the key does not exist."""
    if isinstance(raw, redis_errors.ResponseError):
        if "no such key" in str(raw).lower():
            return None
        raise raw
    return _parse_info(raw)
