"""A test "internet" on one machine for the egress tests (../shared/recipes/test-internet.md).

Test hosts live in network namespaces the test creates, on ``198.18.0.0/15`` (RFC 2544's benchmark
range, blackholed on the host first so a missing route never sends a packet out). Each host runs a
small HTTP server and counts the packets it receives, so a test can prove a denied destination never
got a SYN. Everything made is removed again, also when the test fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

INTERNET = ipaddress.ip_network("198.18.0.0/15")
# Test runs on one machine at once (a developer's and a CI job, say) must not collide: each takes its
# own /24 and namespace names by its process id. Test hosts take /30s from it: host side .1, host .2.
# The workers of one run (pytest-xdist's gw0, gw1...: up to 4) differ in the tag's last two bits.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
RUN_TAG = os.getpid() % 12 * 4 + _WORKER % 4
HOSTS_FROM = ipaddress.ip_network(f"198.18.{150 + RUN_TAG}.0/24")
# (socketserver's own server: http.server's looks its address up in DNS when it binds, which hangs here.)
# With a third argument (a PEM file: certificate chain and key), also HTTPS on port 443.
SERVER = """
import http.server, socketserver, ssl, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from " + sys.argv[2] + " " + self.headers.get("Host", "")).encode()
        if self.path == "/headers":  # what arrived, for the tests of what the egress proxy changes
            body = "".join(k + ": " + v + "\\n" for k, v in self.headers.items()).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
if len(sys.argv) > 3:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[3])
    https = socketserver.ThreadingTCPServer((sys.argv[1], 443), H)
    https.socket = context.wrap_socket(https.socket, server_side=True)
    threading.Thread(target=https.serve_forever, daemon=True).start()
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
    https: bool = False
    veth_made: bool = False

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
def internet_hosts(
    count: int,
    prefix: str = "tnet",
    tls: Sequence[bytes | None] = (),
    network: ipaddress.IPv4Network = HOSTS_FROM,
) -> Iterator[list[InternetHost]]:
    """``count`` test hosts with an HTTP server on port 80 each; removed afterwards whatever happens.

    ``tls[i]``, when given: host i also serves HTTPS on port 443 with that PEM (certificate chain, then
    its key). ``network``: where their /30s come from (a subnet of INTERNET; tests that may run at the
    same time take different ones)."""
    blackhole_internet()
    made: list[InternetHost] = []
    pems = tempfile.TemporaryDirectory(prefix="internet-tls-")
    try:
        for i, subnet in zip(range(count), network.subnets(new_prefix=30), strict=False):
            label = f"{prefix}-{i}"  # what its server says it is
            name = f"{prefix}{RUN_TAG}-{i}"
            host = InternetHost(name, str(subnet[2]), f"{prefix}{RUN_TAG}h{i}")
            run("ip", "netns", "add", name)  # first: a name someone else holds is not ours to remove
            made.append(host)
            run("ip", "link", "add", host.host_side, "type", "veth", "peer", "name", "eth0", "netns", name)
            host.veth_made = True
            run("ip", "addr", "add", f"{subnet[1]}/30", "dev", host.host_side)
            run("ip", "link", "set", host.host_side, "up")
            run("ip", "-n", name, "addr", "add", f"{subnet[2]}/30", "dev", "eth0")
            run("ip", "-n", name, "link", "set", "eth0", "up")
            run("ip", "-n", name, "link", "set", "lo", "up")
            run("ip", "-n", name, "route", "add", "default", "via", str(subnet[1]))
            argv = ["ip", "netns", "exec", name, sys.executable, "-c", SERVER, host.address, label]
            pem = tls[i] if i < len(tls) else None
            if pem is not None:
                path = Path(pems.name, f"{name}.pem")
                path.write_bytes(pem)
                argv.append(str(path))
                host.https = True
            host.server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _until_listening(host)
        yield made
    finally:
        for host in made:
            if host.server is not None:
                host.server.kill()
                host.server.wait()
            if host.veth_made:
                run("ip", "link", "del", host.host_side, check=False)
            run("ip", "netns", "del", host.name, check=False)
        pems.cleanup()


def _until_listening(host: InternetHost) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        listening = run("ip", "netns", "exec", host.name, "ss", "-Hltn").stdout
        if f"{host.address}:80 " in listening and (not host.https or f"{host.address}:443 " in listening):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the test host {host.name} did not start its server")
