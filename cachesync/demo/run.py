"""``cachesync demo``: one owner, several consumer instances, and how stale they get.

:func:`run_demo` starts the owner of :mod:`cachesync.demo.owner` (a plain ASGI app called
in-process through ``httpx.ASGITransport``, with an embedded :class:`~cachesync.Publisher`)
and ``instances`` consumers, each a :class:`~cachesync.CacheSync` with its own ``@cached``
function over the owner's REST API. Then, for ``duration`` seconds, ``readers`` tasks per
consumer read currencies (a few popular codes most of the time) while the owner changes
``update_rate`` of them per second: commit the new version, then publish
``changed(ns, code, version=v)``.

What it measures:

- **Staleness window** of an update: from the owner's commit until *every* instance's reads
  return the new version. Right after each commit a probe per instance reads the key in a
  tight loop (bounded by :data:`PROBE_DEADLINE`) until it sees the new version, so the window
  does not wait for a reader to happen to ask for that key. The readers' own first read of the
  new version is reported beside it.
- **Stale reads**: reads that returned an older version than the owner's current one, although
  they began more than :data:`STALE_GRACE` after the commit of the newer one. A read that
  overlaps the commit may return either version; one that begins well after it may not. This
  count depends on the machine too: a process the OS stops for longer than the grace has
  reads waiting behind the listener.
- **Reads stale after the event**: reads that returned an older version although their
  instance had already applied the newer version's event when they began. The library
  guarantees there are none, however busy the machine.

The caches are warmed up (every instance reads every currency once) before the counting
starts, so the results describe a running service rather than its first second.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import itertools
import math
import random
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TextIO

import httpx

from ..client import CacheSync
from ..errors import CacheSyncError, TransportError
from ..publisher import Publisher
from ..transports.base import redact_url
from .owner import NAMESPACE, Currency, Owner, OwnerApp, owner_client

__all__ = [
    "PROBE_DEADLINE",
    "STALE_GRACE",
    "DemoConfig",
    "DemoResult",
    "InstanceResult",
    "Progress",
    "ProgressPrinter",
    "Window",
    "format_table",
    "run_demo",
]

STALE_GRACE = 0.010
"""A read that begins this long after a commit must return the committed version (seconds)."""

PROBE_DEADLINE = 2.0
"""How long a probe waits for an instance to return a new version before giving up (seconds)."""

HEARTBEAT_INTERVAL = 0.5
CONNECT_TIMEOUT = 5.0
ZIPF_EXPONENT = 1.1
READ_PAUSE = 0.001

clock = time.perf_counter


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """What to run. ``url`` of ``None`` means a fresh ``memory://demo-<random>`` bus.
    ``refresh`` makes the owner's events carry the new value and the consumers store it
    (``mode="refresh"``) instead of dropping their copy and fetching it again."""

    url: str | None = None
    duration: float = 10.0
    instances: int = 4
    readers: int = 8
    update_rate: float = 5.0
    refresh: bool = False
    stale_grace: float = STALE_GRACE
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.duration > 0:
            raise ValueError(f"duration must be positive, got {self.duration!r}")
        if self.instances < 1:
            raise ValueError(f"instances must be at least 1, got {self.instances!r}")
        if self.readers < 1:
            raise ValueError(f"readers must be at least 1, got {self.readers!r}")
        if not self.update_rate >= 0:
            raise ValueError(f"update_rate must be >= 0, got {self.update_rate!r}")
        if not self.stale_grace >= 0:
            raise ValueError(f"stale_grace must be >= 0, got {self.stale_grace!r}")


@dataclass(frozen=True, slots=True)
class Window:
    """Percentiles of a staleness window over ``count`` updates, in seconds (``None`` when
    nothing was measured). ``timeouts`` updates were not seen everywhere within the probe
    deadline; they count at the time the probe gave up, so ``max`` is then a lower bound."""

    count: int
    p50: float | None
    p99: float | None
    max: float | None
    timeouts: int = 0

    @classmethod
    def of(cls, samples: Sequence[float], timeouts: int = 0) -> Window:
        """Nearest-rank percentiles of ``samples``."""
        ordered = sorted(samples)
        if not ordered:
            return cls(0, None, None, None, timeouts)
        return cls(len(ordered), _rank(ordered, 0.50), _rank(ordered, 0.99), ordered[-1], timeouts)


def _rank(ordered: Sequence[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class InstanceResult:
    """One consumer instance: what its cache did, and what its listener noticed."""

    name: str
    reads: int
    hits: int
    hit_rate: float
    owner_calls: int
    events: int
    stale_reads: int
    stale_after_event: int
    read_errors: int
    gaps: int
    reconnects: int
    heartbeat_misses: int
    bad_events: int


@dataclass(frozen=True, slots=True)
class DemoResult:
    """Everything :func:`run_demo` measured. ``to_dict()`` gives it as JSON-ready data."""

    url: str
    channel: str
    instances: list[InstanceResult]
    readers: int
    mode: str
    duration: float
    interrupted: bool
    update_rate: float
    reads: int
    probe_reads: int
    hit_rate: float
    owner_calls: int
    updates: int
    events_published: int
    heartbeats_published: int
    staleness: Window
    first_read: Window
    stale_reads: int
    stale_grace: float
    stale_after_event: int

    def to_dict(self) -> dict[str, Any]:
        """The result as plain dicts, lists and numbers."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of a running demo, for a live display."""

    elapsed: float
    duration: float
    reads: int
    hit_rate: float
    owner_calls: int
    updates: int
    staleness_p99: float | None
    stale_reads: int


