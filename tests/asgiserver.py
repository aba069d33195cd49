"""An ASGI app (FastAPI, or the demo owner) served by uvicorn on a free 127.0.0.1 port, for the
tests that talk to it over a real socket (the CLI's ``state`` and ``explain``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from types import TracebackType
from typing import Any, Self

import uvicorn


class _EmbeddedServer(uvicorn.Server):
    # uvicorn installs its own SIGINT handler while it serves; inside a host program that
    # handler would swallow the host's Ctrl-C, so the host keeps signals to itself.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class AsgiServer:
    """Serves an ASGI app with uvicorn in the running event loop, on a free 127.0.0.1 port.

    ``async with AsgiServer(app) as server:`` returns once the socket accepts connections;
    ``server.url`` is the base URL. Leaving the block stops the server and waits for it.
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host
        self.url = ""
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        # Binding the socket here, rather than passing port=0 to uvicorn, lets us know the
        # port before serving, with no window in which another process could take it. The
        # explicit IPPROTO_TCP matters: asyncio turns Nagle off only on sockets that name it,
        # and with Nagle on every response waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
        except OSError:
            sock.close()
            raise
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=2,
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="asgi-server")
        while not server.started:
            if self._task.done():
                sock.close()
                await self._task  # raises what stopped it
                raise RuntimeError("the owner's HTTP server stopped while starting")
            await asyncio.sleep(0.005)
        self.url = f"http://{self.host}:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await self._task
