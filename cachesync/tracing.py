"""OpenTelemetry spans (the ``otel`` extra: ``opentelemetry-api`` only).

``CacheSync(url, tracing=True)`` (the global tracer provider) or ``tracing=provider`` makes:

- ``cachesync.fetch`` around each owner call of a miss (single or batch), in the caller's
  trace, so an instrumented HTTP client's span nests under it; attributes: namespace,
  function, and for a batch the number of keys;
- ``cachesync.event`` around each event the listener handles: source, seq, op, namespace,
  number of keys and tags, and the lag from the owner's commit;
- ``cachesync.flush`` for each flush of a possible loss: its cause (gap, source, reconnect,
  heartbeat, schema...) and details, inside the event span that revealed it, if any.

Hits make no span and pay nothing: only fetch functions are wrapped, and a client without
tracing wraps nothing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .cached import is_async_callable

if TYPE_CHECKING:
    from .events import EventView

__all__ = ["Tracing"]

_INSTALL_HINT = "pip install 'cachesync[otel]'"


class Tracing:
    """Makes the spans of one client. ``provider`` is an OpenTelemetry ``TracerProvider``
    (None: the global one)."""

    def __init__(self, provider: Any = None) -> None:
        try:
            from opentelemetry import trace
        except ImportError as exc:
            raise ImportError(
                f"tracing needs opentelemetry-api: {_INSTALL_HINT}", name=exc.name
            ) from exc
        from . import __version__

        self._tracer = trace.get_tracer("cachesync", __version__, tracer_provider=provider)

    def wrap_fetch(self, fn: Callable[..., Any], ns: str, *, batch: bool = False) -> Any:
        """``fn`` with a ``cachesync.fetch`` span around each call."""
        tracer = self._tracer
        function = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        base = {"cachesync.namespace": ns, "cachesync.function": function}

        def attributes(args: tuple[Any, ...]) -> dict[str, Any]:
            if batch and args:
                return {**base, "cachesync.keys": len(args[0])}
            return base

        if is_async_callable(fn):

            async def traced_async(*args: Any, **kwargs: Any) -> Any:
                with tracer.start_as_current_span("cachesync.fetch", attributes=attributes(args)):
                    return await fn(*args, **kwargs)

            functools.update_wrapper(traced_async, fn, updated=())
            return traced_async

        def traced(*args: Any, **kwargs: Any) -> Any:
            with tracer.start_as_current_span("cachesync.fetch", attributes=attributes(args)):
                return fn(*args, **kwargs)

        functools.update_wrapper(traced, fn, updated=())
        return traced

    @contextlib.contextmanager
    def event(self, event: EventView, lag: float) -> Iterator[None]:
        """A ``cachesync.event`` span around the handling of ``event``."""
        attributes: dict[str, Any] = {
            "cachesync.source": event.source,
            "cachesync.seq": event.seq,
            "cachesync.op": str(event.op),
            "cachesync.namespace": event.ns,
            "cachesync.keys": len(event.keys),
            "cachesync.lag_seconds": lag,
            "cachesync.schema": event.v,
        }
        if event.tags:
            attributes["cachesync.tags"] = list(event.tags)
        with self._tracer.start_as_current_span("cachesync.event", attributes=attributes):
            yield

    def flush(self, cause: str, ns: str | None, details: dict[str, Any]) -> None:
        """A ``cachesync.flush`` span: namespace ``ns`` (None: all) flushed for ``cause``."""
        attributes: dict[str, Any] = {
            "cachesync.cause": cause,
            "cachesync.namespace": ns if ns is not None else "*",
        }
        for name, value in details.items():
            if isinstance(value, str | int | float | bool):
                attributes[f"cachesync.{name}"] = value
        with self._tracer.start_as_current_span("cachesync.flush", attributes=attributes):
            pass