# -- measuring ------------------------------------------------------------------------------


class _Update:
    __slots__ = ("code", "version", "committed", "probe", "first_read", "timed_out")

    def __init__(self, code: str, version: int, committed: float, instances: int) -> None:
        self.code = code
        self.version = version
        self.committed = committed
        # Per instance, seconds from the commit until a read returned this version (or a
        # newer one): the probe's read, and the first of the workload's reads.
        self.probe: list[float | None] = [None] * instances
        self.first_read: list[float | None] = [None] * instances
        self.timed_out = False


class _Coherence:
    """Checks every read against the owner's commit history, and against the events its
    instance had applied when the read began."""

    def __init__(self, owner: Owner, instances: int, stale_grace: float) -> None:
        self._owner = owner
        self._instances = instances
        self._grace = stale_grace
        self.updates: list[_Update] = []
        self.stale_reads = [0] * instances
        self.stale_after_event = [0] * instances
        self.probe_reads = 0
        # Updates an instance's readers have not read yet, by code.
        self._unread: list[dict[str, list[_Update]]] = [{} for _ in range(instances)]
        # By code: the positions of its updates in the order published, and their versions.
        self._published: dict[str, tuple[list[int], list[int]]] = {}

    def committed(self, code: str, version: int, at: float) -> _Update:
        update = _Update(code, version, at, self._instances)
        positions, versions = self._published.setdefault(code, ([], []))
        positions.append(len(self.updates))
        versions.append(version)
        self.updates.append(update)
        for unread in self._unread:
            unread.setdefault(code, []).append(update)
        return update

    def read(
        self, instance: int, code: str, version: int, started: float, applied: int, finished: float
    ) -> None:
        """A reader's read; notes the first read of each update's version."""
        self._check(instance, code, version, started, applied)
        unread = self._unread[instance].get(code)
        if unread:
            waiting = []
            for update in unread:
                if update.version <= version:
                    update.first_read[instance] = finished - update.committed
                else:
                    waiting.append(update)
            self._unread[instance][code] = waiting

    def probed(self, instance: int, code: str, version: int, started: float, applied: int) -> None:
        """A probe's read: checked, but not a reader's first read."""
        self.probe_reads += 1
        self._check(instance, code, version, started, applied)

    def _check(self, instance: int, code: str, version: int, started: float, applied: int) -> None:
        # By the clock: the owner had committed something newer well before the read began.
        if version < self._owner.version_at(code, started - self._grace):
            self.stale_reads[instance] += 1
        # By the events: the instance had applied the event of something newer (events arrive
        # in the order they were published). This one does not depend on how fast the machine
        # runs the listener, so it must always be zero.
        published = self._published.get(code)
        if published is not None:
            positions, versions = published
            seen = bisect.bisect_left(positions, applied)
            if seen and version < versions[seen - 1]:
                self.stale_after_event[instance] += 1

    def staleness(self) -> Window:
        """Commit until every instance's probe got the new version back."""
        done = [u for u in self.updates if None not in u.probe]  # not those still probing
        return Window.of([_latest(u.probe) for u in done], sum(u.timed_out for u in done))

    def first_reads(self) -> Window:
        """Commit until every instance's readers got the new version, over the updates that
        every instance's readers read again."""
        seen = [u for u in self.updates if None not in u.first_read]
        return Window.of([_latest(u.first_read) for u in seen])


