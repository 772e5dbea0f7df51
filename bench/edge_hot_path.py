"""The edge's own Python cost per proxied request, without sockets: a steady figure to optimise against.

    .venv/bin/python bench/edge_hot_path.py [--requests 200000] [--rounds 5] [--websocket | --browser]

Loopback benchmarks (``edge_vs_nginx.py``) on a small shared machine swing by 20 % between runs, which
hides a change worth 2 us. This drives the real ``EdgeProtocol`` and ``UpstreamConnection`` of one
edge with in-memory transports: a keep-alive client sends a path-form request for a 100-byte response,
the route comes from the resolver's cache, the upstream connection from the pool, and the VM's answer is
fed back. What is timed is everything the edge runs in Python for one request and its response (the
parser included); the system calls of a real proxy come on top. Prints the best round in microseconds
per request, and the share of requests that used the cached route and a pooled connection (both must be
100 %: anything else is not the hot path).

``--browser``: the request is a Chromium-like page request (14 headers, ``edge_idle_memory.py``'s)
instead of wrk's Host-only one.

``--websocket``: the same edge upgrades one request to a WebSocket, and what is timed is a round trip in
its tunnel instead (a 32-byte binary message from the client, masked, and the VM's echo), as in
``edge_vs_nginx.py``'s WebSocket row.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import time
from typing import Any

import uvloop
from edge_idle_memory import browser_request

from gateway.config import load_config, override
from gateway.edge.impl import CHOICES, EdgeImpl, select
from gateway.state.ports import EventSubscriber, InstanceRecord, VmRecord

SESSION_ID = "70653436-f809-4410-b306-b50a3402ca56"
VM_ID = "0123456789abcdef"
VM_IP = "10.200.0.2"
PORT = 8000
REQUEST = b"GET /v1/app/%s/%d/small HTTP/1.1\r\nHost: gateway.example.test\r\n\r\n" % (
    SESSION_ID.encode(),
    PORT,
)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
UPGRADE = (
    b"GET /v1/app/%s/%d/ws HTTP/1.1\r\nHost: gateway.example.test\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
) % (SESSION_ID.encode(), PORT)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
WS_PAYLOAD = b"m" * 32
WS_MASK = b"\x01\x02\x03\x04"
# A final binary frame each way: the client's masked (RFC 6455 5.3), the VM's not.
WS_FROM_CLIENT = b"\x82\xa0" + WS_MASK + bytes(b ^ WS_MASK[i % 4] for i, b in enumerate(WS_PAYLOAD))
WS_FROM_VM = b"\x82\x20" + WS_PAYLOAD


class MemoryTransport(asyncio.Transport):
    """Keeps the last piece written, and lets the one before go (as a real transport does once it is
    sent). Its ``write`` is a C method (a deque's append), as a real transport's is: a Python one
    would add its interpreter's cost to every figure."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.peer = peer
        self.last: collections.deque[bytes] = collections.deque(maxlen=1)
        self.write = self.last.append  # type: ignore[method-assign,assignment]
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class OneRoute:
    """A RouteSource that knows one session's VM, with the port exposed."""

    def __init__(self) -> None:
        self.vm = VmRecord(
            vm_id=VM_ID, session_id=SESSION_ID, owner="bench", driver="process", slot=0, ip=VM_IP,
            status="active", created_at=time.time(), vm_lifetime_seconds=3600, memory_mb=128, vcpu_count=1,
        )  # fmt: skip

    async def vm_and_port(self, vm_id: str, port: int) -> tuple[VmRecord | None, bool]:
        return (self.vm if vm_id == VM_ID else None), port == PORT

    async def session_vm_and_port(self, session_id: str, port: int) -> tuple[VmRecord | None, bool]:
        return (self.vm if session_id == SESSION_ID else None), port == PORT

    async def domain_vm(self, domain: str) -> VmRecord | None:
        return None

    async def instance_route(
        self, instance_uuid: str
    ) -> tuple[InstanceRecord | None, VmRecord | None, frozenset[str]]:
        return None, None, frozenset()


class AlwaysFollowing:
    """An EventFeed that is always connected and never has news: cached routes stay."""

    def add(self, subscriber: EventSubscriber) -> None:
        subscriber.connected()

    def remove(self, subscriber: EventSubscriber) -> None:
        subscriber.disconnected()


async def build_edge(edge_impl: EdgeImpl, access_log_format: str) -> tuple[Any, Any, MemoryTransport, Any]:
    config = override(
        load_config(None, environ={}),
        edge={"api_hosts": "gateway.example.test"},
        api={"sandbox_domain": "sandbox.example.test"},
    )
    settings = edge_impl.settings.EdgeSettings.from_config(config, api_upstream="/nonexistent/api.sock")
    # Cached for longer than a round lasts: the bench measures cache hits, as on a busy edge.
    resolver = edge_impl.resolver.Resolver(OneRoute(), vm_networks=["10.200.0.0/16"], positive_ttl_s=1e9)
    AlwaysFollowing().add(resolver)
    if await resolver.by_session(SESSION_ID, PORT) is None:  # looked up once, like a first request
        raise RuntimeError("the bench's route does not resolve")
    pool = edge_impl.upstream.UpstreamPool(connect_timeout_s=5.0)
    access_log = None
    if access_log_format != "off":
        devnull = os.open(os.devnull, os.O_WRONLY)
        # The line is built and written, to nowhere.
        access_log = edge_impl.observe.AccessLog(access_log_format, devnull)
    edge = edge_impl.protocol.Edge(settings, resolver, pool, access_log)
    address = edge_impl.upstream.UpstreamAddress(VM_ID, VM_IP, PORT)
    upstream = edge_impl.upstream.UpstreamConnection(address, pool)
    upstream.connection_made(MemoryTransport((VM_IP, PORT)))
    pool.release(upstream)
    client = edge_impl.protocol.EdgeProtocol(edge)
    client_transport = MemoryTransport(("127.0.0.1", 40000))
    client.connection_made(client_transport)
    return client, upstream, client_transport, edge


async def run_round(
    edge_impl: EdgeImpl, requests: int, access_log_format: str, websocket: bool, request: bytes = REQUEST
) -> tuple[float, int, int, int]:
    client, upstream, client_transport, edge = await build_edge(edge_impl, access_log_format)
    if websocket:
        client.data_received(UPGRADE)
        upstream.data_received(SWITCHED)
        if client.tunnel is None or not client_transport.last[0].startswith(b"HTTP/1.1 101 "):
            raise RuntimeError("the edge did not open the WebSocket tunnel")
        start = time.perf_counter()
        for _ in range(requests):
            client.data_received(WS_FROM_CLIENT)
            upstream.data_received(WS_FROM_VM)
        elapsed = time.perf_counter() - start
        vm_side = upstream.transport
        if client_transport.last[0] != WS_FROM_VM or vm_side.last[0] != WS_FROM_CLIENT:
            raise RuntimeError("the tunnel did not carry the messages")
        client.connection_lost(None)
        edge.pool.close_all()
        return elapsed / requests * 1e6, 1, 1, requests
    start = time.perf_counter()
    for _ in range(requests):
        client.data_received(request)
        upstream.data_received(RESPONSE)
    elapsed = time.perf_counter() - start
    answered = edge.stats.requests.get(("path", 200), 0)
    if client_transport.closed or answered != requests or not client_transport.last[0].endswith(b"x" * 100):
        raise RuntimeError("the edge did not answer every request (check the request and the route)")
    hits, reuses = edge.resolver.hits, edge.pool.reuses
    client.connection_lost(None)
    edge.pool.close_all()
    return elapsed / requests * 1e6, hits, reuses, requests


async def main(args: argparse.Namespace) -> None:
    edge_impl = select(args.edge)
    request = REQUEST
    if args.browser:
        path = REQUEST.split(b" ")[1].decode()
        request = browser_request("gateway.example.test", path)
    results = [
        await run_round(edge_impl, args.requests, args.access_log, args.websocket, request)
        for _ in range(args.rounds)
    ]
    best = min(results)
    _, hits, reuses, requests = best
    what = "WebSocket round trip" if args.websocket else "browser-like request" if args.browser else "request"
    print(
        f"edge hot path: {best[0]:.2f} us per {what} (best of {args.rounds} rounds of {requests:,}), "
        f"access log {args.access_log}, {edge_impl.name} edge"
    )
    print(f"  rounds: {', '.join(f'{r[0]:.2f}' for r in results)} us")
    if not args.websocket:
        print(f"  cached routes {hits / requests:.0%}, pooled connections {reuses / requests:.0%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--access-log", choices=("off", "text", "json"), default="text", help="(default: %(default)s)"
    )
    parser.add_argument("--edge", choices=CHOICES, default="auto", help="(default: %(default)s)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--websocket", action="store_true", help="time WebSocket round trips instead")
    kind.add_argument("--browser", action="store_true", help="a 14-header browser-like request")
    uvloop.run(main(parser.parse_args()))
