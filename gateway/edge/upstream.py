"""Connections to VMs (and to the control plane): an asyncio protocol per connection, pooled per VM.

The pool key includes the VM id, so a keep-alive connection is never reused for another VM, even when
the address is recycled; when a VM ends, every idle connection to it is closed.

The response parser hands everything to its sink, the ``Exchange`` (the client side; typed through a
type-only import, so the compiled edge calls it directly) as it arrives: nothing is buffered here
beyond what one ``data_received`` holds, and flow control is mutual (a slow client pauses reading from
the VM; a slow VM pauses the client's request body).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, final

import httptools

from gateway.edge.http1 import NAME_CONTENT_LENGTH, NAME_HOP_BY_HOP, NAME_TRANSFER_ENCODING, parsers_for

from .headers import HOP_BY_HOP
from .pump import PUMP_MIN_BYTES, BodyPump

if TYPE_CHECKING:
    from .exchange import Exchange
    from .tunnel import Tunnel

# As many idle connections per VM port as busy clients are likely (nginx's `keepalive` is per worker).
UPSTREAM_MAX_IDLE_PER_KEY: Final = 256
UPSTREAM_IDLE_TIMEOUT_S: Final = 30.0  # shorter than the client side's, so the edge closes first
# Idle connections are closed by one sweep per pool, not a timer each (a timer per request costs more
# than the rest of the pooling), and the first sweep that finds a connection idle stamps its time (no
# clock read per request): an idle connection lives between the timeout and the timeout + two sweeps.
UPSTREAM_IDLE_SWEEP_S: Final = 5.0


log = logging.getLogger(__name__)


@final
class UpstreamAddress:
    """Where the edge dials: a VM's port (or the control plane's listener), and the pool's key for it.

    Made once per cached route, not per request: the key is a string, whose hash is kept, so each
    pooled take and release is one cheap dict lookup (a tuple key would be built, hashed and compared
    every time)."""

    __slots__ = ("host", "key", "port", "unix_path", "vm_id")

    def __init__(self, vm_id: str, host: str, port: int, unix_path: str | None = None) -> None:
        self.vm_id = vm_id  # or "api"
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.key = f"{vm_id} {unix_path}" if unix_path is not None else f"{vm_id} {host} {port}"


# The largest response head from an app (nginx's proxy_buffer_size is 4-8 KiB; apps with many or big
# cookies need more).
MAX_RESPONSE_HEAD_BYTES: Final = 64 * 1024
# This twin's HTTP/1.1 response parser (the compiled edge's is C: gateway/edge/http1.py).
_RESPONSE_PARSER: Final = parsers_for(__name__)[1]
# A response without trailers (most of them) shares this list.
_NO_TRAILERS: Final[list[tuple[bytes, bytes]]] = []


class BadResponse(Exception):
    """The app's answer is not one the edge forwards: the client gets a 502 with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, address: UpstreamAddress, pool: UpstreamPool) -> None:
        self.address = address
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: Exchange | None = None
        self.parser = _RESPONSE_PARSER(self, HOP_BY_HOP)
        self.status = 0
        self.trailers: list[tuple[bytes, bytes]] = _NO_TRAILERS
        self.head_only = False
        self.close_delimited = False
        self.complete = True
        self.reusable = True
        self.closed = False
        self.tunnel: Tunnel | None = None  # after a 101: what the VM sends goes to it
        self.can_write = True
        self.reading_paused = False  # by the client side's back-pressure (pause_reading)
        self.idle_since = 0.0
        # The request's last byte was written: until then the connection is mid-request and can never
        # go back to the pool, even when the app answered early (its next reader would see our rest).
        self.request_sent = True
        self.length_known = False  # the response head had a Content-Length
        self.body_left = -1  # ... and this much of its body is still to come
        self.chunked = False  # ... or Transfer-Encoding (then reads without body count: _count_framing)
        self.framing_bytes = 0
        self.read_had_body = False
        self.hop_by_hop = False  # and a hop-by-hop header (Connection, Transfer-Encoding...)
        # Raw bytes of the response head so far (see EdgeProtocol.head_seen: the same reasoning).
        self.in_head = False
        self.head_fresh = False
        self.head_seen = 0

    # asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.from_vm(data)
            return
        # (Locals, not self.tunnel and self.sink, are narrowed here: parsing changes both, and the
        # compiled edge takes mypy's narrowing of an attribute for a fact: gateway/edge/twin.py.)
        sink = self.sink
        if sink is None:
            # Bytes while idle: the VM broke the protocol (or closed with a message); not reusable.
            self.close()
            return
        try:
            self.parser.feed_data(data)
            if self.sink is not None:
                self.sink.flush_head()  # a head without body bytes yet (SSE, slow apps) goes out now
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            rest = data[offset:]
            tunnel = self.tunnel
            if rest and tunnel is not None:
                tunnel.from_vm(rest)
        except httptools.HttpParserCallbackError:
            # An error of the edge's own (a callback raised): a bug to see, not the app's doing.
            log.exception("edge: a response callback failed")
            self._refuse(BadResponse("upstream_bad_response", "the edge could not forward the app's answer"))
            return
        except httptools.HttpParserError as exc:
            self._refuse(BadResponse("upstream_bad_response", f"the app's answer is not HTTP/1.1: {exc}"))
            return
        if self.in_head:
            if self.head_fresh:
                self.head_fresh = False
                self.head_seen = len(data)  # at most this much of it is head
            else:
                self.head_seen += len(data)
            if self.head_seen > self.pool.max_response_head_bytes:
                message = f"the app's response head is larger than {self.pool.max_response_head_bytes} bytes"
                self._refuse(BadResponse("upstream_head_too_large", message))
        elif self.chunked and not self.complete:
            self._count_framing(len(data))
        elif self.body_left >= PUMP_MIN_BYTES and not self.complete:
            self._pump()
        self.read_had_body = False

    # a long body, pumped (gateway/edge/pump.py) ----------------------------------------------------

    def _pump(self) -> None:
        """The rest of a long Content-Length body goes through a pump, when both sides allow it."""
        sink = self.sink
        transport = self.transport
        if (
            sink is None or transport is None or self.closed or self.head_only or self.tunnel is not None
            or not sink.can_pump()
        ):  # fmt: skip
            return
        self.pool.pumped += 1
        transport.set_protocol(BodyPump(self, self.body_left))

    def pumped(self, data: memoryview) -> None:
        self.body_left -= len(data)
        if self.sink is not None:
            self.sink.on_pumped_body(data)

    def pump_holds(self) -> bool:
        return self.sink is not None and self.sink.client_holds_body()

    def pump_done(self) -> None:
        if self.transport is None or self.closed:
            return
        self.transport.set_protocol(self)
        self._finish_past_parser()  # it never saw the body's rest

    def _count_framing(self, read: int) -> None:
        """A chunked answer is being read: reads that carry none of its body (chunk sizes, and trailers,
        which the parser holds until each ends) count like a head's bytes, so endless trailers are cut
        (EdgeProtocol._count_framing: the same from the client's side)."""
        if self.read_had_body:
            self.framing_bytes = 0
            return
        self.framing_bytes += read
        limit = self.pool.max_response_head_bytes
        if self.framing_bytes > limit:
            message = f"the app sent more than {limit} bytes of chunk framing or trailers without body"
            self._refuse(BadResponse("upstream_bad_response", message))

    def _refuse(self, reason: BadResponse) -> None:
        """The response cannot be forwarded: the connection is dropped and the exchange told why."""
        self.reusable = False
        sink, self.sink = self.sink, None
        self.close()
        if sink is not None:
            sink.on_upstream_lost(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        if self.sink is None:
            return
        if self.close_delimited and not self.complete and self.tunnel is None and exc is None:
            self._finish()  # a body without length or chunking ends with the connection
            return
        sink, self.sink = self.sink, None
        sink.on_upstream_lost(exc)

    def pause_writing(self) -> None:
        self.can_write = False

    def resume_writing(self) -> None:
        self.can_write = True
        if self.sink is not None:
            self.sink.on_upstream_writable()

    # the parser's calls (gateway/edge/http1.py) ----------------------------------------------------

    def on_message_begin(self) -> None:
        if self.sink is None and self.tunnel is None:
            # A second response in the read that completed the first: nothing was asked for it. The
            # connection is out of step with its requests and is never used again.
            self.reusable = False
            self.close()
        self.trailers = _NO_TRAILERS
        self.in_head = True
        self.head_fresh = True

    def on_response(
        self, status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool, names: int, length: int
    ) -> None:
        self.in_head = False
        self.status = status
        self.body_left = length
        if not keep_alive:
            self.reusable = False
        self.length_known = bool(names & NAME_CONTENT_LENGTH)
        self.chunked = bool(names & NAME_TRANSFER_ENCODING)
        self.framing_bytes = 0
        self.hop_by_hop = bool(names & NAME_HOP_BY_HOP)
        framed = bool(names & (NAME_CONTENT_LENGTH | NAME_TRANSFER_ENCODING))
        self.close_delimited = (
            not framed and status not in (204, 304) and status >= 200 and not self.head_only
        )
        if self.close_delimited:
            self.reusable = False
        if self.sink is not None:
            self.sink.on_response_head(status, headers)
        if 100 <= status < 200 and status != 101:
            return  # interim response: the real one follows on the same connection
        if self.head_only and self.sink is not None:
            self._finish_past_parser()  # llhttp cannot be told a response answers HEAD

    def on_body(self, body: bytes) -> None:
        self.read_had_body = True
        self.body_left -= len(body)
        if self.sink is not None:
            self.sink.on_response_body(body)

    def on_message_complete(self, trailers: list[tuple[bytes, bytes]]) -> None:
        status = self.status
        if 100 <= status < 200 and status != 101:
            return
        self.trailers = trailers
        self._finish()

    def _finish_past_parser(self) -> None:
        """The response ended where its parser does not know it (a HEAD answer, a pumped body): finish
        it, and the next response gets a fresh parser."""
        self.parser = _RESPONSE_PARSER(self, HOP_BY_HOP)
        self._finish()

    def _finish(self) -> None:
        if self.complete:
            return
        self.complete = True
        sink = self.sink
        if self.tunnel is None:
            self.sink = None  # a tunnel keeps its sink: it still needs to hear about the close
        if sink is not None:
            sink.on_response_complete(self.trailers)
        if self.tunnel is None:
            if not self.request_sent:
                self.reusable = False
            self.pool.release(self)

    # use ------------------------------------------------------------------------------------------

    def start(self, sink: Exchange, head: bytes, *, head_only: bool, request_sent: bool) -> None:
        """Send a request head; ``request_sent`` False: a body follows, ended by ``end_request``."""
        self.sink = sink
        self.head_only = head_only
        self.request_sent = request_sent
        self.complete = False
        self.write(head)

    def end_request(self) -> None:
        self.request_sent = True

    def pause_reading(self) -> None:
        """The client cannot take more of the response: stop reading from the VM until it can."""
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def ready_for_pool(self) -> bool:
        """Put in the state a pooled connection must be in; False when it cannot be (then it is closed).

        Reading must be on: paused, it would never see its next response, nor the VM closing it.
        """
        transport = self.transport
        if transport is None or self.closed or not self.reusable:
            return False
        if self.reading_paused:  # (every pause of the VM's side goes through pause_reading)
            self.reading_paused = False
            transport.resume_reading()
        return True

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            self.pool.discard(self)


# How a pool opens a new connection, when not over the network (tests: in-memory transports).
Dial = Callable[[UpstreamAddress], Awaitable["UpstreamConnection"]]


class UpstreamPool:
    def __init__(
        self,
        connect_timeout_s: float,
        max_response_head_bytes: int = MAX_RESPONSE_HEAD_BYTES,
        dial: Dial | None = None,
    ):
        self.connect_timeout_s = connect_timeout_s
        self.dial = dial
        self.max_response_head_bytes = max_response_head_bytes
        self.loop = asyncio.get_running_loop()  # created on the loop it serves; kept (see Edge.loop)
        self.idle: dict[str, list[UpstreamConnection]] = {}  # by UpstreamAddress.key
        self._sweeper: asyncio.TimerHandle | None = None
        self.connects = self.reuses = 0
        self.pumped = 0  # responses whose long body went through a pump (gateway/edge/pump.py)

    def take_idle(self, address: UpstreamAddress) -> UpstreamConnection | None:
        """A pooled connection to this address, if one is open and reusable (no await: the common case)."""
        idle = self.idle.get(address.key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.reusable:
                self.reuses += 1
                return conn
        return None

    async def connect(self, address: UpstreamAddress) -> UpstreamConnection:
        """A new connection. Raises TimeoutError past the connect timeout, OSError when refused."""
        loop = self.loop
        self.connects += 1
        async with asyncio.timeout(self.connect_timeout_s):
            if self.dial is not None:
                return await self.dial(address)
            unix_path = address.unix_path
            if unix_path is not None:
                _, conn = await loop.create_unix_connection(
                    lambda: UpstreamConnection(address, self), unix_path
                )
            else:
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(address, self), address.host, address.port
                )
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        # Bytes after the response in the same read close it later (on_message_begin).
        if not conn.ready_for_pool():
            conn.close()
            return
        key = conn.address.key
        idle = self.idle.get(key)
        if idle is None:  # (not setdefault: it makes a list on every call)
            idle = self.idle[key] = []
        elif len(idle) >= UPSTREAM_MAX_IDLE_PER_KEY:
            conn.close()
            return
        idle.append(conn)
        conn.idle_since = 0.0  # stamped by the next sweep: no clock read per request
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(UPSTREAM_IDLE_SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        cutoff = now - UPSTREAM_IDLE_TIMEOUT_S
        for conns in list(self.idle.values()):
            for conn in conns:
                if not conn.idle_since:
                    conn.idle_since = now  # first seen idle: closed UPSTREAM_IDLE_TIMEOUT_S from here
            for conn in [c for c in conns if c.idle_since < cutoff]:
                conn.close()
        if self.idle:
            self._sweeper = self.loop.call_later(UPSTREAM_IDLE_SWEEP_S, self._sweep)

    def discard(self, conn: UpstreamConnection) -> None:
        key = conn.address.key
        idle = self.idle.get(key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self.idle[key]

    def close_vm(self, vm_id: str) -> None:
        """Close every idle connection to a VM that ended (busy ones end with their VM)."""
        for conns in list(self.idle.values()):
            for conn in [c for c in conns if c.address.vm_id == vm_id]:
                conn.close()

    def close_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in list(self.idle.values()):
            for conn in list(conns):
                conn.close()
