"""Volumes in real VMs of both drivers, through the official SDK: what one VM writes a later VM reads;
read-only is refused by the kernel; the quota stops a writer with ENOSPC and nothing else is harmed; a
checkpoint mounted shows its old content; the files API and the VM see the same bytes; a mounted volume
cannot be deleted; another key's volume is refused; live mount and unmount."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest
from instavm import InstaVM

from gateway.volumes.local import LocalVolumeStore
from tests.conftest import (
    ROOTFS_CACHE,
    GatewayUnderTest,
    remove_blackhole,
    remove_empty_cgroup_parents,
    remove_host_firewall,
)
from tests.egress_env import DRIVERS
from tests.integration.test_cli import Server, gateway
from tests.integration.test_sdk_volumes import IS_ROOT, MiB, call, client_for, status_of

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not IS_ROOT, reason="volumes need root (loop devices, mounts)"),
]


async def vm_with(client: InstaVM, volumes: list[dict[str, Any]]) -> dict[str, Any]:
    vm = await call(client.vms.create, volumes=volumes, wait=True)
    assert vm["status"] == "active", vm
    return vm  # type: ignore[no-any-return]


async def sh(gw: GatewayUnderTest, vm: dict[str, Any], command: str) -> dict[str, Any]:
    status, out = await gw.request(
        "POST",
        "/execute",
        json={"session_id": vm["session_id"], "language": "bash", "command": command, "timeout": 60},
    )
    assert status == 200, out
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_volume_outlives_its_vms_and_keeps_its_rules(
    driver: str, gateway_factory: Any, tmp_path: Path
) -> None:
    gw: GatewayUnderTest = await gateway_factory(driver, vms={"driver": driver, "boot_timeout_s": 90.0})
    client = await call(client_for, gw)
    volume_id = (await call(client.volumes.create, "project", 32 * MiB))["id"]
    local = tmp_path / "hello.txt"
    local.write_bytes(b"from the files API\n")
    await call(client.volumes.upload_file, volume_id, str(local), "hello.txt")

    first = await vm_with(client, [{"volume_id": volume_id, "mount_path": "/data", "mode": "rw"}])
    assert (await call(client.vms.get, first["vm_id"]))["volumes"] == [
        {"volume_id": volume_id, "mount_path": "/data", "mode": "rw", "checkpoint_id": None}
    ]
    seen = await sh(gw, first, "cat /data/hello.txt && echo one > /data/from-vm.txt && sync")
    assert seen["stdout"] == "from the files API\n", seen
    with pytest.raises(Exception) as busy:
        await call(client.volumes.delete, volume_id)
    assert status_of(busy.value) == 409  # mounted
    await call(client.vms.delete, first["vm_id"])
    downloaded = await call(client.volumes.download_file, volume_id, "from-vm.txt")
    assert downloaded["content"] in ("b25lCg==", "one\n"), downloaded  # base64 or text: the VM's bytes

    checkpoint = await call(client.volumes.create_checkpoint, volume_id, name="before")
    local.write_bytes(b"newer\n")
    await call(client.volumes.upload_file, volume_id, str(local), "hello.txt", overwrite=True)
    second = await vm_with(
        client,
        [
            {"volume_id": volume_id, "mount_path": "/data", "mode": "ro"},
            {"volume_id": volume_id, "mount_path": "/old", "mode": "ro", "checkpoint_id": checkpoint["id"]},
        ],
    )
    seen = await sh(gw, second, "cat /data/hello.txt /old/hello.txt /data/from-vm.txt")
    assert seen["stdout"] == "newer\nfrom the files API\none\n", seen
    refused = await sh(gw, second, "echo x > /data/x; echo x > /old/x")
    assert refused["stderr"].count("Read-only file system") == 2, refused

    # Live: a read-write mount into the running VM; the quota stops a writer, nothing else suffers.
    mounted = await call(client.vms.mount_volume, second["vm_id"], volume_id, "/work/rw", mode="rw")
    assert mounted["mount_path"] == "/work/rw"
    assert len(await call(client.vms.list_volumes, second["vm_id"])) == 3
    full = await sh(gw, second, "dd if=/dev/zero of=/work/rw/big bs=1M count=64 2>&1; cat /work/rw/hello.txt")
    assert "No space left on device" in full["stdout"], full
    assert full["stdout"].endswith("newer\n"), full
    assert (await sh(gw, second, "rm /work/rw/big && echo still-fine"))["stdout"] == "still-fine\n"
    await call(client.vms.unmount_volume, second["vm_id"], volume_id, "/work/rw")
    assert [v["mount_path"] for v in await call(client.vms.list_volumes, second["vm_id"])] == [
        "/data",
        "/old",
    ]
    gone = await sh(gw, second, "ls /work/rw | wc -l")
    assert gone["stdout"].strip() == "0", gone  # what is left there is the VM's own empty folder

    other = client_for(gw, await gw.new_key())
    with pytest.raises(Exception) as hidden:
        await call(other.volumes.get, volume_id)
    assert status_of(hidden.value) == 404
    status, body = await gw.request(
        "POST", "/v1/vms", json={"volumes": [{"volume_id": volume_id, "mount_path": "/x"}]}, key=other.api_key
    )
    assert status == 422 and body["detail"][0]["loc"] == ["body", "volumes", 0, "volume_id"], body

    await call(client.vms.delete, second["vm_id"])
    await call(client.volumes.delete, volume_id)  # nothing holds it any more


@pytest.mark.parametrize("driver", DRIVERS)
async def test_two_vms_share_one_volume_read_write(driver: str, gateway_factory: Any) -> None:
    """Allowed, as on a network file system: one file system, each sees what the other wrote."""
    gw: GatewayUnderTest = await gateway_factory(driver, vms={"driver": driver, "boot_timeout_s": 90.0})
    client = await call(client_for, gw)
    volume_id = (await call(client.volumes.create, "shared", 16 * MiB))["id"]
    mounts = [{"volume_id": volume_id, "mount_path": "/shared", "mode": "rw"}]
    one, two = await vm_with(client, mounts), await vm_with(client, mounts)
    await sh(gw, one, "echo from-one > /shared/note && sync")
    seen = await sh(gw, two, "cat /shared/note && echo from-two >> /shared/note && sync")
    assert seen["stdout"] == "from-one\n", seen
    assert (await sh(gw, one, "cat /shared/note"))["stdout"] == "from-one\nfrom-two\n"
    for vm in (one, two):
        await call(client.vms.delete, vm["vm_id"])
    await call(client.volumes.delete, volume_id)


async def test_bad_mounts_are_422s_naming_the_field(gateway_factory: Any) -> None:
    gw: GatewayUnderTest = await gateway_factory("netns")
    client = await call(client_for, gw)
    volume_id = (await call(client.volumes.create, "v", 16 * MiB))["id"]
    for volumes, loc in (
        ([{"volume_id": volume_id, "mount_path": "/etc/x"}], ["body", "volumes", 0, "mount_path"]),
        ([{"volume_id": volume_id, "mount_path": "/a/../b"}], ["body", "volumes", 0, "mount_path"]),
        ([{"volume_id": volume_id, "mount_path": "/d", "mode": "rx"}], ["body", "volumes", 0, "mode"]),
        ([{"volume_id": volume_id, "mount_path": "/d"}] * 2, ["body", "volumes"]),
        ([{"volume_id": "vol-nope", "mount_path": "/d"}], ["body", "volumes", 0, "volume_id"]),
    ):
        status, body = await gw.request("POST", "/v1/vms", json={"volumes": volumes})
        assert status == 422 and body["detail"][0]["loc"] == loc, (volumes, body)


async def test_vms_without_mounts_say_so(gw: GatewayUnderTest) -> None:
    status, body = await gw.request(
        "POST", "/v1/vms", json={"volumes": [{"volume_id": "v", "mount_path": "/d"}]}
    )
    assert status == 422 and body["detail"][0]["loc"] == ["body", "volumes"], body


DURABLE = {  # this test's own driver names (its gateway is a process of its own)
    "GATEWAY_VMS_DRIVER": "netns",
    "GATEWAY_NETNS_CIDR": "172.31.220.0/24",
    "GATEWAY_NETNS_NAME_PREFIX": "gwdn",
    "GATEWAY_NETNS_CGROUP_NAME": "gateway-dntest",
    "GATEWAY_IMAGES_DIR": str(ROOTFS_CACHE),
}


@pytest.mark.parametrize("driver", ["netns"])
def test_a_write_the_vm_saw_survives_a_sigkill_of_the_gateway_and_the_vms_kill(
    driver: str, tmp_path: Path
) -> None:
    """No sync in the VM, SIGKILL of the gateway (no drain, no unmount), a restart, the VM killed: the
    write is there for the files API and for the next VM."""
    data = tmp_path / "data"
    first = Server(data, env=DURABLE)
    try:
        key = gateway("--data-dir", str(data), "keys", "create", "--name", "k").stdout.split()[-1]
        status, volume = first.call("POST", "/v1/volumes", {"name": "d", "quota_bytes": 16 * MiB}, key)
        assert status == 201, volume
        mounts = [{"volume_id": volume["id"], "mount_path": "/data"}]
        status, vm = first.call("POST", "/v1/vms", {"volumes": mounts}, key)
        assert status == 200, vm
        command = {"session_id": vm["session_id"], "language": "bash", "command": "echo durable > /data/f"}
        status, wrote = first.call("POST", "/execute", command, key)
        assert status == 200 and wrote["exit_code"] == 0, wrote
        first.proc.kill()
        first.proc.wait(timeout=30)
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
        first.close_pipes()
    second = Server(data, env=DURABLE)
    try:
        assert second.call("DELETE", f"/v1/vms/{vm['vm_id']}", None, key)[0] == 200
        status, got = second.call("POST", f"/v1/volumes/{volume['id']}/files/download", {"path": "f"}, key)
        assert status == 200 and base64.b64decode(got["content"]) == b"durable\n", got
        status, later = second.call("POST", "/v1/vms", {"volumes": mounts}, key)
        assert status == 200, later
        command = {"session_id": later["session_id"], "language": "bash", "command": "cat /data/f"}
        assert second.call("POST", "/execute", command, key)[1]["stdout"] == "durable\n"
        assert second.call("DELETE", f"/v1/vms/{later['vm_id']}", None, key)[0] == 200
    finally:
        assert second.stop() == 0
        asyncio.run(LocalVolumeStore(data / "volumes").release_all())
        remove_host_firewall("gwdn")
        remove_blackhole(DURABLE["GATEWAY_NETNS_CIDR"])
        remove_empty_cgroup_parents("gateway-dntest")
