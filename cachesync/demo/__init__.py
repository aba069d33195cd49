"""The ``cachesync demo``: an owner service and several cached consumer instances in one
process, with a workload that measures staleness. Not part of the library: nothing else in
cachesync imports it.

- :mod:`cachesync.demo.owner`: the owner (a plain ASGI app with an embedded publisher);
- :mod:`cachesync.demo.run`: the consumers, the workload and its report.
"""

from .run import (
    PROBE_DEADLINE,
    STALE_GRACE,
    DemoConfig,
    DemoResult,
    InstanceResult,
    Progress,
    ProgressPrinter,
    Window,
    format_table,
    run_demo,
)

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
