"""Helpers the benchmark scripts share: stopping child processes, Markdown tables, pyplot.

A leaf module: it imports nothing else from ``benchmarks``, so any script can use it.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any


def stop_processes(
    procs: Sequence[BaseProcess],
    pipes: Sequence[multiprocessing.connection.Connection] = (),
    grace: float = 5.0,
    wait_for: Any = None,
) -> None:
    """Stop ``procs``: send ``("stop",)`` down each of ``pipes``, wait up to ``grace`` seconds
    for the processes that ``wait_for(proc)`` selects (all by default) to end by themselves,
    SIGTERM the rest, then SIGKILL what is left. A second Ctrl-C does not cut this short."""
    for pipe in pipes:
        with contextlib.suppress(OSError):
            pipe.send(("stop",))
        pipe.close()
    started = [p for p in procs if p.pid is not None]
    deadline = time.monotonic() + grace
    for proc in started:
        if wait_for is None or wait_for(proc):
            with contextlib.suppress(KeyboardInterrupt):
                proc.join(max(0.0, deadline - time.monotonic()))
    for proc in started:
        if proc.is_alive():
            proc.terminate()
    for proc in started:
        with contextlib.suppress(KeyboardInterrupt):
            proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown pipe table, padded so it also reads well in a terminal."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
