"""Egress bench: what the egress proxy costs a VM's connections, against the same client and server
without it.

    .venv/bin/python bench/egress.py [--size-mib 1024] [--seconds 3] [--clients 4] [--rounds 2]
                                     [--stream-splice]

Needs root, iproute2 and nftables. Everything it makes lives in ``198.18.210.0/24`` (RFC 2544's benchmark
range, blackholed on the host first exactly like tests/internet_env.py), two network namespaces named
``bench-eg-*``, veths ``begh0``/``begs0`` on the host, the nftables table ``gateway_beg`` and the proxy's
loopback ports 15701/15753; all of it (and every process it started) is removed on exit, also on an
exception, Ctrl-C or SIGTERM. Traffic goes only to the loopback and to those namespaces.

The two paths, same client namespace, same server process::

    proxy:   client ns eth0 .2 --veth--> host begh0 .1  (nftables dnat to 127.0.0.1:15701, route_localnet)
               -> EgressProxy (this process, uvloop; SO_ORIGINAL_DST, Host, policy, dial) -> host begs0 .5
               --veth--> server ns eth0 .6
    direct:  client ns eth1 .9 --veth--> server ns eth1 .10

The proxy path is the gateway's own: the host firewall table the netns driver installs
(``hostfw.render`` with an ``EgressRedirect``, matched on the ``begh*`` veth as on a VM's), and the
egress plane as the gateway runs it (``running_egress``: the real proxy with its policy refresh and
resolver) with a static policy source that names the client's address as a VM whose policy opens the
server by CIDR (``allow_http``, ``allowed_cidrs``: the client connects by IP, so no DNS is involved) and
``dial_networks`` confined to the bench's range. The direct path is the fairest "no gateway" line: the
same client process in the same namespace reaching the same server process over one veth link, so the
difference is the proxy plus its second link (which a VM always has: its own veth to the host). Routing
the client through the host without the proxy would need ``ip_forward`` on the whole host, which the
gateway keeps off.

Measured on each path, in ``--rounds`` rounds (direct, proxy, then proxy, direct, ...; the best round of
each path is shown):

- MiB/s of one ``--size-mib`` download (a Python reader with 4 MiB ``recv_into``; the server sends from
  a preallocated 1 MiB buffer on uvloop, so neither end is the bottleneck);
- connections/s: ``--clients`` concurrent clients each opening a connection, sending a tiny GET,
  reading the whole answer (about 100 bytes, then the server closes) for ``--seconds``;
- connect latency: one client, one connection at a time for ``--seconds``: from ``connect()`` to the
  answer's first byte (median and p99), after a short warm-up.

The client and server run as separate processes (``ip netns exec``), the proxy in this one. They share
this machine's CPUs, so compare the ratios, not the figures. The proxy logs nothing (the gateway logs a
line per connection at INFO). To see where the proxy's time goes, point py-spy at
this process while it runs (``py-spy record --pid``: the proxy is its only busy thread).
``--stream-splice`` makes the proxy splice through its asyncio streams (the path a TLS connection
takes), to compare with the kernel's ``splice(2)``. The CPU lines say what each process spent per GiB
downloaded and per connection (user + system, /proc and getrusage), the proxy's user part apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.config import EgressConfig  # noqa: E402
from gateway.orchestrator.drivers import hostfw  # noqa: E402
from tests.internet_env import blackhole_internet, run  # noqa: E402

RANGE = ipaddress.ip_network("198.18.210.0/24")
PREFIX = "beg"  # hostfw's prefix: table gateway_beg, redirected veths begh*
CLIENT_NS, SERVER_NS = "bench-eg-client", "bench-eg-server"
CLIENT_VETH, SERVER_VETH = f"{PREFIX}h0", f"{PREFIX}s0"  # host sides (only begh* is redirected)
HOST_CLIENT_SIDE, CLIENT_ADDRESS = "198.18.210.1", "198.18.210.2"  # 198.18.210.0/30
HOST_SERVER_SIDE, SERVER_ADDRESS = "198.18.210.5", "198.18.210.6"  # 198.18.210.4/30
DIRECT_CLIENT, DIRECT_SERVER = "198.18.210.9", "198.18.210.10"  # 198.18.210.8/30, no host side
SERVER_PORT = 80
PROXY_PORT, RESOLVER_PORT = 15701, 15753
VM_ID = "bench-eg-vm"

CHUNK = bytes(1 << 20)
RECV_BYTES = 4 << 20
SMALL_BODY = b"x" * 100
SMALL_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
    len(SMALL_BODY),
    SMALL_BODY,
)
MAX_HEAD_BYTES = 8192
WARM_UP = 50
LATENCY_SAMPLES_MAX = 50_000
READY_TIMEOUT_S = 10.0
CLIENT_GRACE_S = 30.0  # past its own deadline, a client process is killed
NS_PORT_RANGE = "1024 65000"  # the client namespace's own: short connections, many of them


# The server (in the server namespace) ---------------------------------------------------------------


class BenchServer(asyncio.Protocol):
    """``GET /bytes/N``: N bytes (from one preallocated buffer, honouring flow control); anything else:
    100 bytes. Every answer closes its connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.left = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=4 * len(CHUNK))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._send()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.left or self.head is None:
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            if len(self.head) > MAX_HEAD_BYTES:
                self.transport.close()
            return
        path = self.head.split(b" ", 2)[1]
        if path.startswith(b"/bytes/"):
            self.left = int(path[len(b"/bytes/") :])
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % self.left
            )
            self._send()
        else:
            self.transport.write(SMALL_RESPONSE)
            self.transport.close()

    def _send(self) -> None:
        while self.left and not self.paused and self.transport is not None:
            chunk = CHUNK if self.left >= len(CHUNK) else CHUNK[: self.left]
            self.left -= len(chunk)
            self.transport.write(chunk)
        if not self.left and self.transport is not None:
            self.transport.close()


