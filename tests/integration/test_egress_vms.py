"""Egress from inside real VMs: the host's nftables redirect a VM's TCP and DNS to the gateway's proxy
and resolver, which let through what the VM's policy allows and nothing else, toward a test internet
(namespaces on 198.18/15 named in bind9). Nothing here can leave the machine: the proxy may dial only
the test range."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.acme_env import AcmeTestEnv
from tests.conftest import GatewayUnderTest
from tests.internet_env import INTERNET, InternetHost, internet_hosts

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nftables"),
]

ALLOWED, DENIED = "web.example.test", "other.example.test"
EGRESS_PORTS = {"proxy_port": 15901, "resolver_port": 15953}


@pytest.fixture
async def hosts(acme_env: AcmeTestEnv) -> AsyncIterator[list[InternetHost]]:
    with internet_hosts(2) as made:
        await acme_env.set_record(ALLOWED, "A", made[0].address)
        await acme_env.set_record(DENIED, "A", made[1].address)
        yield made


async def egress_gateway(gateway_factory: Any, acme_env: AcmeTestEnv) -> GatewayUnderTest:
    egress = {
        "enabled": True,
        **EGRESS_PORTS,
        "upstream_resolvers": f"127.0.0.1:{acme_env.dns_port}",
        "dial_networks": str(INTERNET),
    }
    return await gateway_factory("netns", egress=egress)


async def sh(gw: GatewayUnderTest, sid: str, command: str) -> dict[str, Any]:
    status, out = await gw.request(
        "POST", "/execute", json={"session_id": sid, "language": "bash", "command": command, "timeout": 30}
    )
    assert status == 200, out
    return out  # type: ignore[return-value]


async def test_a_vm_reaches_what_its_policy_allows_and_nothing_else(
    gateway_factory: Any, acme_env: AcmeTestEnv, hosts: list[InternetHost]
) -> None:
    gw = await egress_gateway(gateway_factory, acme_env)
    policy = {"allow_http": True, "allowed_domains": [ALLOWED]}
    status, vm = await gw.request("POST", "/v1/vms", json={"egress_policy": policy})
    assert status == 200, vm
    sid = vm["session_id"]

    allowed = await sh(gw, sid, f"curl -sS -m 10 http://{ALLOWED}/")
    assert allowed["stdout"] == f"hello from tnet-0 {ALLOWED}", allowed
    denied_name = await sh(gw, sid, f"getent hosts {DENIED} || echo no-such-name")
    assert denied_name["stdout"].strip() == "no-such-name"  # NXDOMAIN, though bind9 has it
    before = hosts[1].packets_received()
    by_address = await sh(
        gw, sid, f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}' http://{hosts[1].address}/"
    )
    assert by_address["stdout"] == "403", by_address  # an address no allowed name gave
    lying = await sh(
        gw,
        sid,
        f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}' -H 'Host: {ALLOWED}' http://{hosts[1].address}/",
    )
    assert lying["stdout"] == "403", lying
    assert hosts[1].packets_received() == before  # not one packet reached it
    udp = await sh(gw, sid, f"timeout 3 bash -c 'echo x > /dev/udp/{hosts[1].address}/9' ; echo done")
    assert udp["stdout"].strip().endswith("done")
    assert hosts[1].packets_received() == before  # UDP other than DNS goes nowhere
    denials = gw.services.egress.denials(vm["vm_id"])  # type: ignore[union-attr]
    assert {d.rule for d in denials} == {"not_allowed", "name_not_resolved_to_address"}


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
