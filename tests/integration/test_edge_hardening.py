"""Edge hardening found by outside probes (issue 17), each through real sockets to a real app in a VM."""

from __future__ import annotations

import asyncio
import socket

from gateway.edge.exchange import Exchange
from gateway.edge.protocol import EdgeProtocol
from tests.conftest import GatewayUnderTest
from tests.integration.test_edge import APP_PORT, start_app

# Short, so that a request stalled on a broken pooled connection shows as a 504 quickly.
FIRST_BYTE_TIMEOUT_S = 3.0


class FinishedExchanges:
    """Counts the exchanges an edge finishes (it calls ``Edge.observe`` for each), so a test can await
    one instead of polling."""

    def __init__(self, gw: GatewayUnderTest) -> None:
        edge = gw.services.edge
        assert edge is not None
        self.count = 0
        self._changed = asyncio.Condition()
        observe = edge.observe

        def counting_observe(ex: Exchange, peer_ip: str) -> None:
            observe(ex, peer_ip)
            self.count += 1
            asyncio.get_running_loop().create_task(self._notify())

        edge.observe = counting_observe  # type: ignore[method-assign]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def reach(self, count: int, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: self.count >= count)


async def open_small_window(gw: GatewayUnderTest) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection with a tiny receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (gw.config.server.host, gw.config.server.port))
    return await asyncio.open_connection(sock=sock, limit=1024)  # the reader pauses past 2 KiB unread


def edge_connection(gw: GatewayUnderTest, writer: asyncio.StreamWriter) -> EdgeProtocol:
    """The edge's side of a test client's connection."""
    edge = gw.services.edge
    assert edge is not None
    port = writer.get_extra_info("sockname")[1]
    return next(
        c for c in edge.connections if c.transport and c.transport.get_extra_info("peername")[1] == port
    )


def app_get(sid: str, path: str) -> bytes:
    target = b"/v1/app/%s/%d%s" % (sid.encode(), APP_PORT, path.encode())
    return b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % target


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One Content-Length response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line[15:]) for line in lines if line.lower().startswith(b"content-length:"))
    return head, await reader.readexactly(length)


async def test_a_connection_paused_by_a_full_client_goes_back_to_the_pool_reading(
    gateway_factory: object,
) -> None:
    """The exact interleaving of issue 17, point 0: the client's buffer is full while the last bytes of a
    response arrive, so the edge pauses reading from the VM in the same read that completes the response.
    The connection must enter the pool reading again, or the next request sent on it waits for the
    first-byte timeout."""
    gw: GatewayUnderTest = await gateway_factory(  # type: ignore[operator]
        "process", edge={"upstream_first_byte_timeout_s": FIRST_BYTE_TIMEOUT_S}
    )
    sid, _, _ = await start_app(gw)
    edge = gw.services.edge
    assert edge is not None
    reader, writer = await open_small_window(gw)
    other_reader, other_writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    try:
        writer.write(app_get(sid, "/echo"))
        assert (await read_response(reader))[0].startswith(b"HTTP/1.1 200 ")
        conn = edge_connection(gw, writer)
        assert conn.transport is not None
        # Small kernel buffers on both ends: what the client does not read stays in the edge's buffer.
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # 1. A response the client does not read: all of it waits in the edge's buffer (limit raised so
        #    that this one completes without pausing anything).
        conn.transport.set_write_buffer_limits(high=2**24)
        finished = FinishedExchanges(gw)
        writer.write(app_get(sid, "/big?mib=1"))
        await finished.reach(1)
        # 2. The client's buffer counts as full from now on; the next response arrives whole in one read.
        conn.transport.set_write_buffer_limits(high=1)
        assert not conn.can_write
        writer.write(app_get(sid, "/echo"))
        await finished.reach(2)
        # 3. Another client's request takes that pooled connection.
        other_writer.write(app_get(sid, "/echo"))
        async with asyncio.timeout(FIRST_BYTE_TIMEOUT_S + 5):
            head, _ = await read_response(other_reader)
        assert head.startswith(b"HTTP/1.1 200 "), head
        # And the slow client gets both of its responses whole.
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200 ") and len(body) == 2**20
        assert (await read_response(reader))[0].startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
        other_writer.close()


async def test_a_connection_with_bytes_after_its_response_is_never_reused(gw: GatewayUnderTest) -> None:
    """Bytes after a complete response in the same read belong to no request: the connection is out of
    step, and a request sent on it would read them as the start of its own answer."""
    sid, _, _ = await start_app(gw)
    reader, writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    try:
        writer.write(app_get(sid, "/overrun"))
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"first"
        for _ in range(3):
            writer.write(app_get(sid, "/echo"))
            async with asyncio.timeout(5):
                head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ") and body.startswith(b"{"), (head, body)
    finally:
        writer.close()
