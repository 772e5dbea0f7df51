"""The host firewall's rendered nftables text (pure), and that nft itself accepts it (root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.errors import DriverError
from gateway.orchestrator.drivers import hostfw

HAS_NFT = shutil.which("nft") is not None
NEEDS_NFT = pytest.mark.skipif(
    not (os.geteuid() == 0 and HAS_NFT), reason="`nft -c` talks to the kernel: needs root and nftables"
)


def rules(text: str, chain: str) -> list[str]:
    """The statements of one chain of a rendered table, stripped."""
    lines = [line.strip() for line in text.splitlines()]
    start = lines.index(f"chain {chain} {{")
    end = lines.index("}", start)
    return lines[start + 1 : end]


@pytest.mark.parametrize(
    ("prefix", "table", "pattern"),
    [("gw", "gateway_gw", "gwh*"), ("gwq", "gateway_gwq", "gwqh*"), ("gwt", "gateway_gwt", "gwth*")],
)
def test_each_prefix_has_its_own_table_and_veth_wildcard(prefix: str, table: str, pattern: str) -> None:
    text = hostfw.render(prefix)
    assert text.splitlines()[:3] == [
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
    ]
    assert rules(text, "input") == [
        "type filter hook input priority filter - 10; policy accept;",
        f'iifname "{pattern}" jump from_vm',
    ]
    assert rules(text, "forward") == [
        "type filter hook forward priority filter - 10; policy accept;",
        f'iifname "{pattern}" counter drop',
        f'oifname "{pattern}" counter drop',
    ]
    # Exactly one table, and no other driver's names.
    assert text.count("table inet ") == 3
    assert all(f'"{other}h*"' not in text for other in ("gw", "gwq", "gwt") if other != prefix)


def test_without_an_allow_list_a_vm_gets_replies_and_nothing_else() -> None:
    assert rules(hostfw.render("gw"), "from_vm") == ["ct state established,related accept", "counter drop"]


def test_allowed_services_come_between_replies_and_the_drop_sorted_and_once() -> None:
    text = hostfw.render("gw", [("udp", 53), ("tcp", 3128), ("tcp", 53), ("udp", 53)])
    assert rules(text, "from_vm") == [
        "ct state established,related accept",
        "meta nfproto ipv4 fib daddr . iif type local tcp dport 53 accept",
        "meta nfproto ipv4 fib daddr . iif type local tcp dport 3128 accept",
        "meta nfproto ipv4 fib daddr . iif type local udp dport 53 accept",
        "counter drop",
    ]
    assert text == hostfw.render("gw", [("tcp", 3128), ("udp", 53), ("tcp", 53)])


def test_render_is_the_delete_idiom_then_the_table() -> None:
    assert hostfw.render("gwx", [("tcp", 1)]) == hostfw.render_remove("gwx") + hostfw.render_table(
        "gwx", [("tcp", 1)]
    )
    assert hostfw.render_remove("gwx") == "table inet gateway_gwx\ndelete table inet gateway_gwx\n"


@pytest.mark.parametrize("prefix", ["", "GW", "1gw", "gw-1", 'gw"', "gw*", "gw h", "gw\n"])
def test_prefixes_outside_the_drivers_alphabet_are_refused(prefix: str) -> None:
    with pytest.raises(DriverError):
        hostfw.render(prefix)
    with pytest.raises(DriverError):
        hostfw.render_remove(prefix)


@pytest.mark.parametrize(
    "entry",
    [("icmp", 1), ("TCP", 80), ("tcp", 0), ("tcp", 65536), ("tcp", -1), ("tcp", "80"), ("tcp", True)],
)
def test_bad_allow_entries_are_refused(entry: tuple[str, int]) -> None:
    with pytest.raises(DriverError):
        hostfw.render("gw", [entry])


def test_host_ipv6_off_takes_only_interface_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("", "gw.h1", "gw/h1", "../../kernel/panic", "a" * 16, "-gwh1"):
        with pytest.raises(DriverError):
            hostfw.disable_host_ipv6(bad)


def test_namespace_sysctls_are_written_by_a_shell_entered_into_the_namespace() -> None:
    argv = hostfw.namespace_sysctl_argv(Path("/var/run/netns/gw-3"), hostfw.NAMESPACE_IPV6_OFF)
    assert argv[:2] == ["nsenter", "--net=/var/run/netns/gw-3"]
    script = argv[-1]
    for key in ("net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"):
        # Skipped where the kernel has no such setting (no IPv6), written otherwise.
        assert f"[ ! -e /proc/sys/{key} ] || echo '1' > /proc/sys/{key}" in script.splitlines()
    for bad in (("../../kernel/panic", "1"), ("net/ipv4/x", "1; reboot")):
        with pytest.raises(DriverError):
            hostfw.namespace_sysctl_argv(Path("/var/run/netns/gw-3"), [bad])


def test_egress_redirects_a_vms_tcp_and_dns_to_the_egress_plane_and_opens_just_those_ports() -> None:
    text = hostfw.render("gw", [], hostfw.EgressRedirect(proxy_port=3129, resolver_port=5353))
    assert rules(text, "egress") == [
        "type nat hook prerouting priority dstnat; policy accept;",
        'iifname "gwh*" meta nfproto ipv4 udp dport 53 dnat ip to 127.0.0.1:5353',
        'iifname "gwh*" meta nfproto ipv4 tcp dport 53 dnat ip to 127.0.0.1:5353',
        'iifname "gwh*" meta nfproto ipv4 meta l4proto tcp dnat ip to 127.0.0.1:3129',
    ]
    assert rules(text, "from_vm") == [
        "ct state established,related accept",
        "meta nfproto ipv4 ip daddr 127.0.0.1 tcp dport 3129 accept",
        "meta nfproto ipv4 ip daddr 127.0.0.1 tcp dport 5353 accept",
        "meta nfproto ipv4 ip daddr 127.0.0.1 udp dport 5353 accept",
        "counter drop",  # other UDP and every other protocol: dropped (and nothing is forwarded)
    ]
    assert "chain egress" not in hostfw.render("gw")
    with pytest.raises(DriverError):
        hostfw.render("gw", [], hostfw.EgressRedirect(proxy_port=0, resolver_port=53))


@pytest.mark.root
@NEEDS_NFT
@pytest.mark.parametrize("allowed", [[], [("tcp", 3128), ("udp", 53), ("tcp", 53)]])
@pytest.mark.parametrize("prefix", ["gw", "gwq", "gwt"])
def test_nft_accepts_the_ruleset(prefix: str, allowed: list[tuple[str, int]]) -> None:
    """``nft -c`` checks against the kernel (expressions such as fib must exist) and changes nothing."""
    egress = hostfw.render(prefix, allowed, hostfw.EgressRedirect(proxy_port=3129, resolver_port=5353))
    for text in (hostfw.render(prefix, allowed), egress, hostfw.render_remove(prefix)):
        done = subprocess.run(
            ["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True, timeout=15
        )
        assert done.returncode == 0, done.stderr
