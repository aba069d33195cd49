"""amqp+stream:// beyond the contract suite, on the machine's RabbitMQ: replay from an offset,
retention gaps, host rotation, and cached reads through a cut connection."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from cachesync.errors import ConfigError
from cachesync.transports.base import from_url

from .amqp_tools import close_amqp_connections, rabbitmqctl_available
from .test_transport_contract import Subscriber, delete_amqp_streams

pytest.importorskip("aio_pika")

from cachesync.transports.amqp_stream import AmqpStreamTransport  # noqa: E402

pytestmark = pytest.mark.timeout(40)


@pytest.fixture
async def channel(amqp_url: str, unique: str) -> AsyncIterator[str]:
    name = f"cachesync-stream-{unique}"
    yield name
    await delete_amqp_streams(amqp_url, [name])


def _stream_url(amqp_url: str, query: str = "") -> str:
    return amqp_url.replace("amqp://", "amqp+stream://", 1) + query


def test_url_is_parsed_and_checked() -> None:
    transport = from_url("amqp+stream://u:pw@h1:5672,h2:5673/vh?stream=s&max_age=1h")
    assert isinstance(transport, AmqpStreamTransport)
    assert (transport.queue_name("c"), transport.max_age) == ("c.s", "1h")
    assert "pw" not in repr(transport)
    with pytest.raises(ConfigError, match="max_age"):
        from_url("amqp+stream://h1/?max_age=1hour")


async def _read_then_miss(
    url: str, channel: str, count: int, payload: bytes = b""
) -> tuple[AmqpStreamTransport, Subscriber]:
    """A subscriber reads one message, its transport closes, ``count`` more are published,
    it connects again; returns its next subscription (started)."""
    pub = AmqpStreamTransport(url)
    transport = AmqpStreamTransport(url)
    await pub.connect()
    await transport.connect()
    first = Subscriber(transport, channel)
    await first.live()
    await pub.publish(channel, b"0")
    await first.wait_for(1)
    await transport.close()
    await first.ended()
    await first.stop()
    for i in range(1, count + 1):
        await pub.publish(channel, b"%d" % i + payload)
    await pub.close()
    await transport.connect()
    return transport, Subscriber(transport, channel)


async def test_a_new_subscription_replays_what_was_missed_then_reports_resumed(
    amqp_url: str, channel: str
) -> None:
    transport, again = await _read_then_miss(_stream_url(amqp_url), channel, 20)
    try:
        assert await again.wait_for(20) == [b"%d" % i for i in range(1, 21)]
        await again.live()
        assert again.log[-1] == ("ready", True)
    finally:
        await again.stop()
        await transport.close()


async def test_retention_that_dropped_missed_messages_reports_not_resumed(
    amqp_url: str, channel: str
) -> None:
    # Small segments and a small size limit: the broker drops whole old segments.
    url = _stream_url(amqp_url, "?max_length_bytes=20000&max_segment_size_bytes=5000")
    transport, again = await _read_then_miss(url, channel, 300, payload=b"." * 200)
    try:
        await again.live()
        assert again.log[0] == ("ready", False)
        # It goes on from the oldest message still kept, without the dropped ones.
        received = await again.wait_for(1)
        assert int(received[0].rstrip(b".")) > 1
    finally:
        await again.stop()
        await transport.close()


async def test_a_channel_closed_under_a_publish_is_a_transport_error(
    amqp_url: str, channel: str
) -> None:
    """aiormq raises ChannelInvalidStateError (a RuntimeError) when a heartbeat timeout closed
    the channel under an RPC; it must reach the publisher as TransportError, which it retries."""
    import aiormq.exceptions

    from cachesync.errors import TransportError

    class ClosedExchange:
        async def publish(self, *args: object, **kwargs: object) -> None:
            raise aiormq.exceptions.ChannelInvalidStateError("Channel closed by RPC timeout")

    transport = AmqpStreamTransport(_stream_url(amqp_url), connect_timeout=5.0)
    async with transport:
        transport._exchanges[channel] = ClosedExchange()  # type: ignore[assignment]
        with pytest.raises(TransportError, match="closed by RPC timeout"):
            await transport.publish(channel, b"x")


async def test_connect_rotates_over_the_hosts(amqp_url: str, channel: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    url = f"amqp+stream://guest:guest@127.0.0.1:{dead},127.0.0.1:5672/"
    transport = AmqpStreamTransport(url, connect_timeout=5.0)
    async with transport:
        sub = Subscriber(transport, channel)
        try:
            await sub.live()
            await transport.publish(channel, b"via the second host")
            assert await sub.wait_for(1) == [b"via the second host"]
        finally:
            await sub.stop()


async def test_a_host_that_never_answers_does_not_use_up_connect_timeout(
    amqp_url: str, channel: str
) -> None:
    # The first node takes TCP connections but never speaks AMQP (a hung node, a stalled
    # network): it gets its share of connect_timeout, then the live node its own.
    from .tcpproxy import TcpProxy

    async with TcpProxy("127.0.0.1", 5672) as hung:
        hung.stall()
        url = f"amqp+stream://guest:guest@127.0.0.1:{hung.port},127.0.0.1:5672/"
        transport = AmqpStreamTransport(url, connect_timeout=3.0)
        async with transport:
            await transport.publish(channel, b"via the second host")


def test_amqps_stream_hosts_default_to_the_tls_port() -> None:
    transport = AmqpStreamTransport("amqps+stream://h1,h2:5000/")
    assert transport._hosts == [("h1", 5671), ("h2", 5000)]


async def test_cached_reads_stay_coherent_through_a_cut_connection(
    amqp_url: str, unique: str
) -> None:
    if not rabbitmqctl_available():
        pytest.skip("rabbitmqctl is not on the PATH (it must run on the broker's host)")
    from .test_faults import assert_coherent, run_scenario

    tag = f"cachesync-test-{unique}"
    channel = f"cachesync-stream-{unique}"
    url = _stream_url(amqp_url, f"?name={tag}")

    async def cut() -> None:
        assert await close_amqp_connections(tag) > 0

    try:
        sync, owner, reads = await run_scenario(url, _stream_url(amqp_url), channel, cut, bound=0.5)
        assert_coherent(sync, owner, reads, bound=0.5)
        # The reconnect replayed what was missed: no flush was needed.
        assert sync.stats()["listener"]["replays"] >= 1
    finally:
        await delete_amqp_streams(amqp_url, [channel])
