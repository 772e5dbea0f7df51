"""Host firewall for a namespaced driver's VMs (defence in depth): a VM reaches nothing on the host.

Routing already keeps a VM in: ip_forward is off, the VM CIDR is blackholed, there is no NAT. But the
host *accepts* what a VM sends to any of the host's own addresses (Linux's weak host model): through its
veth's host address (or another slot's, or the host's public one) a VM could connect to every host
service listening on 0.0.0.0 or [::], such as the API/edge port, the admin listener or a TCP Redis,
and over IPv6 link-local addresses too. This module renders and applies one nftables table per driver:

- ``input``: a packet that arrives on one of the driver's host-side veths (``<prefix>h<slot>``, matched
  with the wildcard ``"<prefix>h*"``) is accepted only if it belongs to a connection the host opened
  (the edge dialling the VM: SYN-ACKs, data, related ICMP errors) or is for an allowed (protocol, port)
  on *that veth's own* address (``fib daddr . iif type local``: not another slot's host address, not the
  host's public one). Today nothing is allowed; later the egress proxy's port (where the nftables
  redirect lands) and the VMs' DNS resolver. Everything else is dropped.
- ``forward``: nothing is forwarded from or to those veths, should anyone ever enable ip_forward.

Why drop and not ``reject with icmpx admin-prohibited``: the verdict is the same for every closed port,
so neither tells a VM which host ports listen; but drop makes the host send nothing on a VM's behalf (no
replies to a flooding VM, no hint that a firewall or a host stack is there at all). Programs in a VM
that dial the host hang until their own timeout instead of failing at once; no legitimate VM program
dials the host except the allowed services.

The ``inet`` family covers IPv4 and IPv6 alike. IPv6 is also switched off on both ends of every veth
(``disable_host_ipv6``, ``NAMESPACE_IPV6_OFF``), so there is no link-local path at all.

The table belongs to one driver (``gateway_<prefix>``): drivers with other prefixes, test suites among
them, never touch each other's tables. Caveat of the wildcard: prefix ``gw`` also matches the veths of
a driver whose prefix starts with ``gwh``; that only ever adds drops, never removes one.

Like the blackhole route, the table outlives the gateway on purpose (VMs keep running across restarts):
install it in the driver's ``start()``, never remove it in ``close()``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import DriverError
from gateway.orchestrator.drivers import _host

# The drivers' own rule for name prefixes (lowercase letters and digits): the prefix is pasted into
# nftables names and quoted strings, so nothing else may get through.
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]*")
# A driver's host-side veth (<prefix>h<slot>); becomes a sysctl key, so no dots or slashes.
_IFNAME_RE = re.compile(r"[a-z][a-z0-9]{0,14}")
PROTOCOLS = ("tcp", "udp")
# Before the distribution's usual ``filter``-priority chains (a drop anywhere is final, whatever the
# order, so this only saves them the work) and after conntrack (-200), which ``ct state`` needs.
PRIORITY = "filter - 10"
IPV6_SYSCTL_DIR = Path("/proc/sys/net/ipv6")


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.fullmatch(prefix):
        raise DriverError(f"firewall name prefix {prefix!r}: use lowercase letters and digits")
    return prefix


def table_name(prefix: str) -> str:
    return f"gateway_{check_prefix(prefix)}"


def veth_pattern(prefix: str) -> str:
    """The nftables wildcard matching every host-side veth of the driver (``gwh0``, ``gwh17``, ...)."""
    return f"{check_prefix(prefix)}h*"


def _allowed_rules(allowed: Iterable[tuple[str, int]]) -> list[str]:
    checked = set()
    for protocol, port in allowed:
        if protocol not in PROTOCOLS:
            raise DriverError(f"firewall allow list: protocol {protocol!r} is not one of {PROTOCOLS}")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise DriverError(f"firewall allow list: port {port!r} is not 1..65535")
        checked.add((protocol, port))
    # Sorted and without duplicates: the same allow list always renders the same text.
    # IPv4 only: the services listen on the veth's IPv4 address; a VM has no IPv6 to the host.
    return [f"meta nfproto ipv4 fib daddr . iif type local {p} dport {n} accept" for p, n in sorted(checked)]


@dataclass(frozen=True)
class EgressRedirect:
    """Where a VM's outbound traffic goes instead of out (the egress plane): every new TCP connection to
    the egress proxy's port, DNS to the resolver's, both on the host's loopback."""

    proxy_port: int
    resolver_port: int

    def rules(self) -> list[str]:
        for port in (self.proxy_port, self.resolver_port):
            if isinstance(port, bool) or not 1 <= port <= 65535:
                raise DriverError(f"egress redirect port {port!r} is not 1..65535")
        # To the loopback, where the egress plane listens (never on an address anyone else can reach);
        # the VM's host-side veth lets its traffic be routed there (``enable_route_localnet``).
        return [
            f"meta nfproto ipv4 udp dport 53 dnat ip to 127.0.0.1:{self.resolver_port}",
            f"meta nfproto ipv4 tcp dport 53 dnat ip to 127.0.0.1:{self.resolver_port}",
            f"meta nfproto ipv4 meta l4proto tcp dnat ip to 127.0.0.1:{self.proxy_port}",
        ]

    def accept_rules(self) -> list[str]:
        """What the input chain must then let through: the redirected traffic, to those two ports of the
        loopback (nothing else of the loopback)."""
        return [
            f"meta nfproto ipv4 ip daddr 127.0.0.1 tcp dport {self.proxy_port} accept",
            f"meta nfproto ipv4 ip daddr 127.0.0.1 tcp dport {self.resolver_port} accept",
            f"meta nfproto ipv4 ip daddr 127.0.0.1 udp dport {self.resolver_port} accept",
        ]