async def serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BenchServer, "0.0.0.0", SERVER_PORT, reuse_address=True, backlog=4096)
    print("listening", flush=True)
    await server.serve_forever()


# The clients (in the client namespace); each prints one JSON line ------------------------------------


def own_cpu_s(user_only: bool = False) -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + (0.0 if user_only else usage.ru_stime)


def cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_download(address: str, size: int, seconds: float) -> dict[str, Any]:
    buf = memoryview(bytearray(RECV_BYTES))
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    with socket.create_connection((address, SERVER_PORT), timeout=seconds) as sock:
        sock.sendall(
            b"GET /bytes/%d HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (size, address.encode())
        )
        total, head = 0, b""
        while n := sock.recv_into(buf):
            if not head:  # the answer's head is in the first read (it is tiny)
                first = bytes(buf[:n])
                head = first[: first.index(b"\r\n\r\n") + 4]
            total += n
            if time.monotonic() > deadline:
                raise TimeoutError(f"download not done in {seconds} s")
    elapsed = time.perf_counter() - started
    body = total - len(head)
    if body != size:
        raise RuntimeError(f"download: {body} bytes, not {size}")
    return {"bytes": body, "seconds": elapsed, "mib_s": body / elapsed / 2**20, "cpu_s": own_cpu_s()}


