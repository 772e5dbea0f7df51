"""Upstream app for bench/edge_vs_nginx.py: a small, fast HTTP/1.1 + WebSocket server (uvloop + httptools).

    <venv python> bench/upstream_app.py PORT [--host ADDR] [--processes 2]

Binds ADDR:PORT (default ``$VM_IP``, else 127.0.0.1) with SO_REUSEPORT once per process, forks that many
server processes into the background (own session, output to /dev/null) and exits as soon as they all
listen, so it can be started with ``POST /execute`` (which returns when the main process exits).

Endpoints (keep-alive everywhere):

- ``GET /small``   100 bytes, Content-Length
- ``GET /big``     100 MiB of zeros in 256 KiB writes, Content-Length, honouring flow control
- ``POST /upload`` reads and discards the body (Content-Length or chunked), answers the byte count
- ``GET /ws``      WebSocket echo (RFC 6455: each frame is echoed unmasked with the same FIN/opcode;
                    ping is answered with pong, close with close)

Written by hand (no web framework) so that the app costs as little CPU as possible next to the proxies.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import socket
import struct
import sys

import httptools
import uvloop

SMALL_BODY_BYTES = 100
BIG_BODY_BYTES = 100 * 1024 * 1024
BIG_CHUNK_BYTES = 256 * 1024
LISTEN_BACKLOG = 4096
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

SMALL_BODY = b"x" * SMALL_BODY_BYTES
BIG_CHUNK = bytes(BIG_CHUNK_BYTES)
SMALL_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
    SMALL_BODY_BYTES,
    SMALL_BODY,
)
BIG_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % (
    BIG_BODY_BYTES
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found"

OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA


def _ws_frame(fin_opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", fin_opcode, n) + payload
    if n < 65536:
        return struct.pack("!BBH", fin_opcode, 126, n) + payload
    return struct.pack("!BBQ", fin_opcode, 127, n) + payload


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    key = int.from_bytes((mask * (len(payload) // 4 + 1))[: len(payload)], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")


class AppProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body_bytes = 0
        self.mid_body = False  # the head of a message with a body is parsed, the body not yet complete
        self.bypass_left = 0  # Content-Length body bytes still to count without the parser
        self.bypass_request: tuple[bytes, bytes, bool] = (b"", b"", True)
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.queue: list[tuple[bytes, bytes, int, bool]] = []
        self.streaming: asyncio.Task[None] | None = None
        self.ws_buffer: bytearray | None = None  # set once the connection is a WebSocket

    # asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.can_write.set()
        if self.streaming is not None:
            self.streaming.cancel()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        if self.ws_buffer is not None:
            self.ws_buffer += data
            self._ws_frames()
            return
        if self.bypass_left:
            data = self._count_body(data)
            if not data:
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._ws_accept(data[offset:])
            return
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()
            return
        if self.mid_body and b"content-length" in self.headers and b"transfer-encoding" not in self.headers:
            # A large upload: the rest of the body is only counted, not handed through the parser
            # (which would copy every chunk into a new bytes object); a fresh parser takes the next request.
            self.bypass_left = int(self.headers[b"content-length"]) - self.body_bytes
            path = self.url.partition(b"?")[0]
            self.bypass_request = (self.parser.get_method(), path, self.parser.should_keep_alive())
            self.parser = httptools.HttpRequestParser(self)
            self.mid_body = False

    def _count_body(self, data: bytes) -> bytes:
        """Count bypassed body bytes; answer when the body is complete; return what follows it."""
        taken = min(len(data), self.bypass_left)
        self.bypass_left -= taken
        self.body_bytes += taken
        if not self.bypass_left:
            self._complete(*self.bypass_request)
        return data[taken:]

    # httptools callbacks --------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body_bytes = 0

    def on_headers_complete(self) -> None:
        self.mid_body = True

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        self.mid_body = False
        if self.parser.should_upgrade():
            return  # answered from HttpParserUpgrade
        path = self.url.partition(b"?")[0]
        self._complete(self.parser.get_method(), path, self.parser.should_keep_alive())

    def _complete(self, method: bytes, path: bytes, keep_alive: bool) -> None:
        if self.streaming is not None:  # pipelined behind a /big download: keep the order
            self.queue.append((method, path, self.body_bytes, keep_alive))
            return
        self._respond(method, path, self.body_bytes, keep_alive)

    # responses ------------------------------------------------------------------------------------

    def _respond(self, method: bytes, path: bytes, body_bytes: int, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        if path == b"/small":
            transport.write(SMALL_RESPONSE)
        elif path == b"/big":
            self.streaming = asyncio.get_running_loop().create_task(self._stream_big(keep_alive))
            return
        elif path == b"/upload" and method == b"POST":
            count = b"%d" % body_bytes
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(count), count))
        else:
            transport.write(NOT_FOUND)
        if not keep_alive:
            transport.close()

    async def _stream_big(self, keep_alive: bool) -> None:
        try:
            assert self.transport is not None
            self.transport.write(BIG_HEAD)
            for _ in range(BIG_BODY_BYTES // BIG_CHUNK_BYTES):
                await self.can_write.wait()
                if self.transport is None:
                    return
                self.transport.write(BIG_CHUNK)
        finally:
            self.streaming = None
        if self.transport is None:
            return
        if not keep_alive:
            self.transport.close()
            return
        queued, self.queue = self.queue, []
        for method, path, body_bytes, queued_keep_alive in queued:
            if self.streaming is not None:  # another /big among the queued ones: it serves the rest
                self.queue.append((method, path, body_bytes, queued_keep_alive))
            else:
                self._respond(method, path, body_bytes, queued_keep_alive)

    # WebSocket ------------------------------------------------------------------------------------

    def _ws_accept(self, rest: bytes) -> None:
        assert self.transport is not None
        key = self.headers.get(b"sec-websocket-key")
        if key is None or self.headers.get(b"upgrade", b"").lower() != b"websocket":
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(key.strip() + WS_GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept
        )
        self.ws_buffer = bytearray(rest)
        self._ws_frames()

    def _ws_frames(self) -> None:
        buf = self.ws_buffer
        assert buf is not None
        while self.transport is not None and len(buf) >= 2:
            first, second = buf[0], buf[1]
            length, offset = second & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, offset = struct.unpack_from("!H", buf, 2)[0], 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, offset = struct.unpack_from("!Q", buf, 2)[0], 10
            masked = second & 0x80
            end = offset + (4 if masked else 0) + length
            if len(buf) < end:
                return
            payload = bytes(buf[end - length : end])
            if masked:
                payload = _unmask(payload, bytes(buf[offset : offset + 4]))
            del buf[:end]
            opcode = first & 0x0F
            if opcode == OP_CLOSE:
                self.transport.write(_ws_frame(0x80 | OP_CLOSE, payload[:2]))
                self.transport.close()
            elif opcode == OP_PING:
                self.transport.write(_ws_frame(0x80 | OP_PONG, payload))
            elif opcode != OP_PONG:
                self.transport.write(_ws_frame(first & 0x8F, payload))


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    return sock


async def serve(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(AppProtocol, sock=sock)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default=os.environ.get("VM_IP", "127.0.0.1"))
    parser.add_argument("--processes", type=int, default=2, help="SO_REUSEPORT processes (default 2)")
    parser.add_argument("--foreground", action="store_true", help="one process, no fork (debugging)")
    args = parser.parse_args()
    if args.foreground:
        uvloop.run(serve(listening_socket(args.host, args.port)))
        return
    # Every socket is bound and listening before the parent exits: once /execute returns, it accepts.
    sockets = [listening_socket(args.host, args.port) for _ in range(args.processes)]
    pids = []
    for index, sock in enumerate(sockets):
        pid = os.fork()
        if pid == 0:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            for other in sockets[:index] + sockets[index + 1 :]:
                other.close()
            try:
                uvloop.run(serve(sock))
            finally:
                os._exit(0)
        pids.append(pid)
    print(
        f"upstream app listening on {args.host}:{args.port}; " + ", ".join(f"pid {p}" for p in pids),
        flush=True,
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
