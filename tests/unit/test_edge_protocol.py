"""``EdgeProtocol`` driven at the protocol level: bytes into ``data_received``, bytes out of in-memory
transports, the VM's side played by hand. No sockets, no servers: each case states the exact order of
events (a read split anywhere, the client's buffer full at a given moment), which real sockets can only
approximate. The integration suites check the same behaviour over real connections."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import time
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from gateway.config import load_config, override
from gateway.edge import access
from gateway.edge.impl import EdgeImpl
from gateway.edge.protocol import Edge, EdgeProtocol
from gateway.edge.pump import BodyPump
from gateway.edge.upstream import MAX_RESPONSE_HEAD_BYTES, UpstreamAddress, UpstreamConnection
from gateway.state.records import VM_ACTIVE, VmRecord
from tests.fakes import FakeEventFeed, NoRoutes

SID = "70653436-f809-4410-b306-b50a3402ca56"
VM_ID = "vmid-0123456789abcdef"
VM_IP = "10.200.0.2"
PORT = 8000
API_HOST = b"gateway.example.test"
APP = b"/v1/app/%s/%d" % (SID.encode(), PORT)
TOKEN = b"private-share-token"


def request(target: bytes = APP + b"/", *lines: bytes, method: bytes = b"GET") -> bytes:
    head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, API_HOST)
    return head + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def response(body: bytes = b"hello", *lines: bytes, status: bytes = b"200 OK") -> bytes:
    head = b"HTTP/1.1 %s\r\nContent-Length: %d\r\n" % (status, len(body))
    return head + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


class MemoryTransport(asyncio.Transport):
    """Keeps what is written and what the protocol asked of it."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.peer = peer
        self.data = bytearray()
        self.reading = True
        self.closed = False
        self.aborted = False
        self.eof = False
        self.changed = asyncio.Event()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data
        self.changed.set()

    def take(self) -> bytes:
        out, self.data = bytes(self.data), bytearray()
        return out

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    def abort(self) -> None:
        self.closed = self.aborted = True
        self.changed.set()

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return len(self.data)  # (what was written is held until taken)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait for the protocol to write or close until ``done`` says so (its timers run meanwhile)."""
        async with asyncio.timeout(5):
            while not done():
                self.changed.clear()
                await self.changed.wait()


@dataclass
class RouteStore(NoRoutes):
    """The edge's route source: one session's VM and its share."""

    share: dict[str, object] = field(default_factory=lambda: {"port": PORT, "is_public": True})
    lookups: int = 0

    def vm(self) -> VmRecord:
        now = time.time()
        return VmRecord(
            vm_id=VM_ID, session_id=SID, owner="k", driver="process", slot=1, ip=VM_IP, status=VM_ACTIVE,
            created_at=now, vm_lifetime_seconds=3600, memory_mb=512, vcpu_count=1, expires_at=now + 3600,
            share=self.share,
        )  # fmt: skip

    async def session_vm_and_port(self, session_id: str, port: int) -> tuple[VmRecord | None, bool]:
        self.lookups += 1
        return (self.vm(), False) if session_id == SID else (None, False)


# Every test here runs on each edge (the compiled one and the pure-Python one), by the edge_harness fixture.
pytestmark = pytest.mark.both_edges


