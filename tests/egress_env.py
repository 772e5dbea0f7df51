"""What the egress tests from inside VMs share: a gateway with egress toward the test internet, the
drivers they run on, their own host names (so files can run beside each other), commands in a VM, and
test certificates."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.egress.ca import EgressCa, load_ca, mint_leaf
from tests.acme_env import AcmeTestEnv
from tests.conftest import (
    HOST_NAMES,
    GatewayUnderTest,
    remove_blackhole,
    remove_empty_cgroup_parents,
    remove_host_firewall,
)
from tests.internet_env import INTERNET
from tests.qemu_env import qemu_missing

DRIVERS = [
    pytest.param("netns", id="netns"),
    pytest.param(
        "qemu", id="qemu", marks=pytest.mark.skipif(qemu_missing() is not None, reason=str(qemu_missing()))
    ),
]
BOOT_TIMEOUT_S = 90.0
Own = dict[str, dict[str, Any]]


def own_names(tag: str, netns_cidr: str, qemu_cidr: str, ports_from: int) -> Own:
    """A test file's own driver prefixes, ranges, cgroups and egress ports (driver -> config sections)."""
    return {
        "netns": {
            "netns": {"cidr": netns_cidr, "name_prefix": f"gw{tag}n", "cgroup_name": f"gateway-{tag}ntest"},
            "egress": {"proxy_port": ports_from, "resolver_port": ports_from + 50},
        },
        "qemu": {
            "qemu": {"cidr": qemu_cidr, "name_prefix": f"gw{tag}q", "cgroup_name": f"gateway-{tag}qtest"},
            "egress": {"proxy_port": ports_from + 1, "resolver_port": ports_from + 51},
        },
    }


def remove_own_names(own: Own) -> None:
    """What the drivers keep on purpose (their nftables table, blackhole route, parent cgroups)."""
    for driver, sections in own.items():
        remove_host_firewall(str(sections[driver]["name_prefix"]))
        remove_blackhole(str(sections[driver]["cidr"]))
        remove_empty_cgroup_parents(str(sections[driver]["cgroup_name"]))


async def egress_gateway(
    gateway_factory: Any,
    acme_env: AcmeTestEnv,
    driver: str = "netns",
    own: Own | None = None,
    **egress: object,
) -> GatewayUnderTest:
    """A gateway whose VMs have egress, names from the test DNS, dialling only the test internet."""
    sections = (own or {}).get(driver, {})
    settings = {
        "enabled": True,
        "proxy_port": HOST_NAMES.egress_env_ports[0],
        "resolver_port": HOST_NAMES.egress_env_ports[1],
        "upstream_resolvers": f"127.0.0.1:{acme_env.dns_port}",
        "dial_networks": str(INTERNET),
        **sections.get("egress", {}),
        **egress,
    }
    vms = {"driver": driver, "boot_timeout_s": BOOT_TIMEOUT_S}
    driver_section = {driver: sections[driver]} if driver in sections else {}
    return await gateway_factory(driver, egress=settings, vms=vms, **driver_section)  # type: ignore[no-any-return]


async def sh(gw: GatewayUnderTest, sid: str, command: str) -> dict[str, Any]:
    """A bash command in the session's VM."""
    status, out = await gw.request(
        "POST", "/execute", json={"session_id": sid, "language": "bash", "command": command, "timeout": 40}
    )
    assert status == 200, out
    return out  # type: ignore[return-value]


def leaf_pem(ca: EgressCa, name: str) -> bytes:
    """A server certificate for ``name`` signed by ``ca`` and its key, as a test host loads them."""
    cert, ca_key = load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = mint_leaf(cert, ca_key, key, name)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return leaf.public_bytes(serialization.Encoding.PEM) + key_pem
