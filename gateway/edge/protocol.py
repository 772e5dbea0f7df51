"""The client side of the edge: one asyncio protocol per connection, parsing with httptools (llhttp).

Each request becomes an ``Exchange``. The hot path runs inside the parser's and the upstream's
callbacks, with no task, future or timeout object per request: as soon as a head is parsed its target
is decided by the pure ``TargetParser``, the route comes from the resolver's cache, an idle upstream
connection from the pool, and the request head is written. Only a cache miss (a Redis lookup) or a new
upstream connection leaves the callbacks for a short task. From then on bytes flow by callbacks in
both directions: bodies are re-framed (never passed through as raw framing), and each side's flow
control pauses the other. Requests on one connection are answered in order; a few pipelined requests
are parsed ahead, then reading pauses.

Timeouts are ``Deadline``s, moved rather than re-created per request: one per connection whose
meaning follows the connection's state (request head, the app's answer or upload progress, keep-alive),
and one for stream or tunnel idleness when those limits are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol, cast

import httptools

from gateway.edge.http1 import RequestParser, parsers_for, writers_for
from gateway.errors import GatewayError, edge_error
from gateway.state.ports import Waker
from gateway.tokens import token_hash

from . import access, pages
from . import headers as hdr
from .deadline import Deadline
from .exchange import Exchange
from .observe import ACTIVITY_HTTP, AccessLog, EdgeStats, VmTraffic, printable
from .pump import PUMP_MIN_BYTES, BodyPump
from .ratelimit import KeyRates
from .resolver import MISS, CacheKey, Resolver, Route
from .routing import WAKE, Redirect, Reply, RoutingPolicy, body_too_large
from .settings import EdgeSettings
from .target import ApiTarget, AppTarget, TargetParser, header_form
from .tunnel import Tunnel
from .upstream import BadResponse, UpstreamAddress, UpstreamConnection, UpstreamPool

log = logging.getLogger(__name__)
# Which twin this is (gateway/edge/twin.py): the start-up line says which edge runs.
IMPLEMENTATION: Final = "compiled" if __name__.startswith("gateway._edgec.") else "pure"

# Requests parsed ahead of the one being answered before reading pauses (HTTP/1.1 pipelining).
MAX_PIPELINED: Final = 8
# With a 429 for a VM at its max_exchanges_per_vm: its requests in flight end within moments.
RETRY_AFTER_1: Final[tuple[tuple[bytes, bytes], ...]] = ((b"Retry-After", b"1"),)
# The status an exchange is logged with when the client left before its answer was complete (nginx's).
CLIENT_CLOSED: Final = 499


def api_address(api_upstream: str) -> UpstreamAddress:
    """Where the control plane listens: a socket path, or HOST:PORT over TCP."""
    if api_upstream.startswith("/"):
        return UpstreamAddress("api", "unix", 0, api_upstream)
    host, _, port = api_upstream.rpartition(":")
    return UpstreamAddress("api", host.strip("[]"), int(port))


# Closing with the client still sending (see EdgeProtocol._close): nginx's lingering_timeout and
# lingering_time, and a cap on the bytes read meanwhile.
LINGER_IDLE_S: Final = 5.0
LINGER_TOTAL_S: Final = 30.0
LINGER_MAX_BYTES: Final = 64 * 2**20

# Per line of a request head beyond its name, value and target: method, version, ": ", CRLF and some
# optional whitespace.
HEAD_LINE_OVERHEAD: Final = 32

# Forwarding headers per (client address, Host), shared by connections; emptied when this many.
MAX_SHARED_CLIENT_INFOS: Final = 4096
# Idle kept-alive connections are closed by one sweep per process at this interval (not a timer each:
# an idle connection holds no timer), so one closes between keepalive_timeout_s and that plus twice this.
KEEPALIVE_SWEEP_S: Final = 1.0
# This twin's HTTP/1.1 request parser and request-head writer (the compiled edge's are C:
# gateway/edge/http1.py).
_REQUEST_PARSER: Final = parsers_for(__name__)[0]
_REQUEST_HEAD: Final = writers_for(__name__).request_head
_REQUEST_ID: Final = writers_for(__name__).request_id
# How an HTTP/2 client with prior knowledge starts (RFC 9113 section 3.4); llhttp stops there.
H2_PREFACE_START: Final = b"PRI * HTTP/2.0\r\n"


class Http2Session(Protocol):
    """A client connection that turned out to speak HTTP/2 (gateway/edge/http2.py): its first
    EdgeProtocol stays in the edge's connections, as its owner, and hands it what the edge asks."""

    def drain(self) -> None: ...


# Starts HTTP/2 on a connection: (its first EdgeProtocol, the bytes read so far) -> the session.
StartHttp2 = Callable[["EdgeProtocol", bytes], Http2Session]

# A held request for a suspended VM: how often it asks again for the wake, and looks whether it is back.
WAKE_ASK_S: Final = 5.0
WAKE_POLL_S: Final = 0.1


