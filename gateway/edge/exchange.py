"""One request and its response on a client connection: the edge's ``Exchange``.

The connection (``EdgeProtocol``) creates one per parsed request head; the upstream connection feeds the
response into it (its ``on_response_*`` methods). It re-frames both bodies, keeps what the metrics and
the access log report, and tells its connection about progress.

What it uses of its connection: the client's transport, ``loop``, ``scheme``, ``can_write``,
``draining``, ``silence_deadline``, and the progress calls (``response_started``, ``response_complete``,
``upstream_lost``...). The connection is typed as its class through a type-only import (no import at
run time, so no cycle): the compiled edge then calls it directly rather than through Python's attribute
lookup, which a Protocol type would cost on every call (gateway/edge/twin.py).
"""

from __future__ import annotations

import asyncio
import http
from typing import TYPE_CHECKING, Final

from gateway.edge.http1 import writers_for

from . import headers as hdr
from .observe import ACTIVITY_HTTP, VmUse
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from .protocol import EdgeProtocol


# Request body bytes buffered while no upstream connection is attached yet, before reading pauses.
BODY_BUFFER_HIGH: Final = 256 * 1024


# A year, the common minimum (and what the HSTS preload list asks for); not includeSubDomains: names
# under the API host are not the platform's to speak for.
HSTS_HEADER: Final = b"Strict-Transport-Security: max-age=31536000\r\n"


def _status_line(status: int) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


_STATUS_LINES: Final = {status: _status_line(status) for status in range(100, 600)}


# ``name: value\r\n`` for each header: in C in the compiled edge (gateway/edge/http1.py).
head_bytes: Final = writers_for(__name__).head_bytes


def _holds_bytes(transport: asyncio.Transport | None) -> bool:
    """Whether a transport still holds bytes it was given to write (a pump's buffer among them)."""
    return transport is not None and transport.get_write_buffer_size() > 0


