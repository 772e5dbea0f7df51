"""The client side of the edge: one asyncio protocol per connection, parsing with httptools (llhttp).

Each request becomes an ``Exchange``: the target is decided by the pure ``target.parse_target`` as soon
as the head is parsed, the route is resolved, an upstream connection is taken from the pool, and from
then on bytes flow by callbacks in both directions: body chunks are re-framed (never passed through as
raw framing), and each side's flow control pauses the other. Requests on one connection are served in
order; reading pauses after a complete request until its response is done.
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
from collections import deque
from dataclasses import dataclass

import httptools

from gateway.edge import access, pages
from gateway.edge import headers as hdr
from gateway.edge.resolver import Resolver, Route
from gateway.edge.target import ApiTarget, AppTarget, Rejection, RoutingConfig, parse_target
from gateway.edge.upstream import UpstreamConnection, UpstreamPool
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

BODY_BUFFER_HIGH = 256 * 1024


@dataclass(frozen=True)
class EdgeSettings:
    routing: RoutingConfig
    api_socket: str
    scheme: str = "http"
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    first_byte_timeout_s: float = 60.0
    max_header_count: int = 100
    max_header_bytes: int = 32 * 1024
    max_connections: int = 10000
    trusted_proxies: frozenset[str] = frozenset()


class Edge:
    """What every connection of one edge process shares."""

    def __init__(self, settings: EdgeSettings, resolver: Resolver, pool: UpstreamPool) -> None:
        self.settings = settings
        self.resolver = resolver
        self.pool = pool
        self.connections: set[EdgeProtocol] = set()
        # Kept: asyncio.get_running_loop() costs a getpid() system call per use on Python 3.11.
        self.loop = asyncio.get_running_loop()
        resolver.on_vm_gone.append(self.vm_gone)

    def vm_gone(self, vm_id: str) -> None:
        self.pool.close_vm(vm_id)
        for conn in list(self.connections):
            conn.vm_gone(vm_id)


def _status_line(status: int, reason: bytes | None = None) -> bytes:
    if reason is None:
        try:
            reason = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def _head(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)


class Exchange:
    """One request and its response."""

    def __init__(self, proto: EdgeProtocol, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]],
                 version: str, keep_alive: bool, upgrade: bool) -> None:  # fmt: skip
        self.proto = proto
        self.method = method
        self.url = url
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        names = {name.lower(): value for name, value in headers}
        self.accept = names.get(b"accept")
        self.chunked_in = b"transfer-encoding" in names
        self.has_body = self.chunked_in or int(names.get(b"content-length", b"0") or 0) > 0
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.body_done = False
        self.upstream: UpstreamConnection | None = None
        self.vm_id: str | None = None
        self.head_sent = False
        self.pending_head = b""
        self.chunked_out = False
        self.no_body_out = False
        self.tunnel = False
        loop = proto.edge.loop
        self.done = loop.create_future()
        self.head_received = loop.create_future()

    # request body (from the client parser) ---------------------------------------------------------

    def feed_body(self, data: bytes) -> None:
        if self.upstream is not None:
            self._send_body(data)
            if not self.upstream.can_write:
                self.proto.pause_reading()
            return
        self.body.append(data)
        self.body_bytes += len(data)
        if self.body_bytes > BODY_BUFFER_HIGH:
            self.proto.pause_reading()

    def end_body(self) -> None:
        self.body_done = True
        if self.upstream is not None and self.chunked_in:
            self.upstream.write(b"0\r\n\r\n")

    def _send_body(self, data: bytes) -> None:
        assert self.upstream is not None
        if self.chunked_in:
            self.upstream.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.upstream.write(data)

    def attach(self, conn: UpstreamConnection, head: bytes) -> None:
        self.upstream = conn
        conn.start(self, head, head_only=self.method == b"HEAD")
        for chunk in self.body:
            self._send_body(chunk)
        self.body.clear()
        if self.body_done and self.chunked_in:
            conn.write(b"0\r\n\r\n")
        self.proto.resume_body(self)

    # ResponseSink ---------------------------------------------------------------------------------

    def on_response_head(self, status: int, version: str, headers: list[tuple[bytes, bytes]]) -> None:
        if not self.head_received.done():
            self.head_received.set_result(None)
        transport = self.proto.transport
        if transport is None:
            return
        if 100 <= status < 200 and status != 101:
            transport.write(_status_line(status) + _head(hdr.response_headers(headers)) + b"\r\n")
            return
        out = hdr.response_headers(headers)
        if status == 101 and self.upgrade:
            upgrade = [(n, v) for n, v in headers if n.lower() == b"upgrade"]
            out += [(b"Connection", b"Upgrade"), *upgrade]
            self.tunnel = True
            self.proto.start_tunnel(self)
        else:
            names = {name.lower() for name, _ in headers}
            self.no_body_out = self.method == b"HEAD" or status in (204, 304)
            if not self.no_body_out and b"content-length" not in names:
                self.chunked_out = True
                out.append((b"Transfer-Encoding", b"chunked"))
            if not self.keep_alive:
                out.append((b"Connection", b"close"))
        self.head_sent = True
        head = _status_line(status) + _head(out) + b"\r\n"
        if self.tunnel:
            transport.write(head)
        else:
            # Held until the body's first bytes or the end of this read from the VM (flush_head), so
            # a small response leaves in one write instead of two.
            self.pending_head = head

    def flush_head(self) -> None:
        if self.pending_head and self.proto.transport is not None:
            self.proto.transport.write(self.pending_head)
        self.pending_head = b""

    def on_response_body(self, data: bytes) -> None:
        transport = self.proto.transport
        if transport is None or self.no_body_out or not data:
            return
        out = b"%x\r\n%s\r\n" % (len(data), data) if self.chunked_out else data
        if self.pending_head:
            out, self.pending_head = self.pending_head + out, b""
        transport.write(out)
        if not self.proto.can_write and self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def on_response_complete(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.tunnel:
            return
        transport = self.proto.transport
        if transport is not None and self.chunked_out:
            self.pending_head += b"0\r\n" + _head(hdr.response_headers(trailers)) + b"\r\n"
        self.flush_head()
        if not self.done.done():
            self.done.set_result(True)

    def on_upstream_lost(self, exc: Exception | None) -> None:
        if self.tunnel and self.proto.transport is not None:
            self.proto.transport.close()  # the VM closed the tunnel: so does the client's side
        if not self.head_received.done():
            self.head_received.set_exception(ConnectionError("upstream closed before answering"))
        if not self.done.done():
            self.done.set_result(False)

    def on_upstream_writable(self) -> None:
        if self.tunnel:
            self.proto.resume_reading()
        else:
            self.proto.resume_body(self)


class EdgeProtocol(asyncio.Protocol):
    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.settings = edge.settings
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = ""
        self.pending: deque[Exchange | Rejection] = deque()
        self.parsing: Exchange | None = None
        self.current: Exchange | None = None
        self.task: asyncio.Task[None] | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.can_write = True
        self.reading_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None
        self.tunnel_to: UpstreamConnection | None = None
        self.early_tunnel_data = b""
        self.closing = False

    # connection -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else "unix"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.edge.connections) >= self.settings.max_connections:
            # Refused cleanly rather than left unaccepted in the backlog: the client learns at once.
            self.closing = True
            message = "too many open connections; try again later"
            self.transport.write(
                pages.error_response(503, "too_many_connections", message, accept=None, close=True)
            )
            self.transport.close()
            return
        self.edge.connections.add(self)
        self._arm(self.settings.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge.connections.discard(self)
        self._stop_timer()
        self.transport = None
        if self.tunnel_to is not None:
            self.tunnel_to.close()
        if self.current is not None and self.current.upstream is not None and not self.current.done.done():
            self.current.upstream.close()  # the client left: the VM's request ends too (SSE, long polls)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # answered and closing: nothing more on this connection is read
        if self.tunnel_to is not None:
            self.tunnel_to.write(data)
            if not self.tunnel_to.can_write:
                self.pause_reading()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self.early_tunnel_data += data[offset:]
            self.pause_reading()  # nothing more is parsed: the rest belongs to the tunnel
        except httptools.HttpParserError as exc:
            self._protocol_error(400, "bad_request", f"malformed request: {exc}")

    def pause_writing(self) -> None:
        self.can_write = False
        if self.tunnel_to is not None and self.tunnel_to.transport is not None:
            self.tunnel_to.transport.pause_reading()

    def resume_writing(self) -> None:
        self.can_write = True
        if self.tunnel_to is not None and self.tunnel_to.transport is not None:
            self.tunnel_to.transport.resume_reading()
            return
        ex = self.current
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.resume_reading()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def resume_body(self, ex: Exchange) -> None:
        """Read more of a request body once its buffer or the VM's socket has room again."""
        if self.parsing is ex:
            self.resume_reading()

    # One lazy timer per connection: arming moves a deadline, and the timer reschedules itself when it
    # fires early, instead of a call_later and a cancel for every request on a keep-alive connection.

    def _arm(self, timeout_s: float) -> None:
        self.deadline = self.edge.loop.time() + timeout_s
        if self.timer is None:
            self.timer = self.edge.loop.call_at(self.deadline, self._timed_out)

    def _disarm(self) -> None:
        self.deadline = None

    def _stop_timer(self) -> None:
        self.deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.deadline is None:
            return
        if self.deadline > self.edge.loop.time():
            self.timer = self.edge.loop.call_at(self.deadline, self._timed_out)
            return
        self.deadline = None
        if self.transport is not None and self.current is None and self.tunnel_to is None:
            self.transport.close()

    def _protocol_error(self, status: int, code: str, message: str) -> None:
        """Answer a malformed request and close: after a framing error nothing on it is trusted."""
        if self.closing:
            return  # already answered (e.g. 431 from a callback, then the parser's own error)
        self.closing = True
        if self.transport is not None:
            if self.current is None:
                self.transport.write(pages.error_response(status, code, message, accept=None, close=True))
            self.transport.close()

    def vm_gone(self, vm_id: str) -> None:
        ex = self.current
        if ex is not None and ex.vm_id == vm_id and self.transport is not None:
            self.transport.close()

    # httptools callbacks --------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self._arm(self.settings.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.settings.routing.max_target_bytes:
            raise httptools.HttpParserError("request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.header_bytes += len(name) + len(value)
        if (
            len(self.headers) > self.settings.max_header_count
            or self.header_bytes > self.settings.max_header_bytes
        ):
            self._protocol_error(431, "headers_too_large", "request headers too large")
            raise httptools.HttpParserError("headers too large")

    def on_headers_complete(self) -> None:
        self._disarm()
        parser = self.parser
        ex = Exchange(
            self, parser.get_method(), self.url, self.headers, parser.get_http_version(),
            parser.should_keep_alive(), parser.should_upgrade(),
        )  # fmt: skip
        self.parsing = ex
        self.pending.append(ex)
        if self.task is None:
            self.task = self.edge.loop.create_task(self._serve_all())

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing.feed_body(body)

    def on_message_complete(self) -> None:
        if self.parsing is not None:
            self.parsing.end_body()
            self.parsing = None
        if self.pending:
            # Pipelined requests wait their turn; reading resumes when the queue is empty again.
            self.pause_reading()

    # serving --------------------------------------------------------------------------------------

    async def _serve_all(self) -> None:
        try:
            while self.pending and self.transport is not None:
                ex = self.pending.popleft()
                assert isinstance(ex, Exchange)
                self.current = ex
                keep = await self._serve(ex)
                self.current = None
                if not keep or self.transport is None or self.closing:
                    if self.transport is not None:
                        self.transport.close()
                    return
                if ex.tunnel:
                    return
            if self.transport is not None:
                self._arm(self.settings.keepalive_timeout_s)
                self.resume_reading()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("edge exchange failed")
            if self.transport is not None:
                self.transport.close()
        finally:
            self.task = None

    def _reply(self, ex: Exchange, status: int, code: str, message: str, *, close: bool = False) -> bool:
        assert self.transport is not None
        keep = ex.keep_alive and not close and not ex.upgrade
        self.transport.write(pages.error_response(status, code, message, accept=ex.accept, close=not keep))
        return keep and ex.body_done

    async def _serve(self, ex: Exchange) -> bool:
        target = parse_target(ex.method, ex.url, _host_header(ex.headers), self.settings.routing)
        if isinstance(target, Rejection):
            if target.location is not None:
                assert self.transport is not None
                self.transport.write(
                    pages.redirect_response(target.status, target.location, close=not ex.keep_alive)
                )
                return ex.keep_alive and ex.body_done
            return self._reply(ex, target.status, target.code, target.message, close=target.status == 400)
        upgrade = hdr.upgrade_protocol(ex.headers) if ex.upgrade else None
        if upgrade == b"h2c":
            ex.upgrade = False
        out_headers = hdr.forwarded_headers(
            ex.headers,
            hdr.ClientInfo(
                self.peer_ip, self.settings.scheme, target.host, self.peer_ip in self.settings.trusted_proxies
            ),
            target.prefix if isinstance(target, AppTarget) else None,
        )
        if isinstance(target, ApiTarget):
            key = ("api", "unix", 0)
            unix_path: str | None = self.settings.api_socket
            request_target = ex.url
        else:
            try:
                route = await self._resolve(target)
            except GatewayError as exc:
                return self._reply(ex, 503, "store_unavailable", f"routing unavailable: {exc}")
            if route is None:
                return self._no_route(ex)
            request_target, token = access.split_token_from_target(target.upstream_target)
            if route.token_sha256 is not None:
                if token is not None:
                    return self._trade_token_for_cookie(ex, target, route, token)
                if not access.token_matches(access.presented_token(ex.headers), route.token_sha256):
                    return self._no_route(ex)  # the same answer as an unknown app: no oracle
            out_headers = hdr.strip_gateway_credentials(out_headers, access.COOKIE_NAMES, access.TOKEN_HEADER)
            ex.vm_id = route.vm_id
            key = (route.vm_id, route.ip, route.port)
            unix_path = None
        try:
            conn = await self.edge.pool.acquire(key, unix_path)
        except TimeoutError:
            return self._reply(
                ex, 504, "upstream_connect_timeout", "the app did not accept a connection in time"
            )
        except OSError:
            return self._reply(ex, 502, "upstream_refused", "nothing is listening on this port in the VM")
        ex.attach(conn, self._request_head(ex, request_target, out_headers))
        try:
            async with asyncio.timeout(self.settings.first_byte_timeout_s):
                await ex.head_received
        except TimeoutError:
            conn.close()
            return self._reply(ex, 504, "upstream_timeout", "the app did not answer in time", close=True)
        except ConnectionError:
            return self._reply(ex, 502, "upstream_closed", "the app closed the connection without answering")
        if ex.tunnel:
            return True
        completed = await ex.done
        if not completed:
            return False  # the VM went away mid-response: the client sees the connection end
        if ex.upgrade:
            return False  # a refused upgrade: the connection's remaining bytes are not HTTP
        return ex.keep_alive and ex.body_done

    def _no_route(self, ex: Exchange) -> bool:
        message = "no such app: the VM does not exist, has ended, or this port is not exposed"
        return self._reply(ex, 404, "no_route", message)

    def _trade_token_for_cookie(self, ex: Exchange, target: AppTarget, route: Route, token: bytes) -> bool:
        """A token in the query: a valid one becomes a cookie, and the client goes to the clean URL."""
        if not access.token_matches(token, route.token_sha256 or ""):
            return self._no_route(ex)
        clean, _ = access.split_token_from_target(ex.url)
        cookie_path = target.prefix + b"/" if target.prefix is not None else b"/"
        cookie = access.cookie_header(token, cookie_path, secure=self.settings.scheme == "https")
        assert self.transport is not None
        self.transport.write(
            pages.redirect_response(303, clean, extra_headers=[cookie], close=not ex.keep_alive)
        )
        return ex.keep_alive and ex.body_done

    async def _resolve(self, target: AppTarget) -> Route | None:
        if target.kind == "path":
            assert target.session_id is not None
            return await self.edge.resolver.by_session(target.session_id, target.port)
        assert target.vm_id is not None
        return await self.edge.resolver.by_vm(target.vm_id, target.port)

    def _request_head(self, ex: Exchange, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        out = list(headers)
        if ex.chunked_in:
            out.append((b"Transfer-Encoding", b"chunked"))
        else:
            length = next((v for n, v in ex.headers if n.lower() == b"content-length"), None)
            if length is not None:
                out.append((b"Content-Length", length))
        if ex.upgrade:
            out += [(b"Connection", b"Upgrade")] + [(n, v) for n, v in ex.headers if n.lower() == b"upgrade"]
        return b"%s %s HTTP/1.1\r\n%s\r\n" % (ex.method, target, _head(out))

    def start_tunnel(self, ex: Exchange) -> None:
        """The VM accepted an upgrade: from now on bytes flow unparsed both ways."""
        conn = ex.upstream
        assert conn is not None and self.transport is not None
        transport = self.transport
        conn.tunnel = transport.write
        self.tunnel_to = conn
        if self.early_tunnel_data:
            conn.write(self.early_tunnel_data)
            self.early_tunnel_data = b""
        self.resume_reading()


def _host_header(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    hosts = [value for name, value in headers if name.lower() == b"host"]
    return hosts[0] if len(hosts) == 1 else None