def _latest(windows: list[float | None]) -> float:
    return max(w for w in windows if w is not None)


# -- the consumers --------------------------------------------------------------------------


class _Consumer:
    """One instance of the consuming service: a CacheSync and its cached owner read."""

    def __init__(
        self, name: str, url: str, channel: str, owner: OwnerApp, *, refresh: bool
    ) -> None:
        self.name = name
        self.sync = CacheSync(url, channel, connect_timeout=CONNECT_TIMEOUT)
        self.http = owner_client(owner, timeout=5.0)
        self.read_errors = 0
        self._baseline: dict[str, int] = {}
        http = self.http

        @self.sync.cached(
            NAMESPACE,
            ttl=3600.0,
            version_of=_version_of,
            mode="refresh" if refresh else "invalidate",
            from_event=Currency.model_validate if refresh else None,
        )
        async def get_currency(code: str) -> Currency | None:
            response = await http.get(f"/currencies/{code}")
            if response.status_code == 404:
                return None
            response.raise_for_status()
            return Currency.model_validate_json(response.content)

        self.get = get_currency
        self._events = self.sync.namespace(NAMESPACE).stats
        self._events_before = 0

    async def __aenter__(self) -> Self:
        try:
            await self.sync.start()
        except BaseException:
            await self.http.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.sync.stop()
        finally:
            await self.http.aclose()

    def heard_owner(self) -> bool:
        return int(self.sync.stats()["listener"]["messages"]) > 0

    def mark(self) -> None:
        """Count from now on (the warm-up is not part of the results)."""
        self._baseline = self._counters()
        self._events_before = self._events.events

    def applied(self) -> int:
        """How many of the owner's events this instance has applied since :meth:`mark`."""
        return self._events.events - self._events_before

    def counters(self) -> dict[str, int]:
        """The client's and the namespace's counters since :meth:`mark`."""
        return {k: v - self._baseline.get(k, 0) for k, v in self._counters().items()}

    def _counters(self) -> dict[str, int]:
        stats = self.sync.stats()
        merged = {**stats["listener"], **stats["namespaces"][NAMESPACE]}
        return {k: v for k, v in merged.items() if type(v) is int}


def _version_of(currency: Currency) -> int:
    return currency.version


def _lookups(counters: dict[str, int]) -> int:
    return counters["hits"] + counters["misses"] + counters["bypassed"] + counters["stale_serves"]


# -- the workload ---------------------------------------------------------------------------


