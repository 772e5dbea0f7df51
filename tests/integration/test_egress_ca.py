"""Inside real VMs with egress (netns, and qemu where it can run): a nameserver without the user writing
one, and trust in the deployment's egress CA, specific to it: a test host whose certificate that CA
signed is reached by ``curl https://`` (no ``-k``), one signed by another CA is refused.

Every name here is this file's own (driver prefixes and ranges, egress ports, test hosts), so it runs
beside the other egress tests; all of it is removed again, also when a test fails."""

from __future__ import annotations

import ipaddress
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.egress.ca import make_ca
from gateway.guest.egress_setup import BUNDLE, CA_COPY, CA_ENV
from tests.acme_env import AcmeTestEnv
from tests.egress_env import DRIVERS, egress_gateway, leaf_pem, own_names, remove_own_names, sh
from tests.internet_env import internet_hosts

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nftables"),
]

TRUSTED, ROGUE = "vault.example.test", "rogue.example.test"
HOSTS_NETWORK = ipaddress.IPv4Network("198.18.201.0/24")
# The drivers' settings of this file alone (prefixes, ranges, cgroups), and its own egress ports.
OWN = own_names("ca", "172.31.228.0/24", "172.31.226.0/24", 15921)


@pytest.fixture
def own_host_names() -> Iterator[None]:
    """Set up before the gateways (so torn down after them): what the drivers keep on purpose."""
    yield
    remove_own_names(OWN)


@pytest.mark.usefixtures("own_host_names")
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_vm_has_a_nameserver_and_trusts_the_deployment_ca_only(
    driver: str, gateway_factory: Any, acme_env: AcmeTestEnv
) -> None:
    gw = await egress_gateway(gateway_factory, acme_env, driver, OWN)
    assert gw.services.egress is not None and gw.services.egress.minter is not None
    ca = gw.services.egress.minter.ca  # the deployment's, as Redis holds it
    unknown = make_ca("not this deployment")
    with internet_hosts(
        2, "tca", tls=[leaf_pem(ca, TRUSTED), leaf_pem(unknown, ROGUE)], network=HOSTS_NETWORK
    ) as hosts:
        await acme_env.set_record(TRUSTED, "A", hosts[0].address)
        await acme_env.set_record(ROGUE, "A", hosts[1].address)
        policy = {"allow_https": True, "allowed_domains": [TRUSTED, ROGUE]}
        status, vm = await gw.request("POST", "/v1/vms", json={"egress_policy": policy})
        assert status == 200, vm
        sid = vm["session_id"]

        resolv = await sh(gw, sid, "cat /etc/resolv.conf")
        assert resolv["stdout"].startswith("nameserver "), resolv
        named = await sh(gw, sid, f"getent hosts {TRUSTED}")
        assert named["stdout"].split() == [hosts[0].address, TRUSTED], named

        trusted = await sh(gw, sid, f"curl -sS -m 20 https://{TRUSTED}/")
        assert trusted["stdout"] == f"hello from tca-0 {TRUSTED}", trusted
        rogue = await sh(gw, sid, f"curl -sS -m 20 https://{ROGUE}/")
        assert rogue["exit_code"] == 60 and "certificate" in rogue["stderr"], (
            rogue
        )  # CURLE_PEER_FAILED_VERIFICATION
        assert hosts[1].packets_received() > 0  # it was reached: refused for its certificate only

        python = await sh(
            gw,
            sid,
            f"python3 -c 'import urllib.request; print(urllib.request.urlopen(\"https://{TRUSTED}/\").read())'",
        )
        assert python["stdout"].strip() == f"b'hello from tca-0 {TRUSTED}'", python
        env = await sh(gw, sid, "env")
        assert {f"{name}={BUNDLE}" for name in CA_ENV} <= set(env["stdout"].splitlines())
        copy = await sh(gw, sid, f"cat {CA_COPY}; grep -c 'BEGIN CERTIFICATE' {BUNDLE}")
        assert copy["stdout"].startswith(ca.cert_pem.decode()), copy
        assert int(copy["stdout"].splitlines()[-1]) > 100  # Debian's roots are still there
        mine = await sh(gw, sid, "echo 'nameserver 192.0.2.53' > /etc/resolv.conf && cat /etc/resolv.conf")
        assert mine["stdout"] == "nameserver 192.0.2.53\n", mine  # the VM's own file, to change at will


@pytest.mark.usefixtures("own_host_names")
async def test_without_egress_a_vm_root_is_left_as_the_image_has_it(gateway_factory: Any) -> None:
    gw = await gateway_factory("netns", netns=OWN["netns"]["netns"])
    status, vm = await gw.request("POST", "/v1/vms", json={})
    assert status == 200, vm
    out = await sh(
        gw, vm["session_id"], f"cat /etc/resolv.conf; ls {CA_COPY} 2>&1; echo ${{SSL_CERT_FILE:-unset}}"
    )
    assert out["stdout"].splitlines()[-1] == "unset" and "No such file" in out["stdout"], out
    assert not out["stdout"].startswith("nameserver")
