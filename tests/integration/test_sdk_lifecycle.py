"""Suspend and resume through the official SDK (``client.vms.suspend/resume/update``), auto_suspend at the
end of a lifetime and auto_resume on a request held by the edge, on the drivers that can (issue 19.6)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from instavm import InstaVM

from tests.conftest import GatewayUnderTest
from tests.integration.test_edge import APP_PORT, echo_app_command
from tests.integration.test_sdk import http_error, poll, sdk
from tests.integration.test_sdk_files import DRIVERS

IS_ROOT = os.geteuid() == 0
# The drivers that can suspend: netns and qemu.
SUSPENDING = [param for param in DRIVERS if param.id != "process"]


async def start(gateway_factory: Any, driver: str, **vms: object) -> GatewayUnderTest:
    settings: dict[str, object] = {"min_lifetime_s": 1, **vms}
    if driver == "qemu":
        settings |= {"driver": "qemu", "boot_timeout_s": 120}
    return await gateway_factory(driver, vms=settings)


async def sh(client: InstaVM, command: str) -> dict[str, Any]:
    return await asyncio.to_thread(client.execute, command, language="bash")


async def app_get(gw: GatewayUnderTest, url: str) -> tuple[int, str]:
    async with gw.http.get(url, headers={"Accept": "application/json"}) as resp:
        return resp.status, await resp.text()


async def serving_vm(gw: GatewayUnderTest, **create: Any) -> tuple[InstaVM, dict[str, Any], str]:
    """A VM (made through the SDK) serving the echo app publicly; its record and the app's URL."""
    client = await asyncio.to_thread(sdk, gw)
    vm = await asyncio.to_thread(
        client.vms.create,
        True,
        None,
        session_id=client.session_id,
        share={"port": APP_PORT, "is_public": True},
        **create,
    )
    started = await sh(client, echo_app_command(APP_PORT))
    assert started["exit_code"] == 0, started
    return client, vm, vm["share"]["url"] + "echo"


@pytest.fixture(params=SUSPENDING)
async def suspending(request: pytest.FixtureRequest, gateway_factory: Any) -> GatewayUnderTest:
    return await start(gateway_factory, request.param)


async def test_a_suspended_vm_keeps_its_processes_and_comes_back_as_it_was(
    suspending: GatewayUnderTest,
) -> None:
    gw = suspending
    client, vm, url = await serving_vm(gw)
    vm_id = vm["vm_id"]
    address = (await asyncio.to_thread(client.vms.get, vm_id))["vm_ip"]
    pid = (await sh(client, "sleep 1000 > /dev/null 2>&1 & echo $!"))["stdout"].strip()
    assert (await app_get(gw, url))[0] == 200

    suspended = await asyncio.to_thread(client.vms.suspend, vm_id)
    assert suspended["status"] == "suspended" and suspended["suspended_at"]
    assert [v["vm_id"] for v in await asyncio.to_thread(client.vms.list)] == [vm_id]  # still its
    status, page = await app_get(gw, url)
    assert status == 409 and "suspended" in page  # not woken: auto_resume is off
    with pytest.raises(Exception) as asleep:
        await sh(client, "true")
    assert http_error(asleep.value).response.status_code == 410

    resumed = await asyncio.to_thread(client.vms.resume, vm_id)
    assert (resumed["status"], resumed["vm_id"], resumed["vm_ip"]) == ("active", vm_id, address)
    assert resumed["expires_in_seconds"] > 0
    alive = await sh(client, f"kill -0 {pid} && echo same-process")
    assert alive["stdout"] == "same-process\n", alive  # its memory and processes, as they were
    assert (await app_get(gw, url))[0] == 200


async def test_auto_resume_wakes_the_vm_for_the_request_the_edge_holds(suspending: GatewayUnderTest) -> None:
    gw = suspending
    client, vm, url = await serving_vm(gw)
    updated = await asyncio.to_thread(client.vms.update, vm["vm_id"], None, True)
    assert updated["auto_resume"] is True
    await asyncio.to_thread(client.vms.suspend, vm["vm_id"])
    status, body = await app_get(gw, url)  # held while the VM resumes, then answered
    assert status == 200 and '"path": "/echo"' in body
    record = await asyncio.to_thread(client.vms.get, vm["vm_id"])
    assert record["status"] == "active"
    # execute wakes it too
    await asyncio.to_thread(client.vms.suspend, vm["vm_id"])
    assert (await sh(client, "echo awake"))["stdout"] == "awake\n"