@dataclass
class Harness:
    edge: Edge
    client: EdgeProtocol
    client_side: MemoryTransport
    vm: UpstreamConnection
    vm_side: MemoryTransport
    store: RouteStore
    pool: MemoryDialer

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.client.data_received(chunk)

    def answer(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.vm.data_received(chunk)


HarnessFactory = Callable[..., AbstractAsyncContextManager[Harness]]


@pytest.fixture
def edge_harness(edge: EdgeImpl) -> HarnessFactory:
    """``async with edge_harness(store, **edge_config) as h``: a client connection of one edge (of the
    edge under test), and one idle connection to the VM in its pool."""

    @asynccontextmanager
    async def start(store: RouteStore | None = None, **edge_config: object) -> AsyncIterator[Harness]:
        config = override(
            load_config(None, environ={}),
            edge={"api_hosts": API_HOST.decode(), **edge_config},
            api={"sandbox_domain": "sandbox.example.test"},
        )
        settings = edge.settings.EdgeSettings.from_config(config, api_upstream="/nonexistent/api.sock")
        store = store or RouteStore()
        # Cached for longer than a test lasts: a test on a busy machine still sees the route cached.
        resolver = edge.resolver.Resolver(store, vm_networks=["10.200.0.0/16"], positive_ttl_s=3600.0)
        FakeEventFeed().add(resolver)  # following the events channel: the route cache is in use
        # The route looked up once, as by an earlier request: from then on it comes from the cache, and
        # a request is forwarded within the read that completes its head.
        await resolver.by_session(SID, PORT)
        dialer = MemoryDialer(edge)
        pool = dialer.pool
        edge_ = edge.protocol.Edge(settings, resolver, pool)
        # One idle connection to the VM in the pool: the exchange takes it without connecting.
        vm = dialer.vm_connection(edge.upstream.UpstreamAddress(VM_ID, VM_IP, PORT))
        vm_side = dialer.dialed[0][1]
        pool.release(vm)
        client = edge.protocol.EdgeProtocol(edge_)
        client_side = MemoryTransport(("192.0.2.7", 40000))
        client.connection_made(client_side)
        try:
            yield Harness(edge_, client, client_side, vm, vm_side, store, dialer)
        finally:
            if not client_side.closed:
                client.connection_lost(None)
            pool.close_all()
            for deadline in (client.deadline, client.silence_deadline, client.send_deadline):
                if deadline is not None:
                    deadline.cancel()

    return start


def status(data: bytes) -> int:
    """The status of the first response in ``data`` (0: none)."""
    line = data.split(b"\r\n", 1)[0]
    return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0


class MemoryDialer:
    """A pool that dials nothing: a new connection to the VM is one more in-memory transport, kept in
    ``dialed``."""

    def __init__(self, edge: EdgeImpl) -> None:
        self.edge = edge
        self.pool = edge.upstream.UpstreamPool(connect_timeout_s=5.0, dial=self.dial)
        self.dialed: list[tuple[UpstreamConnection, MemoryTransport]] = []

    def vm_connection(self, address: UpstreamAddress) -> UpstreamConnection:
        conn = self.edge.upstream.UpstreamConnection(address, self.pool)
        transport = MemoryTransport((address.host, address.port))
        conn.connection_made(transport)
        self.dialed.append((conn, transport))
        return conn

    async def dial(self, address: UpstreamAddress) -> UpstreamConnection:
        return self.vm_connection(address)


async def test_a_request_is_forwarded_below_its_prefix_with_forwarding_headers(
    edge_harness: HarnessFactory,
) -> None:
    async with edge_harness() as h:
        h.send(request(APP + b"/page?q=1", b"Accept: text/html"))
        sent = h.vm_side.take()
        assert sent.startswith(b"GET /page?q=1 HTTP/1.1\r\n")
        assert b"\r\nX-Forwarded-Prefix: " + APP + b"\r\n" in sent
        assert b"\r\nX-Forwarded-For: 192.0.2.7\r\n" in sent
        assert b"\r\nX-Request-Id: " in sent
        h.answer(response(b"hello"))
        out = h.client_side.take()
        assert status(out) == 200 and out.endswith(b"\r\n\r\nhello")
        assert not h.client_side.closed


async def test_a_kept_alive_connection_uses_the_cached_route_and_the_pooled_connection(
    edge_harness: HarnessFactory,
) -> None:
    async with edge_harness() as h:
        for _ in range(3):
            h.send(request())
            h.answer(response())
        assert h.client_side.take().count(b"HTTP/1.1 200 OK") == 3
        assert h.store.lookups == 1  # only the harness's lookup: each request used the cached route
        assert h.edge.pool.reuses == 3


async def test_the_pool_closes_a_connection_idle_past_its_timeout_counted_from_the_sweep_that_saw_it(
    edge_harness: HarnessFactory, edge: EdgeImpl
) -> None:
    """A released connection reads no clock: the first sweep that finds it idle stamps it, and a later
    sweep past the idle timeout from there closes it (a connection used meanwhile is stamped anew)."""
    async with edge_harness() as h:
        h.send(request())
        h.answer(response())
        assert h.edge.pool.take_idle(h.vm.address) is h.vm
        h.edge.pool.release(h.vm)
        assert h.vm.idle_since == 0.0
        h.edge.pool._sweep()
        stamped = h.vm.idle_since
        assert stamped > 0 and not h.vm.closed
        h.edge.pool._sweep()
        assert h.vm.idle_since == stamped and not h.vm.closed  # not yet idle for the timeout
        h.vm.idle_since = stamped - edge.upstream.UPSTREAM_IDLE_TIMEOUT_S - 0.001
        h.edge.pool._sweep()
        assert h.vm.closed and h.edge.pool.take_idle(h.vm.address) is None


def pump_body(pump: BodyPump, left: int, receiver: MemoryTransport) -> None:
    """Feed a pump the rest of a body as the event loop would, read by read (at most 200,000 bytes each,
    a pattern per read), and check what ``receiver`` got: every byte once, in order, never a read past
    the body; on even steps the receiver still holds the last write, so the pump must not reuse it."""
    received, previous, sizes = bytearray(), None, []
    while left:
        buffer = pump.get_buffer(-1)
        assert 0 < len(buffer) <= left  # never past the body
        if previous is not None and len(sizes) % 2 == 0:  # the receiver holds the last write
            assert buffer.obj is not previous
        n = min(len(buffer), 200_000)
        buffer[:n] = bytes([len(sizes) % 251]) * n
        pump.buffer_updated(n)
        left -= n
        previous = buffer.obj
        sizes.append(n)
        if len(sizes) % 2 == 1 or not left:
            received += receiver.take()
    assert received == b"".join(bytes([i % 251]) * n for i, n in enumerate(sizes))


async def test_a_long_body_is_pumped_through_reused_buffers_and_the_connection_serves_again(
    edge_harness: HarnessFactory, edge: EdgeImpl
) -> None:
    """Past PUMP_MIN_BYTES the rest of a Content-Length body is read into a pump's buffers, never past its
    end; a buffer the client still holds is never written over; the connection goes back to its
    owner (and the pool) with the body's last byte. (The buffers' sizes: test_edge_pump.py.)"""
    pump_module = edge.pump
    async with edge_harness() as h:
        h.vm.transport.set_protocol(h.vm)  # type: ignore[union-attr]
        h.send(request())
        size = pump_module.PUMP_MIN_BYTES + 300_000
        h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"a" * 10)
        pump = h.vm_side.protocol
        assert type(pump) is pump_module.BodyPump
        first = h.client_side.take()
        assert status(first) == 200 and first.endswith(b"\r\n\r\n" + b"a" * 10)
        pump_body(pump, size - 10, h.client_side)
        assert h.vm_side.protocol is h.vm  # the body's end: the connection is its own again
        h.send(request())
        h.answer(response(b"again"))
        assert h.client_side.take().endswith(b"\r\n\r\nagain") and len(h.pool.dialed) == 1