class Exchange:
    """One request and its response; the upstream connection feeds the response side."""

    __slots__ = (
        "body",
        "body_bytes",
        "body_done",
        "bytes_out",
        "chunked_in",
        "chunked_out",
        "code",
        "content_length",
        "finished",
        "has_credentials",
        "head_received",
        "header_classes",
        "headers",
        "host",
        "http10",
        "incoming_request_id",
        "keep_alive",
        "kind",
        "max_body",
        "method",
        "no_body_out",
        "pending_head",
        "port",
        "proto",
        "request_id",
        "route_id",
        "sandbox_routing",
        "sent_bytes",
        "signed",
        "started",
        "status",
        "tunnel",
        "upgrade",
        "upstream",
        "upstream_s",
        "upstream_started",
        "url",
        "vm_id",
        "vm_use",
    )  # fmt: skip

    def __init__(self, proto: EdgeProtocol, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]],
                 keep_alive: bool, upgrade: bool, http10: bool, classes: bytes) -> None:  # fmt: skip
        self.proto = proto
        # An HTTP/1.0 client: no chunked framing and no 1xx for it (RFC 9112 section 6.1, RFC 9110
        # section 15.2), and its keep-alive only when announced.
        self.http10 = http10
        self.method = method
        self.url = url
        self.headers = headers
        self.header_classes = classes  # of the headers' names (headers.REQUEST_NAME_CLASSES), by the parser
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        # One pass over the head's classes for what the edge itself needs from it (no name lower-cased).
        hosts = 0
        host = length = request_id = None
        routing: list[tuple[bytes, bytes]] | None = None
        chunked = credentials = False
        for i in range(len(classes)):
            kind = classes[i]
            if kind == hdr.REQ_OTHER:
                continue
            value = headers[i][1]
            if kind == hdr.REQ_HOST:
                hosts += 1
                host = value
            elif kind == hdr.REQ_CONTENT_LENGTH:
                length = value
            elif kind == hdr.REQ_TRANSFER_ENCODING:
                chunked = True  # llhttp accepts only a final "chunked" (anything else is a 400)
            elif kind == hdr.REQ_CREDENTIALS:
                credentials = True
            elif kind == hdr.REQ_REQUEST_ID:
                request_id = value
            elif kind == hdr.REQ_SANDBOX:
                if routing is None:
                    routing = []
                routing.append((headers[i][0].lower(), value))
        self.host = host if hosts == 1 else None
        self.incoming_request_id = request_id
        self.sandbox_routing = routing  # X-Sandbox-Id / X-Sandbox-Port, lower-case names (target.header_form)
        self.chunked_in = chunked
        self.content_length = None if chunked or length is None else int(length)  # llhttp checked it
        self.has_credentials = credentials
        self.body: list[bytes] = []
        self.body_bytes = 0  # buffered while no upstream is attached
        self.sent_bytes = 0  # whole body so far, for the size limit
        self.body_done = False
        self.upstream: UpstreamConnection | None = None
        self.vm_id: str | None = None
        self.port = 0  # the VM's port, with vm_id
        self.vm_use: VmUse | None = None  # the VM's counters, while this exchange counts for it
        self.head_received = False
        self.pending_head = b""
        self.chunked_out = False
        self.no_body_out = False
        self.tunnel = False
        self.signed = False  # let in by a signed URL (or its cookie): a key rotation ends it
        self.max_body = 0
        self.finished = False  # the response is complete; waiting for the request's end to move on
        # For the metrics and the access log (gateway.edge.observe).
        self.started = proto.loop.time()
        self.kind = "rejected"  # until routed: "api", "path", "host", "header", "domain" or "instance"
        self.route_id: str | None = None
        self.request_id = b""
        self.status = 0
        self.code: str | None = None  # the edge's own error code, when the edge answered
        self.bytes_out = 0
        self.upstream_started = 0.0
        self.upstream_s: float | None = None

    @property
    def has_body(self) -> bool:
        return self.chunked_in or bool(self.content_length)

    def accept(self) -> bytes | None:
        return next((v for n, v in self.headers if n.lower() == b"accept"), None)

    # request body (from the client parser) ---------------------------------------------------------

    def feed_body(self, data: bytes) -> None:
        self.sent_bytes += len(data)
        if self.max_body and self.sent_bytes > self.max_body:
            self.proto.body_too_large(self)
            return
        upstream = self.upstream
        if upstream is not None:
            self._body_up(upstream, b"%x\r\n%s\r\n" % (len(data), data) if self.chunked_in else data)
            return
        self.body.append(data)
        self.body_bytes += len(data)
        if self.body_bytes > BODY_BUFFER_HIGH:
            self.proto.pause_reading()

    def _body_up(self, upstream: UpstreamConnection, out: bytes | memoryview) -> None:
        use = self.vm_use
        if use is not None:  # body bytes reaching a VM: client activity (the idle clock)
            use.active = ACTIVITY_HTTP
        upstream.write(out)
        if not upstream.can_write:
            self.proto.pause_reading()
        self.proto.upload_progress()

    def can_pump_up(self) -> bool:
        """Whether the rest of the request body may come as views of a pump's buffer: a Content-Length
        body within the limit, its head and first bytes already on their way to an attached app."""
        length = self.content_length
        return (
            self.upstream is not None and length is not None and not self.body_done
            and (not self.max_body or length <= self.max_body)
        )  # fmt: skip

    def on_pumped_upload(self, data: memoryview) -> None:
        self.sent_bytes += len(data)
        upstream = self.upstream
        if upstream is not None:
            self._body_up(upstream, data)

    def app_holds_body(self) -> bool:
        upstream = self.upstream
        return upstream is not None and _holds_bytes(upstream.transport)

    def end_body(self) -> None:
        self.body_done = True
        upstream = self.upstream
        if upstream is not None:
            if self.chunked_in:
                upstream.write(b"0\r\n\r\n")
            upstream.end_request()
            self.proto.request_sent(self)

    def attach(self, conn: UpstreamConnection, head: bytes) -> None:
        self.upstream = conn
        if self.body:
            chunked = self.chunked_in
            head += b"".join([b"%x\r\n%s\r\n" % (len(c), c) for c in self.body] if chunked else self.body)
            self.body.clear()
            self.body_bytes = 0
        if self.body_done and self.chunked_in:
            head += b"0\r\n\r\n"
        self.upstream_started = self.proto.loop.time()
        conn.start(self, head, head_only=self.method == b"HEAD", request_sent=self.body_done)

    # the response, fed by the upstream connection -------------------------------------------------

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        proto = self.proto
        transport = proto.transport
        if transport is None:
            return
        if 100 <= status < 200 and status != 101:
            if not self.http10:
                transport.write(_STATUS_LINES[status] + head_bytes(hdr.strip_hop_by_hop(headers)) + b"\r\n")
            return
        self.head_received = True
        self.status = status
        self.upstream_s = proto.loop.time() - self.upstream_started
        if status == 101 and not (self.upgrade and hdr.valid_upgrade_response(self.headers, headers)):
            proto.bad_upgrade(self)
            return
        assert self.upstream is not None
        # Most answers have no hop-by-hop header (the upstream saw while reading the head): they pass as
        # they came, without a second look at each name.
        out = hdr.strip_hop_by_hop(headers) if self.upstream.hop_by_hop else headers
        if status == 101:
            upgrade = [(n, v) for n, v in headers if n.lower() == b"upgrade"]
            out = [*out, (b"Connection", b"Upgrade"), *upgrade]
            self.tunnel = True
            transport.write(_STATUS_LINES[101] + head_bytes(out) + b"\r\n")
            proto.start_tunnel(self, extensions=any(n.lower() == b"sec-websocket-extensions" for n, _ in out))
            return
        head = (_STATUS_LINES.get(status) or _status_line(status)) + head_bytes(out)
        if self.kind == "api" and proto.scheme == "https":
            # The platform's own hosts are HTTPS only; sandbox and customer hosts are their apps' call.
            head += HSTS_HEADER
        self.no_body_out = self.method == b"HEAD" or status in (204, 304)
        if not self.no_body_out and not self.upstream.length_known:
            if self.http10:
                self.keep_alive = False  # its end is the connection's end
            else:
                self.chunked_out = True
                head += b"Transfer-Encoding: chunked\r\n"
        if not self.keep_alive or self.upgrade or (self.has_body and not self.body_done) or proto.draining:
            # An answer before the request's end closes the connection (the rest of it is not read); so
            # does a declined upgrade (what follows its request may not be HTTP).
            head += b"Connection: close\r\n"
        elif self.http10:
            head += b"Connection: keep-alive\r\n"
        # Held until the body's first bytes or the end of this read from the VM (flush_head), so a
        # small response leaves in one write instead of two.
        self.pending_head = head + b"\r\n"
        proto.response_started(self)

    def flush_head(self) -> None:
        if self.pending_head and self.proto.transport is not None:
            self.proto.transport.write(self.pending_head)
        self.pending_head = b""

    def on_response_body(self, data: bytes) -> None:
        proto = self.proto
        transport = proto.transport
        if transport is None or self.no_body_out or not data:
            return
        self.bytes_out += len(data)
        out = b"%x\r\n%s\r\n" % (len(data), data) if self.chunked_out else data
        if self.pending_head:
            out, self.pending_head = self.pending_head + out, b""
        self._write_body(transport, out)

    def _write_body(self, transport: asyncio.Transport, out: bytes | memoryview) -> None:
        transport.write(out)
        proto = self.proto
        if proto.silence_deadline is not None:
            proto.activity()
        if not proto.can_write and self.upstream is not None:
            self.upstream.pause_reading()

    # A long body pumped to the client (gateway/edge/pump.py): written on as it came, with its head
    # already out (the pump starts after the read that carried the head).

    def can_pump(self) -> bool:
        """Whether the rest of the body may come as views of a pump's buffer: it goes out as it is,
        to a transport that writes a view at once or tells what it holds (not an HTTP/2 stream)."""
        proto = self.proto
        return (
            proto.transport is not None and not proto.h2_stream and not self.no_body_out
            and not self.chunked_out and not self.pending_head
        )  # fmt: skip

    def on_pumped_body(self, data: memoryview) -> None:
        transport = self.proto.transport
        if transport is not None:
            self.bytes_out += len(data)
            self._write_body(transport, data)

    def client_holds_body(self) -> bool:
        return _holds_bytes(self.proto.transport)

    def on_response_complete(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.tunnel:
            return
        if self.chunked_out and self.proto.transport is not None:
            self.pending_head += b"0\r\n" + head_bytes(hdr.strip_hop_by_hop(trailers)) + b"\r\n"
        self.flush_head()
        self.proto.response_complete(self)

    def on_upstream_lost(self, exc: Exception | None) -> None:
        self.proto.upstream_lost(self, exc)

    def on_upstream_writable(self) -> None:
        self.proto.upstream_writable(self)
