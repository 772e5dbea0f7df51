"""The qemu driver end to end, as a user drives it: a real VM (its own kernel, TCG here) created through
the API, a web server started in it with /execute, reached through the edge by path and by host, then
snapshotted when it is killed and resumed as a new VM that still serves the same files from memory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import Config, override
from gateway.errors import DriverError
from gateway.orchestrator.drivers.base import VmSpec
from gateway.orchestrator.drivers.registry import make_driver
from tests.conftest import GatewayUnderTest, remove_blackhole, remove_empty_cgroup_parents
from tests.integration.test_driver_contract import await_gone
from tests.integration.test_lifecycle import wait_for_release
from tests.qemu_env import guest_image, qemu_missing

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(qemu_missing() is not None, reason=qemu_missing() or ""),
]

APP_PORT = 8000
SERVE_TIMEOUT_S = 30.0
BOOT_TIMEOUT_S = 90.0
PAGE = "hello from a qemu guest"


async def start_qemu(gateway_factory: Any) -> GatewayUnderTest:
    return await gateway_factory("qemu", vms={"driver": "qemu", "boot_timeout_s": BOOT_TIMEOUT_S})


async def get_when_served(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET until the app answers (a server started in the background takes a moment under TCG)."""
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    async with aiohttp.ClientSession() as client:
        while True:
            async with client.get(url, headers=headers or {}) as resp:
                body = await resp.text()
                if resp.status != 502 or time.monotonic() > deadline:
                    return resp.status, body
            await asyncio.sleep(0.1)


async def serve_app(gw: GatewayUnderTest, session_id: str) -> str:
    status, app = await gw.request("GET", f"/v1/sessions/app-url/{session_id}?port={APP_PORT}")
    assert status == 200, app
    return app["url"]


async def test_a_vm_serves_through_the_edge_and_resumes_from_its_snapshot(gateway_factory: Any) -> None:
    gw = await start_qemu(gateway_factory)
    status, created = await gw.request(
        "POST", "/v1/vms", json={"snapshot_on_terminate": True, "snapshot_name": "site", "memory_mb": 384}
    )
    assert status == 200 and created["status"] == "active", created
    vm_id, session_id = created["vm_id"], created["session_id"]
    status, vm = await gw.request("GET", f"/v1/vms/{vm_id}")
    assert (vm["driver"], vm["accel"], vm["snapshot_on_terminate"]) == (
        "qemu",
        gw.services.orchestrator.driver.accel,
        True,
    )
    assert vm["accel"] in ("kvm", "tcg")

    # Its own kernel, not the host's, and the server started in the background outlives the call.
    command = (
        f"uname -r; mkdir -p site && echo '{PAGE}' > site/index.html && cd site && "
        f"(python3 -m http.server {APP_PORT} >/dev/null 2>&1 &)"
    )
    status, out = await gw.request(
        "POST", "/execute", json={"session_id": session_id, "language": "bash", "command": command}
    )
    assert (status, out["exit_code"]) == (200, 0), out
    assert out["stdout"].strip().endswith("cloud-amd64") and out["vm_id"] == vm_id

    url = await serve_app(gw, session_id)
    assert (await get_when_served(url)) == (200, f"{PAGE}\n")
    host = f"{vm_id}-{APP_PORT}.{gw.config.api.sandbox_domain}"
    assert (await get_when_served(gw.url + "/index.html", {"Host": host})) == (200, f"{PAGE}\n")

    status, killed = await gw.request("DELETE", f"/v1/vms/{vm_id}")
    assert (status, killed["status"]) == (200, "killed")
    status, ended = await gw.request("GET", f"/v1/vms/{vm_id}")
    snapshot_id = ended["snapshot_id"]
    assert snapshot_id and ended["snapshot_error"] is None, ended
    status, listed = await gw.request("GET", "/v1/snapshots")
    assert status == 200 and [(s["snapshot_id"], s["name"], s["vm_id"]) for s in listed["snapshots"]] == [
        (snapshot_id, "site", vm_id)
    ]
    assert listed["snapshots"][0]["memory_mb"] == 384 and listed["snapshots"][0]["size_bytes"] > 0
    # The killed VM is gone from the edge at once.
    status, _ = await get_when_served(url)
    assert status == 404

    # Another key sees no such snapshot; a different machine shape is refused, naming the field.
    other = await gw.new_key()
    status, body = await gw.request("POST", "/v1/vms", key=other, json={"snapshot_id": snapshot_id})
    assert (status, body) == (404, {"detail": "Snapshot not found", "code": "snapshot_not_found"})
    status, body = await gw.request("POST", "/v1/vms", json={"snapshot_id": snapshot_id, "memory_mb": 512})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "memory_mb"], body

    started = time.monotonic()
    status, restored = await gw.request("POST", "/v1/vms", json={"snapshot_id": snapshot_id})
    assert status == 200 and restored["status"] == "active", restored
    resumed_in = time.monotonic() - started
    new_id = restored["vm_id"]
    status, vm2 = await gw.request("GET", f"/v1/vms/{new_id}")
    assert (vm2["restored_from"], vm2["memory_mb"]) == (snapshot_id, 384)
    assert vm2["vm_ip"] != vm["vm_ip"]
    # The server process and its files came back with the memory: no command was run in the new VM.
    url2 = await serve_app(gw, restored["session_id"])
    assert (await get_when_served(url2)) == (200, f"{PAGE}\n")
    host2 = f"{new_id}-{APP_PORT}.{gw.config.api.sandbox_domain}"
    assert (await get_when_served(gw.url + "/", {"Host": host2}))[0] == 200
    status, out = await gw.request(
        "POST", "/execute", json={"session_id": restored["session_id"], "command": "cat site/index.html"}
    )
    assert (status, out["stdout"], out["vm_id"]) == (200, f"{PAGE}\n", new_id), out
    assert resumed_in < BOOT_TIMEOUT_S
    # The resumed VM's agent answers to a token of its own, not to the snapshot's.
    handles = [(await gw.services.store.get_vm(i)).handle for i in (vm_id, new_id)]  # type: ignore[union-attr]
    assert handles[0]["agent_token"] != handles[1]["agent_token"]

    status, _ = await gw.request("DELETE", f"/v1/snapshots/{snapshot_id}")
    assert status == 204
    assert not (gw.config.data_path / "snapshots" / snapshot_id).exists()
    status, _ = await gw.request("GET", f"/v1/snapshots/{snapshot_id}")
    assert status == 404


