"""Python memory per idle keep-alive connection of the edge, measured with tracemalloc.

    PYTHONPATH=. .venv/bin/python bench/edge_idle_memory.py [--connections 2000] [--host-only]
                                                           [--edge compiled|pure]

One edge (the real ``Edge`` and ``EdgeProtocol`` on uvloop, on a loopback port) proxies to a small app
in this process; a child process opens ``--connections`` connections, sends one browser-like request on
each (14 headers, as Chromium sends for a page: ``--host-only`` sends only ``Host``), reads the answer
and keeps the connection open. The edge's allocations are snapshotted with tracemalloc before the
connections open and once they are all idle; the difference divided by the connections is printed,
with the largest sources (file:line). The app's side is one pooled connection, made before the first
snapshot. The access log is on (to /dev/null) and flushed before each snapshot.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import time
import tracemalloc

import uvloop

from gateway.config import load_config, override
from gateway.edge.impl import CHOICES, select
from gateway.state.ports import EventSubscriber, InstanceRecord, VmRecord

SESSION_ID = "70653436-f809-4410-b306-b50a3402ca56"
VM_ID = "0123456789abcdef"
RUN_TIMEOUT_S = 120.0
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n" + b"x" * 100

# The child: N connections, one request each, then wait for a line on stdin before closing them.
CLIENT = r"""
import socket, sys
host, port, n, request = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
request = request.decode("unicode_escape").encode("latin-1")
socks = []
for _ in range(n):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(request)
    got = b""
    while not (b"\r\n\r\n" in got and len(got.partition(b"\r\n\r\n")[2]) >= 100):
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("closed: %r" % got[:80])
        got += chunk
    if not got.startswith(b"HTTP/1.1 200"):
        raise SystemExit("answer: %r" % got[:80])
    socks.append(s)
print("idle", flush=True)
sys.stdin.readline()
"""


def browser_request(host: str, path: str) -> bytes:
    """A Chromium-like page request: 14 headers."""
    headers = [
        ("Host", host),
        ("Connection", "keep-alive"),
        ("sec-ch-ua", '"Chromium";v="131", "Not_A Brand";v="24"'),
        ("sec-ch-ua-mobile", "?0"),
        ("sec-ch-ua-platform", '"Linux"'),
        ("Upgrade-Insecure-Requests", "1"),
        (
            "User-Agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/131.0.0.0 Safari/537.36",
        ),
        (
            "Accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
            "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7",
        ),
        ("Sec-Fetch-Site", "none"),
        ("Sec-Fetch-Mode", "navigate"),
        ("Sec-Fetch-User", "?1"),
        ("Sec-Fetch-Dest", "document"),
        ("Accept-Encoding", "gzip, deflate, br, zstd"),
        ("Accept-Language", "en-US,en;q=0.9"),
    ]
    assert len(headers) == 14
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"GET {path} HTTP/1.1\r\n{lines}\r\n".encode()


class App(asyncio.Protocol):
    """The VM's app: a 100-byte answer per request (one request per read is enough here)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(RESPONSE)  # type: ignore[attr-defined]


class OneRoute:
    def __init__(self, port: int) -> None:
        self.port = port
        self.vm = VmRecord(
            vm_id=VM_ID, session_id=SESSION_ID, owner="bench", driver="process", slot=0, ip="127.0.0.1",
            status="active", created_at=time.time(), vm_lifetime_seconds=3600, memory_mb=128, vcpu_count=1,
        )  # fmt: skip

    async def vm_and_port(self, vm_id: str, port: int) -> tuple[VmRecord | None, bool]:
        return (self.vm if vm_id == VM_ID else None), port == self.port

    async def session_vm_and_port(self, session_id: str, port: int) -> tuple[VmRecord | None, bool]:
        return (self.vm if session_id == SESSION_ID else None), port == self.port

    async def domain_vm(self, domain: str) -> VmRecord | None:
        return None

    async def instance_route(
        self, instance_uuid: str
    ) -> tuple[InstanceRecord | None, VmRecord | None, frozenset[str]]:
        return None, None, frozenset()