class Edge:
    """What every connection of one edge process shares."""

    def __init__(
        self,
        settings: EdgeSettings,
        resolver: Resolver,
        pool: UpstreamPool,
        access_log: AccessLog | None = None,
        waker: Waker | None = None,
    ) -> None:
        self.settings = settings
        self.implementation = IMPLEMENTATION
        self.waker = waker  # asks for suspended auto_resume VMs to be woken
        self.resolver = resolver
        self.pool = pool
        self.api_address = api_address(settings.api_upstream)
        self.stats = EdgeStats()
        self.traffic = VmTraffic()
        self.access_log = access_log
        # Request ids: this process's random prefix and a counter (unique without a random call each).
        self._request_prefix = secrets.token_hex(4).encode()
        # This process among the edges (its report of what it has open per VM is kept under it).
        self.instance_id = secrets.token_hex(8)
        self.open_reported = False
        self._request_count = 0
        self.pumped = 0  # request bodies that went up through a pump (gateway/edge/pump.py)
        self.parse_target = TargetParser(settings.routing)
        self.policy = RoutingPolicy(settings.https_redirect_port, settings.plain_http_paths)
        self.connections: set[EdgeProtocol] = set()
        self._client_infos: dict[tuple[str, str, bytes, bool], hdr.ClientInfo] = {}
        self.draining = False
        self._drained: asyncio.Event | None = None
        self._sweep: asyncio.TimerHandle | None = None  # the keep-alive sweep, while connections are open
        # The longest raw request head: the target and header limits, plus each line's framing.
        self.head_limit = (
            settings.routing.max_target_bytes + settings.max_header_bytes
            + HEAD_LINE_OVERHEAD * (settings.max_header_count + 1)
        )  # fmt: skip
        # Kept: asyncio.get_running_loop() costs a getpid() system call per use on Python 3.11.
        self.loop = asyncio.get_running_loop()
        resolver.on_vm_gone.append(self.vm_gone)
        resolver.on_share_revoked.append(self.share_revoked)
        resolver.on_url_key_rotated.append(self.url_key_rotated)
        # Told of each exchange that ended and each connection that closed (what tests await).
        self.exchange_ended: list[Callable[[Exchange], None]] = []
        self.api_rates = (
            KeyRates(settings.api_rate_per_key, settings.api_burst_per_key)
            if settings.api_rate_per_key
            else None
        )
        self.connection_ended: list[Callable[[EdgeProtocol], None]] = []
        # HTTP/2 (edge.http2): how a connection switches to it, and the pool of h2c connections to apps
        # for gRPC requests (gateway/edge/http2.py and h2c.py, set up by the listener).
        self.start_h2: StartHttp2 | None = None
        self.h2c_pool: UpstreamPool | None = None

    def client_info(self, peer_ip: str, scheme: str, host: bytes, trusted: bool) -> hdr.ClientInfo:
        key = (peer_ip, scheme, host, trusted)
        info = self._client_infos.get(key)
        if info is None:
            if len(self._client_infos) >= MAX_SHARED_CLIENT_INFOS:
                self._client_infos.clear()
            info = self._client_infos[key] = hdr.ClientInfo(peer_ip, scheme, host, trusted)
        return info

    def next_request_id(self) -> bytes:
        self._request_count += 1
        return _REQUEST_ID(self._request_prefix, self._request_count)

    def observe(self, ex: Exchange, peer_ip: str) -> None:
        """An exchange ended (answered, cut, or its tunnel closed): count it and log it."""
        self.stats.count(ex.kind, ex.status, ex.sent_bytes, ex.bytes_out, ex.upstream_s)
        use = ex.vm_use
        if use is not None:
            use.ended(ex.sent_bytes, ex.bytes_out, ex.tunnel)
        if self.access_log is not None:
            request_id = ex.request_id
            if request_id is ex.incoming_request_id:  # a trusted proxy's, as it came (the edge's are safe)
                request_id = printable(request_id)
            self.access_log.write(
                peer_ip, ex.method, ex.host, ex.url, ex.kind, ex.route_id, ex.status, ex.code, request_id,
                ex.sent_bytes, ex.bytes_out, ex.upstream_s, self.loop.time() - ex.started,
            )  # fmt: skip
        if self.exchange_ended:
            for ended in self.exchange_ended:
                ended(ex)

    def went_idle(self) -> None:
        """A connection waits for its next request: make sure the keep-alive sweep runs."""
        if self._sweep is None:
            self._sweep = self.loop.call_later(KEEPALIVE_SWEEP_S, self.sweep_idle)

    def sweep_idle(self) -> None:
        """Close kept-alive connections idle for keepalive_timeout_s. A connection first seen idle by a
        sweep is stamped with the sweep's time (no clock read per request) and lets its timer and its
        parser go (it needs neither until its next request)."""
        self._sweep = None
        now = self.loop.time()
        limit = self.settings.keepalive_timeout_s
        expired = []
        for conn in self.connections:
            if not conn.idle():
                continue
            if not conn.idle_since:
                conn.idle_since = now
                conn.deadline.cancel()
                conn.parser = None
            elif limit > 0 and now - conn.idle_since >= limit:
                expired.append(conn)
        for conn in expired:
            conn._close_quietly()
        if self.connections:
            self._sweep = self.loop.call_later(KEEPALIVE_SWEEP_S, self.sweep_idle)

    def vm_gone(self, vm_id: str) -> None:
        self.pool.close_vm(vm_id)
        if self.h2c_pool is not None:
            self.h2c_pool.close_vm(vm_id)
        for conn in list(self.connections):
            conn.vm_gone(vm_id)

    def share_revoked(self, vm_id: str, port: int) -> None:
        """A share was revoked: requests and tunnels to that port of the VM end now."""
        for conn in list(self.connections):
            conn.vm_gone(vm_id, port)

    def url_key_rotated(self, vm_id: str) -> None:
        """A VM's URL key was rotated: what its old signed URLs let in (WebSockets, streams) ends now, as
        the URLs themselves do."""
        for conn in list(self.connections):
            conn.signed_access_ended(vm_id)

    async def drain(self, grace_s: float) -> None:
        """Finish what is in flight, then close: idle connections at once, busy ones after their
        response, tunnels with a WebSocket close frame; whatever remains after the grace is cut."""
        self.draining = True
        self._drained = asyncio.Event()
        for conn in list(self.connections):
            conn.drain()
        if self.connections:
            try:
                async with asyncio.timeout(grace_s):
                    await self._drained.wait()
            except TimeoutError:
                log.warning("drain: %d connections still open after %.1f s, closing them",
                            len(self.connections), grace_s)  # fmt: skip
        for conn in list(self.connections):
            conn.abort()

    def connection_closed(self, conn: EdgeProtocol) -> None:
        self.connections.discard(conn)
        for ended in self.connection_ended:
            ended(conn)
        if self._drained is not None and not self.connections:
            self._drained.set()


