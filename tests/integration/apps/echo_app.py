"""A small app that tests run inside VMs: echoes requests, streams, and speaks WebSocket (stdlib only).

    python3 echo_app.py PORT     (returns once listening; the server keeps running in the background)

GET/POST /echo...  -> JSON {method, path, headers, body_length, body_sha256, local_address}
POST /slow-echo    -> the same, the first half of a Content-Length body read slowly
POST /early-drain  -> answers at once, then reads the body until the sender stops
GET /stream?n=N    -> N chunks of 1 KiB, chunked (no Content-Length), with a trailer X-Checksum: N
GET /sse           -> event "one", then waits until /sse-next is requested, then event "two"
GET /big?mib=N     -> N MiB with Content-Length, in 256 KiB writes
GET /pattern?mib=N -> the same, chunk i all byte i % 251; /short?mib=N stops halfway and closes
POST /discard      -> reads a Content-Length body in pieces, answers its length (flat memory)
GET /hang          -> never answers
POST /early        -> answers at once, without reading the request body
GET /ws            -> WebSocket echo (text and binary), closes when the client closes; its 101
                      says the request's Host and X-Forwarded-Host (X-Echo-Host, X-Echo-Forwarded-Host),
                      its target and Cookie header (X-Echo-Path, X-Echo-Cookie)
GET /ws-bad        -> 101 with a Sec-WebSocket-Accept that does not answer the key
GET /overrun       -> a response followed, in the same write, by the start of another nobody asked for
GET /endless-head  -> a response head whose one header line never ends (until the edge hangs up)
"""

import base64
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
sse_next = threading.Event()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if not self.path.startswith("/slow-echo"):
            return self.rfile.read(length)
        # Reads its first half slowly: the sender's buffers fill up and its writes wait.
        data = b""
        while len(data) < length:
            data += self.rfile.read(min(65536, length - len(data)))
            if len(data) < length // 2:
                time.sleep(0.002)
        return data

    def _json(self, obj, status=200):
        out = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "1234")  # what a GET would carry; a HEAD answer has no body
        self.end_headers()

    def do_POST(self):
        self.do_GET()

    def do_PUT(self):
        self.do_GET()

    def do_GET(self):
        if self.path == "/ws-bad":
            return self._websocket(accept="d3Jvbmc=")  # a 101 that does not answer the key
        if self.path.startswith("/ws"):
            return self._websocket()
        if self.path.startswith("/stream"):
            n = int(self.path.partition("n=")[2] or 4)
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(n):
                self.wfile.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
            self.wfile.write(b"0\r\nX-Checksum: %d\r\n\r\n" % n)  # a trailer
            return
        if self.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"data: one\n\n")
            self.wfile.flush()
            sse_next.wait(30)
            self.wfile.write(b"data: two\n\n")
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.startswith("/big"):
            total = int(self.path.partition("mib=")[2]) * 1024 * 1024
            chunk = b"b" * (256 * 1024)
            self.send_response(200)
            self.send_header("Content-Length", str(total))
            self.end_headers()
            for _ in range(total // len(chunk)):
                self.wfile.write(chunk)
            return
        if self.path.startswith(("/pattern", "/short")):
            # Chunk i is byte i % 251 throughout: a body moved out of order or written over shows. /short
            # announces its length and stops halfway, closing the connection.
            total = int(self.path.partition("mib=")[2]) * 1024 * 1024
            self.send_response(200)
            self.send_header("Content-Length", str(total))
            self.end_headers()
            chunks = total // (256 * 1024)
            for i in range(chunks // 2 if self.path.startswith("/short") else chunks):
                self.wfile.write(bytes([i % 251]) * (256 * 1024))
            self.close_connection = self.path.startswith("/short")
            return
        if self.path == "/discard":
            left, count = int(self.headers.get("Content-Length") or 0), 0
            while left:
                part = self.rfile.read(min(left, 256 * 1024))
                if not part:
                    break
                left -= len(part)
                count += len(part)
            return self._json({"body_length": count})
        if self.path == "/overrun":
            extra = b"HTTP/1.1 200 OK\r\nContent-Le"
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" + extra)
            return
        if self.path == "/endless-head":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
            chunk = b"h" * 65536
            try:
                for _ in range(1024):  # 64 MiB at most
                    self.wfile.write(chunk)
            except OSError:
                pass
            self.close_connection = True
            return
        if self.path == "/early":
            return self._json({"early": True})  # answers without reading the request body
        if self.path == "/early-drain":
            # Answers first, then reads what comes of the body until the sender stops: it never closes
            # with bytes unread (a reset that could overtake its answer).
            self._json({"early": True})
            while self.rfile.read1(65536):
                pass
            self.close_connection = True
            return
        if self.path == "/hang":
            threading.Event().wait()  # never answers (until the VM is killed)
        if self.path == "/sse-next":
            sse_next.set()
            return self._json({"ok": True})
        body = self._body()
        self._json(
            {
                "method": self.command,
                "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body_length": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "local_address": self.connection.getsockname()[0],  # the VM's address: which VM answered
            }
        )

    def _websocket(self, accept=None):
        key = self.headers["Sec-WebSocket-Key"].encode()
        accept = accept or base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        # What the upgrade request carried, for the tests of the Host an app sees.
        self.send_header("X-Echo-Host", self.headers.get("Host", ""))
        self.send_header("X-Echo-Forwarded-Host", self.headers.get("X-Forwarded-Host", ""))
        self.send_header("X-Echo-Path", self.path)  # the request target the app got
        self.send_header("X-Echo-Cookie", self.headers.get("Cookie", ""))
        self.end_headers()
        self.wfile.flush()
        sock = self.connection
        while True:
            head = self._recv(sock, 2)
            if head is None:
                break
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._recv(sock, 2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._recv(sock, 8))[0]
            mask = self._recv(sock, 4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self._recv(sock, length) or b""))
            if opcode == 8:
                sock.sendall(b"\x88" + bytes([len(data)]) + data)
                break
            first = (head[0] & 0x80) | opcode  # the same fragmentation back
            if length < 126:
                frame = bytes([first, length])
            elif length < 65536:
                frame = bytes([first, 126]) + struct.pack("!H", length)
            else:
                frame = bytes([first, 127]) + struct.pack("!Q", length)
            sock.sendall(frame + data)
        self.close_connection = True

    @staticmethod
    def _recv(sock, n):
        data = b""
        while len(data) < n:
            part = sock.recv(n - len(data))
            if not part:
                return None
            data += part
        return data


if __name__ == "__main__":
    # The process driver's VMs share the host's network, each with a loopback address of its own ($HOST):
    # an app there binds that (two test workers' VMs may serve the same port at once).
    server = ThreadingHTTPServer((os.environ.get("HOST", "0.0.0.0"), int(sys.argv[1])), Handler)
    server.daemon_threads = True
    socket.setdefaulttimeout(None)
    # Listening now: the parent exits, so `python3 echo_app.py PORT` returns exactly when the app is ready.
    if os.fork():
        os._exit(0)
    os.setsid()
    server.serve_forever()
