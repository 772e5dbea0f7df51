"""The qemu driver end to end, as a user drives it: a real VM (its own kernel, TCG here) created through
the API, a web server started in it with /execute, reached through the edge by path and by host, then
snapshotted when it is killed and resumed as a new VM that still serves the same files from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import Config, override
from gateway.errors import DriverError
from gateway.orchestrator.drivers import hostfw, qemu_net
from gateway.orchestrator.drivers.base import VmInfo, VmSpec
from gateway.orchestrator.drivers.qemu import QemuVmDriver
from gateway.orchestrator.drivers.registry import make_driver
from tests.conftest import TEST_QEMU_CIDR, GatewayUnderTest, remove_blackhole, remove_empty_cgroup_parents
from tests.integration.test_driver_contract import await_gone
from tests.integration.test_lifecycle import wait_for_release
from tests.qemu_env import guest_image, qemu_missing
from tests.rootfs_env import CACHE_ROOT as ROOTFS_CACHE

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
    assert out["stdout"].strip().endswith("-amd64") and out["vm_id"] == vm_id

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
    assert status == 200 and [(s["snapshot_id"], s["name"], s["vm_id"]) for s in listed] == [
        (snapshot_id, "site", vm_id)
    ]
    assert listed[0]["memory_mb"] == 384 and listed[0]["size_bytes"] > 0
    assert (listed[0]["id"], listed[0]["status"]) == (listed[0]["snapshot_id"], "ready")
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
        "POST",
        "/execute",
        json={"session_id": restored["session_id"], "language": "bash", "command": "cat site/index.html"},
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
    assert (await gw.request("GET", "/v1/snapshots")) == (200, [])


async def test_a_vm_survives_a_gateway_restart_and_is_snapshotted_when_its_lifetime_ends(
    gateway_factory: Any,
) -> None:
    sections = {"vms": {"driver": "qemu", "boot_timeout_s": BOOT_TIMEOUT_S}}
    first: GatewayUnderTest = await gateway_factory("qemu", **sections)
    status, created = await first.request("POST", "/v1/vms", json={"snapshot_on_terminate": True})
    assert status == 200 and created["status"] == "active", created
    session = created["session_id"]
    status, out = await first.request(
        "POST", "/execute", json={"session_id": session, "language": "bash", "command": "echo before > mark"}
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
    assert (await gw.request("GET", "/v1/snapshots"))[1] == []


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
            "POST",
            "/execute",
            json={"session_id": created["session_id"], "language": "bash", "command": command},
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


async def test_a_vm_runs_on_the_python_data_image_and_its_snapshot_resumes_only_there(
    gateway_factory: Any,
) -> None:
    """One image definition for both drivers: image_variant picks the root qemu boots into (a disk made
    from the shared store's build), and templates and snapshots are the image's own."""
    gw = await start_qemu(gateway_factory)
    shape = {"memory_mb": 352, "vcpu_count": 1}
    for old in (guest_image() / "templates").glob("*-1cpu-352mb-*"):
        shutil.rmtree(old)

    async def create(**fields: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        status, created = await gw.request("POST", "/v1/vms", json={**shape, **fields})
        assert status == 200 and created["status"] == "active", created
        rec = await gw.services.store.get_vm(created["vm_id"])
        assert rec is not None
        return created, rec.handle

    async def run(created: dict[str, Any], command: str) -> dict[str, Any]:
        status, out = await gw.request(
            "POST",
            "/execute",
            json={"session_id": created["session_id"], "language": "bash", "command": command},
        )
        assert status == 200, out
        return out

    numpy = "python3 -c 'import numpy, pandas; print(numpy.arange(4).sum())'"
    data, data_handle = await create(image_variant="python-data", snapshot_on_terminate=True)
    assert (data_handle["image"], data_handle["booted_from"]) == ("python-data", "kernel")
    status, vm = await gw.request("GET", f"/v1/vms/{data['vm_id']}")
    assert vm["image_variant"] == "python-data"
    assert (out := await run(data, numpy))["exit_code"] == 0 and out["stdout"] == "6\n", out
    # The image's files, read-only under an overlay in the VM's memory: writable like any root.
    assert (await run(data, "echo kept > /usr/local/mark && cat /usr/local/mark"))["stdout"] == "kept\n"

    # The default image lacks NumPy; and python-data's boot template (same shape) is not its.
    plain, plain_handle = await create()
    assert (plain_handle["image"], plain_handle["booted_from"]) == ("default", "kernel")
    assert plain_handle["disk_id"] != data_handle["disk_id"]
    out = await run(plain, numpy)
    assert out["exit_code"] != 0 and "No module named 'numpy'" in out["stderr"], out
    again, again_handle = await create(image_variant="python-data")
    assert again_handle["booted_from"] == "template"
    assert (await run(again, numpy))["stdout"] == "6\n"
    assert (await run(again, "cat /usr/local/mark"))["exit_code"] != 0  # (the template ran nothing)

    # Unknown images are refused as on netns, listing the defined ones.
    status, body = await gw.request("POST", "/v1/vms", json={"image_variant": "nope"})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "image_variant"], body
    assert "available: default, python-data, browser" in body["detail"][0]["msg"]

    status, _ = await gw.request("DELETE", f"/v1/vms/{data['vm_id']}")
    status, ended = await gw.request("GET", f"/v1/vms/{data['vm_id']}")
    snapshot_id = ended["snapshot_id"]
    assert snapshot_id, ended
    status, body = await gw.request(
        "POST", "/v1/vms", json={"snapshot_id": snapshot_id, "image_variant": "default"}
    )
    assert status == 422 and body["detail"][0]["loc"] == ["body", "image_variant"], body
    status, restored = await gw.request("POST", "/v1/vms", json={"snapshot_id": snapshot_id})
    assert status == 200 and restored["status"] == "active", restored
    status, vm = await gw.request("GET", f"/v1/vms/{restored['vm_id']}")
    assert vm["image_variant"] == "python-data"
    assert (await run(restored, "cat /usr/local/mark; " + numpy))["stdout"] == "kept\n6\n"


def qemu_driver(data_dir: Path, cidr: str, prefix: str) -> QemuVmDriver:
    """A qemu driver of its own (addresses, names, cgroup) on the cached image."""
    config = override(
        Config(),
        server={"data_dir": str(data_dir)},
        vms={"driver": "qemu", "boot_timeout_s": BOOT_TIMEOUT_S},
        qemu={
            "cidr": cidr,
            "name_prefix": prefix,
            "cgroup_name": f"gateway-{prefix}",
            "image_dir": str(guest_image()),
        },
        images={"dir": str(ROOTFS_CACHE)},
    )
    driver = make_driver(config)
    assert isinstance(driver, QemuVmDriver)
    return driver


@contextlib.asynccontextmanager
async def started(driver: QemuVmDriver, cidr: str, prefix: str) -> AsyncIterator[QemuVmDriver]:
    await driver.start()
    try:
        yield driver
    finally:
        await driver.sweep(set())
        await driver.close()
        remove_blackhole(cidr)
        remove_empty_cgroup_parents(f"gateway-{prefix}")
        await hostfw.remove(prefix)  # (the driver's host firewall table outlives it on purpose)


async def execute(driver: QemuVmDriver, info: VmInfo, command: str) -> str:
    result = await driver.execute(
        info.vm_id, info.handle, ["sh", "-c", command], env={}, timeout_s=30, max_output_bytes=65536
    )
    assert result.exit_code == 0, result
    return result.stdout.decode()


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def assert_confined(pid: int, vm_dir: Path, uid: int) -> None:
    """What the kernel says of the running QEMU, not what its command line asked for."""
    assert os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "qemu-system-x86_64"
    status = proc_status(pid)
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(uid)] * 4, status
    assert status["Groups"] == ""
    assert {status[cap] for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == {"0" * 16}
    assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "1")
    # Its root is the VM's jail folder, in a mount namespace of its own, showing nothing of the host
    # but /usr (and the merged-usr links) beside its own files.
    assert os.readlink(f"/proc/{pid}/root") == str(vm_dir / "root")
    assert os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
    root = Path(f"/proc/{pid}/root")
    assert set(os.listdir(root)) <= {
        "usr",
        "bin",
        "sbin",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "dev",
        "image",
        "vm",
        "volumes",
        "proc",
    }
    # Its /proc shows it its own uid's processes only (hidepid), and no kernel settings (subset=pid).
    procs = [line for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines() if " - proc " in line]
    assert len(procs) == 1 and procs[0].split()[4] == "/proc", procs
    assert "hidepid=invisible" in procs[0] and "subset=pid" in procs[0], procs
    assert not (root / "proc" / "sys").exists()
    assert os.listdir(root / "volumes") == []
    assert sorted(os.listdir(root / "vm")) == ["config", "qmp"] and sorted(os.listdir(root / "image")) == [
        "disk",
        "initrd",
        "kernel",
    ]
    assert sorted(os.listdir(root / "dev")) == ["net", "null", "random", "urandom", "zero"]
    assert not (root / vm_dir.relative_to("/")).exists()  # the host's folders, this VM's included


async def test_each_qemu_runs_unprivileged_under_seccomp_in_a_root_of_its_own(tmp_path: Path) -> None:
    cidr, prefix = TEST_QEMU_CIDR, "gwqc"
    async with started(qemu_driver(tmp_path / "data", cidr, prefix), cidr, prefix) as driver:
        info = await driver.create(VmSpec(vm_id="vm-jailed", slot=3, vcpu_count=1, memory_mb=256))
        vm_dir = Path(info.handle["vm_dir"])
        uid = info.handle["qemu_ids"]
        assert uid == driver._qemu.id_base + 1 + 3 and uid > 0
        assert_confined(info.handle["init_pid"], vm_dir, uid)
        assert await execute(driver, info, "echo up") == "up\n"
        # A snapshot is written by QEMU through a descriptor the gateway opened: QEMU's uid has no
        # access to the snapshot folder, whose files stay root's.
        await execute(driver, info, "echo kept > mark")
        dest = tmp_path / "snap"
        meta = await driver.snapshot(info.vm_id, info.handle, dest)
        assert meta["size_bytes"] > 0 and (dest / "state.bin").stat().st_uid == 0
        await driver.destroy(info.vm_id, info.handle)
        # Resumed in another slot, it runs as that slot's uid, confined the same way.
        spec = VmSpec(vm_id="vm-resumed", slot=5, vcpu_count=1, memory_mb=256, restore_from=str(dest))
        resumed = await driver.create(spec)
        assert resumed.handle["qemu_ids"] == driver._qemu.id_base + 1 + 5
        assert_confined(
            resumed.handle["init_pid"], Path(resumed.handle["vm_dir"]), resumed.handle["qemu_ids"]
        )
        assert await execute(driver, resumed, "cat mark") == "kept\n"
        await driver.destroy(resumed.vm_id, resumed.handle)


async def test_a_data_dir_too_deep_for_a_unix_socket_path_still_runs_and_snapshots_vms(
    tmp_path: Path,
) -> None:
    # QEMU binds its control socket at a short path in its jail, and the gateway reaches it through a
    # descriptor: the data folder's depth no longer matters (it was refused before QEMU was confined).
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    cidr, prefix = TEST_QEMU_CIDR, "gwql"
    async with started(qemu_driver(deep, cidr, prefix), cidr, prefix) as driver:
        info = await driver.create(VmSpec(vm_id="vm-long", slot=0, vcpu_count=1, memory_mb=256))
        assert len(bytes(Path(info.handle["vm_dir"]) / "qmp" / "qmp.sock")) > 108
        assert await execute(driver, info, "echo deep") == "deep\n"
        meta = await driver.snapshot(info.vm_id, info.handle, tmp_path / "snap")
        assert meta["size_bytes"] > 0
        await driver.destroy(info.vm_id, info.handle)
        assert not any(map(os.path.exists, ("/var/run/netns/gwql-0", deep / "vms" / "vm-long")))


async def test_a_qemu_that_cannot_start_to_resume_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (A QEMU that died while being resumed was reported as "Connection reset by peer", its own error
    # left in its log.) A snapshot folder good enough to get past the checks; QEMU dies on its options.
    cidr, prefix = TEST_QEMU_CIDR, "gwqr"
    async with started(qemu_driver(tmp_path / "data", cidr, prefix), cidr, prefix) as driver:
        snap = tmp_path / "snap"
        snap.mkdir()
        meta = {
            "vm_id": "vm-old",
            "token": "t",
            "vcpu_count": 1,
            "memory_mb": 256,
            "accel": driver.accel,
            "image_id": driver.image_id,
            "guest_half": str(qemu_net.guest_half(cidr)),
            "image": "default",
            "disk_id": (await driver.image_disk("")).disk_id,
        }
        (snap / "snapshot.json").write_text(json.dumps(meta))
        (snap / "guest.json").write_text(json.dumps({"token": "t", "agent_port": 1}))
        (snap / "state.bin").write_bytes(b"")
        argv = driver._qemu_argv
        monkeypatch.setattr(driver, "_qemu_argv", lambda spec: [*argv(spec), "-no-such-option"])
        spec = VmSpec(vm_id="vm-broken", slot=2, vcpu_count=1, memory_mb=256, restore_from=str(snap))
        started_at = time.monotonic()
        with pytest.raises(DriverError, match=r"QEMU exited while VM vm-broken resumed: .*no-such-option"):
            await driver.create(spec)
        assert time.monotonic() - started_at < 5  # not the socket's whole wait
        assert not (tmp_path / "data" / "vms" / "vm-broken").exists()


async def test_too_little_memory_for_the_guests_files_is_refused_before_anything_is_made(
    tmp_path: Path,
) -> None:
    # (160 MiB booted a guest that lost files while unpacking its root and never answered: a boot
    # timeout after seconds, saying nothing of memory.)
    cidr, prefix = TEST_QEMU_CIDR, "gwqm"
    async with started(qemu_driver(tmp_path / "data", cidr, prefix), cidr, prefix) as driver:
        least = driver.min_memory_mb()
        assert 160 < least <= 256
        with pytest.raises(DriverError, match=f"memory_mb 160 is too little .* at least {least}"):
            await driver.create(VmSpec(vm_id="vm-small", slot=0, vcpu_count=1, memory_mb=160))
        made = (f"/var/run/netns/{prefix}-0", tmp_path / "data" / "vms" / "vm-small")
        assert not any(map(os.path.exists, made))


async def test_a_kvm_verdict_of_an_unconfined_probe_is_probed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The probe now runs confined like the VMs (a jail's own /dev/kvm, an unprivileged uid): what an
    # unconfined QEMU could do under KVM proves nothing for them.
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm: the accelerator is TCG without a probe")
    image = tmp_path / "image"
    image.mkdir()
    for name in ("manifest.json", "vmlinux", "initrd.cpio"):
        (image / name).symlink_to(guest_image() / name)
    driver = qemu_driver(tmp_path / "data", TEST_QEMU_CIDR, "gwqa")
    monkeypatch.setattr(driver, "_image_dir", image)
    old_key = {"host_kernel": platform.release(), "qemu": driver._qemu_version(), "image_id": ""}
    old_key["image_id"] = json.loads((image / "manifest.json").read_text())["image_id"]
    (image / "accel.json").write_text(json.dumps({"key": old_key, "accel": "kvm"}))
    probes: list[str] = []

    async def probe() -> bool:
        probes.append("probed")
        return False

    monkeypatch.setattr(driver, "_kvm_boots", probe)
    assert (await driver.detect())["accel"] == "tcg" and probes == ["probed"]
    again = qemu_driver(tmp_path / "data", TEST_QEMU_CIDR, "gwqa")
    monkeypatch.setattr(again, "_image_dir", image)
    monkeypatch.setattr(again, "_kvm_boots", probe)
    assert (await again.detect())["accel"] == "tcg" and probes == ["probed"]  # the new verdict is kept