async def test_a_long_request_body_is_pumped_up_and_the_connection_reads_the_next_request(
    edge_harness: HarnessFactory, edge: EdgeImpl
) -> None:
    pump_module = edge.pump
    async with edge_harness() as h:
        h.client_side.set_protocol(h.client)
        size = pump_module.PUMP_MIN_BYTES + 100_000
        h.send(request(APP + b"/up", b"Content-Length: %d" % size, method=b"PUT") + b"x" * 10)
        pump = h.client_side.protocol
        assert type(pump) is pump_module.BodyPump
        first = h.vm_side.take()
        assert first.startswith(b"PUT /up HTTP/1.1\r\n") and first.endswith(b"\r\n\r\n" + b"x" * 10)
        pump_body(pump, size - 10, h.vm_side)
        assert h.client_side.protocol is h.client  # the body's end: the connection reads requests again
        h.answer(response(b"stored"))
        assert h.client_side.take().endswith(b"\r\n\r\nstored")
        h.send(request(APP + b"/next"))
        assert h.vm_side.take().startswith(b"GET /next HTTP/1.1\r\n")
        h.answer(response(b"next"))
        assert h.client_side.take().endswith(b"\r\n\r\nnext")


async def test_an_app_closing_in_a_pumped_body_closes_the_client(
    edge_harness: HarnessFactory, edge: EdgeImpl
) -> None:
    async with edge_harness() as h:
        h.vm.transport.set_protocol(h.vm)  # type: ignore[union-attr]
        h.send(request())
        h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * edge.pump.PUMP_MIN_BYTES))
        pump = h.vm_side.protocol
        assert type(pump) is edge.pump.BodyPump
        pump.get_buffer(-1)[:5] = b"12345"
        pump.buffer_updated(5)
        assert h.client_side.take().endswith(b"12345") and not h.client_side.closed
        pump.connection_lost(None)  # short of its Content-Length
        assert h.client_side.closed