def render_table(
    prefix: str, allowed: Iterable[tuple[str, int]] = (), egress: EgressRedirect | None = None
) -> str:
    """Pure: the driver's table (nftables syntax), allowing ``allowed`` (protocol, port) from its VMs, and
    with ``egress`` redirecting their outbound TCP and DNS to the egress plane (no forwarding, no NAT out:
    a redirect makes the connection the host's own, which the proxy then judges)."""
    table, veths = table_name(prefix), veth_pattern(prefix)
    egress_accept = egress.accept_rules() if egress else []
    from_vm = [
        "ct state established,related accept",
        *_allowed_rules(allowed),
        *egress_accept,
        "counter drop",
    ]
    redirect = []
    if egress is not None:
        redirect = [
            "\tchain egress {",
            "\t\ttype nat hook prerouting priority dstnat; policy accept;",
            *(f'\t\tiifname "{veths}" {rule}' for rule in egress.rules()),
            "\t}",
            "",
        ]
    lines = [
        f"table inet {table} {{",
        # A VM speaks only from its own address: a packet from its link whose source the host would not
        # route back out of that link goes no further (a qemu guest owns its network stack and could
        # take any address; the host's answers to a foreign source would follow the host's routes).
        "\tchain antispoof {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        f'\t\tiifname "{veths}" meta nfproto ipv4 fib saddr . iif oif missing counter drop',
        "\t}",
        "",
        *redirect,
        "\tchain input {",
        f"\t\ttype filter hook input priority {PRIORITY}; policy accept;",
        f'\t\tiifname "{veths}" jump from_vm',
        "\t}",
        "",
        # A regular chain, so the interface wildcard is compared once per packet, not once per rule.
        "\tchain from_vm {",
        *(f"\t\t{rule}" for rule in from_vm),
        "\t}",
        "",
        "\tchain forward {",
        f"\t\ttype filter hook forward priority {PRIORITY}; policy accept;",
        f'\t\tiifname "{veths}" counter drop',
        f'\t\toifname "{veths}" counter drop',
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _delete(prefix: str) -> str:
    # ``table`` (add, a no-op when it exists) then ``delete``: deletes whether or not it existed, so the
    # same text installs the first time and replaces afterwards. One nft batch is one transaction: the
    # old table is never gone without the new one in place.
    table = table_name(prefix)
    return f"table inet {table}\ndelete table inet {table}\n"


def render(prefix: str, allowed: Iterable[tuple[str, int]] = (), egress: EgressRedirect | None = None) -> str:
    """Pure: the ``nft -f -`` input that installs or atomically replaces the driver's table."""
    return _delete(prefix) + render_table(prefix, allowed, egress)


def render_remove(prefix: str) -> str:
    """Pure: the ``nft -f -`` input that removes the driver's table; succeeds when there is none."""
    return _delete(prefix)


def _nft() -> str:
    return shutil.which("nft") or "/usr/sbin/nft"


async def install(
    prefix: str, allowed: Iterable[tuple[str, int]] = (), egress: EgressRedirect | None = None
) -> None:
    """Install (or replace) the driver's table; a DriverError names nft's complaint."""
    await _host.run_host([_nft(), "-f", "-"], input=render(prefix, allowed, egress).encode())


async def remove(prefix: str) -> None:
    """Remove the driver's table (tests, uninstall); nothing to do is not an error."""
    await _host.run_host([_nft(), "-f", "-"], input=render_remove(prefix).encode())


def ipv6_available() -> bool:
    """False on a kernel without IPv6 (``ipv6.disable=1``): there is then nothing to switch off."""
    return IPV6_SYSCTL_DIR.is_dir()


def enable_route_localnet(veth: str) -> None:
    """Let packets that arrived on a VM's host-side veth be delivered to 127.0.0.1 (where the egress
    redirect sends them): without it the kernel drops them as martians. The setting goes with the veth."""
    if not _IFNAME_RE.fullmatch(veth):
        raise DriverError(f"invalid interface name {veth!r}")
    Path(f"/proc/sys/net/ipv4/conf/{veth}/route_localnet").write_text("1")


def disable_host_ipv6(veth: str) -> None:
    """Switch IPv6 off on a driver's host-side veth: no link-local address, and every IPv6 packet arriving
    on it is dropped by the kernel (which matters most for qemu guests, whose own kernel sends whatever it
    likes). Call it after ``ip link add`` and before the link comes up (the link-local address is made
    then, so it never exists). The setting goes with the veth.
    """
    if not _IFNAME_RE.fullmatch(veth):
        raise DriverError(f"invalid interface name {veth!r}")
    if ipv6_available():
        (IPV6_SYSCTL_DIR / "conf" / veth / "disable_ipv6").write_text("1")


# IPv6 off inside a VM's network namespace, ``lo`` included: ``all`` for the interfaces already there,
# ``default`` for those created in or moved into it later (eth0, the qemu driver's bridge and tap).
# Set right after the namespace is made, so eth0 never has an IPv6 address. Sockets bound to ``[::]``
# inside still accept IPv4 (dual-stack), so servers that listen that way keep working.
NAMESPACE_IPV6_OFF = (("net/ipv6/conf/all/disable_ipv6", "1"), ("net/ipv6/conf/default/disable_ipv6", "1"))


def namespace_sysctl_argv(namespace_path: Path, settings: Iterable[tuple[str, str]]) -> list[str]:
    """Pure: the command that writes ``settings`` (``/proc/sys`` paths, values) in a network namespace.

    ``/proc/sys/net`` shows the namespace of the process that reads it, so a shell entered into it
    (``nsenter --net``) writes them; ``ip -n`` sets no sysctls. A setting the kernel lacks (IPv6 ones on a
    kernel without IPv6) is skipped.
    """
    lines = []
    for key, value in settings:
        if not re.fullmatch(r"[a-z0-9_/]+", key) or not re.fullmatch(r"[0-9 ]+", value):
            raise DriverError(f"invalid sysctl {key}={value!r}")
        lines.append(f"[ ! -e /proc/sys/{key} ] || echo '{value}' > /proc/sys/{key}\n")
    return ["nsenter", f"--net={namespace_path}", "/bin/sh", "-ec", "".join(lines)]
