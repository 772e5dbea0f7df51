"""Egress from inside real VMs: the host's nftables redirect a VM's TCP and DNS to the gateway's proxy
and resolver, which let through what the VM's policy allows and nothing else, toward a test internet
(namespaces on 198.18/15 named in bind9). Nothing here can leave the machine: the proxy may dial only
the test range."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.egress.ca import make_ca
from tests.acme_env import AcmeTestEnv
from tests.conftest import GatewayUnderTest
from tests.egress_env import DRIVERS, egress_gateway, leaf_pem, sh
from tests.internet_env import InternetHost, internet_hosts
from tests.qemu_env import qemu_missing

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nftables"),
]

ALLOWED, DENIED, WILD = "web.example.test", "other.example.test", "a.wild.example.test"
# The test internet's own roots: its HTTPS hosts' leaves chain to them; a VM trusts them when told.
ROOTS = make_ca("test internet roots")


@pytest.fixture
async def hosts(acme_env: AcmeTestEnv) -> AsyncIterator[list[InternetHost]]:
    with internet_hosts(2) as made:
        await acme_env.set_record(ALLOWED, "A", made[0].address)
        await acme_env.set_record(DENIED, "A", made[1].address)
        yield made


def host_side(host: InternetHost) -> str:
    """The host's address on a test host's link (the test host is the next one)."""
    return str(ipaddress.ip_address(host.address) - 1)


async def until_listed(gw: GatewayUnderTest, vm_id: str, rules: set[str]) -> set[str]:
    """The VM's denial list through the API once it names every rule of ``rules`` (reported each second)."""
    deadline = time.monotonic() + 10
    while True:
        status, view = await gw.request("GET", f"/v1/egress/vm/{vm_id}")
        assert status == 200, view
        listed = {d["rule"] for d in view["recent_denials"]}
        if rules <= listed or time.monotonic() > deadline:
            return listed
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_vm_reaches_what_its_policy_allows_and_nothing_else(
    driver: str, gateway_factory: Any, acme_env: AcmeTestEnv
) -> None:
    gw = await egress_gateway(gateway_factory, acme_env, driver)
    with internet_hosts(4, tls=[leaf_pem(ROOTS, ALLOWED), leaf_pem(ROOTS, DENIED)]) as (
        allowed_host,
        denied_host,
        wild_host,
        cidr_host,
    ):
        for name, host in ((ALLOWED, allowed_host), (DENIED, denied_host), (WILD, wild_host)):
            await acme_env.set_record(name, "A", host.address)
        policy = {
            "allow_http": True,
            "allow_https": True,
            "allowed_domains": [ALLOWED, "*.wild.example.test"],
            # The second: the host's own side of that test host's link (an address of the host).
            "allowed_cidrs": [f"{cidr_host.address}/32", f"{host_side(cidr_host)}/32"],
        }
        status, vm = await gw.request("POST", "/v1/vms", json={"egress_policy": policy})
        assert status == 200, vm
        sid = vm["session_id"]
        await sh(gw, sid, f"cat > /tmp/roots.pem <<'EOF'\n{ROOTS.cert_pem.decode()}EOF")
        before = denied_host.packets_received()

        http = await sh(gw, sid, f"curl -sS -m 10 http://{ALLOWED}/")  # by Host
        assert http["stdout"] == f"hello from tnet-0 {ALLOWED}", http
        https = await sh(gw, sid, f"curl -sS -m 10 --cacert /tmp/roots.pem https://{ALLOWED}/")  # by SNI
        assert https["stdout"] == f"hello from tnet-0 {ALLOWED}", https  # end to end: the host's own leaf
        wild = await sh(gw, sid, f"curl -sS -m 10 http://{WILD}/")
        assert wild["stdout"] == f"hello from tnet-2 {WILD}", wild
        raw = await sh(gw, sid, (  # raw TCP, no name at all, opened by the CIDR
            f"exec 3<>/dev/tcp/{cidr_host.address}/80; "
            "printf 'HELLO / HTTP/1.0\\r\\n\\r\\n' >&3; head -c 12 <&3"
        ))  # fmt: skip
        assert raw["stdout"] == "HTTP/1.0 501", raw  # the server answered bytes no HTTP method began

        denied_name = await sh(gw, sid, f"getent hosts {DENIED} || echo no-such-name")
        assert denied_name["stdout"].strip() == "no-such-name"  # NXDOMAIN, though bind9 has it
        never_resolved = await sh(
            gw, sid, f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}' http://{denied_host.address}/"
        )
        assert never_resolved["stdout"] == "403", never_resolved
        lying_host = await sh(gw, sid, (
            f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}' -H 'Host: {ALLOWED}' http://{denied_host.address}/"
        ))  # fmt: skip
        assert lying_host["stdout"] == "403", lying_host
        lying_sni = await sh(gw, sid, (
            f"curl -sS -m 10 --cacert /tmp/roots.pem --connect-to {ALLOWED}:443:{denied_host.address}:443 "
            f"https://{ALLOWED}/"
        ))  # fmt: skip
        assert lying_sni["exit_code"] != 0 and not lying_sni["stdout"], lying_sni
        raw_denied = await sh(gw, sid, (
            f"exec 3<>/dev/tcp/{denied_host.address}/80 && printf 'x' >&3; head -c 1 <&3 | wc -c"
        ))  # fmt: skip
        assert raw_denied["stdout"].strip().endswith("0"), raw_denied  # closed, nothing came back
        own = await sh(gw, sid, f"curl -sS -m 10 http://{host_side(cidr_host)}:{gw.config.server.port}/")
        assert "denied_network" in own["stdout"], own  # the host itself, though a CIDR names it
        udp = await sh(gw, sid, f"timeout 3 bash -c 'echo x > /dev/udp/{denied_host.address}/9' ; echo done")
        assert udp["stdout"].strip().endswith("done")
        assert denied_host.packets_received() == before  # not one packet reached it

        listed = await until_listed(gw, vm["vm_id"], {"not_allowed", "name_not_resolved_to_address"})
        assert {"not_allowed", "name_not_resolved_to_address"} <= listed, listed