class EdgeProtocol(asyncio.Protocol):
    # Slots: an idle keep-alive connection is this object, its parser and its deadline; a __dict__
    # would be the largest part of it.
    __slots__ = (
        "can_write",
        "client_info",
        "closing",
        "current",
        "deadline",
        "draining",
        "early_tunnel_data",
        "edge",
        "ended_in_read",
        "framing_bytes",
        "h2",
        "h2_stream",
        "head_fresh",
        "head_limit",
        "head_seen",
        "head_timed",
        "idle_since",
        "in_head",
        "linger_left",
        "lingering",
        "loop",
        "parser",
        "parsing",
        "peer_ip",
        "pending",
        "read_had_body",
        "reading_paused",
        "scheme",
        "send_backlog",
        "send_deadline",
        "settings",
        "silence_deadline",
        "sni_name",
        "task",
        "task_start",
        "transport",
        "trusted",
        "tunnel",
    )

    def __init__(self, edge: Edge, *, tls: bool = False, h2_stream: bool = False) -> None:
        self.edge = edge
        # One HTTP/2 stream's exchange (its transport is the stream: gateway/edge/http2.py), or a
        # connection that switched to HTTP/2 (then h2 is its session).
        self.h2_stream = h2_stream
        self.h2: Http2Session | None = None
        self.settings = edge.settings
        # The scheme clients used: https on the TLS listener; else what server.public_url says (a TLS
        # load balancer in front may make the plain listener public as https).
        self.scheme = "https" if tls else edge.settings.scheme
        self.sni_name: bytes | None = None  # the name the TLS client asked for, if any
        self.loop = edge.loop
        self.transport: asyncio.Transport | None = None
        # None while idle past a keep-alive sweep (about 0.9 KiB: the parser holds a bound method per
        # callback); made again by the next read, between two requests, so nothing of its state is lost.
        self.parser: RequestParser | None = self._new_parser()
        self.peer_ip = ""
        self.trusted = False
        self.pending: list[Exchange] = []  # parsed, waiting for the current one (a deque is 600 bytes)
        self.parsing: Exchange | None = None  # the request whose body the parser is reading
        self.current: Exchange | None = None  # the request being answered
        self.task: asyncio.Task[None] | None = None  # a route lookup or upstream connect, if any
        self.task_start: Callable[[], Coroutine[Any, Any, None]] | None = None
        self.in_head = False
        # Kept-alive and idle since this sweep's time (0: busy, or idle and not seen by a sweep yet).
        self.idle_since = 0.0
        # Raw bytes of the request head so far, counted as they arrive: the parser holds a header line's
        # pieces until it ends, so an endless line must be cut by count.
        self.head_seen = 0
        self.head_fresh = False  # the head began in the read being parsed
        self.ended_in_read = False  # a request ended in the read being parsed
        self.head_limit = edge.head_limit
        # A chunked body's reads that carried none of it, in bytes since the last that did (see
        # _count_framing); whether the read being parsed carried body.
        self.framing_bytes = 0
        self.read_had_body = False
        self.can_write = True
        self.reading_paused = False
        # The connection's state decides what an expiry means (see _deadline_expired): a request head
        # due, the app's answer due (or upload progress), or keep-alive idleness. One timer serves all
        # three, so an idle connection holds one; each new deadline is usually later than the timer.
        self.deadline = Deadline(self.loop, self._deadline_expired)
        self.head_timed = False  # the deadline currently times a request head
        # A streaming response's or a tunnel's idleness, when limited; made on first use.
        self.silence_deadline: Deadline | None = None
        # Output pending that the client does not take (see pause_writing); made on first use.
        self.send_deadline: Deadline | None = None
        self.send_backlog = 0
        self.client_info: hdr.ClientInfo | None = None
        self.tunnel: Tunnel | None = None  # after a 101: the connection is a tunnel from then on
        self.early_tunnel_data = b""
        self.closing = False
        self.draining = False
        self.lingering = False  # closing, but reading (and discarding) what the client still sends
        self.linger_left = 0

    # connection -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream server's: it writes
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            name = getattr(ssl_object, "sni_name", None)  # set by the SNI table's callback
            self.sni_name = name.lower().encode("ascii") if name else None
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else "unix"
        self.trusted = self.peer_ip in self.settings.trusted_proxies
        # No TCP_NODELAY here: uvloop's TCP transports set it (TCPTransport.new), as asyncio's do; and
        # the socket's wrapper, once asked for, would stay with the connection.
        if len(self.edge.connections) >= self.settings.max_connections or self.edge.draining:
            # Refused cleanly rather than left unaccepted in the backlog: the client learns at once.
            self.closing = True
            code = "shutting_down" if self.edge.draining else "too_many_connections"
            status, message = edge_error(code)
            self.transport.write(pages.error_response(status, code, message, accept=None, close=True))
            self.transport.close()
            return
        self.edge.connections.add(self)
        if (
            ssl_object is not None and not self.h2_stream and ssl_object.selected_alpn_protocol() == "h2"
            and self._to_http2(b"")
        ):  # fmt: skip
            return
        self.deadline.start(self.settings.header_timeout_s)
        self.head_timed = True

    def _to_http2(self, data: bytes) -> bool:
        """The client speaks HTTP/2 (ALPN h2, or the h2c preface in ``data``): the session takes the
        transport over; this object stays as its owner in the edge's connections, parsing nothing."""
        start = self.edge.start_h2
        if start is None:
            return False
        self.closing = True
        self.deadline.cancel()
        self.parser = None
        self.h2 = start(self, data)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge.connection_closed(self)
        self.deadline.cancel()
        if self.silence_deadline is not None:
            self.silence_deadline.cancel()
        if self.send_deadline is not None:
            self.send_deadline.cancel()
        self.transport = None
        if self.tunnel is not None:
            self.tunnel.close()
            self.edge.stats.tunnels_open -= 1
        ex = self.current
        if ex is not None and not ex.finished:
            if ex.upstream is not None:
                ex.upstream.close()  # the client left: the VM's request ends too (SSE, long polls)
            ex.finished = True
            if not ex.tunnel:
                ex.status = ex.status or CLIENT_CLOSED  # cut before (or while) the answer went out
            self.edge.observe(ex, self.peer_ip)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            if self.lingering:
                self._discard(len(data))
            return  # answered and closing: nothing more on this connection is parsed
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        parser = self.parser
        if parser is None:
            parser = self.parser = self._new_parser()
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self.early_tunnel_data += data[offset:]
            self.pause_reading()  # nothing more is parsed: the rest belongs to the tunnel
        except httptools.HttpParserError as exc:
            if data.startswith(H2_PREFACE_START) and self._may_switch() and self._to_http2(data):
                return
            self._protocol_error("bad_request", f"malformed request: {exc}")
            return
        ex = self.parsing
        if ex is not None and ex.chunked_in and not self._count_framing(len(data)):
            return
        self.read_had_body = False
        # Requests start once this read is parsed: a framing error anywhere in it is answered before
        # any of it reaches an app.
        if self.current is None and self.pending and not self.closing:
            self._begin(self.pending.pop(0))
        if self.in_head:
            self._head_in_progress(len(data))
        if self.ended_in_read:
            self.ended_in_read = False
        ex = self.parsing
        if ex is not None and ex.content_length is not None:
            left = ex.content_length - ex.sent_bytes
            if left >= PUMP_MIN_BYTES:
                self._pump(ex, left)

    # a long request body, pumped up (gateway/edge/pump.py) -----------------------------------------

    def _pump(self, ex: Exchange, left: int) -> None:
        """The rest of a long request body goes to the app through a pump, when both sides allow it (a
        plain connection: TLS and HTTP/2 streams keep the plain path)."""
        transport = self.transport
        if (
            transport is None or ex is not self.current or self.closing or self.tunnel is not None
            or self.h2_stream or not ex.can_pump_up() or transport.get_extra_info("ssl_object") is not None
        ):  # fmt: skip
            return
        self.edge.pumped += 1
        transport.set_protocol(BodyPump(self, left))

    def pumped(self, data: memoryview) -> None:
        ex = self.parsing
        if self.closing:
            if self.lingering:
                self._discard(len(data))  # answered early: the rest of the body is read and dropped
            return
        if ex is not None:
            ex.on_pumped_upload(data)

    def pump_holds(self) -> bool:
        ex = self.parsing
        return ex is not None and ex.app_holds_body()

    def pump_done(self) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.set_protocol(self)
        self.parser = None  # it never saw the body's rest: the next request gets a fresh one
        self.on_message_complete()
        self.ended_in_read = False
        self.read_had_body = False

    def _count_framing(self, read: int) -> bool:
        """A chunked body is being read. Its trailers are headers the parser holds until each ends, so
        reads that carry none of the body (chunk sizes, trailers) count like a head's bytes: endless
        trailers are cut as an endless head is. False when they were."""
        if self.read_had_body:
            self.framing_bytes = 0
            return True
        self.framing_bytes += read
        if self.framing_bytes > self.head_limit:
            self._protocol_error("headers_too_large", "request trailers too large")
            return False
        return True

    def _may_switch(self) -> bool:
        """Nothing of HTTP/1.1 is under way (the h2c preface may start a connection only)."""
        return self.current is None and not self.pending and not self.h2_stream and self.tunnel is None

    def _head_in_progress(self, read: int) -> None:
        """A read ended inside a request head (split over packets; a whole head moves nothing here)."""
        if not self.head_fresh:
            self.head_seen += read
        elif not self.ended_in_read:
            self.head_fresh = False
            self.head_seen = read  # the head began this read (at most a few CRLFs before it)
        else:
            # After another request in the same read (pipelining): where this head began is not known.
            # The parts parsed so far are a lower bound; the rest is at most one read, held once.
            self.head_fresh = False
            self.head_seen = self.parser.parsed_bytes() if self.parser is not None else 0
        if self.head_seen > self.head_limit:
            self._protocol_error("headers_too_large", "request head too large")
            return
        if self.current is None and not self.head_timed:
            self.deadline.start(self.settings.header_timeout_s)
            self.head_timed = True

    def pause_writing(self) -> None:
        self.can_write = False
        if self.tunnel is not None:
            self.tunnel.client_paused()
        if self.settings.send_timeout_s > 0 and self.transport is not None:
            # The other side is paused now, so the backlog only shrinks while the client reads.
            if self.send_deadline is None:
                self.send_deadline = Deadline(self.loop, self._send_timed_out)
            self.send_backlog = self.transport.get_write_buffer_size()
            self.send_deadline.start(self.settings.send_timeout_s)

    def _send_timed_out(self) -> None:
        """The client took nothing of its pending output for send_timeout_s: drop it (nginx's
        send_timeout), which also frees the VM's side. Progress, however slow, re-arms the timer."""
        transport = self.transport
        if transport is None or self.can_write:
            return
        backlog = transport.get_write_buffer_size()
        if backlog < self.send_backlog:
            self.send_backlog = backlog
            assert self.send_deadline is not None
            self.send_deadline.start(self.settings.send_timeout_s)
            return
        self.closing = True
        transport.abort()  # close() would wait for the buffer to drain, which is what never happens

    def resume_writing(self) -> None:
        self.can_write = True
        if self.send_deadline is not None:
            self.send_deadline.stop()
        if self.tunnel is not None:
            self.tunnel.client_resumed()
            return
        ex = self.current
        if ex is not None and ex.upstream is not None and ex.upstream.sink is ex:
            ex.upstream.resume_reading()  # (not once it went back to the pool: it serves others there)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def activity(self) -> None:
        deadline = self.silence_deadline
        if deadline is not None and deadline.armed:
            deadline.touch()

    def upload_progress(self) -> None:
        # Each counts only while it measures silence (start_idle): the body is still streaming up.
        self.deadline.touch()
        if self.silence_deadline is not None:
            self.silence_deadline.touch()

    # deadlines ------------------------------------------------------------------------------------

    def _silence_deadline(self) -> Deadline:
        if self.silence_deadline is None:
            self.silence_deadline = Deadline(self.loop, self._close_quietly)
        return self.silence_deadline

    def _close_quietly(self) -> None:
        """Stream or tunnel idleness: the connection just ends."""
        if self.transport is not None:
            self.closing = True
            self.transport.close()

    def _deadline_expired(self) -> None:
        if self.transport is None:
            return
        if self.lingering:
            self.transport.close()  # the client stopped sending the rest: done waiting for it
            return
        ex = self.current
        if ex is None:
            self._close_quietly()  # the request head is late, or keep-alive idleness
        elif not ex.head_received and not ex.finished:
            self._drop_upstream(ex)
            self._reply(ex, "upstream_timeout", close=True)

    # the request side (the parser's calls: gateway/edge/http1.py) -----------------------------------

    def _new_parser(self) -> RequestParser:
        settings = self.settings
        return _REQUEST_PARSER(
            self, settings.routing.max_target_bytes, settings.max_header_count, settings.max_header_bytes
        )

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_fresh = True

    def on_head_limit(self, code: str) -> None:
        if code == "uri_too_long":
            limit = self.settings.routing.max_target_bytes
            self._protocol_error(code, f"the request target is longer than {limit} bytes")
        else:
            self._protocol_error(code)

    def on_request(
        self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool, upgrade: bool,
        http10: bool, classes: bytes,
    ) -> None:  # fmt: skip
        self.in_head = False
        self.head_timed = False
        self.framing_bytes = 0
        ex = Exchange(self, method, url, headers, keep_alive, upgrade, http10, classes)
        self.parsing = ex
        self.pending.append(ex)

    def on_body(self, body: bytes) -> None:
        self.read_had_body = True
        if self.parsing is not None:
            self.parsing.feed_body(body)

    def on_message_complete(self) -> None:
        self.ended_in_read = True
        ex = self.parsing
        self.parsing = None
        if ex is None:
            return
        ex.end_body()
        if ex.finished and ex is self.current and not self.closing and self.transport is not None:
            self._next(ex)  # answered before its body ended (e.g. a rejection of a GET)
        elif len(self.pending) >= MAX_PIPELINED:
            self.pause_reading()

    # one exchange ---------------------------------------------------------------------------------

    def _begin(self, ex: Exchange) -> None:
        self.current = ex
        self.idle_since = 0.0
        # Covers the route lookup and the connect too; restarted when the request is sent.
        self.deadline.start(self.settings.first_byte_timeout_s)
        try:
            self._route(ex)
        except Exception:
            log.exception("edge exchange failed")
            self._abort_exchange(ex)

    def _route(self, ex: Exchange) -> None:
        edge = self.edge
        incoming = ex.incoming_request_id
        ex.request_id = incoming if incoming and self.trusted else edge.next_request_id()
        target = edge.parse_target(ex.method, ex.url, ex.host)
        if ex.sandbox_routing is not None and type(target) is ApiTarget:
            target = header_form(ex.url, target, ex.sandbox_routing)
        decision = edge.policy.before_lookup(target, ex.url, self.scheme, self.sni_name)
        if type(decision) is AppTarget:
            if ex.upgrade and hdr.upgrade_protocol(ex.headers) == b"h2c":
                ex.upgrade = False  # not offered: the request goes on as HTTP/1.1 (RFC 9113 drops h2c)
            ex.kind = decision.kind
            key = decision.key
            ex.route_id = decision.route_id
            route = edge.resolver.peek(key)
            if route is MISS:
                self._spawn(lambda: self._resolve_then_route(ex, decision, key))
            else:
                self._routed(ex, decision, route)  # type: ignore[arg-type]
        elif type(decision) is ApiTarget:
            if ex.upgrade and hdr.upgrade_protocol(ex.headers) == b"h2c":
                ex.upgrade = False
            ex.kind = "api"
            if edge.api_rates is not None and ex.has_credentials and self._over_key_rate(ex, edge.api_rates):
                return
            head = self._request_head(ex, ex.url, self._forwarded(ex, decision.host, None))
            self._send(ex, edge.pool, edge.api_address, head)
        else:
            self._carry_out(ex, decision)

    def _over_key_rate(self, ex: Exchange, rates: KeyRates) -> bool:
        """Whether the request's API key is over its rate (then answered 429 here)."""
        key = access.platform_key(ex.headers)
        if key is None:
            return False
        wait = rates.retry_after(token_hash(key), self.loop.time())
        if not wait:
            return False
        self._reply(ex, "too_many_requests", extra=((b"Retry-After", b"%d" % wait),))
        return True

    async def _resolve_then_route(self, ex: Exchange, target: AppTarget, key: CacheKey) -> None:
        try:
            route = await self.edge.resolver.resolve(key)
        except GatewayError as exc:
            self._reply(ex, "store_unavailable", f"routing unavailable: {exc}")
            return
        if self.current is ex and self.transport is not None:
            self._routed(ex, target, route)

    def _routed(self, ex: Exchange, target: AppTarget, route: Route | None) -> None:
        ex.max_body = self.settings.max_body_bytes
        decision = self.edge.policy.after_lookup(
            target, route, ex.url, ex.headers, self.scheme, ex.max_body, ex.content_length, ex.sent_bytes
        )
        if type(decision) is not bytes:
            if decision is WAKE:
                assert route is not None
                self._spawn(lambda: self._wake_then_route(ex, target, route))
            else:
                self._carry_out(ex, decision)  # type: ignore[arg-type]
            return
        assert route is not None
        cap = self.settings.max_exchanges_per_vm
        own = route.max_exchanges
        if own and (not cap or own < cap):
            cap = own  # the VM's own cap, under the operator's ceiling
        use = self.edge.traffic.started(route.vm_id, cap)
        if use is None:
            self._reply(ex, "too_many_vm_exchanges", extra=RETRY_AFTER_1)
            return
        # From here on the exchange counts for the VM (Edge.observe ends it).
        ex.vm_id, ex.port, ex.vm_use = route.vm_id, route.port, use
        tokens = route.tokens
        if tokens is not None and route.url_key is not None:
            # A private app that signs URLs: was it a signature (or its cookie) that let this in?
            ex.signed = not access.opens(ex.headers, tokens, route.cookies, bearer=route.bearer)
        use.active = ACTIVITY_HTTP  # a request that reaches it: client activity
        headers = self._forwarded(ex, target.host, target.prefix)
        if ex.sandbox_routing is not None:
            headers = hdr.strip_sandbox_routing(headers)
        app_host = route.app_host
        if app_host is not None:  # the share's "localhost" policy: the public host is in X-Forwarded-Host
            headers = hdr.with_host(headers, app_host)
        if ex.has_credentials:
            token_headers = access.BEARER_TOKEN_HEADERS if route.bearer else access.TOKEN_HEADERS
            headers = hdr.strip_gateway_credentials(headers, access.COOKIE_NAMES, token_headers)
        pool = self.edge.pool
        if self.h2_stream and hdr.is_grpc(ex.headers):
            # gRPC needs HTTP/2 to the app as well (its trailers, its streaming): h2c to the VM.
            h2c_pool = self.edge.h2c_pool
            if h2c_pool is not None:
                pool = h2c_pool
        head = self._request_head(ex, decision, headers)
        self._send(ex, pool, route.upstream, head)

    async def _wake_then_route(self, ex: Exchange, target: AppTarget, route: Route) -> None:
        """Its VM is suspended and wakes on demand: ask for it (again every WAKE_ASK_S) and hold the
        request until the route says it runs, at most wake_timeout_s."""
        edge = self.edge
        self.deadline.stop()  # the wait has its own limit; the first-byte one starts again after it
        give_up = self.loop.time() + self.settings.wake_timeout_s
        ask_at = 0.0
        while route.suspended:
            now = self.loop.time()
            if now >= give_up:
                self._reply(ex, "vm_wake_timeout")
                return
            if now >= ask_at and edge.waker is not None:
                with contextlib.suppress(GatewayError):
                    await edge.waker.request_wake(route.vm_id)
                ask_at = now + WAKE_ASK_S
            await asyncio.sleep(WAKE_POLL_S)
            if self.current is not ex or self.transport is None:
                return
            try:
                found = await edge.resolver.resolve(target.key)
            except GatewayError:
                continue
            if found is None:
                self._routed(ex, target, None)  # it ended meanwhile
                return
            route = found
        self.deadline.start(self.settings.first_byte_timeout_s)
        self._routed(ex, target, route)

    def _carry_out(self, ex: Exchange, decision: Reply | Redirect) -> None:
        """An answer the edge makes itself."""
        if isinstance(decision, Redirect):
            cookie = (decision.cookie,) if decision.cookie is not None else ()
            self._redirect(ex, decision.status, decision.location, cookie)
        else:
            self._reply(ex, decision.code, decision.message, close=decision.close)

    def _forwarded(self, ex: Exchange, host: bytes, prefix: bytes | None) -> list[tuple[bytes, bytes]]:
        client = self.client_info
        if client is None or client.host != host:
            # Kept per connection (a client sends the same Host on every request) and shared between
            # connections: the many idle connections of one client hold one ClientInfo.
            client = self.client_info = self.edge.client_info(self.peer_ip, self.scheme, host, self.trusted)
        return hdr.forwarded_headers(ex.headers, client, prefix, ex.header_classes)

    def _send(self, ex: Exchange, pool: UpstreamPool, address: UpstreamAddress, head: bytes) -> None:
        conn = pool.take_idle(address)
        if conn is None:
            self._spawn(lambda: self._connect_then_send(ex, pool, address, head))
        else:
            self._attach(ex, conn, head)

    async def _connect_then_send(
        self, ex: Exchange, pool: UpstreamPool, address: UpstreamAddress, head: bytes
    ) -> None:
        try:
            conn = await pool.connect(address)
        except TimeoutError:
            self.edge.stats.connect_failed("timeout")
            self._reply(ex, "upstream_connect_timeout")
            return
        except OSError:
            self.edge.stats.connect_failed("refused")
            self._reply(ex, "upstream_refused")
            return
        if self.current is not ex or self.transport is None:
            conn.close()
            return
        self._attach(ex, conn, head)

    def _attach(self, ex: Exchange, conn: UpstreamConnection, head: bytes) -> None:
        ex.attach(conn, head)
        if ex.has_body and not ex.body_done:
            # While a body streams up, the limit is on silence (a 1 GiB upload may take minutes);
            # the answer is timed from the body's end (request_sent).
            self.deadline.start_idle(self.settings.first_byte_timeout_s)
            if self.parsing is ex:
                self.resume_reading()  # a body buffered while routing may have paused reading
        elif self.task is not None:
            self.deadline.start(self.settings.first_byte_timeout_s)  # after a lookup or a connect

    def _spawn(self, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``start()`` as the connection's task. The coroutine is made only when the task runs: a task
        cancelled before its first step (the client left) leaves no coroutine that was never awaited."""
        self.task_start = start
        self.task = self.loop.create_task(self._guarded(start))

    async def _guarded(self, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
        ex = self.current
        try:
            await start()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("edge exchange failed")
            if ex is not None:
                self._abort_exchange(ex)
        finally:
            if self.task_start is start:  # not when this task started the next one (lookup -> connect)
                self.task = self.task_start = None

    # progress reported by the exchange -----------------------------------------------------------

    def request_sent(self, ex: Exchange) -> None:
        if self.current is ex and not ex.head_received and ex.has_body:
            self.deadline.start(self.settings.first_byte_timeout_s)

    def response_started(self, ex: Exchange) -> None:
        if self.current is ex:
            self.deadline.stop()
            if self.settings.stream_idle_timeout_s > 0:
                self._silence_deadline().start_idle(self.settings.stream_idle_timeout_s)

    def response_complete(self, ex: Exchange) -> None:
        self._finish(ex, ex.keep_alive and not ex.upgrade)  # a refused upgrade: the rest is not HTTP

    def upstream_lost(self, ex: Exchange, exc: Exception | None) -> None:
        if ex.tunnel or ex.head_received:
            if self.transport is not None:
                self.transport.close()  # mid-response or a tunnel: the client sees the end too
            return
        if isinstance(exc, BadResponse):
            self._reply(ex, exc.code, exc.message)
            return
        self._reply(ex, "upstream_closed")

    def upstream_writable(self, ex: Exchange) -> None:
        if ex.tunnel or self.parsing is ex:
            self.resume_reading()  # the VM's socket has room for more of the tunnel or the body

    def bad_upgrade(self, ex: Exchange) -> None:
        """A 101 without a valid handshake for what was asked: no tunnel, a 502, and both sides closed."""
        ex.head_received = False
        self._drop_upstream(ex)
        self._reply(ex, "upstream_bad_upgrade", close=True)

    def body_too_large(self, ex: Exchange) -> None:
        """A body passed the route's limit while streaming: 413 if nothing was answered yet, then close."""
        if self.closing:
            return
        self._drop_upstream(ex)
        if not ex.head_received and self.current is ex:
            self._too_large(ex)
        elif self.transport is not None:
            self.closing = True
            self.transport.close()

    def _too_large(self, ex: Exchange) -> None:
        self._carry_out(ex, body_too_large(ex.max_body))

    # ending an exchange ---------------------------------------------------------------------------

    def _reply(
        self,
        ex: Exchange,
        code: str,
        message: str | None = None,
        *,
        close: bool = False,
        extra: hdr.Headers = (),
    ) -> None:
        """Answer with an edge-made error page (see gateway.errors.EDGE_ERRORS)."""
        if self.transport is None or self.current is not ex:
            return
        status, default_message = edge_error(code)
        message = message or default_message
        keep = ex.keep_alive and not close and not ex.upgrade and not self.draining
        ex.status, ex.code = status, code
        response = pages.error_response(
            status, code, message, accept=ex.accept(), close=not keep, head_only=ex.method == b"HEAD",
            keep_alive_http10=keep and ex.http10, extra_headers=extra,
        )  # fmt: skip
        self.transport.write(response)
        self._finish(ex, keep)

    def _redirect(self, ex: Exchange, status: int, location: bytes, extra: hdr.Headers = ()) -> None:
        assert self.transport is not None
        keep = ex.keep_alive and not self.draining
        ex.status = status
        response = pages.redirect_response(
            status, location, extra_headers=extra, close=not keep, keep_alive_http10=keep and ex.http10
        )
        self.transport.write(response)
        self._finish(ex, keep)

    def _finish(self, ex: Exchange, keep: bool) -> None:
        """The response is complete. Next request, keep-alive wait, or close."""
        if self.current is not ex or ex.finished:
            return
        ex.finished = True
        self.edge.observe(ex, self.peer_ip)
        if self.transport is None:
            return
        if not keep or self.closing or self.draining:
            if not self.closing:
                self._close(linger=self.parsing is not None)
            return
        if not ex.body_done:
            if ex.has_body:
                # Answered before the body ended: the rest of it would have to be read and thrown
                # away; closing is what the client can rely on.
                self._close(linger=True)
            # else: its end arrives in this same parse (on_message_complete moves on)
            return
        self._next(ex)

    def _close(self, *, linger: bool) -> None:
        """Close once the answer is out. ``linger``: the client may still be sending (a body or a head
        the edge stopped reading), and a socket closed with unread input is reset, which can destroy
        the answer before the client reads it (a client that writes its whole body first sees only a
        reset). So first half-close, and read and discard what still comes, for a bounded time and
        number of bytes (RFC 9112 section 9.6; nginx's lingering close)."""
        self.closing = True
        transport = self.transport
        if transport is None:
            return
        if not linger:
            transport.close()
            return
        self.lingering = True
        self.linger_left = LINGER_MAX_BYTES
        if transport.can_write_eof():
            transport.write_eof()  # after the answer: the client sees its end, and nothing after it
        self.deadline.start_idle(LINGER_IDLE_S)
        self._silence_deadline().start(LINGER_TOTAL_S)
        self.resume_reading()

    def _discard(self, size: int) -> None:
        self.linger_left -= size
        self.deadline.touch()
        if self.linger_left <= 0 and self.transport is not None:
            self.transport.close()

    def _next(self, ex: Exchange) -> None:
        self.current = None
        if self.silence_deadline is not None:
            self.silence_deadline.stop()
        if self.pending:
            # On the next turn of the loop: the VM's connection that just answered goes back to the
            # pool when this returns, and the next request takes it instead of dialling another.
            self.loop.call_soon(self._begin_pending)
            return
        if self.in_head:
            self.deadline.start(self.settings.header_timeout_s)
            self.head_timed = True
        else:
            # Idle: the sweep times keep-alive (Edge.sweep_idle). Nothing of the finished request stays
            # (the parser let its target and header list go; the exchange went with ``current``).
            self.deadline.stop()
            self.edge.went_idle()
        self.resume_reading()

    def idle(self) -> bool:
        """Kept alive and waiting for a request that has not begun (the keep-alive sweep's case)."""
        return (
            self.current is None and not self.in_head and not self.head_timed and not self.pending
            and self.tunnel is None and not self.closing and self.transport is not None
        )  # fmt: skip

    def _begin_pending(self) -> None:
        if not self._pending_can_begin():
            return  # begun by a read meanwhile, or the connection is ending
        self._begin(self.pending.pop(0))
        if self.current is not None and len(self.pending) < MAX_PIPELINED and self.parsing is None:
            self.resume_reading()

    def _pending_can_begin(self) -> bool:
        # A method of its own: checked inline, self.current would stay narrowed to None after _begin set
        # it, and the compiled edge takes mypy's narrowing for a fact (gateway/edge/twin.py).
        return self.current is None and bool(self.pending) and not self.closing and self.transport is not None

    def _drop_upstream(self, ex: Exchange) -> None:
        conn = ex.upstream
        if conn is not None:
            conn.sink = None  # its loss is not news: the client is answered here
            conn.close()

    def _abort_exchange(self, ex: Exchange) -> None:
        self._drop_upstream(ex)
        if self.transport is not None:
            self.closing = True
            self.transport.close()

    def _protocol_error(self, code: str, message: str | None = None) -> None:
        """Answer a malformed request and close: after a framing error nothing on it is trusted."""
        status, default_message = edge_error(code)
        message = message or default_message
        if self.closing:
            return  # already answered (e.g. 431 from a callback, then the parser's own error)
        self.closing = True
        if self.transport is not None:
            ex = self.current
            if ex is None or ex.finished or not ex.head_received:
                if ex is not None and not ex.finished:
                    self._drop_upstream(ex)  # the app saw at most the start of it: it is cut short
                self.transport.write(pages.error_response(status, code, message, accept=None, close=True))
                self._close(linger=True)  # the client may still be sending what made it wrong
            else:
                self.transport.close()  # mid-response: the client sees the answer cut

    def _request_head(self, ex: Exchange, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        if ex.chunked_in:
            headers.append((b"Transfer-Encoding", b"chunked"))
        elif ex.content_length is not None:
            headers.append((b"Content-Length", b"%d" % ex.content_length))
        if ex.upgrade:
            headers.append((b"Connection", b"Upgrade"))
            headers += [(n, v) for n, v in ex.headers if n.lower() == b"upgrade"]
        if not (self.trusted and ex.incoming_request_id):  # a trusted proxy's id is kept as it came
            headers.append((b"X-Request-Id", ex.request_id))
        return _REQUEST_HEAD(ex.method, target, headers)

    # VM gone, drain -------------------------------------------------------------------------------

    def vm_gone(self, vm_id: str, port: int | None = None) -> None:
        """The VM ended (or, with ``port``, that port's share was revoked): an exchange with it ends."""
        ex = self.current
        if (
            ex is not None
            and ex.vm_id == vm_id
            and (port is None or ex.port == port)
            and self.transport is not None
        ):
            self.transport.close()

    def signed_access_ended(self, vm_id: str) -> None:
        ex = self.current
        if ex is not None and ex.signed and ex.vm_id == vm_id and self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        """Stop taking requests on this connection: close it now if idle, else after its response."""
        self.draining = True
        h2 = self.h2
        if h2 is not None:
            h2.drain()  # GOAWAY: the streams under way finish
            return
        if self.transport is None:
            return
        if self.tunnel is not None:
            self.tunnel.shut_down()
        elif self.current is None and not self.in_head and not self.pending:
            self.closing = True
            self.transport.close()
        # else: the response in flight carries Connection: close (if its head is not out yet) and the
        # connection closes when it is complete (_finish)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.tunnel is not None:
            self.tunnel.close()

    # tunnel ---------------------------------------------------------------------------------------

    def start_tunnel(self, ex: Exchange, *, extensions: bool = False) -> None:
        """The VM accepted an upgrade: from now on bytes flow unparsed both ways (``extensions``: the VM
        accepted a WebSocket extension)."""
        conn = ex.upstream
        assert conn is not None and self.transport is not None
        settings = self.settings
        self.tunnel = tunnel = Tunnel(
            self, ex, conn, websocket=hdr.is_websocket_upgrade(ex.headers), extensions=extensions,
            max_frame=settings.ws_max_frame_bytes, max_message=settings.ws_max_message_bytes,
        )  # fmt: skip
        edge = self.edge
        edge.stats.tunnels_open += 1
        edge.stats.tunnels_opened += 1
        use = ex.vm_use
        if use is not None:
            use.tunnels += 1
        self.deadline.stop()
        if settings.tunnel_idle_timeout_s > 0:
            self._silence_deadline().start_idle(settings.tunnel_idle_timeout_s)
        if self.early_tunnel_data:
            data, self.early_tunnel_data = self.early_tunnel_data, b""
            tunnel.from_client(data)
        self.resume_reading()
        if self.draining:
            tunnel.shut_down()

    def close_after_answer(self) -> None:
        """Close once what is written is out, reading what the client still sends for a while."""
        self._close(linger=True)