class _Workload:
    """Readers on every consumer, an updater on the owner, a probe per update and consumer."""

    def __init__(
        self,
        config: DemoConfig,
        owner: Owner,
        consumers: list[_Consumer],
        rng: random.Random,
    ) -> None:
        self.config = config
        self.owner = owner
        self.consumers = consumers
        self.coherence = _Coherence(owner, len(consumers), config.stale_grace)
        self._rng = rng
        self._codes = list(owner.currencies)
        self._cum_weights = list(
            itertools.accumulate(
                1.0 / (rank + 1) ** ZIPF_EXPONENT for rank in range(len(self._codes))
            )
        )
        self._probes: set[asyncio.Task[None]] = set()
        self._owner_gets_before = owner.gets

    @property
    def owner_calls(self) -> int:
        """GET requests the owner served since the workload began."""
        return self.owner.gets - self._owner_gets_before

    async def run(
        self,
        stop: asyncio.Event,
        on_progress: Callable[[Progress], None] | None,
        progress_interval: float,
    ) -> tuple[float, bool]:
        """Run until ``duration`` passes or ``stop`` is set; return (elapsed, interrupted)."""
        started = clock()
        tasks = [
            asyncio.create_task(self._reader(i, consumer, random.Random(self._rng.random())))
            for i, consumer in enumerate(self.consumers)
            for _ in range(self.config.readers)
        ]
        updater = None
        if self.config.update_rate > 0:
            updater = asyncio.create_task(self._updater())
            tasks.append(updater)
        if on_progress is not None:
            tasks.append(asyncio.create_task(self._report(on_progress, progress_interval, started)))
        stopping = asyncio.create_task(stop.wait())
        waiting: list[asyncio.Future[Any]] = [stopping] if updater is None else [stopping, updater]
        interrupted = True  # unless the wait below runs its course
        try:
            await asyncio.wait(
                waiting, timeout=self.config.duration, return_when=asyncio.FIRST_COMPLETED
            )
            elapsed = clock() - started
            interrupted = stop.is_set()
        finally:
            stopping.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(stopping, *tasks, return_exceptions=True)
            failure = None
            if updater is not None and not updater.cancelled():
                failure = updater.exception()
            await self._end_probes(cancel=interrupted or failure is not None)
        if failure is not None:
            raise failure
        return elapsed, interrupted

    async def _reader(self, instance: int, consumer: _Consumer, rng: random.Random) -> None:
        get = consumer.get
        coherence = self.coherence
        codes, cum_weights = self._codes, self._cum_weights
        while True:
            for code in rng.choices(codes, cum_weights=cum_weights, k=256):
                started, applied = clock(), consumer.applied()
                try:
                    currency = await get(code)
                except (httpx.HTTPError, CacheSyncError):
                    consumer.read_errors += 1
                    await asyncio.sleep(0.01)
                    continue
                coherence.read(instance, code, _version(currency), started, applied, clock())
                # A request handler does more than read the cache. The pause also matters
                # because a hit never suspends: without it the readers would keep the one
                # event loop that all instances and the owner share busy, and measure that.
                await asyncio.sleep(READ_PAUSE)

    async def _updater(self) -> None:
        interval = 1.0 / self.config.update_rate
        next_at = clock()
        rng = self._rng
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - clock()))
            code = rng.choice(self._codes)
            rate = round(self.owner.currencies[code].rate * rng.uniform(0.98, 1.02), 6)
            currency, committed = self.owner.commit(code, rate)
            update = self.coherence.committed(code, currency.version, committed)
            # Probes start at the commit, before the event is even sent, so the window they
            # measure includes the publish.
            for instance, consumer in enumerate(self.consumers):
                task = asyncio.create_task(self._probe(instance, consumer, update))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)
            await self.owner.publish(currency)

    async def _probe(self, instance: int, consumer: _Consumer, update: _Update) -> None:
        deadline = update.committed + PROBE_DEADLINE
        while True:
            started, applied = clock(), consumer.applied()
            pause = 0.0
            try:
                version = _version(await consumer.get(update.code))
            except (httpx.HTTPError, CacheSyncError):
                consumer.read_errors += 1
                version, pause = 0, 0.01  # no old value was served; do not hammer the owner
            else:
                self.coherence.probed(instance, update.code, version, started, applied)
            finished = clock()
            if version >= update.version or finished >= deadline:
                update.timed_out |= version < update.version
                update.probe[instance] = finished - update.committed
                return
            await asyncio.sleep(pause)

    async def _end_probes(self, *, cancel: bool) -> None:
        probes = list(self._probes)
        if cancel:
            for task in probes:
                task.cancel()
        # Probes end by themselves within PROBE_DEADLINE.
        await asyncio.gather(*probes, return_exceptions=True)

    async def _report(
        self, on_progress: Callable[[Progress], None], interval: float, started: float
    ) -> None:
        while True:
            await asyncio.sleep(interval)
            on_progress(self.progress(clock() - started))

    def progress(self, elapsed: float) -> Progress:
        """A snapshot of the counters so far."""
        counters = [consumer.counters() for consumer in self.consumers]
        reads = sum(_lookups(c) for c in counters)
        hits = sum(c["hits"] for c in counters)
        return Progress(
            elapsed=elapsed,
            duration=self.config.duration,
            reads=reads,
            hit_rate=hits / reads if reads else 0.0,
            owner_calls=self.owner_calls,
            updates=self.owner.updates,
            staleness_p99=self.coherence.staleness().p99,
            stale_reads=sum(self.coherence.stale_reads),
        )

    def result(
        self, url: str, channel: str, elapsed: float, interrupted: bool, publisher: Publisher
    ) -> DemoResult:
        """Everything measured, taken while the consumers are still open."""
        instances = []
        for i, consumer in enumerate(self.consumers):
            c = consumer.counters()
            reads = _lookups(c)
            instances.append(
                InstanceResult(
                    name=consumer.name,
                    reads=reads,
                    hits=c["hits"],
                    hit_rate=c["hits"] / reads if reads else 0.0,
                    owner_calls=c["fetches"],
                    events=c["events"],
                    stale_reads=self.coherence.stale_reads[i],
                    stale_after_event=self.coherence.stale_after_event[i],
                    read_errors=consumer.read_errors,
                    gaps=c["gaps"],
                    reconnects=c["reconnects"],
                    heartbeat_misses=c["heartbeat_misses"],
                    bad_events=c["bad_events"],
                )
            )
        reads = sum(i.reads for i in instances)
        events = self.owner.updates
        return DemoResult(
            url=redact_url(url),
            channel=channel,
            instances=instances,
            readers=self.config.readers,
            mode="refresh" if self.config.refresh else "invalidate",
            duration=round(elapsed, 3),
            interrupted=interrupted,
            update_rate=self.config.update_rate,
            reads=reads,
            probe_reads=self.coherence.probe_reads,
            hit_rate=sum(i.hits for i in instances) / reads if reads else 0.0,
            owner_calls=self.owner_calls,
            updates=self.owner.updates,
            events_published=events,
            heartbeats_published=max(0, publisher.published - events),
            staleness=self.coherence.staleness(),
            first_read=self.coherence.first_reads(),
            stale_reads=sum(self.coherence.stale_reads),
            stale_grace=self.config.stale_grace,
            stale_after_event=sum(self.coherence.stale_after_event),
        )


