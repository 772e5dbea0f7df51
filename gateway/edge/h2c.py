"""h2c to apps, for gRPC: the edge's HTTP/1.1 upstream connection carried over HTTP/2 to the VM.

gRPC servers speak HTTP/2 only and end every answer with trailers (``grpc-status``). A gRPC request
(a stream of an HTTP/2 client, gateway/edge/http2.py) is routed as any request and handed to an
``UpstreamConnection`` from the edge's h2c pool; that connection's transport is an ``H2cLink``, one
HTTP/2 connection with prior knowledge to the app, which turns each HTTP/1.1 request written to it
into a stream and each response back into HTTP/1.1: a chunked body whose trailers are the stream's,
or, for an answer that is one HEADERS frame ("trailers-only"), a head with ``content-length: 0``.
One stream at a time per link, as one request at a time per pooled HTTP/1.1 connection; the pool keeps
links per VM, as it keeps HTTP/1.1 connections.

Stays interpreted (not in the compiled twin): ``h2`` is pure Python.
"""

from __future__ import annotations

import asyncio
import http
import logging
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httptools

from .http2 import CONNECTION_HEADERS, STREAM_HIGH, STREAM_LOW, STREAM_WINDOW, send_held

if TYPE_CHECKING:
    from .upstream import Dial, UpstreamAddress, UpstreamConnection, UpstreamPool

log = logging.getLogger(__name__)


def h2c_dial(pool: UpstreamPool, connection_class: type[UpstreamConnection]) -> Dial:
    """The h2c pool's way of opening a connection: an UpstreamConnection over a new H2cLink."""

    async def dial(address: UpstreamAddress) -> UpstreamConnection:
        loop = pool.loop
        _, link = await loop.create_connection(
            lambda: H2cLink(connection_class(address, pool)), address.host, address.port
        )
        return link.upstream

    return dial


class LinkTransport(asyncio.Transport):
    """What the UpstreamConnection writes its HTTP/1.1 requests to: the link."""

    def __init__(self, link: H2cLink) -> None:
        super().__init__()
        self._link = link

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._link.from_edge(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self._link.transport
        return default if transport is None else transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._link.closed

    def close(self) -> None:
        self._link.close()

    def abort(self) -> None:
        self._link.close()

    def pause_reading(self) -> None:
        self._link.reading_paused = True

    def resume_reading(self) -> None:
        self._link.resume_reading()

    def is_reading(self) -> bool:
        return not self._link.reading_paused

    def get_write_buffer_size(self) -> int:
        return self._link.held_out


class H2cLink(asyncio.Protocol):
    """One HTTP/2 connection to an app, carrying its UpstreamConnection's requests one stream each."""

    def __init__(self, upstream: UpstreamConnection) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.reading_paused = False
        # The request being parsed and sent.
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.stream_id = 0
        self.out: list[bytes] = []
        self.held_out = 0
        self.request_complete = False
        self.writer_paused = False
        # The response: framed as chunked (False: its head said content-length 0 and nothing follows).
        self.chunked = False
        self.trailers: list[tuple[bytes, bytes]] = []
        self.held_in: list[tuple[bytes, int]] = []  # HTTP/1.1 bytes for the edge while it pauses reading

    # the connection to the app ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self._flush()
        self.upstream.connection_made(LinkTransport(self))

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("edge: h2c to an app: protocol error: %s", exc)
            self._flush()
            self.close()
            return
        for event in events:
            self._handle(event)
        self._flush()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived) and event.stream_id == self.stream_id:
            self._response_head(event.headers or [], ended=event.stream_ended is not None)
        elif isinstance(event, h2.events.DataReceived):
            if event.stream_id == self.stream_id and self.chunked and event.data:
                self._to_edge(b"%x\r\n%s\r\n" % (len(event.data), event.data), event.flow_controlled_length)
            else:
                self._acknowledge(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and event.stream_id == self.stream_id:
            self.trailers = list(event.headers or [])
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id == self.stream_id:
            if self.chunked:
                fields = b"".join(b"%s: %s\r\n" % (n, v) for n, v in self.trailers if n[:1] != b":")
                self._to_edge(b"0\r\n%s\r\n" % fields, 0)
            self.trailers = []
        elif isinstance(event, h2.events.StreamReset) and event.stream_id == self.stream_id:
            self.close()  # the app gave up on the request: the exchange sees its upstream lost
        elif isinstance(event, h2.events.WindowUpdated):
            self._pump()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.close()

    def _response_head(self, fields: list[tuple[bytes, bytes]], *, ended: bool) -> None:
        status = 0
        lines = []
        for name, value in fields:
            if name == b":status":
                status = int(value)
            elif name[:1] != b":" and name not in (b"content-length", b"transfer-encoding"):
                lines.append(b"%s: %s\r\n" % (name, value))
        try:
            reason = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b"-"
        self.chunked = not ended
        framing = b"transfer-encoding: chunked\r\n" if self.chunked else b"content-length: 0\r\n"
        self._to_edge(b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (status, reason, b"".join(lines), framing), 0)

    def _to_edge(self, data: bytes, flow_length: int) -> None:
        if self.reading_paused or self.held_in:
            self.held_in.append((data, flow_length))
            return
        self.upstream.data_received(data)
        self._acknowledge(flow_length, self.stream_id)

    def resume_reading(self) -> None:
        self.reading_paused = False
        while self.held_in and not self.reading_paused and not self.closed:
            data, flow_length = self.held_in.pop(0)
            self.upstream.data_received(data)
            self._acknowledge(flow_length, self.stream_id)
        self._flush()

    def _acknowledge(self, length: int, stream_id: int) -> None:
        if length and not self.closed:
            try:
                self.conn.acknowledge_received_data(length, stream_id)
            except h2.exceptions.StreamClosedError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.upstream.connection_lost(exc)

    # the request, written by the UpstreamConnection as HTTP/1.1 -------------------------------------

    def from_edge(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            log.error("edge: h2c: the edge's own request did not parse: %s", exc)
            self.close()
            return
        self._pump()

    def on_message_begin(self) -> None:
        self.url = b""
        self.fields = []
        self.request_complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        authority = b""
        fields = []
        for name, value in self.fields:
            if name == b"host":
                authority = value
            elif name not in CONNECTION_HEADERS:
                fields.append((name, value))
        head = [
            (b":method", self.parser.get_method()),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", self.url),
            *fields,
            (b"te", b"trailers"),  # gRPC servers ask for it: the answer ends with trailers
        ]
        self.stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.stream_id, head)

    def on_body(self, body: bytes) -> None:
        self.out.append(body)
        self.held_out += len(body)

    def on_message_complete(self) -> None:
        self.request_complete = True

    def _pump(self) -> None:
        stream_id = self.stream_id
        if not stream_id or self.closed:
            return
        conn = self.conn
        try:
            self.held_out -= send_held(conn, stream_id, self.out)
            if self.request_complete and not self.out:
                self.request_complete = False
                conn.end_stream(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.out.clear()
            self.held_out = 0
        self._flush()
        if self.held_out > STREAM_HIGH and not self.writer_paused:
            self.writer_paused = True
            self.upstream.pause_writing()
        elif self.held_out < STREAM_LOW and self.writer_paused:
            self.writer_paused = False
            self.upstream.resume_writing()

    # ------------------------------------------------------------------------------------------------

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.closed:
            self.transport.write(out)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
