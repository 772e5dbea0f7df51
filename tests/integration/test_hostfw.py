"""The host firewall on real namespaces: a VM reaches no host service and no other VM; the edge still
reaches the VM.

Two namespaces built by hand the way the netns driver builds a slot (veth ``gwfh<s>`` with ``.1`` of a
/30 on the host, ``eth0`` with ``.2`` inside): ``gwf-0`` keeps IPv6 with fixed link-local addresses (so
the IPv6 path can be shown open, then closed), ``gwf-1`` has IPv6 switched off by the module's commands,
in the order the driver is to run them. Everything here uses its own prefix (``gwf``), range
(172.31.246.0/24, away from every other suite's and the bench's) and table, so it runs beside the other
suites. Every probe is bounded by PROBE_TIMEOUT_S (a dropped SYN is only ever seen as a timeout); all
probes of a step run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import re
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from gateway.orchestrator.drivers import hostfw

IS_ROOT = os.geteuid() == 0
HAS_TOOLS = all(shutil.which(tool) for tool in ("ip", "nft", "sysctl"))
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not (IS_ROOT and HAS_TOOLS), reason="needs root, iproute2, nftables and procps"),
    pytest.mark.skipif(
        not hostfw.ipv6_available(), reason="the kernel has no IPv6 (the IPv6 paths are tested)"
    ),
]

PREFIX = "gwf"
BASE = "172.31.246."
HOST_LINK_LOCAL = "fe80::1"
VM_LINK_LOCAL = "fe80::2"
NETNS_DIR = Path("/var/run/netns")
SYS_CLASS_NET = Path("/sys/class/net")
PROBE_TIMEOUT_S = 1.0
COMMAND_TIMEOUT_S = 15.0
THREAD_TIMEOUT_S = 5.0
CLONE_NEWNET = 0x40000000
OPEN, TIMEOUT = "open", "timeout"

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def run(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), input=input, capture_output=True, text=True, check=check, timeout=COMMAND_TIMEOUT_S
    )


def ours() -> list[str]:
    """This suite's namespaces and host-side veths, and its table, wherever they are left."""
    found = [f"namespace {n}" for n in _listdir(NETNS_DIR) if re.fullmatch(rf"{PREFIX}-[0-9]+", n)]
    found += [f"veth {n}" for n in _listdir(SYS_CLASS_NET) if re.fullmatch(rf"{PREFIX}h[0-9]+", n)]
    if run("nft", "list", "table", "inet", hostfw.table_name(PREFIX), check=False).returncode == 0:
        found.append(f"table {hostfw.table_name(PREFIX)}")
    return found


def scrub() -> None:
    """Remove whatever this suite may have left (a crashed earlier run too); only ``gwf`` names."""
    for name in _listdir(SYS_CLASS_NET):
        if re.fullmatch(rf"{PREFIX}h[0-9]+", name):
            run("ip", "link", "del", name, check=False)
    for name in _listdir(NETNS_DIR):
        if re.fullmatch(rf"{PREFIX}-[0-9]+", name):
            run("ip", "netns", "del", name, check=False)
    run("nft", "-f", "-", input=hostfw.render_remove(PREFIX))


def _listdir(path: Path) -> list[str]:
    return os.listdir(path) if path.is_dir() else []


