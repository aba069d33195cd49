"""Run async services on a thread of their own, for code without an event loop.

Django and Flask apps behind gunicorn or uWSGI have request threads and no event loop. A
:class:`LoopThread` is an event loop on a daemon thread; :class:`BackgroundRunner` runs a
:class:`~cachesync.client.CacheSync` on one (``sync.start_in_background()``,
``with sync.running():``), so that cached plain functions work from any request thread.

Forks. A worker forked from a preloaded master (gunicorn ``--preload``, uWSGI without
``lazy-apps``, ``multiprocessing``) inherits the client but not its thread: nothing feeds its
caches any more. :func:`os.register_at_fork` tells the runner at once: in the child every cache
is distrusted (reads go to the owner) and the listener starts again on a new thread; entries
inherited from the parent come back only through that new subscription, which flushes them.
The child never touches what it inherited from the parent's loop (its epoll instance and
sockets are shared with the parent; closing them would unregister the parent's descriptors):
those objects are kept, unused, for the life of the child process.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import weakref
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from .backoff import Backoff
from .errors import StateError, TransportError

if TYPE_CHECKING:
    from .client import CacheSync

__all__ = ["INHERITED", "BackgroundRunner", "LoopThread"]

T = TypeVar("T")

log = logging.getLogger("cachesync.runner")

# Loops and connections a forked child inherited from its parent. They must never be closed
# or collected in the child (their epoll instance is shared with the parent), so they are kept
# here until the child exits. Only ever filled in a child, once per fork and runner.
INHERITED: list[object] = []


class LoopThread:
    """An event loop running on a daemon thread; :meth:`call` runs a coroutine on it from any
    other thread and blocks for its result."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.pid = os.getpid()

    def start(self) -> None:
        """Start the thread (and its loop)."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the loop runs, in this process."""
        return self.pid == os.getpid() and self._thread.is_alive()

    def in_loop_thread(self) -> bool:
        """Whether the caller runs on this loop's thread (where :meth:`call` would deadlock)."""
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; its result arrives in the returned future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result; cancel it after ``timeout``."""
        if self.in_loop_thread():
            coro.close()
            raise StateError(
                f"{self.name}: a blocking call from the loop's own thread would deadlock; "
                "await the async API there instead"
            )
        if not self.alive:
            coro.close()
            raise StateError(f"{self.name} is not running")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"{self.name}: no result within {timeout}s") from None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (cancelling what still runs on it) and join the thread."""
        if not self.alive:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()


class BackgroundRunner:
    """Runs one :class:`~cachesync.client.CacheSync` on a :class:`LoopThread`, follows forks
    and stops at interpreter exit. Built by ``sync.start_in_background()``; see the module
    docstring."""

    def __init__(self, client: CacheSync) -> None:
        self._client = client
        self._thread: LoopThread | None = None
        self._lock = threading.Lock()
        self._restart: concurrent.futures.Future[None] | None = None
        # Per runner, weakly: neither atexit nor the fork hooks keep a client alive.
        ref = weakref.ref(self)
        self._at_exit = functools.partial(_stop_at_exit, ref)
        self._fork_hooks = False
        self._hooks_ref = ref

    @property
    def running(self) -> bool:
        """Whether the listener's thread runs in this process."""
        return self._thread is not None and self._thread.alive

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the client runs on, while it runs."""
        return self._thread.loop if self.running and self._thread is not None else None

    def start(self, *, wait: bool = True) -> None:
        """Start the listener's thread and return once the subscription is live.

        Raises :class:`~cachesync.errors.TransportError` after the client's
        ``connect_timeout`` (nothing is left running then). With ``wait=False`` it returns at
        once and keeps trying to connect in the background; reads go to the owner meanwhile.
        """
        client = self._client
        with self._lock:
            if self.running:
                raise StateError("this CacheSync already runs in the background")
            client._check_thread_safe()
            thread = LoopThread("cachesync-listener")
            thread.start()
            if wait:
                try:
                    thread.call(client.start(), timeout=client.connect_timeout + 5.0)
                except BaseException:
                    thread.stop()
                    raise
            else:
                self._restart = thread.submit(self._start_until_live())
            self._thread = thread
            atexit.register(self._at_exit)
            if not self._fork_hooks:
                self._fork_hooks = True
                _register_fork_hooks(self._hooks_ref)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the listener, close the connection and join the thread. Idempotent."""
        with self._lock:
            thread, self._thread = self._thread, None
            atexit.unregister(self._at_exit)
            if thread is None or not thread.alive:
                return
            restart, self._restart = self._restart, None
            if restart is not None:
                restart.cancel()
            with contextlib.suppress(Exception):
                thread.call(self._client.stop(), timeout=timeout)
            thread.stop(timeout)

    # -- forks -----------------------------------------------------------------------------

    def _before_fork(self) -> None:
        # A lock held by another thread at the fork stays held forever in the child: take
        # them all here (each is held only briefly), release them on both sides after.
        self._lock.acquire()
        for lock in self._client._fork_locks():
            lock.acquire()

    def _after_fork_in_parent(self) -> None:
        for lock in reversed(self._client._fork_locks()):
            lock.release()
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        for lock in reversed(self._client._fork_locks()):
            lock.release()
        self._lock.release()
        inherited = self._thread
        if inherited is None or inherited.pid == os.getpid():
            return  # not running in the parent: nothing to follow
        # From here on nothing serves the inherited entries: reads go to the owner until the
        # new subscription is live (which flushes them).
        old_transport = self._client._reopen()
        INHERITED.extend((inherited, old_transport))
        self._thread = None
        thread = LoopThread("cachesync-listener")
        thread.start()
        self._thread = thread
        self._restart = thread.submit(self._start_until_live())
        log.info("cachesync restarts its listener in a forked child", extra={"pid": os.getpid()})

    async def _start_until_live(self) -> None:
        """Start the client; while the broker cannot be reached, try again with backoff
        (reads go to the owner meanwhile). In a forked child, and for ``wait=False``."""
        client = self._client
        backoff = Backoff(initial=0.1, maximum=5.0)
        while True:
            try:
                await client.start()
                return
            except TransportError as exc:
                delay = backoff.next_delay()
                log.warning(
                    "cachesync listener could not start; retrying",
                    extra={"error": str(exc), "retry_in": delay},
                )
                client._reopen()
                await asyncio.sleep(delay)
            except Exception:
                # Not a broker outage (a bad URL, a bug): retrying would not help. Reads keep
                # going to the owner; the log says why.
                log.exception("cachesync listener cannot start; reads go to the owner")
                return


def _register_fork_hooks(ref: weakref.ReferenceType[BackgroundRunner]) -> None:
    def before() -> None:
        runner = ref()
        if runner is not None:
            runner._before_fork()

    def after_in_parent() -> None:
        runner = ref()
        if runner is not None:
            runner._after_fork_in_parent()

    def after_in_child() -> None:
        runner = ref()
        if runner is not None:
            runner._after_fork_in_child()

    os.register_at_fork(
        before=before, after_in_parent=after_in_parent, after_in_child=after_in_child
    )


def _stop_at_exit(ref: weakref.ReferenceType[BackgroundRunner]) -> None:
    runner = ref()
    if runner is not None:
        runner.stop()
