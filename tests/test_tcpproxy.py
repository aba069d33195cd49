"""The fault-injection proxy itself, against a tiny echo server: forward, stall, cut, refuse."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from .tcpproxy import TcpProxy, proxied_url

pytestmark = pytest.mark.timeout(10)


class EchoServer:
    """Echoes every byte back; tracks its handler tasks so the test can end them."""

    def __init__(self) -> None:
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        task = asyncio.get_running_loop().create_task(self.echo(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    listener = await asyncio.start_server(server.accept, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for writer in server.writers:
            writer.close()
        for task in list(server.tasks):
            task.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)
        await listener.wait_closed()


async def connect(proxy: TcpProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True once the peer has closed or reset the connection (EOF or ConnectionResetError)."""
    try:
        return await asyncio.wait_for(reader.read(1), timeout=2.0) == b""
    except ConnectionError:
        return True


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_forwards_both_ways(echo: EchoServer) -> None:
    async with TcpProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        try:
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            big = bytes(range(256)) * 4096  # 1 MiB, larger than any socket buffer
            writer.write(big)
            assert await reader.readexactly(len(big)) == big
            assert proxy.connections == 1
        finally:
            await close(writer)


async def test_stall_holds_bytes_without_closing_and_resume_delivers_them(
    echo: EchoServer,
) -> None:
    async with TcpProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        try:
            writer.write(b"a")
            assert await reader.readexactly(1) == b"a"
            proxy.stall()
            writer.write(b"held")
            # Silence is what a stall is: the only way to see it is to wait a little.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(10), timeout=0.2)
            assert not reader.at_eof()
            proxy.resume()
            assert await reader.readexactly(4) == b"held"
        finally:
            await close(writer)


async def test_cut_resets_current_connections_only(echo: EchoServer) -> None:
    async with TcpProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        try:
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            await proxy.cut()
            assert await closed_by_peer(reader)
            assert proxy.connections == 0
        finally:
            await close(writer)
        # The proxy itself is still up: a new connection works.
        reader, writer = await connect(proxy)
        try:
            writer.write(b"y")
            assert await reader.readexactly(1) == b"y"
        finally:
            await close(writer)


async def test_cut_also_ends_a_stalled_connection(echo: EchoServer) -> None:
    async with TcpProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        try:
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            proxy.stall()
            writer.write(b"held")
            await proxy.cut()
            assert await closed_by_peer(reader)
        finally:
            await close(writer)


async def test_refuse_resets_new_connections_and_leaves_open_ones(echo: EchoServer) -> None:
    async with TcpProxy("127.0.0.1", echo.port) as proxy:
        old_reader, old_writer = await connect(proxy)
        try:
            old_writer.write(b"1")
            assert await old_reader.readexactly(1) == b"1"
            proxy.refuse(True)
            reader, writer = await connect(proxy)
            try:
                writer.write(b"nope")
                assert await closed_by_peer(reader)
            finally:
                await close(writer)
            old_writer.write(b"2")
            assert await old_reader.readexactly(1) == b"2"
            proxy.refuse(False)
            reader, writer = await connect(proxy)
            try:
                writer.write(b"3")
                assert await reader.readexactly(1) == b"3"
            finally:
                await close(writer)
            assert proxy.accepted == 3
        finally:
            await close(old_writer)


async def test_an_unreachable_target_resets_the_client() -> None:
    # A port that was just free: nothing listens there.
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    async with TcpProxy("127.0.0.1", port) as proxy:
        reader, writer = await connect(proxy)
        try:
            assert await closed_by_peer(reader)
        finally:
            await close(writer)


async def test_exit_cancels_and_awaits_every_task_and_stops_listening(echo: EchoServer) -> None:
    before = asyncio.all_tasks()
    async with TcpProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        proxy.stall()  # a pump blocked on the stall must be cancelled too
        writer.write(b"y")
        port = proxy.port
    try:
        assert await closed_by_peer(reader)
        # Only the echo server's handler may still be running; none of the proxy's tasks.
        leftover = asyncio.all_tasks() - before - echo.tasks
        assert leftover == set()
        with pytest.raises(OSError):
            _, extra = await asyncio.open_connection("127.0.0.1", port)
            await close(extra)
    finally:
        await close(writer)


def test_proxied_url_keeps_credentials_path_and_query() -> None:
    proxy = TcpProxy("127.0.0.1", 6379)
    proxy.port = 4242
    assert (
        proxied_url("redis://user:secret@10.0.0.1:6379/2?client_name=x", proxy)
        == "redis://user:secret@127.0.0.1:4242/2?client_name=x"
    )
    assert proxied_url("amqp://localhost/", proxy) == "amqp://127.0.0.1:4242/"