def in_namespace(namespace: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` on a throwaway thread that joined the namespace: sockets made there belong to it
    for good, wherever they are used afterwards. Never on a pool thread, which would stay in there and
    run later work inside (``asyncio.to_thread(in_namespace, ...)`` is fine: that thread only waits)."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(NETNS_DIR / namespace, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {namespace}")
            finally:
                os.close(fd)
            outcome.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"in-{namespace}")
    thread.start()
    thread.join(THREAD_TIMEOUT_S)
    if failure:
        raise failure[0]
    assert outcome, f"nothing came back from namespace {namespace}"
    return outcome[0]


def listener(family: socket.AddressFamily, address: str, *, v6only: bool = False) -> socket.socket:
    """A listening TCP socket on a free port. The kernel completes handshakes without accept(), so a
    probe's connect succeeding shows the path is open."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((address, 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def dual_stack_listener() -> socket.socket:
    """A VM's server as many listen: on [::], taking IPv4 too."""
    return listener(socket.AF_INET6, "::")


def connect_all(addresses: list[tuple[object, ...]]) -> list[str]:
    """Non-blocking connects to every address, awaited together for at most PROBE_TIMEOUT_S."""
    results = [TIMEOUT] * len(addresses)
    with contextlib.ExitStack() as stack, selectors.DefaultSelector() as selector:
        for index, address in enumerate(addresses):
            sock = stack.enter_context(
                socket.socket(socket.AF_INET6 if len(address) == 4 else socket.AF_INET)
            )
            sock.setblocking(False)
            code = sock.connect_ex(address)
            if code == errno.EINPROGRESS:
                selector.register(sock, selectors.EVENT_WRITE, index)
            else:
                results[index] = OPEN if code == 0 else errno.errorcode.get(code, str(code))
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                code = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
                results[key.data] = OPEN if code == 0 else errno.errorcode.get(code, str(code))
                selector.unregister(key.fileobj)
    return results


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


@dataclass
class Net:
    """Two slots, host listeners, and the address-probing helpers."""

    stack: contextlib.ExitStack
    scope_id: int  # eth0's index inside gwf-0, for the link-local address
    host_v4: socket.socket = field(init=False)
    host_v6: socket.socket = field(init=False)
    host_allowed: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        # The gateway's API, admin listener, a TCP Redis: what listens on every host address.
        self.host_v4 = self.keep(listener(socket.AF_INET, "0.0.0.0"))
        self.host_v6 = self.keep(listener(socket.AF_INET6, "::", v6only=True))
        # Stands for a later egress proxy or resolver port.
        self.host_allowed = self.keep(listener(socket.AF_INET, "0.0.0.0"))

    def keep(self, sock: socket.socket) -> socket.socket:
        self.stack.callback(sock.close)
        return sock

    @staticmethod
    def host_ip(slot: int) -> str:
        return f"{BASE}{4 * slot + 1}"

    @staticmethod
    def vm_ip(slot: int) -> str:
        return f"{BASE}{4 * slot + 2}"

    async def probe(self, namespace: str, targets: dict[str, tuple[object, ...]]) -> dict[str, str]:
        """Connect from inside the namespace to every target at once: 'open', 'timeout' or an errno name.

        Off the loop: the namespace thread does the connects itself (uvloop's sock_connect resolves the
        address again, losing a link-local address's scope).
        """
        addresses = list(targets.values())
        results = await asyncio.to_thread(in_namespace, namespace, lambda: connect_all(addresses))
        return dict(zip(targets, results, strict=True))

    async def from_vm0(self) -> dict[str, str]:
        """What the VM in slot 0 can reach on the host, by every way in."""
        return await self.probe(
            f"{PREFIX}-0",
            {
                "own host address": (self.host_ip(0), port_of(self.host_v4)),
                "other slot's host address": (self.host_ip(1), port_of(self.host_v4)),
                "IPv6 link-local": (HOST_LINK_LOCAL, port_of(self.host_v6), 0, self.scope_id),
                "allowed port, own host address": (self.host_ip(0), port_of(self.host_allowed)),
                "allowed port, other slot's host address": (self.host_ip(1), port_of(self.host_allowed)),
            },
        )


def build_slot(slot: int, *, ipv6: bool) -> None:
    """One slot as the driver makes it; with ``ipv6`` False, IPv6 goes off the way the driver is to do it."""
    namespace, veth = f"{PREFIX}-{slot}", f"{PREFIX}h{slot}"
    run("ip", "netns", "add", namespace)
    if not ipv6:  # before eth0 exists in there
        run(*hostfw.namespace_sysctl_argv(Path("/var/run/netns") / namespace, hostfw.NAMESPACE_IPV6_OFF))
    run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
    host_side = [f"addr add {Net.host_ip(slot)}/30 dev {veth}", f"link set dev {veth} up"]
    vm_side = [
        "link set dev lo up",
        f"addr add {Net.vm_ip(slot)}/30 dev eth0",
        "link set dev eth0 up",
        f"route add default via {Net.host_ip(slot)} dev eth0",
    ]
    if ipv6:
        # Fixed link-local addresses without duplicate address detection: usable at once, no waiting.
        host_side[:0] = [
            f"link set dev {veth} addrgenmode none",
            f"addr add {HOST_LINK_LOCAL}/64 dev {veth} nodad",
        ]
        vm_side[:0] = ["link set dev eth0 addrgenmode none", f"addr add {VM_LINK_LOCAL}/64 dev eth0 nodad"]
    else:
        hostfw.disable_host_ipv6(veth)  # before the link comes up
    run("ip", "-batch", "-", input="\n".join(host_side) + "\n")
    run("ip", "-n", namespace, "-batch", "-", input="\n".join(vm_side) + "\n")


@pytest.fixture
def net() -> Iterator[Net]:
    scrub()
    forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    try:
        # Sockets (some made inside the namespaces) close first, then the namespaces go.
        with contextlib.ExitStack() as stack:
            build_slot(0, ipv6=True)
            build_slot(1, ipv6=False)
            scope_id = in_namespace(f"{PREFIX}-0", lambda: socket.if_nametoindex("eth0"))
            yield Net(stack, scope_id)
    finally:
        scrub()
    assert not ours(), "left on the host after the test"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forwarding


async def edge_round_trip(net: Net, slot: int) -> bytes:
    """The edge's direction: the host dials a server in the VM and they exchange bytes both ways. The
    server listens on [::] (dual-stack), as many do; the edge dials its IPv4 address."""
    server = net.keep(await asyncio.to_thread(in_namespace, f"{PREFIX}-{slot}", dual_stack_listener))
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(PROBE_TIMEOUT_S * 5):
        with socket.socket() as client:
            client.setblocking(False)
            await loop.sock_connect(client, (net.vm_ip(slot), port_of(server)))
            accepted, _ = await loop.sock_accept(server)
            with accepted:
                await loop.sock_sendall(client, b"ping")
                assert await loop.sock_recv(accepted, 4) == b"ping"
                await loop.sock_sendall(accepted, b"pong")
                return await loop.sock_recv(client, 4)


async def test_a_vm_reaches_host_services_only_until_the_firewall_is_installed(net: Net) -> None:
    # Without the firewall every way in is open: what the firewall is for, and what makes this test able
    # to fail.
    assert set((await net.from_vm0()).values()) == {OPEN}

    await hostfw.install(PREFIX)
    closed = await net.from_vm0()
    assert closed == {name: TIMEOUT for name in closed}, closed
    # Replies to what the host opens still pass, data included.
    assert await edge_round_trip(net, 0) == b"pong"
    assert await edge_round_trip(net, 1) == b"pong"

    # Re-installing replaces the table at once (same text, other allow list): the allowed port answers
    # on the VM's own host address only.
    await hostfw.install(PREFIX, [("tcp", port_of(net.host_allowed))])
    await hostfw.install(PREFIX, [("tcp", port_of(net.host_allowed))])
    listed = run("nft", "list", "table", "inet", hostfw.table_name(PREFIX)).stdout
    assert listed.count("jump from_vm") == 1 and listed.count(f"dport {port_of(net.host_allowed)}") == 1
    assert await net.from_vm0() == {
        "own host address": TIMEOUT,
        "other slot's host address": TIMEOUT,
        "IPv6 link-local": TIMEOUT,
        "allowed port, own host address": OPEN,
        "allowed port, other slot's host address": TIMEOUT,
    }

    await hostfw.remove(PREFIX)
    await hostfw.remove(PREFIX)  # nothing left to remove is fine
    assert set((await net.from_vm0()).values()) == {OPEN}


async def test_nothing_is_forwarded_to_or_from_a_vm(net: Net) -> None:
    """Were forwarding on (here on the two test veths only; ip_forward stays off), VM 0 could reach VM 1."""
    server = net.keep(await asyncio.to_thread(in_namespace, f"{PREFIX}-1", dual_stack_listener))
    for slot in (0, 1):
        run("sysctl", "-qw", f"net.ipv4.conf.{PREFIX}h{slot}.forwarding=1")
    to_vm1 = {"VM 1's server": (net.vm_ip(1), port_of(server))}
    # Nothing listens on VM 0's port 9: its kernel's reset coming back shows the path is open.
    to_vm0 = {"VM 0's closed port": (net.vm_ip(0), 9)}
    before = await net.probe(f"{PREFIX}-0", to_vm1), await net.probe(f"{PREFIX}-1", to_vm0)
    if before != ({"VM 1's server": OPEN}, {"VM 0's closed port": "ECONNREFUSED"}):
        pytest.skip(f"something else on this host already stops forwarding between the test veths: {before}")

    await hostfw.install(PREFIX)
    assert await net.probe(f"{PREFIX}-0", to_vm1) == {"VM 1's server": TIMEOUT}
    assert await net.probe(f"{PREFIX}-1", to_vm0) == {"VM 0's closed port": TIMEOUT}


async def test_ipv6_is_off_on_both_ends_of_a_veth(net: Net) -> None:
    assert run("sysctl", "-n", f"net.ipv6.conf.{PREFIX}h1.disable_ipv6").stdout == "1\n"
    assert '"inet6"' not in run("ip", "-j", "addr", "show", "dev", f"{PREFIX}h1").stdout
    inside = run("ip", "-n", f"{PREFIX}-1", "-j", "addr", "show").stdout
    assert '"inet"' in inside and '"inet6"' not in inside  # not even ::1 on lo
    assert (
        run("ip", "netns", "exec", f"{PREFIX}-1", "cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6").stdout
        == "1\n"
    )
    # ...and a dual-stack server in there is still reached over IPv4.
    assert await edge_round_trip(net, 1) == b"pong"
