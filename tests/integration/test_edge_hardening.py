"""Edge hardening found by outside probes (issue 17), each through real sockets to a real app in a VM."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import h11
import pytest

from gateway.edge.exchange import Exchange
from gateway.edge.protocol import EdgeProtocol
from tests.conftest import GatewayUnderTest
from tests.integration.test_edge import APP_PORT, max_rss_bytes, raw_exchange, start_app
from tests.unit.test_edge_websocket import header as ws_header

# Every test here runs on each edge (the compiled one and the pure-Python one).
pytestmark = pytest.mark.both_edges

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

        def counted(ex: Exchange) -> None:
            self.count += 1
            asyncio.get_running_loop().create_task(self._notify())

        edge.exchange_ended.append(counted)

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


def h11_request(method: str, target: str, headers: list[tuple[str, str]] | None = None) -> h11.Request:
    return h11.Request(method=method, target=target, headers=[("Host", "localhost"), *(headers or [])])


async def h11_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: h11.Connection, request: h11.Request
) -> tuple[list[h11.InformationalResponse], h11.Response, bytes]:
    """One request and its whole response through a strict HTTP/1.1 parser (h11): any framing error the
    edge makes (a body after HEAD, a bad chunk) raises h11.RemoteProtocolError, here or on the next use."""
    writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
    interim: list[h11.InformationalResponse] = []
    response: h11.Response | None = None
    body = b""
    async with asyncio.timeout(5):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.InformationalResponse):
                interim.append(event)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return interim, response, body
            else:
                raise AssertionError(f"unexpected {event!r}")


async def test_every_response_the_edge_makes_parses_strictly_and_keeps_the_connection(
    gw: GatewayUnderTest,
) -> None:
    """Error pages, redirects, 1xx and HEAD answers through h11 on one kept-alive connection: each must
    follow HEAD's rules (no body), or the next response on the connection does not parse (issue 17,
    point 9)."""
    sid, _, _ = await start_app(gw)
    app = f"/v1/app/{sid}/{APP_PORT}"
    unknown = "/v1/app/00000000-0000-4000-8000-000000000000/3000/"
    reader, writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    conn = h11.Connection(h11.CLIENT)
    expected = [
        (h11_request("HEAD", unknown), 404, b""),
        (h11_request("GET", unknown), 404, None),
        (h11_request("HEAD", app), 308, b""),
        (h11_request("GET", app), 308, b""),
        (h11_request("HEAD", app + "/echo"), 200, b""),
        (h11_request("GET", app + "/echo"), 200, None),
    ]
    try:
        for request, status, body in expected:
            _, response, received = await h11_exchange(reader, writer, conn, request)
            assert response.status_code == status, (request, response)
            if body is not None:
                assert received == body
            else:
                assert received.startswith(b"{")
            conn.start_next_cycle()
        # An interim 100 before the app's answer.
        request = h11_request("POST", app + "/echo", [("Expect", "100-continue"), ("Content-Length", "0")])
        interim, response, _ = await h11_exchange(reader, writer, conn, request)
        assert [i.status_code for i in interim] == [100] and response.status_code == 200
    finally:
        writer.close()


async def test_a_target_over_the_limit_is_414(gw: GatewayUnderTest) -> None:
    limit = gw.config.edge.max_target_bytes
    received, closed = await raw_exchange(gw, b"GET /%s HTTP/1.1\r\nHost: localhost\r\n\r\n" % (b"a" * limit))
    assert received.startswith(b"HTTP/1.1 414 ") and b"X-Gateway-Error: uri_too_long" in received
    assert closed


async def http10_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[bytes, bytes]:
    """An HTTP/1.0 exchange: a body with Content-Length, or up to the connection's end."""
    writer.write(request)
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        lengths = [int(line[15:]) for line in lines if line.startswith(b"content-length:")]
        body = await reader.readexactly(lengths[0]) if lengths else await reader.read()
    return head, body