def _version(currency: Currency | None) -> int:
    return 0 if currency is None else currency.version


# -- running it -----------------------------------------------------------------------------


async def run_demo(
    config: DemoConfig,
    *,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 1.0,
) -> DemoResult:
    """Run the demo described by ``config`` and return what it measured.

    Setting ``stop`` ends the workload early; the result then covers the time it ran and says
    ``interrupted``. ``on_progress`` is called every ``progress_interval`` seconds. Everything
    the demo starts (publisher, consumers, tasks) is stopped before it returns.
    Raises :class:`~cachesync.errors.ConfigError` for a URL no transport handles and
    :class:`~cachesync.errors.TransportError` when the broker cannot be reached.
    """
    token = uuid.uuid4().hex[:8]
    url = config.url or f"memory://demo-{token}"
    channel = f"cachesync-demo-{token}"
    rng = random.Random(config.seed)
    stop = stop or asyncio.Event()
    publisher = Publisher(url, channel, heartbeat_interval=HEARTBEAT_INTERVAL)
    owner = Owner(publisher, rng=rng, carry_values=config.refresh)
    async with contextlib.AsyncExitStack() as stack:
        app = OwnerApp(owner)
        await stack.enter_async_context(publisher)
        consumers = [
            await stack.enter_async_context(
                _Consumer(f"consumer-{i + 1}", url, channel, app, refresh=config.refresh)
            )
            for i in range(config.instances)
        ]
        await _wait_until_heard(consumers, url, stop)
        await _warm_up(consumers, list(owner.currencies))
        workload = _Workload(config, owner, consumers, rng)
        elapsed, interrupted = await workload.run(stop, on_progress, progress_interval)
        result = workload.result(url, channel, elapsed, interrupted, publisher)
    return result


async def _wait_until_heard(consumers: list[_Consumer], url: str, stop: asyncio.Event) -> None:
    # A consumer that caches before it has heard a publisher must treat that publisher's first
    # message as a possible restart and flush; starting the reads after every instance heard
    # the owner's first heartbeat keeps that one-time flush out of the measurements.
    timeout = CONNECT_TIMEOUT + 3 * HEARTBEAT_INTERVAL
    deadline = clock() + timeout
    while not all(consumer.heard_owner() for consumer in consumers):
        if stop.is_set():
            return
        if clock() > deadline:
            raise TransportError(
                f"the consumers did not receive the owner's heartbeats on {redact_url(url)} "
                f"within {timeout:g}s; is the broker delivering messages?"
            )
        await asyncio.sleep(0.02)