async def test_snapshots_are_refused_where_the_driver_has_none(gw: GatewayUnderTest) -> None:
    status, body = await gw.request("POST", "/v1/vms", json={"snapshot_on_terminate": True})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "snapshot_on_terminate"], body
    assert (await gw.request("GET", "/v1/snapshots")) == (200, {"snapshots": [], "total": 0})


async def test_a_vm_survives_a_gateway_restart_and_is_snapshotted_when_its_lifetime_ends(
    gateway_factory: Any,
) -> None:
    sections = {"vms": {"driver": "qemu", "boot_timeout_s": BOOT_TIMEOUT_S}}
    first: GatewayUnderTest = await gateway_factory("qemu", **sections)
    status, created = await first.request("POST", "/v1/vms", json={"snapshot_on_terminate": True})
    assert status == 200 and created["status"] == "active", created
    session = created["session_id"]
    status, out = await first.request(
        "POST", "/execute", json={"session_id": session, "command": "echo before > mark"}
    )
    assert out["exit_code"] == 0, out
    await first.stop()  # as SIGTERM: the VM keeps running

    second: GatewayUnderTest = await gateway_factory("qemu", **sections)
    second.api_key, second.key_id = first.api_key, first.key_id
    status, out = await second.request(
        "POST",
        "/execute",
        json={"session_id": session, "language": "python", "command": "print(open('mark').read())"},
    )
    assert (status, out["stdout"], out["vm_id"]) == (200, "before\n\n", created["vm_id"]), out

    # The second gateway's reaper ends it at its lifetime, and snapshots it on the way. (The lifetime
    # is brought forward in Redis rather than waited for: a boot under TCG takes a varying while.)
    store = second.services.store
    rec = await store.get_vm(created["vm_id"])
    assert rec is not None
    await store.client.zadd(store.keys.vm_expiry(), {rec.vm_id: time.time()})
    # The slot is released last, after the snapshot and the destroy.
    await wait_for_release(second, rec)
    status, vm = await second.request("GET", f"/v1/vms/{rec.vm_id}")
    assert (vm["status"], vm["error"]) == ("killed", "lifetime expired"), vm
    assert vm["snapshot_id"] and vm["snapshot_error"] is None, vm
    assert not (await second.services.orchestrator.driver.inspect(rec.vm_id, rec.handle)).running