async def test_http10_clients_get_http10_framing(gw: GatewayUnderTest) -> None:
    """No chunked framing and no 1xx for HTTP/1.0, and keep-alive only announced (issue 17, point 10)."""
    sid, _, _ = await start_app(gw)
    app = b"/v1/app/%s/%d" % (sid.encode(), APP_PORT)
    # A response without a length (chunked from the app): close-delimited for HTTP/1.0.
    reader, writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    head, body = await http10_exchange(
        reader, writer, b"GET %s/stream?n=3 HTTP/1.0\r\nHost: localhost\r\n\r\n" % app
    )
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower() and b"Connection: close" in head
    assert body == b"x" * 3 * 1024
    # Expect: 100-continue from a 1.0 client: no interim response, straight to the answer.
    reader, writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    head, _ = await http10_exchange(
        reader,
        writer,
        b"POST %s/echo HTTP/1.0\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"
        % app,
    )
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 "), head
    # Keep-alive asked for: announced on every response that keeps the connection, edge-made ones too.
    reader, writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    try:
        for target in (
            b"%s/echo" % app,
            b"/v1/app/00000000-0000-4000-8000-000000000000/3000/",
            b"%s/echo" % app,
        ):
            request = b"GET %s HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n" % target
            head, _ = await http10_exchange(reader, writer, request)
            assert b"Connection: keep-alive" in head, head
        # Without it the connection closes after the answer, with or without a length.
        head, _ = await http10_exchange(
            reader, writer, b"GET %s/echo HTTP/1.0\r\nHost: localhost\r\n\r\n" % app
        )
        assert b"Connection: close" in head
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    finally:
        writer.close()


async def test_api_answers_name_no_software(gw: GatewayUnderTest) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(gw.url + "/v1/templates") as resp:
            assert resp.headers["Server"] == "gateway"


async def test_platform_keys_never_reach_the_vm_nor_the_log(
    gw: GatewayUnderTest, capfd: pytest.CaptureFixture[str]
) -> None:
    """The user's platform key, sent to an app by habit (the SDK's header, a Bearer header, a query
    parameter), is removed before forwarding; an app's own X-API-Key and Authorization pass untouched
    (issue 17, point 5)."""
    _, _, url = await start_app(gw)
    key = gw.api_key
    async with aiohttp.ClientSession() as client:
        async with client.get(
            url + f"echo?api_key={key}&page=2&api_key=app-own",
            headers={"X-API-Key": key, "Authorization": f"Bearer {key}"},
        ) as resp:
            seen = await resp.json()
        async with client.get(
            url + "echo", headers={"X-API-Key": "app-key-1", "Authorization": "Bearer app-token"}
        ) as resp:
            own = await resp.json()
    assert key not in str(seen)
    headers = {k.lower() for k, _ in seen["headers"]}
    assert "x-api-key" not in headers and "authorization" not in headers
    assert seen["path"] == "/echo?page=2&api_key=app-own"
    assert ["X-API-Key", "app-key-1"] in own["headers"] and ["Authorization", "Bearer app-token"] in own[
        "headers"
    ]
    assert key not in capfd.readouterr().err


SMALL_HEAD = {"max_header_bytes": 1024, "max_target_bytes": 512, "max_header_count": 10}


def socket_buffers_bound() -> int:
    """The most a TCP connection's kernel buffers can hold between a writer and a server that stopped
    reading (the receiver's and the sender's autotuning maxima): a client that got further than this
    was being read. Measured against this, not a guess, since loopback buffers grow to several MiB."""
    most = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        most += int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
    return most


async def endless_header(address: tuple[str, int], piece: bytes, limit_bytes: int) -> tuple[int, bytes]:
    """Send a request head whose last header line never ends, ``piece`` by ``piece``, until the server
    answers or ``limit_bytes`` went out; returns the bytes sent and what came back (b"" when the server
    reset the connection: closing with our bytes unread, its answer may be lost in the reset)."""
    reader, writer = await asyncio.open_connection(*address)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Endless: ")
    sent = 0
    reading = asyncio.ensure_future(reader.read(65536))
    try:
        async with asyncio.timeout(20):
            while sent < limit_bytes and not reading.done():
                writer.write(piece)
                sent += len(piece)
                try:
                    await writer.drain()
                except ConnectionError:
                    break
            try:
                return sent, await reading
            except ConnectionError:
                return sent, b""
    finally:
        reading.cancel()
        writer.close()


