"""Vault secrets put in at egress, from inside real VMs (netns, and qemu where it can run): a VM made with
``vault_ids`` holds a placeholder; its HTTPS request to the service's host leaves the gateway with the
secret in the service's header (the proxy opened that TLS with a leaf the VM trusts, and checked the
host's real certificate); the same placeholder anywhere else, or toward any other host, is left alone,
and every other host's TLS is end to end. The vault's request log has the request; no log has the secret.

Every name here is this file's own (driver prefixes and ranges, egress ports, test hosts)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from instavm import InstaVM

from gateway.egress.ca import make_ca
from tests.acme_env import AcmeTestEnv
from tests.conftest import (
    GatewayUnderTest,
)
from tests.egress_env import DRIVERS, egress_gateway, leaf_pem, own_names, remove_own_names, sh
from tests.internet_env import internet_hosts

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nftables"),
]

SERVICE, OTHER = "api.vault.example.test", "other.vault.example.test"
SECRET = "sk-live-the-real-secret-0123456789"
HOSTS_NETWORK = ipaddress.IPv4Network("198.18.202.0/24")
OWN = own_names("vl", "172.31.224.0/24", "172.31.222.0/24", 15931)
# The "public" roots of the test internet: what the hosts' certificates chain to, and what the proxy
# checks them against (egress.upstream_ca_file); VMs do not trust them unless told.
PUBLIC_CA = make_ca("test internet roots")


@pytest.fixture
def own_host_names() -> Iterator[None]:
    yield
    remove_own_names(OWN)


async def vault_gateway(
    gateway_factory: Any, acme_env: AcmeTestEnv, driver: str, roots: Path
) -> GatewayUnderTest:
    return await egress_gateway(gateway_factory, acme_env, driver, OWN, upstream_ca_file=str(roots))


def service_vault(sdk: InstaVM) -> dict[str, Any]:
    """A vault with the secret, and a service sending it to SERVICE as a bearer token (the SDK's calls)."""
    vault = sdk.create_vault("api keys")
    sdk.add_vault_credential(vault["id"], name="SERVICE_TOKEN", value=SECRET)
    sdk.add_vault_service(vault["id"], host=SERVICE, auth_config={"type": "bearer", "token": "SERVICE_TOKEN"})
    return vault  # type: ignore[no-any-return]


async def vm_with(gw: GatewayUnderTest, policy: dict[str, Any], vault: dict[str, Any]) -> dict[str, Any]:
    status, vm = await gw.request(
        "POST", "/v1/vms", json={"egress_policy": policy, "vault_ids": [vault["id"]]}
    )
    assert status == 200, vm
    return vm  # type: ignore[no-any-return]


def headers_seen(out: dict[str, Any]) -> dict[str, str]:
    assert out["exit_code"] == 0, out
    lines = [line.partition(": ") for line in out["stdout"].splitlines()]
    return {name.lower(): value for name, _, value in lines}


@pytest.mark.usefixtures("own_host_names")
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_vault_secret_reaches_its_service_host_only(
    driver: str, gateway_factory: Any, acme_env: AcmeTestEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(PUBLIC_CA.cert_pem)
    gw = await vault_gateway(gateway_factory, acme_env, driver, roots)
    sdk = InstaVM(gw.api_key, base_url=gw.url, auto_start_session=False)
    vault = await asyncio.to_thread(service_vault, sdk)
    with internet_hosts(
        2, "tvl", tls=[leaf_pem(PUBLIC_CA, SERVICE), leaf_pem(PUBLIC_CA, OTHER)], network=HOSTS_NETWORK
    ) as hosts:
        await acme_env.set_record(SERVICE, "A", hosts[0].address)
        await acme_env.set_record(OTHER, "A", hosts[1].address)
        policy = {"allow_https": True, "allowed_domains": [SERVICE, OTHER]}
        vm = await vm_with(gw, policy, vault)
        sid = vm["session_id"]
        placeholder = (await sh(gw, sid, 'printf %s "$SERVICE_TOKEN"'))["stdout"]
        assert placeholder.startswith("gwvault-") and SECRET not in placeholder

        # To the service's host, over TLS the VM trusts (the deployment's CA signed what it sees).
        seen = headers_seen(await sh(gw, sid, (
            f"curl -sS -m 20 https://{SERVICE}/headers -H \"Authorization: Bearer $SERVICE_TOKEN\" "
            "-H \"X-Elsewhere: $SERVICE_TOKEN\""
        )))  # fmt: skip
        assert seen["authorization"] == f"Bearer {SECRET}"
        assert seen["x-elsewhere"] == placeholder  # only the service's header gets the secret
        assert seen["connection"] == "close"
        # A bare placeholder in the header gets the scheme put before the secret.
        bare = headers_seen(await sh(gw, sid,
            f"curl -sS -m 20 https://{SERVICE}/headers -H \"Authorization: $SERVICE_TOKEN\""))  # fmt: skip
        assert bare["authorization"] == f"Bearer {SECRET}"

        # Any other host: end-to-end TLS (the VM sees the host's own certificate, from roots it was given)
        # and the placeholder arrives as it was sent.
        await sh(gw, sid, f"cat > /tmp/roots.pem <<'EOF'\n{PUBLIC_CA.cert_pem.decode()}EOF")
        other = headers_seen(await sh(gw, sid, (
            f"curl -sS -m 20 --cacert /tmp/roots.pem https://{OTHER}/headers "
            "-H \"Authorization: Bearer $SERVICE_TOKEN\""
        )))  # fmt: skip
        assert other["authorization"] == f"Bearer {placeholder}"
        untouched = await sh(gw, sid, f"curl -sS -m 20 --cacert /tmp/roots.pem https://{SERVICE}/headers")
        assert untouched["exit_code"] == 60, untouched  # the service's host is the one intercepted

        deadline = time.monotonic() + 10
        while True:
            logs = await asyncio.to_thread(sdk.get_vault_request_logs, vault["id"])
            if len(logs) >= 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        newest = logs[0]
        assert (newest["host"], newest["method"], newest["path"], newest["status"]) == (
            SERVICE,
            "GET",
            "/headers",
            200,
        )
        assert newest["vm_id"] == vm["vm_id"]
    assert SECRET not in caplog.text  # never logged


@pytest.mark.usefixtures("own_host_names")
async def test_a_host_whose_certificate_fails_is_a_502_and_gets_no_secret(
    gateway_factory: Any, acme_env: AcmeTestEnv, tmp_path: Path
) -> None:
    roots = tmp_path / "roots.pem"
    roots.write_bytes(PUBLIC_CA.cert_pem)
    gw = await vault_gateway(gateway_factory, acme_env, "netns", roots)
    sdk = InstaVM(gw.api_key, base_url=gw.url, auto_start_session=False)
    vault = await asyncio.to_thread(service_vault, sdk)
    impostor = make_ca("not the test internet's roots")  # a host whose certificate the proxy cannot check
    with internet_hosts(1, "tvm", tls=[leaf_pem(impostor, SERVICE)], network=HOSTS_NETWORK) as hosts:
        await acme_env.set_record(SERVICE, "A", hosts[0].address)
        policy = {"allow_https": True, "allowed_domains": [SERVICE]}
        vm = await vm_with(gw, policy, vault)
        out = await sh(gw, vm["session_id"], (
            f"curl -sS -m 20 -o /dev/null -w '%{{http_code}}' https://{SERVICE}/headers "
            "-H \"Authorization: Bearer $SERVICE_TOKEN\""
        ))  # fmt: skip
        assert out["stdout"] == "502", out