async def test_egress_policies_are_refused_where_vms_have_no_egress(gw: GatewayUnderTest) -> None:
    status, body = await gw.request("POST", "/v1/vms", json={"egress_policy": {"allow_https": True}})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "egress_policy"]


async def test_a_bad_policy_is_a_422_naming_the_field(gateway_factory: Any, acme_env: AcmeTestEnv) -> None:
    gw = await egress_gateway(gateway_factory, acme_env)
    for policy, loc in (
        ({"allowed_domains": ["no spaces.test"]}, ["body", "egress_policy", "allowed_domains"]),
        ({"allowed_cidrs": ["10.0.0.0/33"]}, ["body", "egress_policy", "allowed_cidrs"]),
    ):
        status, body = await gw.request("POST", "/v1/vms", json={"egress_policy": policy})
        assert status == 422 and body["detail"][0]["loc"] == loc, body


def antispoof_drops(prefix: str) -> int:
    """Packets the driver's table dropped for a source address that is not the VM's own."""
    listed = subprocess.run(
        ["nft", "list", "chain", "inet", f"gateway_{prefix}", "antispoof"], capture_output=True, text=True
    ).stdout
    found = re.search(r"counter packets (\d+)", listed)
    assert found is not None, listed
    return int(found.group(1))


# Three DNS questions from the address given as the first argument.
SPOOF_SENDER = (
    "import socket, sys; s = socket.socket(2, 2); s.bind((sys.argv[1], 0)); "
    "[s.sendto(b'x' * 12, ('192.0.2.53', 53)) for _ in range(3)]"
)


@pytest.mark.skipif(qemu_missing() is not None, reason=str(qemu_missing()))
async def test_a_vm_cannot_speak_from_an_address_not_its_own(
    gateway_factory: Any, acme_env: AcmeTestEnv
) -> None:
    """A qemu guest owns its network stack and can take any address. What it sends from one that is not
    its own is dropped on the host's side of its link: the proxy never answers a foreign source (its
    answer would follow the host's routes, off the machine)."""
    gw = await egress_gateway(gateway_factory, acme_env, "qemu")
    status, vm = await gw.request("POST", "/v1/vms", json={})
    assert status == 200, vm
    foreign = "203.0.113.7"  # TEST-NET-3: nobody's
    prefix = gw.config.qemu.name_prefix
    added = await sh(gw, vm["session_id"], f"ip addr add {foreign}/32 dev eth0")
    assert added["exit_code"] == 0, added
    before = antispoof_drops(prefix)
    sent = await sh(gw, vm["session_id"], f"timeout 10 python3 -c {shlex.quote(SPOOF_SENDER)} {foreign}")
    assert sent["exit_code"] == 0, sent
    assert antispoof_drops(prefix) >= before + 3
    own = await sh(gw, vm["session_id"], f"getent hosts {ALLOWED}; echo $?")
    assert own["stdout"].strip() == "2", own  # from its own address: answered (NXDOMAIN: the default)