async def test_an_endless_request_header_line_is_cut_by_its_size(gateway_factory: object) -> None:
    """The head is counted as it arrives, not when a line ends (issue 17, point 1): 431 once past the
    limits, whether the line streams at full speed or one byte at a time."""
    gw: GatewayUnderTest = await gateway_factory("process", edge=SMALL_HEAD)  # type: ignore[operator]
    edge = gw.services.edge
    assert edge is not None
    address = (gw.config.server.host, gw.config.server.port)
    bound = socket_buffers_bound()
    sent, answer = await endless_header(address, b"a" * 65536, bound + 32 * 2**20)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert sent <= bound, "the edge kept reading an endless header line"
    _, answer = await endless_header(address, b"a", 64 * 2**10)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    # All of it in one burst, then nothing: answered at once, not at the header deadline.
    async with asyncio.timeout(gw.config.edge.header_timeout_s / 2):
        _, answer = await endless_header(address, b"a" * 100_000, 100_000)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    # A head within the limits still passes.
    received, _ = await raw_exchange(
        gw, b"GET /v1/templates HTTP/1.1\r\nHost: localhost\r\nX-Ok: %s\r\n\r\n" % (b"b" * 900)
    )
    assert received.startswith(b"HTTP/1.1 200 ")


async def test_an_endless_response_head_from_the_app_is_a_502(gw: GatewayUnderTest) -> None:
    sid, _, _ = await start_app(gw)
    received, _ = await raw_exchange(gw, app_get(sid, "/endless-head"))
    assert received.startswith(b"HTTP/1.1 502 ") and b"X-Gateway-Error: upstream_head_too_large" in received
    received, _ = await raw_exchange(gw, app_get(sid, "/echo"))  # the app and the edge carry on
    assert received.startswith(b"HTTP/1.1 200 ")


