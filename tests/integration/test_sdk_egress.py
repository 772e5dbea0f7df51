"""Egress policies read and changed live through the official SDK, from inside a real VM: the session's
policy and then the VM's own apply to new connections within a second; the API shows the VM's recent
denials (a DNS answer refused included) and its egress bytes are in the session's usage."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import urllib.request
from typing import Any

import pytest
from instavm import InstaVM
from instavm.exceptions import InstaVMError

from tests.acme_env import AcmeTestEnv
from tests.conftest import GatewayUnderTest
from tests.egress_env import DRIVERS, egress_gateway
from tests.integration.test_egress_vms import ALLOWED, DENIED, hosts  # noqa: F401
from tests.integration.test_sdk import sdk
from tests.internet_env import InternetHost

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nftables"),
]

# A change is applied within REFRESH_S (0.5 s) on every gateway; the commands that observe it take their
# own time, so the test allows them a few seconds in all.
APPLIED_WITHIN_S = 5.0
POLL_S = 0.1


def curl(client: InstaVM, name: str) -> str:
    """What the VM gets from http://name/: the page, or curl's exit code (6: the name did not resolve)."""
    out = client.execute(f"curl -sS -m 5 http://{name}/ || echo exit=$?", language="bash")
    return str(out["stdout"]).strip().splitlines()[-1] if out["stdout"].strip() else ""


async def until(check: Any, what: str, within_s: float = APPLIED_WITHIN_S) -> float:
    """Seconds until ``check()`` (run in a thread) is true; fails naming ``what`` after ``within_s``.
    (What it waits for happens in another process: there is no event to await, only state to read.)"""
    started = time.monotonic()
    while not await asyncio.to_thread(check):
        assert time.monotonic() - started < within_s, f"not within {within_s} s: {what}"
        await asyncio.sleep(POLL_S)
    return time.monotonic() - started


@pytest.mark.parametrize("driver", DRIVERS)
async def test_policies_change_live_and_the_api_shows_denials_and_bytes(
    driver: str,
    gateway_factory: Any,
    acme_env: AcmeTestEnv,
    hosts: list[InternetHost],  # noqa: F811
) -> None:
    gw: GatewayUnderTest = await egress_gateway(gateway_factory, acme_env, driver)
    client = await asyncio.to_thread(sdk, gw)  # a session and its VM, with no policy of their own
    sid = client.session_id

    before = await asyncio.to_thread(client.get_session_egress, sid)
    assert before["source"] == "default" and before["allow_public_repos"] and before["egress_enabled"]
    assert await asyncio.to_thread(curl, client, ALLOWED) == "exit=6"  # refused at DNS: NXDOMAIN

    changed = await asyncio.to_thread(
        client.set_session_egress, sid, allow_package_managers=False, allowed_domains=[ALLOWED]
    )
    assert changed["source"] == "session" and changed["allowed_domains"] == [ALLOWED]
    assert changed["allow_public_repos"] is False
    page = f"hello from tnet-0 {ALLOWED}"
    await until(lambda: curl(client, ALLOWED) == page, "the session's policy opens the name")

    vm_id = changed["vm_id"]
    seen = await asyncio.to_thread(client.get_vm_egress, vm_id)
    assert seen["source"] == "session" and seen["session_id"] == sid

    def denial_listed() -> bool:
        denials = client.get_vm_egress(vm_id)["recent_denials"]
        return any(d["name"] == ALLOWED and d["protocol"] == "dns" and d["rule"] for d in denials)

    await until(denial_listed, "the refused DNS question in the VM's denial list")

    own = await asyncio.to_thread(client.set_vm_egress, vm_id, allow_package_managers=False,
                                  allowed_domains=[DENIED])  # fmt: skip
    assert own["source"] == "vm" and own["allowed_domains"] == [DENIED]
    await until(lambda: curl(client, DENIED) == f"hello from tnet-1 {DENIED}", "the VM's own policy applies")
    assert await asyncio.to_thread(curl, client, ALLOWED) == "exit=6"  # the session's no longer does
    session_view = await asyncio.to_thread(client.get_session_egress, sid)
    assert session_view["source"] == "vm" and session_view["allowed_domains"] == [DENIED]

    def bytes_counted() -> bool:
        usage = client.get_usage()
        return usage["egress_bytes_out"] > 0 and usage["egress_bytes_in"] > len(page)

    await until(bytes_counted, "the egress bytes in the session's usage")

    metrics = await asyncio.to_thread(scrape, f"http://{gw.config.admin.listen}/metrics")
    assert 'gateway_egress_decisions_total{outcome="denied",rule="not_allowed"}' in metrics
    assert 'gateway_egress_decisions_total{outcome="allowed",rule="domain"}' in metrics, metrics
    assert "gateway_egress_received_bytes_total" in metrics


async def test_egress_policies_are_the_keys_own_and_checked(
    gateway_factory: Any, acme_env: AcmeTestEnv
) -> None:
    gw: GatewayUnderTest = await egress_gateway(gateway_factory, acme_env)
    status, vm = await gw.request("POST", "/v1/vms", json={})
    assert status == 200, vm
    other = InstaVM(await gw.new_key(), base_url=gw.url, auto_start_session=False)
    for call in (
        lambda: other.get_vm_egress(vm["vm_id"]),
        lambda: other.set_vm_egress(vm["vm_id"], allowed_domains=["x.test"]),
        lambda: other.get_session_egress(vm["session_id"]),
        lambda: other.set_session_egress(vm["session_id"], allowed_domains=["x.test"]),
    ):
        with pytest.raises(InstaVMError, match=r"404|not found"):
            await asyncio.to_thread(call)
    status, body = await gw.request(
        "POST", f"/v1/egress/vm/{vm['vm_id']}", json={"allowed_cidrs": ["10.0.0.0/33"]}
    )
    assert status == 422 and body["detail"][0]["loc"] == ["body", "allowed_cidrs"], body
    status, body = await gw.request("POST", f"/v1/egress/session/{vm['session_id']}", json=[])
    assert status == 422, body
    status, _ = await gw.request("DELETE", f"/v1/vms/{vm['vm_id']}")
    assert status == 200
    status, body = await gw.request("POST", f"/v1/egress/vm/{vm['vm_id']}", json={"allow_https": True})
    assert status == 410, body  # an ended VM's policy no longer changes
    status, body = await gw.request("GET", f"/v1/egress/vm/{vm['vm_id']}")
    assert status == 200 and body["source"] == "default", body


async def test_policies_cannot_be_set_where_vms_have_no_egress(gw: GatewayUnderTest) -> None:
    status, vm = await gw.request("POST", "/v1/vms", json={})
    assert status == 200, vm
    status, body = await gw.request("POST", f"/v1/egress/vm/{vm['vm_id']}", json={"allow_https": True})
    assert status == 422 and body["detail"][0]["type"] == "egress_off", body
    status, body = await gw.request("GET", f"/v1/egress/vm/{vm['vm_id']}")
    assert status == 200 and body["egress_enabled"] is False, body


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()
