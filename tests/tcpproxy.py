"""A loopback TCP proxy for fault tests: cut, stall or refuse a broker connection on demand.

    async with TcpProxy("127.0.0.1", 6379) as proxy:
        transport = RedisPubSubTransport(f"redis://127.0.0.1:{proxy.port}/0")
        ...
        proxy.stall()        # a silent network: bytes are held, nothing is closed
        proxy.resume()
        await proxy.cut()    # every current connection is reset
        proxy.refuse(True)   # the broker is "down": new connections are reset at once

It listens on 127.0.0.1 only, on a free port. Every task it starts is cancelled and awaited on
exit, and every socket it opened is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

__all__ = ["TcpProxy", "proxied_url"]

_CHUNK = 1 << 16


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed peer or a middlebox would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream connection, with a pump task each way."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _reset(writer)


class TcpProxy:
    """Forwards every connection made to ``127.0.0.1:port`` to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        """Connections accepted so far (refused ones included)."""
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._opening: set[asyncio.Task[None]] = set()  # links still connecting upstream
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False

    @property
    def connections(self) -> int:
        """How many proxied connections are open now."""
        return len(self._links)

    async def __aenter__(self) -> Self:
        # A plain callback, not a coroutine: asyncio would run a coroutine in a task of its
        # own that this class could not cancel and await on exit.
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        await self.cut()
        # Links still connecting upstream, and pumps of links that closed by themselves.
        await self._cancel(self._tasks)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- faults ----------------------------------------------------------------------------

    def stall(self) -> None:
        """Stop forwarding in both directions, closing nothing: a silent network. Bytes in
        flight are held (and TCP backpressure stops the senders) until :meth:`resume`."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again, starting with the bytes held during the stall."""
        self._flowing.set()

    async def cut(self) -> None:
        """Reset every current connection, both sides; the peers see a reset or EOF.

        New connections are still accepted (unless :meth:`refuse` says otherwise)."""
        await self._cancel(self._opening)
        links, self._links = list(self._links), set()
        for link in links:
            link.reset()
        for link in links:
            await self._cancel(link.tasks)

    def refuse(self, refusing: bool = True) -> None:
        """While true, every new connection is reset as soon as it is accepted (the broker is
        "down"); connections already open are left alone."""
        self._refusing = refusing

    # -- forwarding ------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refusing:
            _reset(writer)
            return
        task = asyncio.get_running_loop().create_task(self._open(reader, writer))
        for tasks in (self._opening, self._tasks):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _open(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _reset(writer)
            return
        except asyncio.CancelledError:
            _reset(writer)
            raise
        link.upstream = up_writer
        self._links.add(link)
        loop = asyncio.get_running_loop()
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pump = loop.create_task(self._pump(source, sink, link))
            # In both sets: cut() ends one link's pumps, exit ends every task still running.
            for tasks in (link.tasks, self._tasks):
                tasks.add(pump)
                pump.add_done_callback(tasks.discard)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while True:
                data = await source.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        # One side closed or failed: close the whole link, as a real peer's close would end
        # the conversation (half-closed connections are no use to broker clients).
        if link in self._links:
            self._links.discard(link)
            for writer in (link.client, link.upstream):
                if writer is not None:
                    writer.close()

    @staticmethod
    async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def proxied_url(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host and port replaced by the proxy's (credentials, path and query
    kept)."""
    parts = urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@" if userinfo else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}"))