async def test_auto_suspend_parks_an_expiring_vm_instead_of_killing_it(gateway_factory: Any) -> None:
    if not IS_ROOT:
        pytest.skip("the netns driver needs root")
    gw = await start(gateway_factory, "netns")
    client = await asyncio.to_thread(sdk, gw)
    vm = await asyncio.to_thread(
        client.vms.create, True, None, True, session_id=client.session_id, vm_lifetime_seconds=2
    )
    assert vm["status"] == "active"

    async def parked() -> dict[str, Any] | None:
        record = await asyncio.to_thread(client.vms.get, vm["vm_id"])
        return record if record["status"] != "active" else None

    record = await poll(parked, limit_s=30)
    assert record["status"] == "suspended", record
    resumed = await asyncio.to_thread(client.vms.resume, vm["vm_id"])
    assert resumed["status"] == "active"


async def test_drivers_that_cannot_suspend_refuse_clearly_and_tenants_stay_apart(
    gw: GatewayUnderTest,
) -> None:
    client = await asyncio.to_thread(sdk, gw)
    await asyncio.to_thread(client.execute, "print(1)")
    vm_id = (await asyncio.to_thread(client.get_session_status))["vm_id"]
    with pytest.raises(Exception) as refused:
        await asyncio.to_thread(client.vms.suspend, vm_id)
    answer = http_error(refused.value).response
    assert answer.status_code == 422 and "cannot suspend" in answer.json()["detail"]
    status, body = await gw.request("POST", "/v1/vms", json={"auto_resume": True})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "auto_resume"]
    other = InstaVM(await gw.new_key(), base_url=client.base_url, auto_start_session=False)
    for call in (other.vms.suspend, other.vms.resume):
        with pytest.raises(Exception) as hidden:
            await asyncio.to_thread(call, vm_id)
        assert http_error(hidden.value).response.status_code == 404


QEMU_ONLY = [p for p in SUSPENDING if p.id == "qemu"]


@pytest.mark.parametrize("driver", QEMU_ONLY)
async def test_a_running_vm_is_snapshotted_and_cloned_and_goes_on(gateway_factory: Any, driver: str) -> None:
    gw = await start(gateway_factory, driver)
    client = await asyncio.to_thread(sdk, gw)
    marker = await sh(client, "echo before-the-clone > mark && cat mark")
    assert marker["stdout"] == "before-the-clone\n"
    vm_id = (await asyncio.to_thread(client.get_session_status))["vm_id"]

    snap = await asyncio.to_thread(client.vms.snapshot, vm_id, True, "kept")
    assert (snap["name"], snap["vm_id"], snap["status"]) == ("kept", vm_id, "ready")
    assert (await sh(client, "cat mark"))["stdout"] == "before-the-clone\n"  # the source goes on
    assert [s["id"] for s in await asyncio.to_thread(client.snapshots.list)] == [snap["id"]]

    clone = await asyncio.to_thread(client.vms.clone, vm_id, True, "for-the-clone")
    assert clone["source_vm_id"] == vm_id and clone["vm_id"] != vm_id and clone["status"] == "active"
    twin = InstaVM(gw.api_key, base_url=client.base_url, auto_start_session=False)
    twin.session_id = clone["session_id"]
    assert (await sh(twin, "cat mark"))["stdout"] == "before-the-clone\n"  # its memory and files
    await sh(twin, "echo only-in-the-clone > mark")
    assert (await sh(client, "cat mark"))["stdout"] == "before-the-clone\n"  # two VMs from then on


async def test_a_driver_without_snapshots_refuses_them_clearly(gateway_factory: Any) -> None:
    if not IS_ROOT:
        pytest.skip("the netns driver needs root")
    gw = await start(gateway_factory, "netns")
    client = await asyncio.to_thread(sdk, gw)
    await asyncio.to_thread(client.execute, "print(1)")
    vm_id = (await asyncio.to_thread(client.get_session_status))["vm_id"]
    for call in (client.vms.snapshot, client.vms.clone):
        with pytest.raises(Exception) as refused:
            await asyncio.to_thread(call, vm_id)
        answer = http_error(refused.value).response
        assert answer.status_code == 422 and "cannot snapshot" in answer.json()["detail"], call
