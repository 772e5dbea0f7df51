"""A test "internet" on one machine for the egress tests (../shared/recipes/test-internet.md).

Test hosts live in network namespaces the test creates, on ``198.18.0.0/15`` (RFC 2544's benchmark
range, blackholed on the host first so a missing route never sends a packet out). Each host runs a
small HTTP server and counts the packets it receives, so a test can prove a denied destination never
got a SYN. Everything made is removed again, also when the test fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

INTERNET = ipaddress.ip_network("198.18.0.0/15")
# Test hosts take /30s from here: host side .1, test host .2.
HOSTS_FROM = ipaddress.ip_network("198.18.200.0/24")
# (socketserver's own server: http.server's looks its address up in DNS when it binds, which hangs here.)
SERVER = """
import http.server, socketserver, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from " + sys.argv[2] + " " + self.headers.get("Host", "")).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer((sys.argv[1], 80), H).serve_forever()
"""
READY_TIMEOUT_S = 10.0


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=15, check=check)


def blackhole_internet() -> None:
    """Before any test host exists: the whole range goes nowhere unless a more specific route (a test
    host's veth) says otherwise. Left in place afterwards (other suites and the bench rely on it too)."""
    run("ip", "route", "replace", "blackhole", str(INTERNET))


@dataclass
class InternetHost:
    name: str
    address: str
    host_side: str
    server: subprocess.Popen[bytes] | None = None

    def packets_received(self) -> int:
        """TCP segments and UDP datagrams the test host's kernel received (a SYN included; the ARP and
        IPv6 neighbour chatter of its link not)."""
        lines = run("ip", "netns", "exec", self.name, "cat", "/proc/net/snmp").stdout.splitlines()
        counters: dict[str, int] = {}
        for head, values in zip(lines[::2], lines[1::2], strict=False):
            proto = head.split(":")[0]
            for key, value in zip(head.split()[1:], values.split()[1:], strict=False):
                counters[f"{proto}.{key}"] = int(value)
        return counters["Tcp.InSegs"] + counters["Udp.InDatagrams"] + counters["Udp.NoPorts"]


@contextlib.contextmanager
def internet_hosts(count: int, prefix: str = "tnet") -> Iterator[list[InternetHost]]:
    """``count`` test hosts with an HTTP server on port 80 each; removed afterwards whatever happens."""
    blackhole_internet()
    made: list[InternetHost] = []
    try:
        for i, subnet in zip(range(count), HOSTS_FROM.subnets(new_prefix=30), strict=False):
            name = f"{prefix}-{i}"
            host = InternetHost(name, str(subnet[2]), f"{prefix}h{i}")
            made.append(host)
            run("ip", "netns", "add", name)
            run("ip", "link", "add", host.host_side, "type", "veth", "peer", "name", "eth0", "netns", name)
            run("ip", "addr", "add", f"{subnet[1]}/30", "dev", host.host_side)
            run("ip", "link", "set", host.host_side, "up")
            run("ip", "-n", name, "addr", "add", f"{subnet[2]}/30", "dev", "eth0")
            run("ip", "-n", name, "link", "set", "eth0", "up")
            run("ip", "-n", name, "link", "set", "lo", "up")
            run("ip", "-n", name, "route", "add", "default", "via", str(subnet[1]))
            host.server = subprocess.Popen(
                ["ip", "netns", "exec", name, sys.executable, "-c", SERVER, host.address, name],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            _until_listening(host)
        yield made
    finally:
        for host in made:
            if host.server is not None:
                host.server.kill()
                host.server.wait()
            run("ip", "link", "del", host.host_side, check=False)
            run("ip", "netns", "del", host.name, check=False)


def _until_listening(host: InternetHost) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        listening = run("ip", "netns", "exec", host.name, "ss", "-Hltn").stdout
        if f"{host.address}:80 " in listening:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the test host {host.name} did not start its server")