async def client_rate(address: str, seconds: float, clients: int) -> dict[str, Any]:
    request = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % address.encode()
    deadline = time.monotonic() + seconds
    failures = []

    async def one_client() -> int:
        done = 0
        while time.monotonic() < deadline:
            try:
                async with asyncio.timeout(5):
                    reader, writer = await asyncio.open_connection(address, SERVER_PORT)
                    writer.write(request)
                    answer = await reader.read()
                    writer.close()
            except (OSError, TimeoutError) as exc:
                failures.append(repr(exc))
                continue
            if answer.startswith(b"HTTP/1.1 200") and answer.endswith(SMALL_BODY):
                done += 1
            else:
                failures.append(answer[:60].decode(errors="replace"))
        return done

    started = time.perf_counter()
    counts = await asyncio.gather(*(one_client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return {"connections": sum(counts), "seconds": elapsed, "conn_s": sum(counts) / elapsed,
            "failures": len(failures), "first_failure": failures[0] if failures else None,
            "cpu_s": own_cpu_s()}  # fmt: skip


def client_latency(address: str, seconds: float) -> dict[str, Any]:
    request = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % address.encode()
    samples: list[float] = []
    deadline = time.monotonic() + seconds
    for i in range(WARM_UP + LATENCY_SAMPLES_MAX):
        if i >= WARM_UP and time.monotonic() > deadline:
            break
        started = time.perf_counter()
        with socket.create_connection((address, SERVER_PORT), timeout=5) as sock:
            sock.sendall(request)
            first = sock.recv(1)
            took = time.perf_counter() - started
            while sock.recv(4096):
                pass
        if first != b"H":
            raise RuntimeError(f"latency: answer began {first!r}")
        if i >= WARM_UP:
            samples.append(took * 1000)
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return {"samples": len(samples), "p50_ms": statistics.median(samples), "p99_ms": p99}


def client_main(args: argparse.Namespace) -> None:
    if args.what == "download":
        result = client_download(args.address, args.size, args.seconds)
    elif args.what == "rate":
        result = uvloop.run(client_rate(args.address, args.seconds, args.clients))
    else:
        result = client_latency(args.address, args.seconds)
    print(json.dumps(result), flush=True)


# The network: namespaces, veths, the gateway's nftables table ---------------------------------------


def _sysctl_in(namespace: str, key: str, value: str) -> None:
    run("ip", "netns", "exec", namespace, "sysctl", "-qw", f"{key}={value}")


def _nft(script: str, check: bool = True) -> None:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    subprocess.run([nft, "-f", "-"], input=script, text=True, capture_output=True, timeout=15, check=check)


def _remove_network() -> None:
    _nft(hostfw.render_remove(PREFIX), check=False)
    for veth in (CLIENT_VETH, SERVER_VETH):
        run("ip", "link", "del", veth, check=False)
    for namespace in (CLIENT_NS, SERVER_NS):
        run("ip", "netns", "del", namespace, check=False)


@contextlib.contextmanager
def bench_network() -> Iterator[None]:
    """The two namespaces, three links and the redirect; removed afterwards whatever happens."""
    blackhole_internet()
    leftovers = [n for n in run("ip", "netns", "list").stdout.split() if n in (CLIENT_NS, SERVER_NS)]
    if leftovers:
        raise RuntimeError(f"namespaces {leftovers} exist: another egress bench is running (or was killed)")
    try:
        for namespace in (CLIENT_NS, SERVER_NS):
            run("ip", "netns", "add", namespace)
            run("ip", "-n", namespace, "link", "set", "lo", "up")
        _sysctl_in(CLIENT_NS, "net.ipv4.ip_local_port_range", NS_PORT_RANGE)
        # client <-> host, as a VM's link: the host side redirected by the gateway's table
        run("ip", "link", "add", CLIENT_VETH, "type", "veth", "peer", "name", "eth0", "netns", CLIENT_NS)
        hostfw.disable_host_ipv6(CLIENT_VETH)
        hostfw.enable_route_localnet(CLIENT_VETH)
        run("ip", "addr", "add", f"{HOST_CLIENT_SIDE}/30", "dev", CLIENT_VETH)
        run("ip", "link", "set", CLIENT_VETH, "up")
        run("ip", "-n", CLIENT_NS, "addr", "add", f"{CLIENT_ADDRESS}/30", "dev", "eth0")
        run("ip", "-n", CLIENT_NS, "link", "set", "eth0", "up")
        run("ip", "-n", CLIENT_NS, "route", "add", "default", "via", HOST_CLIENT_SIDE)
        # host <-> server, as a test internet host's link
        run("ip", "link", "add", SERVER_VETH, "type", "veth", "peer", "name", "eth0", "netns", SERVER_NS)
        hostfw.disable_host_ipv6(SERVER_VETH)
        run("ip", "addr", "add", f"{HOST_SERVER_SIDE}/30", "dev", SERVER_VETH)
        run("ip", "link", "set", SERVER_VETH, "up")
        run("ip", "-n", SERVER_NS, "addr", "add", f"{SERVER_ADDRESS}/30", "dev", "eth0")
        run("ip", "-n", SERVER_NS, "link", "set", "eth0", "up")
        # client <-> server directly (no host side at all)
        run(
            "ip",
            "-n",
            CLIENT_NS,
            "link",
            "add",
            "eth1",
            "type",
            "veth",
            "peer",
            "name",
            "eth1",
            "netns",
            SERVER_NS,
        )
        run("ip", "-n", CLIENT_NS, "addr", "add", f"{DIRECT_CLIENT}/30", "dev", "eth1")
        run("ip", "-n", CLIENT_NS, "link", "set", "eth1", "up")
        run("ip", "-n", SERVER_NS, "addr", "add", f"{DIRECT_SERVER}/30", "dev", "eth1")
        run("ip", "-n", SERVER_NS, "link", "set", "eth1", "up")
        redirect = hostfw.EgressRedirect(proxy_port=PROXY_PORT, resolver_port=RESOLVER_PORT)
        _nft(hostfw.render(PREFIX, egress=redirect))
        yield
    finally:
        _remove_network()


# The bench ------------------------------------------------------------------------------------------


class StaticPolicies:
    """The state as the egress plane sees it: the client's address is a VM whose policy opens the
    server's address (by CIDR: the client asks for the IP, so no name is involved) over HTTP; what the
    proxy reports (bytes per VM) is kept to check that the proxy path went through it."""

    def __init__(self) -> None:
        self.bytes_in = 0

    async def egress_policies(self) -> dict[str, tuple[str, dict[str, Any]]]:
        return {CLIENT_ADDRESS: (VM_ID, {"allow_http": True, "allowed_cidrs": [f"{SERVER_ADDRESS}/32"]})}

    async def add_egress(self, counts: dict[str, tuple[int, int]], denials: dict[str, list[str]]) -> None:
        self.bytes_in += counts.get(VM_ID, (0, 0))[1]


@contextlib.asynccontextmanager
async def in_namespace(namespace: str, *argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """This script (``argv``: its subcommand) in ``namespace``; killed on the way out if still running."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", namespace, sys.executable, __file__, *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def running_server() -> AsyncIterator[int]:
    async with in_namespace(SERVER_NS, "serve") as proc:
        assert proc.stdout is not None
        async with asyncio.timeout(READY_TIMEOUT_S):
            line = await proc.stdout.readline()
        if line.strip() != b"listening":
            raise RuntimeError(f"the bench server did not start: {line!r}")
        yield proc.pid  # (``ip netns exec`` execs: this is the server's own)


async def client(what: str, address: str, *argv: str, limit_s: float) -> dict[str, Any]:
    async with in_namespace(CLIENT_NS, "client", what, address, *argv) as proc:
        async with asyncio.timeout(limit_s + CLIENT_GRACE_S):
            out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"client {what} {address} failed: {err.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


@dataclass
class Figures:
    mib_s: float = 0.0
    conn_s: float = 0.0
    p50_ms: float = float("inf")
    p99_ms: float = float("inf")
    failures: int = 0
    # CPU seconds per GiB downloaded and microseconds per connection: client, server, proxy (the least
    # of the rounds)
    cpu_per_gib: list[float] = field(default_factory=lambda: [float("inf")] * 3)
    cpu_per_conn_us: list[float] = field(default_factory=lambda: [float("inf")] * 3)
    proxy_user_per_gib: float = float("inf")  # of which the proxy's user CPU (Python, uvloop)

    def take(self, download: dict[str, Any], rate: dict[str, Any], latency: dict[str, Any]) -> None:
        """The best of the rounds, figure by figure."""
        self.mib_s = max(self.mib_s, download["mib_s"])
        self.conn_s = max(self.conn_s, rate["conn_s"])
        gib, connections = download["bytes"] / 2**30, max(1, rate["connections"])
        self.cpu_per_gib = [min(a, b / gib) for a, b in zip(self.cpu_per_gib, download["cpu"], strict=True)]
        self.proxy_user_per_gib = min(self.proxy_user_per_gib, download["proxy_user_s"] / gib)
        self.cpu_per_conn_us = [
            min(a, b * 1e6 / connections) for a, b in zip(self.cpu_per_conn_us, rate["cpu"], strict=True)
        ]
        self.p50_ms = min(self.p50_ms, latency["p50_ms"])
        self.p99_ms = min(self.p99_ms, latency["p99_ms"])
        self.failures += rate["failures"]


async def measure(address: str, args: argparse.Namespace, figures: Figures, server_pid: int) -> None:
    size = args.size_mib * 2**20
    download_s = 30 + args.size_mib / 20  # even at 20 MiB/s
    before = (cpu_s(server_pid), own_cpu_s(), own_cpu_s(user_only=True))
    download = await client("download", address, "--size", str(size), "--seconds", str(download_s),
                            limit_s=download_s)  # fmt: skip
    download["cpu"] = (download["cpu_s"], cpu_s(server_pid) - before[0], own_cpu_s() - before[1])
    download["proxy_user_s"] = own_cpu_s(user_only=True) - before[2]
    before = (cpu_s(server_pid), own_cpu_s())
    rate = await client("rate", address, "--seconds", str(args.seconds), "--clients", str(args.clients),
                        limit_s=args.seconds)  # fmt: skip
    rate["cpu"] = (rate["cpu_s"], cpu_s(server_pid) - before[0], own_cpu_s() - before[1])
    latency = await client("latency", address, "--seconds", str(args.seconds), limit_s=args.seconds * 2)
    if rate["failures"]:
        print(f"  ({address}: {rate['failures']} failed connections, first: {rate['first_failure']})")
    figures.take(download, rate, latency)


def report(args: argparse.Namespace, direct: Figures, proxy: Figures, stats: str) -> None:
    print(
        f"egress bench: {args.size_mib} MiB download, {args.seconds:g} s of connections ({args.clients} "
        f"clients), {args.seconds:g} s of connect latency; best of {args.rounds} round(s)"
    )
    print(f"{'path':<14} {'MiB/s':>9} {'conn/s':>9} {'connect p50 ms':>15} {'p99 ms':>8}")
    for name, f in (("direct", direct), ("proxy", proxy)):
        print(f"{name:<14} {f.mib_s:>9.1f} {f.conn_s:>9.0f} {f.p50_ms:>15.3f} {f.p99_ms:>8.3f}")
    ratio_mib, ratio_conn = proxy.mib_s / direct.mib_s, proxy.conn_s / direct.conn_s
    added50, added99 = proxy.p50_ms - direct.p50_ms, proxy.p99_ms - direct.p99_ms
    print(f"{'proxy/direct':<14} {ratio_mib:>9.2f} {ratio_conn:>9.2f} {added50:>+15.3f} {added99:>+8.3f}")
    met = {True: "met", False: "missed"}
    print(
        f"download >= 0.8x direct: {met[ratio_mib >= 0.8]} ({ratio_mib:.2f}x); added connect latency "
        f"< 1 ms: {met[added50 < 1.0]} (p50 {added50:+.3f} ms, p99 {added99:+.3f} ms)"
    )
    print("CPU (client, server, proxy): s per GiB downloaded | µs per connection")
    for name, f in (("direct", direct), ("proxy", proxy)):
        per_gib = " ".join(f"{x:.2f}" for x in f.cpu_per_gib)
        per_conn = " ".join(f"{x:.0f}" for x in f.cpu_per_conn_us)
        print(f"{name:<14} {per_gib} | {per_conn}")
    print(f"  (the proxy's user CPU: {proxy.proxy_user_per_gib:.2f} s per GiB; the rest is the kernel's)")
    if direct.failures or proxy.failures:
        print(f"failed connections: direct {direct.failures}, proxy {proxy.failures}")
    print(f"proxy: {stats}")


def monkeypatch_stream_splice() -> None:
    import gateway.egress.splice

    gateway.egress.splice._raw_sockets = lambda *writers: []


async def bench(args: argparse.Namespace) -> None:
    from gateway.egress.service import running_egress  # (after the loop exists: nothing at import)

    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    config = EgressConfig(
        enabled=True,
        proxy_port=PROXY_PORT,
        resolver_port=RESOLVER_PORT,
        upstream_resolvers="127.0.0.1:9",  # (never asked: the client resolves nothing)
        dial_networks=str(RANGE),
    )
    if args.stream_splice:  # the path a TLS connection takes: to compare
        monkeypatch_stream_splice()
    client_network = str(ipaddress.ip_network(f"{CLIENT_ADDRESS}/30", strict=False))
    state = StaticPolicies()
    tables: list[tuple[int, Figures, Figures]] = []
    with bench_network():
        async with (
            running_server() as server_pid,
            running_egress(config, state, [client_network]) as proxy,
        ):
            for link_mbit in args.link_mbit:
                shape_server_links(link_mbit)
                direct, proxied = Figures(), Figures()
                for i in range(args.rounds):
                    order = [("direct", DIRECT_SERVER), ("proxy", SERVER_ADDRESS)]
                    for name, address in order if i % 2 == 0 else order[::-1]:
                        await measure(address, args, direct if name == "direct" else proxied, server_pid)
                tables.append((link_mbit, direct, proxied))
            decisions = ", ".join(f"{rule} {'allowed' if ok else 'denied'}: {n}"
                                  for (rule, ok), n in sorted(proxy.stats.decisions.items()))  # fmt: skip
    carried = state.bytes_in  # reported as the plane stopped
    if carried < len(args.link_mbit) * args.rounds * args.size_mib * 2**20:
        raise RuntimeError(
            f"the proxy carried only {carried} bytes back: the proxy path did not go through it"
        )
    for link_mbit, direct, proxied in tables:
        print("link: " + (f"the server's uplinks shaped to {link_mbit} Mbit/s" if link_mbit else "unshaped"))
        report(args, direct, proxied, f"{decisions}; {carried / 2**20:.0f} MiB carried to the client")


def shape_server_links(link_mbit: int) -> None:
    """Both paths' server side at one rate (``tc tbf``): a destination on the internet is as far as its
    link, and whether the proxy keeps up with that link is what a user sees. 0: unshaped (then the bench
    measures CPU: client, server and proxy share this machine's CPUs)."""
    for dev in ("eth0", "eth1"):
        run("ip", "netns", "exec", SERVER_NS, "tc", "qdisc", "del", "dev", dev, "root", check=False)
        if link_mbit:
            burst = max(link_mbit * 1_000_000 // 8 // 100, 64 * 1024)  # 10 ms at the rate, in bytes
            run("ip", "netns", "exec", SERVER_NS, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                "rate", f"{link_mbit}mbit", "burst", str(burst), "latency", "20ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--size-mib", type=int, default=1024, help="download size (default 1024)")
    parser.add_argument("--seconds", type=float, default=3.0, help="each rate and latency run (default 3)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for conn/s (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, ABBA order (default 2)")
    parser.add_argument(
        "--link-mbit",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[0, 10_000, 1_000],
        help="server link rates to run at, Mbit/s, comma separated; 0: unshaped (default 0,10000,1000)",
    )
    parser.add_argument(
        "--stream-splice", action="store_true", help="the proxy splices through its streams (no splice(2))"
    )
    sub.add_parser("serve", help=argparse.SUPPRESS)
    one = sub.add_parser("client", help=argparse.SUPPRESS)
    one.add_argument("what", choices=("download", "rate", "latency"))
    one.add_argument("address")
    one.add_argument("--size", type=int, default=0)
    one.add_argument("--seconds", type=float, default=1.0)
    one.add_argument("--clients", type=int, default=1)
    args = parser.parse_args()
    if args.command == "serve":
        uvloop.run(serve())
    elif args.command == "client":
        client_main(args)
    else:
        if os.geteuid() != 0:
            parser.error("needs root (network namespaces, nftables)")
        uvloop.run(bench(args))


if __name__ == "__main__":
    main()