async def test_a_head_split_anywhere_is_the_same_request(edge_harness: HarnessFactory) -> None:
    raw = request(APP + b"/split", b"X-One: 1")
    for cut in (1, 5, len(raw) // 2, len(raw) - 1):
        async with edge_harness() as h:
            h.send(raw[:cut], raw[cut:])
            assert h.vm_side.take().startswith(b"GET /split HTTP/1.1\r\n"), cut


async def test_pipelined_requests_are_answered_in_order(edge_harness: HarnessFactory) -> None:
    async with edge_harness() as h:
        h.send(request(APP + b"/one") + request(APP + b"/two"))
        assert h.vm_side.take().startswith(b"GET /one ")  # the second waits for the first's answer
        assert len(h.pool.dialed) == 1
        h.answer(response(b"first"))
        await h.vm_side.until(lambda: bool(h.vm_side.data))
        assert h.vm_side.take().startswith(b"GET /two ")  # on the same connection, back from the pool
        assert len(h.pool.dialed) == 1
        h.answer(response(b"second"))
        out = h.client_side.take()
        assert out.index(b"first") < out.index(b"second")


async def test_a_malformed_request_is_answered_400_and_the_connection_closed_lingering(
    edge_harness: HarnessFactory,
) -> None:
    async with edge_harness() as h:
        h.send(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
        assert status(h.client_side.take()) == 400
        assert h.client_side.eof and not h.client_side.closed  # half-closed, reading what still comes
        assert h.vm_side.take() == b""


async def test_an_unknown_app_is_a_404_and_the_connection_stays(edge_harness: HarnessFactory) -> None:
    async with edge_harness() as h:
        h.send(request(b"/v1/app/00000000-0000-4000-8000-000000000000/8000/"))
        await h.client_side.until(lambda: b"\r\n\r\n" in h.client_side.data)
        assert status(h.client_side.take()) == 404
        assert not h.client_side.closed
        h.send(request())  # and the next request on it is served
        h.answer(response())
        assert status(h.client_side.take()) == 200


async def test_a_private_share_trades_its_query_token_for_a_cookie_that_then_opens_it(
    edge_harness: HarnessFactory,
) -> None:
    store = RouteStore(share={"port": PORT, "is_public": False, "token_sha256": access.token_hash(TOKEN)})
    async with edge_harness(store) as h:
        h.send(request(APP + b"/"))
        assert status(h.client_side.take()) == 404
        h.send(request(APP + b"/?gw_access_token=" + TOKEN))
        out = h.client_side.take()
        assert status(out) == 303
        assert b"\r\nLocation: " + APP + b"/\r\n" in out
        cookie = out.split(b"Set-Cookie: ", 1)[1].split(b";", 1)[0]
        h.send(request(APP + b"/", b"Cookie: " + cookie))
        forwarded = h.vm_side.take()
        assert forwarded.startswith(b"GET / HTTP/1.1\r\n")
        assert b"gw_access" not in forwarded  # the gateway's cookie is not the app's business


async def test_a_full_client_buffer_pauses_the_vm_and_its_drain_resumes_it(
    edge_harness: HarnessFactory,
) -> None:
    async with edge_harness() as h:
        h.send(request())
        h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n12345")
        h.client.pause_writing()
        h.answer(b"67890")  # what the VM sends while the client's buffer is full stops its reading
        assert not h.vm_side.reading
        h.client.resume_writing()
        assert h.vm_side.reading
        h.answer(b"abcde")
        assert h.client_side.take().endswith(b"1234567890abcde")


async def test_the_buffer_filling_as_the_last_bytes_arrive_leaves_the_pooled_connection_reading(
    edge_harness: HarnessFactory,
) -> None:
    """Issue 17, point 0, at the protocol level: the pause comes inside the read that completes the
    response, so the connection goes back to the pool with that pause undone."""
    async with edge_harness() as h:
        h.send(request())

        def write_then_pause(data: bytes) -> None:  # (returns None: the compiled edge checks that)
            MemoryTransport.write(h.client_side, data)
            h.client.pause_writing()

        h.client_side.write = write_then_pause  # type: ignore[method-assign]
        h.answer(response(b"last bytes"))
        assert h.edge.pool.take_idle(h.vm.address) is h.vm
        assert h.vm_side.reading


async def test_the_vm_closing_before_it_answers_is_a_502(edge_harness: HarnessFactory) -> None:
    async with edge_harness() as h:
        h.send(request())
        h.vm.connection_lost(None)
        assert status(h.client_side.take()) == 502


async def test_a_vm_that_does_not_answer_in_time_is_a_504(edge_harness: HarnessFactory) -> None:
    async with edge_harness(upstream_first_byte_timeout_s=0.05) as h:
        h.send(request())
        await h.client_side.until(lambda: b"\r\n\r\n" in h.client_side.data)
        assert status(h.client_side.take()) == 504
        assert h.vm_side.closed  # the VM's request is abandoned with its connection


async def test_a_head_too_large_is_cut_as_it_arrives_even_one_byte_at_a_time(
    edge_harness: HarnessFactory,
) -> None:
    async with edge_harness(max_header_bytes=1024) as h:
        h.send(b"GET / HTTP/1.1\r\nHost: gateway.example.test\r\nX-Endless: ")
        for _ in range(h.edge.head_limit):
            h.send(b"a")
            if h.client_side.data:
                break
        assert status(h.client_side.take()) == 431


async def test_endless_request_trailers_are_cut_as_they_arrive(edge_harness: HarnessFactory) -> None:
    """A chunked body's trailers are headers the parser holds until each ends: a client sending one that
    never ends is cut as a head would be, not read into memory for as long as it sends."""
    async with edge_harness(max_header_bytes=1024) as h:
        h.send(request(APP + b"/up", b"Transfer-Encoding: chunked", method=b"POST") + b"5\r\nhello\r\n")
        h.send(b"0\r\nX-Endless: ")
        piece = b"a" * 4096
        for _ in range(4 * h.edge.head_limit // len(piece)):
            h.send(piece)
            if h.client_side.closed:
                break
        assert status(h.client_side.take()) == 431
        assert h.vm_side.closed  # the VM's side of the request is dropped with it


async def test_endless_response_trailers_from_an_app_are_cut_as_they_arrive(
    edge_harness: HarnessFactory,
) -> None:
    """The same from the VM's side: an app's trailer that never ends costs the edge a bounded amount."""
    async with edge_harness() as h:
        h.send(request(APP + b"/stream"))
        h.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Endless: ")
        piece = b"a" * 4096
        for _ in range(4 * MAX_RESPONSE_HEAD_BYTES // len(piece)):
            h.answer(piece)
            if h.vm_side.closed:
                break
        assert h.vm_side.closed and h.client_side.closed  # mid-answer: the client sees it cut
        assert b"hello" in h.client_side.take()


async def test_a_body_over_the_limit_by_its_length_is_refused_before_the_vm_sees_it(
    edge_harness: HarnessFactory,
) -> None:
    async with edge_harness(max_body_bytes=10) as h:
        h.send(request(APP + b"/", b"Content-Length: 11", method=b"POST") + b"x" * 11)
        assert status(h.client_side.take()) == 413
        assert h.vm_side.take() == b""


async def test_head_requests_get_the_head_only(edge_harness: HarnessFactory) -> None:
    async with edge_harness() as h:
        h.send(request(method=b"HEAD"))
        assert h.vm_side.take().startswith(b"HEAD / HTTP/1.1\r\n")
        h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")  # a HEAD response has no body
        h.send(request())
        assert h.vm_side.take().startswith(b"GET / ")  # the connection was back in the pool
        h.answer(response(b"hello"))
        out = h.client_side.take()
        assert out.count(b"HTTP/1.1 200 OK") == 2 and out.endswith(b"hello")


async def test_an_upgrade_becomes_a_tunnel_both_ways(edge_harness: HarnessFactory) -> None:
    async with edge_harness() as h:
        h.send(request(APP + b"/ws", b"Connection: Upgrade", b"Upgrade: chat"))
        sent = h.vm_side.take()
        assert b"\r\nConnection: Upgrade\r\n" in sent and b"\r\nUpgrade: chat\r\n" in sent
        h.answer(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\nfrom-vm")
        assert h.client_side.take().endswith(b"\r\n\r\nfrom-vm")
        h.send(b"from-client")
        assert h.vm_side.take() == b"from-client"
        assert h.edge.stats.tunnels_open == 1


async def test_what_the_client_sends_a_vm_is_its_activity_and_nothing_the_vm_sends_is(
    edge_harness: HarnessFactory,
) -> None:
    """The idle clock's input: a request that reaches the VM, its body bytes, and a tunnel's client bytes
    (another protocol than WebSocket: any byte); never the VM's answers or its bytes in the tunnel."""
    async with edge_harness() as h:
        h.send(request(APP + b"/up", b"Transfer-Encoding: chunked", method=b"POST"))
        h.vm_side.take()
        assert h.edge.traffic.take_active() == {VM_ID: "http"}  # the request head
        h.send(b"3\r\nabc\r\n")
        assert h.edge.traffic.take_active() == {VM_ID: "http"}  # its body, as it streams
        h.send(b"0\r\n\r\n")
        h.vm_side.take()
        h.edge.traffic.take_active()
        h.answer(response(b"done"))
        assert h.edge.traffic.take_active() == {}  # (an answer is not the client's activity)

        h.send(request(APP + b"/ws", b"Connection: Upgrade", b"Upgrade: chat"))
        h.vm_side.take()
        h.edge.traffic.take_active()
        h.answer(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\nhi")
        h.answer(b"from-vm")
        assert h.edge.traffic.take_active() == {}  # an open tunnel the client sends nothing on
        h.send(b"from-client")
        assert h.edge.traffic.take_active() == {VM_ID: "tunnel"}


async def test_an_upgrade_the_vm_declines_is_answered_and_the_close_announced(
    edge_harness: HarnessFactory,
) -> None:
    """The connection ends after a declined upgrade (what follows the request may not be HTTP): the
    answer says so, or a client would send its next request on a connection about to close."""
    async with edge_harness() as h:
        h.send(request(APP + b"/ws", b"Connection: Upgrade", b"Upgrade: websocket"))
        h.vm_side.take()
        h.answer(response(b"no such socket", status=b"404 Not Found"))
        out = h.client_side.take()
        assert out.startswith(b"HTTP/1.1 404 Not Found\r\n") and out.endswith(b"no such socket")
        assert b"\r\nConnection: close\r\n" in out
        assert h.client_side.closed


@pytest.mark.parametrize("draining_first", [True, False])
async def test_draining_closes_an_idle_connection_at_once_and_a_busy_one_after_its_answer(
    edge_harness: HarnessFactory, draining_first: bool
) -> None:
    async with edge_harness() as h:
        if draining_first:
            h.client.drain()
            assert h.client_side.closed
            return
        h.send(request())
        h.client.drain()
        assert not h.client_side.closed
        h.answer(response())
        assert b"\r\nConnection: close\r\n" in h.client_side.take()
        assert h.client_side.closed


async def test_an_idle_kept_alive_connection_holds_nothing_of_its_finished_request(
    edge_harness: HarnessFactory, edge: EdgeImpl
) -> None:
    async with edge_harness() as h:
        h.send(request(APP + b"/page?q=1", b"Accept: text/html", b"User-Agent: test", b"X-Many: headers"))
        h.answer(response())
        assert status(h.client_side.take()) == 200 and not h.client_side.closed
        client = h.client
        assert client.current is None and client.idle()
        assert client.parser is not None and client.parser.parsed_bytes() == 0
        gc.collect()
        exchange = edge.exchange.Exchange
        assert not [o for o in gc.get_objects() if type(o) is exchange]  # the exchange is gone too
        # Nor does its parser keep the request's header list.
        assert not [o for o in gc.get_objects() if type(o) is list and (b"X-Many", b"headers") in o]
        # A sweep sees it idle: it lets its timer and its parser go; the next request makes a parser.
        h.edge.sweep_idle()
        assert client.idle_since > 0 and client.parser is None
        assert client.deadline._handle is None
        h.send(request(APP + b"/again"))
        h.answer(response())
        assert status(h.client_side.take()) == 200 and client.idle_since == 0.0


async def test_a_sweep_closes_connections_idle_past_the_keepalive_timeout_and_only_those(
    edge_harness: HarnessFactory, edge: EdgeImpl
) -> None:
    async with edge_harness(keepalive_timeout_s=0.3) as h:
        h.send(request())
        h.answer(response())
        busy = edge.protocol.EdgeProtocol(h.edge)
        busy_side = MemoryTransport(("192.0.2.8", 40001))
        busy.connection_made(busy_side)
        busy.data_received(b"GET / HTTP/1.1\r\n")  # a head in progress: its own (header) deadline
        started = time.monotonic()
        await h.client_side.until(lambda: h.client_side.closed)  # the sweeps run on their own timer
        assert 0.3 <= time.monotonic() - started < 3.5
        assert not busy_side.closed
        busy.connection_lost(None)
        busy.deadline.cancel()


def test_uvloop_sets_tcp_nodelay_on_accepted_connections_by_itself() -> None:
    """The edge no longer sets TCP_NODELAY (issue 22): uvloop's TCPTransport.new does."""

    async def main() -> int:
        seen: list[int] = []

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.read()
        writer.close()
        server.close()
        return seen[0]

    assert uvloop.run(main()) != 0


async def test_a_client_leaving_during_a_route_lookup_leaves_no_coroutine_never_awaited(
    edge_harness: HarnessFactory,
) -> None:
    """The lookup's task is cancelled before its first step: nothing of it may be left unawaited (such a
    coroutine warned when collected, and failed whichever test collected it)."""
    async with edge_harness() as h:
        h.send(request(b"/v1/app/00000000-0000-4000-8000-000000000000/8000/"))  # not cached: a lookup
        task = h.client.task
        assert task is not None and not task.done()
        h.client.connection_lost(None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with contextlib.suppress(asyncio.CancelledError):
                await task
            gc.collect()
        assert task.cancelled()
        assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]


async def test_a_trusted_proxys_request_id_is_kept_and_logged_escaped(
    edge_harness: HarnessFactory, edge: EdgeImpl, tmp_path: Path
) -> None:
    """The edge's own ids need no escaping in the access log; a trusted proxy's, kept as it came, is escaped
    there (Edge.observe), so a JSON line still parses."""
    log_file = tmp_path / "access.log"
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT)
    try:
        async with edge_harness(trusted_proxies="192.0.2.7") as h:
            h.edge.access_log = edge.observe.AccessLog("json", fd)
            h.send(request(APP + b"/", b'X-Request-Id: proxy"id\\1'))
            assert b'\r\nX-Request-Id: proxy"id\\1\r\n' in h.vm_side.take()
            h.answer(response())
            h.send(request(APP + b"/"))  # from the proxy, without an id: the edge's own
            h.answer(response())
            h.edge.access_log.close()
        first, second = (json.loads(line) for line in log_file.read_bytes().splitlines())
        assert first["request_id"] == 'proxy"id\\1'
        assert second["request_id"] and second["request_id"] != first["request_id"]
    finally:
        os.close(fd)


async def test_a_responses_hop_by_hop_headers_stay_behind_and_the_rest_pass_in_order(
    edge_harness: HarnessFactory,
) -> None:
    async with edge_harness() as h:
        h.send(request())
        hops = (b"Connection: keep-alive, X-Secret", b"Keep-Alive: timeout=5", b"X-Secret: 1")
        h.answer(response(b"one", *hops, b"X-Kept: 1", b"X-Also: 2"))
        head = h.client_side.take().split(b"\r\n\r\n")[0].lower() + b"\r\n"
        assert b"\r\nx-kept: 1\r\n" in head and b"\r\nx-also: 2\r\n" in head
        assert b"keep-alive: " not in head and b"x-secret" not in head and b"\r\nconnection:" not in head
        # Without any hop-by-hop header, the app's headers pass as they came, in their order.
        h.send(request())
        h.answer(response(b"two", b"X-B: 2", b"X-A: 1", b"Cache-Control: no-store"))
        head = h.client_side.take().split(b"\r\n\r\n")[0]
        assert head.index(b"X-B: 2") < head.index(b"X-A: 1") < head.index(b"Cache-Control: no-store")