class Following:
    def add(self, subscriber: EventSubscriber) -> None:
        subscriber.connected()


async def measure(connections: int, host_only: bool, edge_choice: str) -> None:
    loop = asyncio.get_running_loop()
    impl = select(edge_choice)
    app_server = await loop.create_server(App, "127.0.0.1", 0)
    app_port = app_server.sockets[0].getsockname()[1]
    config = override(
        load_config(None, environ={}),
        edge={"api_hosts": "gateway.example.test"},
        api={"sandbox_domain": "sandbox.example.test"},
    )
    settings = impl.settings.EdgeSettings.from_config(config, api_upstream="/nonexistent/api.sock")
    resolver = impl.resolver.Resolver(OneRoute(app_port), vm_networks=["127.0.0.0/8"], positive_ttl_s=1e9)
    Following().add(resolver)
    devnull = os.open(os.devnull, os.O_WRONLY)
    access_log = impl.observe.AccessLog("text", devnull)
    edge = impl.protocol.Edge(
        settings, resolver, impl.upstream.UpstreamPool(connect_timeout_s=5.0), access_log
    )
    server = await loop.create_server(lambda: impl.protocol.EdgeProtocol(edge), "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    host = "gateway.example.test"
    path = f"/v1/app/{SESSION_ID}/{app_port}/"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() if host_only else browser_request(host, path)
    )

    async def client(n: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, "127.0.0.1", str(port), str(n),
            request.decode("latin-1").encode("unicode_escape").decode(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdin is not None
        try:
            async with asyncio.timeout(RUN_TIMEOUT_S):
                line = await proc.stdout.readline()
                if line != b"idle\n":
                    raise RuntimeError(f"client: {line!r}")
                yield_point.set_result(None)
                await release
            proc.stdin.write(b"done\n")
            await proc.stdin.drain()
            async with asyncio.timeout(RUN_TIMEOUT_S):
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    # Warm up: the first request makes the pooled app connection, fills caches and imports lazily.
    yield_point: asyncio.Future[None] = loop.create_future()
    release: asyncio.Future[None] = loop.create_future()
    release.set_result(None)
    await client(5)
    await asyncio.sleep(0.3)
    access_log.flush()
    gc.collect()
    tracemalloc.start(4)
    before = tracemalloc.take_snapshot()
    yield_point = loop.create_future()
    release = loop.create_future()
    task = asyncio.create_task(client(connections))
    await yield_point
    await asyncio.sleep(2.5)  # the last answers' callbacks finish, and a keep-alive sweep or two
    access_log.flush()
    gc.collect()
    after = tracemalloc.take_snapshot()
    open_now = len(edge.connections)
    release.set_result(None)
    await task
    tracemalloc.stop()
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(
        f"edge idle memory: {total / connections / 1024:.2f} KiB per idle keep-alive connection "
        f"({connections:,} connections, {'Host-only' if host_only else 'browser-like 14-header'} request; "
        f"{open_now:,} open at the snapshot; tracemalloc; {impl.name} edge)"
    )
    for stat in after.compare_to(before, "lineno")[:12]:
        if stat.size_diff > 0:
            frame = stat.traceback[0]
            name = frame.filename.removeprefix(os.getcwd() + "/")
            print(f"  {stat.size_diff / connections:8.1f} B  {stat.count_diff:+7d}  {name}:{frame.lineno}")
    server.close()
    app_server.close()
    edge.pool.close_all()
    access_log.close()
    os.close(devnull)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--host-only", action="store_true", help="a request with only a Host header")
    parser.add_argument("--edge", choices=CHOICES, default="auto", help="(default: %(default)s)")
    args = parser.parse_args()
    uvloop.run(measure(args.connections, args.host_only, args.edge))


if __name__ == "__main__":
    main()
