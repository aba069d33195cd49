"""RabbitMQ fault injection for tests: close chosen connections from the broker side.

``rabbitmqctl close_all_connections`` would also cut every other test's connections; these
helpers close only the connections whose client-provided ``connection_name`` starts with a
prefix, so give each transport under test a unique name
(``AmqpTransport(url, connection_name=f"cachesync-test-{unique}")``) and close just that one.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil

__all__ = [
    "amqp_connection_names",
    "close_amqp_connections",
    "exchange_bindings",
    "rabbitmqctl_available",
    "unacknowledged",
]

RABBITMQCTL_TIMEOUT = 20.0


def rabbitmqctl_available() -> bool:
    """Whether ``rabbitmqctl`` is on the PATH (it needs to run where the broker does)."""
    return shutil.which("rabbitmqctl") is not None


async def _rabbitmqctl(*args: str, timeout: float = RABBITMQCTL_TIMEOUT) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"rabbitmqctl {' '.join(args)} took more than {timeout}s") from None
    if process.returncode != 0:
        raise AssertionError(
            f"rabbitmqctl {' '.join(args)} failed ({process.returncode}): {stderr.decode()}"
        )
    return stdout.decode()


# In rabbitmqctl's table output the client properties are an Erlang-ish term list, e.g.
# [{"capabilities",[...]},{"connection_name","cachesync-test-1"},...]. (The JSON formatter
# would be easier to read, but it prints pids as "#PID<...>", which close_connection refuses.)
_CONNECTION_NAME = re.compile(r'\{"connection_name","((?:[^"\\]|\\.)*)"\}')


async def amqp_connection_names(prefix: str = "") -> dict[str, str]:
    """The broker's connections whose ``connection_name`` starts with ``prefix``.

    Maps the broker's process id for each (``"<rabbit@host.1795312024.5811.0>"``, what
    ``rabbitmqctl close_connection`` takes) to its client-provided name.
    """
    out = await _rabbitmqctl("list_connections", "pid", "client_properties", "--silent")
    found: dict[str, str] = {}
    for line in out.splitlines():
        pid, _, properties = line.partition("\t")
        match = _CONNECTION_NAME.search(properties)
        if pid.startswith("<") and match and match.group(1).startswith(prefix):
            found[pid] = match.group(1)
    return found


async def close_amqp_connections(
    connection_name_prefix: str, reason: str = "closed by a cachesync test"
) -> int:
    """Close, from the broker side, every connection whose name starts with the prefix.

    Returns how many were closed. An empty prefix is refused: it would cut every connection on
    the broker, other tests' included.
    """
    if not connection_name_prefix:
        raise ValueError("give a connection name prefix; closing every connection hurts others")
    pids = await amqp_connection_names(connection_name_prefix)
    for pid in pids:
        await _rabbitmqctl("close_connection", pid, reason)
    return len(pids)


async def exchange_bindings(exchange: str) -> list[str]:
    """Names of the queues bound to ``exchange`` now (to spot queues left behind)."""
    out = await _rabbitmqctl(
        "list_bindings", "source_name", "destination_name", "--formatter", "json", "--quiet"
    )
    rows = json.loads(out) if out.strip() else []
    return [str(row["destination_name"]) for row in rows if row.get("source_name") == exchange]


async def unacknowledged(queue: str) -> int | None:
    """How many messages the broker delivered from ``queue`` and awaits an ack for (None
    when there is no such queue)."""
    out = await _rabbitmqctl(
        "list_queues", "name", "messages_unacknowledged", "--formatter", "json", "--quiet"
    )
    rows = json.loads(out) if out.strip() else []
    for row in rows:
        if row.get("name") == queue:
            return int(row["messages_unacknowledged"])
    return None