def post_whole_body_first(url: str, size: int) -> int:
    """What Python's urllib does: write the whole body, then read the answer; returns its status."""
    request = urllib.request.Request(url, data=b"u" * size, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_an_early_413_reaches_a_client_that_writes_its_whole_body_first(
    gateway_factory: object,
) -> None:
    """The edge answers 413 before reading the body; closing at once would reset the connection under
    the client's feet (issue 17, point 11). It half-closes and discards the rest for a while instead."""
    gw: GatewayUnderTest = await gateway_factory("process", edge={"max_body_bytes": 1000})  # type: ignore[operator]
    _, _, url = await start_app(gw)
    for size in (2000, 8 * 2**20):
        status = await asyncio.to_thread(post_whole_body_first, url + "echo", size)
        assert status == 413


async def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(gateway_factory: object) -> None:
    """Output pending and the client taking none of it: dropped after edge.send_timeout_s, with the
    VM's side (issue 17, point 2). A quiet stream with nothing pending is not."""
    send_timeout_s = 1.0
    gw: GatewayUnderTest = await gateway_factory("process", edge={"send_timeout_s": send_timeout_s})  # type: ignore[operator]
    sid, _, url = await start_app(gw)
    edge = gw.services.edge
    assert edge is not None
    reader, writer = await open_small_window(gw)
    try:
        writer.write(app_get(sid, "/big?mib=256"))
        async with asyncio.timeout(send_timeout_s + 10):
            await reader.readuntil(b"\r\n\r\n")
            conn = edge_connection(gw, writer)
            upstream = conn.current.upstream if conn.current is not None else None
            assert upstream is not None
            closed = asyncio.get_running_loop().create_future()

            def connection_closed(closing: EdgeProtocol) -> None:
                if closing is conn and not closed.done():
                    closed.set_result(True)

            edge.connection_ended.append(connection_closed)
            await closed  # the client reads nothing more: the edge gives up on it
        assert conn not in edge.connections
        assert upstream.closed  # and the app's side of the exchange is freed
    finally:
        writer.close()
    # An SSE stream quiet for longer than the send timeout, with nothing pending: kept.
    async with aiohttp.ClientSession() as client, client.get(url + "sse") as resp:
        assert await resp.content.readuntil(b"\n\n") == b"data: one\n\n"
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(send_timeout_s * 2.5):
                await resp.content.readuntil(b"\n\n")
        async with client.get(url + "sse-next") as nudge:
            assert nudge.status == 200
        assert await resp.content.readuntil(b"\n\n") == b"data: two\n\n"


def ws_frame(
    payload: bytes, *, opcode: int = 0x2, final: bool = True, masked: bool = True, length: int | None = None
) -> bytes:
    """One frame as a client sends it; ``length`` overrides the declared payload length."""
    size = len(payload) if length is None else length
    head = ws_header((0x80 if final else 0) | opcode, size, masked=masked)
    if not masked:
        return head + payload
    mask = head[-4:]
    return head + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def open_websocket(gw: GatewayUnderTest, sid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET /v1/app/%s/%d/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (sid.encode(), APP_PORT, key)
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def close_code(reader: asyncio.StreamReader) -> int:
    """Skip echoed frames up to the close frame; its status code."""
    async with asyncio.timeout(10):
        while True:
            first, second = await reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(size)
            if first & 0x0F == 0x8:
                assert not second & 0x80, "a server's close frame is not masked"
                return struct.unpack("!H", payload[:2])[0]


WS_LIMITS = {"ws_max_frame_bytes": 2**20, "ws_max_message_bytes": 4 * 2**20}


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        pytest.param([ws_frame(b"hello", masked=False)], 1002, id="unmasked-client-frame"),
        pytest.param([ws_frame(b"p" * 126, opcode=0x9)], 1002, id="control-frame-over-125"),
        pytest.param([ws_frame(b"p", opcode=0x9, final=False)], 1002, id="fragmented-control-frame"),
        pytest.param([ws_frame(b"c", opcode=0x0)], 1002, id="continuation-without-message"),
        pytest.param([ws_frame(b"r", opcode=0x3)], 1002, id="reserved-opcode"),
        pytest.param([ws_frame(b"x" * 1024, length=32 * 2**20)[: 14 + 1024]], 1009, id="32-mib-frame"),
        pytest.param(
            [ws_frame(b"f" * 2**19, final=False)] + [ws_frame(b"f" * 2**19, opcode=0, final=False)] * 9,
            1009,
            id="endless-fragmented-message",
        ),
    ],
)
async def test_websocket_frames_that_break_the_policy_close_both_sides(
    gateway_factory: object, frames: list[bytes], code: int
) -> None:
    """Frames are checked as they pass (issue 17, point 3): a protocol violation closes with 1002, a
    frame or message over its limit with 1009; what came before passes, the offending frame does not."""
    gw: GatewayUnderTest = await gateway_factory("process", edge=WS_LIMITS)  # type: ignore[operator]
    sid, _, _ = await start_app(gw)
    reader, writer = await open_websocket(gw, sid)
    try:
        writer.write(ws_frame(b"before"))
        for frame in frames:
            writer.write(frame)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        assert await close_code(reader) == code
        async with asyncio.timeout(10):
            await reader.read()  # and the edge ends the connection
    finally:
        writer.close()
    # A well-formed fragmented message within the limits passes whole.
    reader, writer = await open_websocket(gw, sid)
    try:
        writer.write(ws_frame(b"a" * 1000, opcode=0x1, final=False) + ws_frame(b"b", opcode=0x0))
        echoed = await reader.readexactly(2 + 2 + 1000) + await reader.readexactly(2 + 1)
        assert echoed[0] == 0x01 and echoed[-3] == 0x80 and echoed.endswith(b"b")
    finally:
        writer.close()


async def test_a_ping_flood_is_held_by_back_pressure(gw: GatewayUnderTest) -> None:
    """A client pinging without reading the answers: the edge's memory stays flat (the app's answers
    back up, then its reading, then the client's sending)."""
    sid, _, _ = await start_app(gw)
    reader, writer = await open_websocket(gw, sid)
    before = max_rss_bytes()
    ping = ws_frame(b"p" * 125, opcode=0x9)
    sent = 0
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                while True:
                    writer.write(ping * 64)
                    await writer.drain()
                    sent += 64 * len(ping)
        assert max_rss_bytes() - before < 64 * 2**20
        assert sent < 256 * 2**20, "nothing held the flood back"
        # Still a working WebSocket once the client reads: the pings come back answered.
        async with asyncio.timeout(10):
            first = await reader.readexactly(2)
        assert first[0] & 0x0F == 0x9
    finally:
        writer.close()