async def test_a_vm_that_died_is_ended_without_a_snapshot_and_says_why(gateway_factory: Any) -> None:
    gw = await start_qemu(gateway_factory)
    status, created = await gw.request("POST", "/v1/vms", json={"snapshot_on_terminate": True})
    assert status == 200 and created["status"] == "active", created
    rec = await gw.services.store.get_vm(created["vm_id"])
    assert rec is not None
    os.kill(rec.handle["init_pid"], signal.SIGKILL)  # QEMU, started by this test's gateway
    assert await await_gone({rec.handle["init_pid"]}) == set()

    status, killed = await gw.request("DELETE", f"/v1/vms/{rec.vm_id}")
    assert (status, killed["status"]) == (200, "killed"), killed
    status, vm = await gw.request("GET", f"/v1/vms/{rec.vm_id}")
    assert vm["snapshot_id"] is None and "not running" in vm["snapshot_error"], vm
    await wait_for_release(gw, rec)
    assert (await gw.request("GET", "/v1/snapshots"))[1]["total"] == 0


async def test_later_vms_of_a_shape_resume_its_boot_template_each_as_itself(gateway_factory: Any) -> None:
    gw = await start_qemu(gateway_factory)
    shape = {"memory_mb": 320, "vcpu_count": 1}
    # This shape's template may be left from an earlier run (it lives beside the cached image).
    for old in (guest_image() / "templates").glob("*-1cpu-320mb-*"):
        shutil.rmtree(old)

    async def create(env: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
        status, created = await gw.request("POST", "/v1/vms", json={**shape, "env": env})
        assert status == 200 and created["status"] == "active", created
        rec = await gw.services.store.get_vm(created["vm_id"])
        assert rec is not None
        return created, rec.handle

    async def run(created: dict[str, Any], command: str) -> str:
        status, out = await gw.request(
            "POST", "/execute", json={"session_id": created["session_id"], "command": command}
        )
        assert (status, out["exit_code"]) == (200, 0), out
        return out["stdout"]

    first, first_handle = await create({"WHO": "first"})
    assert first_handle["booted_from"] == "kernel"
    await run(first, "echo first > mark")
    second, second_handle = await create({"WHO": "second"})
    assert second_handle["booted_from"] == "template"
    # Nothing of the first VM's use is in the template: it was saved before anything ran.
    assert await run(second, 'ls; echo "$WHO"') == "second\n"
    assert await run(first, 'cat mark; echo "$WHO"') == "first\nfirst\n"
    # Each copy has its own token and its own kernel randomness (copies of one memory would agree).
    assert first_handle["agent_token"] != second_handle["agent_token"]
    draw = 'python3 -c "import os; print(os.urandom(16).hex())"'
    assert await run(first, draw) != await run(second, draw)


async def test_a_data_dir_too_long_for_qemus_control_socket_is_refused_cleanly(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    config = override(
        Config(),
        server={"data_dir": str(deep)},
        vms={"driver": "qemu"},
        qemu={
            "cidr": "172.31.234.0/23",
            "name_prefix": "gwql",
            "cgroup_name": "gateway-qltest",
            "image_dir": str(guest_image()),
        },
    )
    driver = make_driver(config)
    await driver.start()
    try:
        with pytest.raises(DriverError, match="shorter data_dir"):
            await driver.create(VmSpec(vm_id="vm-long", slot=0, vcpu_count=1, memory_mb=256))
        assert not any(map(os.path.exists, ("/var/run/netns/gwql-0", deep / "vms" / "vm-long")))
    finally:
        await driver.close()
        remove_blackhole("172.31.234.0/23")
        remove_empty_cgroup_parents("gateway-qltest")