async def _warm_up(consumers: list[_Consumer], codes: list[str]) -> None:
    # Every instance reads every code once before the clock starts, so the results describe
    # a running service rather than the stampede of its first second.
    await asyncio.gather(*(consumer.get(code) for consumer in consumers for code in codes))
    for consumer in consumers:
        consumer.mark()


# -- showing it -----------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 0.01:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds * 1000:.2f} ms"


def format_table(result: DemoResult) -> str:
    """The result as a plain-text report."""
    lines = [
        f"cachesync demo: {len(result.instances)} instances x {result.readers} readers on "
        f"{result.url}, {result.duration:.1f} s, {result.update_rate:g} updates/s, "
        f"{result.mode} mode" + ("  (interrupted)" if result.interrupted else ""),
        "",
    ]
    header = ("instance", "reads", "hit rate", "owner calls", "events", "stale reads")
    rows = [
        (
            i.name,
            f"{i.reads:,}",
            f"{i.hit_rate:.2%}",
            f"{i.owner_calls:,}",
            f"{i.events:,}",
            f"{i.stale_reads:,}",
        )
        for i in result.instances
    ]
    rows.append(
        (
            "all",
            f"{result.reads:,}",
            f"{result.hit_rate:.2%}",
            f"{sum(i.owner_calls for i in result.instances):,}",
            f"{sum(i.events for i in result.instances):,}",
            f"{result.stale_reads:,}",
        )
    )
    lines += _columns(header, rows)
    lines += [
        "",
        f"owner: {result.owner_calls:,} GET calls served, {result.updates:,} updates committed "
        f"and published (+ {result.heartbeats_published:,} heartbeats)",
        f"reads include {result.probe_reads:,} probe reads; a stale read began more than "
        f"{result.stale_grace * 1000:g} ms after a newer commit",
        f"reads of an old version that began after their instance applied the newer one's "
        f"event: {result.stale_after_event:,}",
        "",
        "staleness window, from the owner's commit until every instance:",
    ]
    window_rows = []
    for label, window in (
        ("serves the new version", result.staleness),
        ("serves it to a workload reader", result.first_read),
    ):
        top = _ms(window.max)
        if window.timeouts:
            top = f">= {top} ({window.timeouts} not seen within {PROBE_DEADLINE:g} s)"
        window_rows.append((label, f"{window.count:,}", _ms(window.p50), _ms(window.p99), top))
    lines += _columns(("", "updates", "p50", "p99", "max"), window_rows, indent="  ")
    lines += [
        "  (a probe per instance reads each changed key from the commit on; in invalidate mode",
        "  its window includes the refetch from the owner. Workload readers come to a key by",
        "  chance, so their row counts only the updates every instance read again.)",
    ]
    problems = {
        "read errors": sum(i.read_errors for i in result.instances),
        "gaps": sum(i.gaps for i in result.instances),
        "reconnects": sum(i.reconnects for i in result.instances),
        "heartbeat misses": sum(i.heartbeat_misses for i in result.instances),
        "bad events": sum(i.bad_events for i in result.instances),
    }
    lines += ["", "listeners: " + ", ".join(f"{n:,} {name}" for name, n in problems.items())]
    return "\n".join(lines)


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return (indent + "   ".join(cells)).rstrip()

    return [line(header), *(line(row) for row in rows)]


class ProgressPrinter:
    """Shows :class:`Progress` snapshots: one line rewritten in place on a terminal, plain
    lines otherwise. Call :meth:`done` before printing anything else."""

    def __init__(self, stream: TextIO = sys.stderr, *, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._shown = False

    def __call__(self, progress: Progress) -> None:
        text = (
            f"{progress.elapsed:4.1f}/{progress.duration:g}s  reads {progress.reads:,}  "
            f"hit {progress.hit_rate:.1%}  owner calls {progress.owner_calls:,}  "
            f"updates {progress.updates:,}  staleness p99 {_ms(progress.staleness_p99)}  "
            f"stale reads {progress.stale_reads:,}"
        )
        if self.tty:
            # \r and "erase line" keep the display to one line without a terminal library;
            # a line wider than the terminal would wrap, and \r would only reach its last row.
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r\x1b[2K" + text[:width])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        """Clear the live line, if any."""
        if self.tty and self._shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
        self._shown = False
