"""HTTP/2 from clients: one connection, many streams, each carried as one HTTP/1.1 exchange.

A connection that negotiated ``h2`` (ALPN) or opened with the h2c preface is taken over by an
``Http2Connection`` (the ``h2`` library's state machine does the framing, HPACK and flow control). Each
request stream gets an ``EdgeProtocol`` of its own, of the twin that runs, whose transport is the
stream: the request is written to it as HTTP/1.1 and what it writes back is parsed (llhttp) and sent on
as HTTP/2 frames. So a stream is routed, limited, logged, counted and answered exactly as an HTTP/1.1
request is, by the same code: this module only translates framing. Apps are reached over HTTP/1.1 as
before, or over h2c for gRPC (gateway/edge/h2c.py).

Flow control holds both ways. Towards the client, a stream's output beyond its window waits here and,
past STREAM_HIGH bytes, pauses the exchange's writer (which pauses reading from the VM). From the
client, a stream's body is acknowledged (WINDOW_UPDATE) only as its exchange takes it: while the
exchange pauses reading, the client's window runs out and it stops sending.

Stays interpreted (not in the compiled twin): ``h2`` is pure Python, and this is the frame work around it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httptools

if TYPE_CHECKING:
    from .protocol import EdgeProtocol, StartHttp2

log = logging.getLogger(__name__)

# A stream's output held for its window beyond this pauses its exchange; below STREAM_LOW it goes on.
STREAM_HIGH = 256 * 1024
STREAM_LOW = 64 * 1024
# What a client may send ahead per stream and per connection before the edge acknowledges it.
STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
# Response headers that belong to one HTTP/1.1 connection and have no place in HTTP/2 (RFC 9113 8.2.2).
CONNECTION_HEADERS = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te")
)
# Bytes that cannot appear in a method or a target of an HTTP/1.1 request line (h2 checks the values).
_NOT_IN_REQUEST_LINE = (b" ", b"\t")
# A client that resets this many streams, most of those it opened, is cut off (the "rapid reset"
# attack, CVE-2023-44487: each reset stream cost the edge a routed exchange).
RESET_FLOOD = 400


def starter(max_streams: int, keepalive_timeout_s: float, max_header_bytes: int) -> StartHttp2:
    """Edge.start_h2: how a connection switches to HTTP/2 with these limits."""

    def start(owner: EdgeProtocol, data: bytes) -> Http2Connection:
        return Http2Connection.take_over(owner, data, max_streams, keepalive_timeout_s, max_header_bytes)

    return start


class StreamTransport(asyncio.Transport):
    """One stream, as the transport of its exchange's EdgeProtocol."""

    def __init__(self, stream: Stream) -> None:
        super().__init__()
        self._stream = stream

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._stream.from_exchange(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # The client connection's: its peer, its TLS object (SNI name) and socket.
        return self._stream.session.transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._stream.exchange_gone

    def close(self) -> None:
        self._stream.exchange_closed()

    def abort(self) -> None:
        self._stream.exchange_closed(abort=True)

    def pause_reading(self) -> None:
        self._stream.reading_paused = True

    def resume_reading(self) -> None:
        self._stream.resume_reading()

    def is_reading(self) -> bool:
        return not self._stream.reading_paused

    def can_write_eof(self) -> bool:
        return False  # a stream ends with its response; the edge's lingering close is not needed here

    def write_eof(self) -> None:
        raise NotImplementedError

    def get_write_buffer_size(self) -> int:
        return self._stream.held_out

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class Stream:
    """One request stream and its exchange."""

    def __init__(self, session: Http2Connection, stream_id: int, head_only: bool, chunked: bool) -> None:
        self.session = session
        self.id = stream_id
        self.head_only = head_only
        self.chunked = chunked  # the request body is re-framed as chunked (no content-length given)
        self.transport = StreamTransport(self)
        self.proto: EdgeProtocol = session.protocol_class(session.edge, tls=session.tls, h2_stream=True)
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.in_trailers = False
        self.head: list[tuple[bytes, bytes]] | None = None  # the response head, until it is sent
        self.out: list[bytes] = []  # response body waiting for the window
        self.held_out = 0
        self.complete = False  # the whole response was parsed
        self.ended = False  # its end went to the client (or the stream was reset)
        self.exchange_gone = False  # the exchange closed its side (connection_lost is on its way)
        self.writer_paused = False
        self.reading_paused = False
        self.held_in: list[tuple[bytes, int]] = []  # request data while the exchange pauses reading
        self.request_ended = False

    # the request side (from the client) ----------------------------------------------------------

    def start(self, head: bytes) -> None:
        self.proto.connection_made(self.transport)
        self.proto.data_received(head)

    def request_data(self, data: bytes, flow_length: int) -> None:
        if self.exchange_gone:
            self.session.acknowledge(flow_length, self.id)
            return
        if self.reading_paused or self.held_in:
            self.held_in.append((data, flow_length))
            return
        self._feed(data, flow_length)

    def _feed(self, data: bytes, flow_length: int) -> None:
        if data:
            self.proto.data_received(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        self.session.acknowledge(flow_length, self.id)

    def request_end(self) -> None:
        self.request_ended = True
        if self.reading_paused or self.held_in:
            self.held_in.append((b"", -1))
        elif self.chunked and not self.exchange_gone:
            self.proto.data_received(b"0\r\n\r\n")

    def resume_reading(self) -> None:
        self.reading_paused = False
        while self.held_in and not self.reading_paused and not self.exchange_gone:
            data, flow_length = self.held_in.pop(0)
            if flow_length < 0:
                if self.chunked:
                    self.proto.data_received(b"0\r\n\r\n")
            else:
                self._feed(data, flow_length)

    def reset_by_client(self) -> None:
        self.ended = True
        self._let_exchange_go()

    # the response side (from the exchange, as HTTP/1.1) --------------------------------------------

    def from_exchange(self, data: bytes) -> None:
        if self.ended or self.complete:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            log.error("edge: HTTP/2 stream %d: the exchange's answer did not parse: %s", self.id, exc)
            self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        self.pump()

    def on_message_begin(self) -> None:
        self.headers = []
        self.trailers = []
        self.in_trailers = False

    def on_header(self, name: bytes, value: bytes) -> None:
        (self.trailers if self.in_trailers else self.headers).append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.headers = []  # interim (100 Continue): the real head follows
            return
        self.in_trailers = True
        self.head = [(b":status", b"%d" % status), *h2_fields(self.headers)]
        if self.head_only:
            self.complete = True  # (llhttp cannot be told it answers a HEAD: no body follows)

    def on_body(self, body: bytes) -> None:
        self.out.append(body)
        self.held_out += len(body)

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:
            return
        self.complete = True

    def pump(self) -> None:
        """Send what the windows allow: the head, body, and the end (with trailers) once all is out."""
        if self.ended:
            return
        session = self.session
        conn = session.conn
        try:
            head = self.head
            if head is not None:
                self.head = None
                # A response that is complete with no body (and no trailers) is one HEADERS frame: also
                # gRPC's "trailers-only" answer.
                alone = self.complete and not self.out and not self.trailers
                conn.send_headers(self.id, head, end_stream=alone)
                if alone:
                    self._ended()
                    return
            if self.out and not session.writing_paused:
                self.held_out -= send_held(conn, self.id, self.out)
            if self.complete and not self.out:
                if self.trailers:
                    conn.send_headers(self.id, h2_fields(self.trailers), end_stream=True)
                else:
                    conn.end_stream(self.id)
                self._ended()
                return
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.ended = True  # the client reset it meanwhile
            self._let_exchange_go()
            return
        finally:
            session.flush()
        self._back_pressure()

    def _back_pressure(self) -> None:
        if self.held_out > STREAM_HIGH and not self.writer_paused:
            self.writer_paused = True
            self.proto.pause_writing()
        elif self.held_out < STREAM_LOW and self.writer_paused and not self.session.writing_paused:
            self.writer_paused = False
            self.proto.resume_writing()

    def _ended(self) -> None:
        self.ended = True
        if not self.request_ended:
            # Answered before the client finished its body: it can stop sending (RFC 9113 8.1).
            self.session.reset_stream(self.id, h2.errors.ErrorCodes.NO_ERROR)
        self._let_exchange_go()

    def reset(self, code: h2.errors.ErrorCodes) -> None:
        if not self.ended:
            self.ended = True
            self.session.reset_stream(self.id, code)
        self._let_exchange_go()

    def exchange_closed(self, *, abort: bool = False) -> None:
        """The exchange closed its transport: after a whole answer, the rest goes out as the window lets
        it; before, the stream is cut (as the HTTP/1.1 connection would be)."""
        if not self.complete or abort:
            self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._let_exchange_go()

    def _let_exchange_go(self) -> None:
        if not self.exchange_gone:
            self.exchange_gone = True
            self.held_in.clear()
            self.session.loop.call_soon(self.proto.connection_lost, None)
        if self.ended:
            self.session.stream_done(self)


def send_held(conn: h2.connection.H2Connection, stream_id: int, out: list[bytes]) -> int:
    """Send from ``out`` (taken from its front) what the stream's and the connection's windows allow,
    in frames of at most the peer's size; returns the bytes sent."""
    sent = 0
    while out:
        window = conn.local_flow_control_window(stream_id)
        if window <= 0:
            break
        chunk = out[0]
        size = min(window, conn.max_outbound_frame_size, len(chunk))
        if size < len(chunk):
            out[0] = chunk[size:]
            chunk = chunk[:size]
        else:
            out.pop(0)
        conn.send_data(stream_id, chunk)
        sent += size
    return sent


def h2_fields(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """HTTP/1.1 response (or trailer) fields as HTTP/2 ones: lower-case names, no connection fields."""
    out = []
    for name, value in headers:
        low = name.lower()
        if low not in CONNECTION_HEADERS:
            out.append((low, value))
    return out


class Http2Connection(asyncio.Protocol):
    """One client connection speaking HTTP/2: its streams, flow control and end."""

    def __init__(
        self, owner: EdgeProtocol, max_streams: int, idle_timeout_s: float, max_header_bytes: int
    ) -> None:
        self.owner = owner
        self.edge = owner.edge
        self.loop = owner.loop
        self.protocol_class = type(owner)
        transport = owner.transport
        assert transport is not None
        self.transport: asyncio.Transport = transport
        self.tls = transport.get_extra_info("ssl_object") is not None
        self.idle_timeout_s = idle_timeout_s
        config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_bytes,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self.streams: dict[int, Stream] = {}
        self.writing_paused = False
        self.draining = False
        self.closed = False
        self.opened = self.resets = 0
        self.idle_timer: asyncio.TimerHandle | None = None

    @classmethod
    def take_over(
        cls, owner: EdgeProtocol, data: bytes, max_streams: int, idle_timeout_s: float, max_header_bytes: int
    ) -> Http2Connection:
        session = cls(owner, max_streams, idle_timeout_s, max_header_bytes)
        session.transport.set_protocol(session)
        session.conn.initiate_connection()
        session.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        session.flush()
        session._idle()
        if owner.reading_paused:
            owner.resume_reading()
        if data:
            session.data_received(data)
        return session

    # asyncio.Protocol ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("edge: HTTP/2 protocol error from a client: %s", exc)
            self.flush()  # h2 queued the GOAWAY
            self._close()
            return
        for event in events:
            self._handle(event)
        self.flush()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.acknowledge(event.flow_controlled_length, event.stream_id)
            else:
                stream.request_data(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.request_end()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self.resets += 1
                stream.reset_by_client()
                if self.resets > RESET_FLOOD and self.resets * 2 > self.opened:
                    self.conn.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                    self.flush()
                    self._close()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.pump()
            else:
                for stream in list(self.streams.values()):
                    stream.pump()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close()

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self.draining:
            self.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        fields = event.headers or []
        ended = event.stream_ended is not None
        head = request_head(fields, ended)
        if head is None:
            self.reset_stream(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)  # malformed (RFC 9113 8.1.1)
            return
        request, method, chunked = head
        self.opened += 1
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        stream = Stream(self, stream_id, method == b"HEAD", chunked)
        stream.request_ended = ended
        self.streams[stream_id] = stream
        if self.writing_paused:
            stream.writer_paused = True
            stream.proto.pause_writing()
        stream.start(request)

    def pause_writing(self) -> None:
        self.writing_paused = True
        # A client that does not read what it asked for (PING and SETTINGS acks, answers) is not read
        # either: the output it leaves behind stays bounded by the transport's high-water mark.
        self.transport.pause_reading()
        for stream in list(self.streams.values()):
            if not stream.writer_paused:
                stream.writer_paused = True
                stream.proto.pause_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if not self.closed:
            self.transport.resume_reading()
        for stream in list(self.streams.values()):
            stream.pump()
            if stream.writer_paused and stream.held_out < STREAM_LOW and not stream.exchange_gone:
                stream.writer_paused = False
                stream.proto.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        for stream in list(self.streams.values()):
            stream.ended = True
            stream._let_exchange_go()
        self.streams.clear()
        self.owner.connection_lost(exc)

    # the edge's calls ------------------------------------------------------------------------------

    def drain(self) -> None:
        """GOAWAY: streams under way finish, new ones are refused; closed when the last one ends."""
        if self.draining or self.closed:
            return
        self.draining = True
        self.conn.close_connection()
        self.flush()
        if not self.streams:
            self._close()

    # helpers ---------------------------------------------------------------------------------------

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.closed:
            self.transport.write(out)

    def acknowledge(self, length: int, stream_id: int) -> None:
        if length and not self.closed:
            try:
                self.conn.acknowledge_received_data(length, stream_id)
            except h2.exceptions.StreamClosedError:
                pass  # (a stream that ended: h2 still credits the connection's window)

    def reset_stream(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        try:
            self.conn.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # already closed both ways
        self.flush()

    def stream_done(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        if not self.streams:
            if self.draining:
                self._close()
            else:
                self._idle()

    def _idle(self) -> None:
        """No stream is open: the connection is idle as a kept-alive HTTP/1.1 one would be."""
        if self.idle_timeout_s > 0 and self.idle_timer is None and not self.closed:
            self.idle_timer = self.loop.call_later(self.idle_timeout_s, self._idle_expired)

    def _idle_expired(self) -> None:
        self.idle_timer = None
        if not self.streams:
            self.drain()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()


def request_head(fields: list[tuple[bytes, bytes]], ended: bool) -> tuple[bytes, bytes, bool] | None:
    """An HTTP/2 request's fields as an HTTP/1.1 request head (``Connection: close``: one exchange per
    stream), with its method and whether its body is re-framed as chunked; None when it has no HTTP/1.1
    form (h2 has checked the fields' characters and pseudo-fields already)."""
    method = path = authority = b""
    lines: list[bytes] = []
    length = False
    for name, value in fields:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"host":
            authority = authority or value
            continue
        if name == b"te" or name == b"transfer-encoding":
            continue  # (te: trailers is HTTP/2's own; the edge asks the app for trailers itself)
        if name == b"content-length":
            length = True
        lines.append(b"%s: %s\r\n" % (name, value))
    if method == b"CONNECT" or not method or not path:
        return None  # (no extended CONNECT is offered: WebSockets take HTTP/1.1)
    for bad in _NOT_IN_REQUEST_LINE:
        if method.find(bad) >= 0 or path.find(bad) >= 0:
            return None
    chunked = not ended and not length
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    host = b"host: %s\r\n" % authority if authority else b""
    head = b"%s %s HTTP/1.1\r\n%s%sconnection: close\r\n\r\n" % (method, path, host, b"".join(lines))
    return head, method, chunked
