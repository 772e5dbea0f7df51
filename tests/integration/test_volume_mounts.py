"""Host folders (volumes) mounted into real VMs of both real drivers (``VmMounts``), tried from inside.

A volume here is what the volume store hands over: a folder on a loop-mounted ext4 image whose root
belongs to uid/gid 0 (``volmount.prepare_volume_root``). Each test asserts on what code in the VM sees
and on the host folder's bytes and owners; the VM tries to get out of read-only (remount, unmount and
write beneath, a nested namespace), to redirect a live mount with a planted link, and to cover the
staging folder.

Every name here is this file's own (prefixes, ranges, cgroups), so it runs beside the other driver
tests; the loop mounts and the drivers' leftovers are removed, also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, override
from gateway.errors import DriverError
from gateway.orchestrator.drivers import hostfw, rootfs, volmount
from gateway.orchestrator.drivers.base import Mount, VmInfo, VmMounts, VmSpec
from gateway.orchestrator.drivers.mount_paths import STAGING_DIR
from gateway.orchestrator.drivers.registry import make_driver
from tests.conftest import remove_blackhole, remove_empty_cgroup_parents
from tests.qemu_env import guest_image, qemu_missing
from tests.rootfs_env import CACHE_ROOT as ROOTFS_CACHE
from tests.rootfs_env import ensure_test_images

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mkfs.ext4") is None, reason="root, e2fsprogs"),
]

OWN = {
    "netns": {"cidr": "172.31.210.0/24", "name_prefix": "gwmn", "cgroup_name": "gateway-mntest"},
    "qemu": {"cidr": "172.31.214.0/23", "name_prefix": "gwmq", "cgroup_name": "gateway-mqtest"},
}
DRIVERS = [
    pytest.param("netns", id="netns"),
    pytest.param(
        "qemu",
        id="qemu",
        marks=[pytest.mark.slow, pytest.mark.skipif(qemu_missing() is not None, reason=str(qemu_missing()))],
    ),
]
VOLUME_MB = 16
VM_MEMORY_MB = 256
BOOT_TIMEOUT_S = 90.0


def driver_config(tmp_path: Path, kind: str) -> Config:
    return override(
        Config(),
        server={"data_dir": str(tmp_path / "data")},
        vms={"driver": kind, "boot_timeout_s": BOOT_TIMEOUT_S},
        netns=OWN["netns"],
        qemu={**OWN["qemu"], "image_dir": str(guest_image()) if kind == "qemu" else ""},
        images={"dir": str(ROOTFS_CACHE)},
    )


@contextlib.asynccontextmanager
async def started(tmp_path: Path, kind: str) -> AsyncIterator[Any]:
    ensure_test_images("default")
    driver = make_driver(driver_config(tmp_path, kind))
    assert isinstance(driver, VmMounts)
    own = OWN[kind]
    await driver.start()
    try:
        yield driver
    finally:
        try:
            await driver.sweep(set())
        finally:
            await driver.close()
            remove_blackhole(own["cidr"])
            remove_empty_cgroup_parents(own["cgroup_name"])
            await hostfw.remove(own["name_prefix"])


@contextlib.contextmanager
def volume(tmp_path: Path, name: str) -> Iterator[Path]:
    """A fresh ext4 volume, loop-mounted on the host like the store's, with its root owned as the drivers
    expect; unmounted afterwards (lazily: a VM's copy may still be going)."""
    image, folder = tmp_path / f"{name}.img", tmp_path / name
    folder.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(VOLUME_MB * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop,nodev,nosuid", str(image), str(folder)], check=True)
    try:
        volmount.prepare_volume_root(folder)
        (folder / "hello.txt").write_text("from the host\n")
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(params=DRIVERS)
async def driver(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    async with started(tmp_path, request.param) as made:
        yield made


class Vm:
    def __init__(self, driver: Any, info: VmInfo) -> None:
        self.driver, self.info = driver, info

    async def sh(self, command: str) -> tuple[int | None, str, str]:
        argv = ["sh", "-c", command]
        result = await self.driver.execute(
            self.info.vm_id, self.info.handle, argv, env={}, timeout_s=30, max_output_bytes=65536
        )
        return result.exit_code, result.stdout.decode(), result.stderr.decode()

    async def ok(self, command: str) -> str:
        code, out, err = await self.sh(command)
        assert code == 0, (command, out, err)
        return out

    async def mount(self, host_dir: Path, path: str, *, read_only: bool = False) -> None:
        await self.driver.mount(self.info.vm_id, self.info.handle, host_dir, path, read_only=read_only)

    async def unmount(self, path: str) -> None:
        await self.driver.unmount(self.info.vm_id, self.info.handle, path)


@contextlib.asynccontextmanager
async def vm(driver: Any, slot: int, *mounts: Mount) -> AsyncIterator[Vm]:
    vm_id = f"vol-{driver.name}-{slot}"
    spec = VmSpec(vm_id=vm_id, slot=slot, vcpu_count=1, memory_mb=VM_MEMORY_MB, mounts=tuple(mounts))
    info = await driver.create(spec)
    try:
        yield Vm(driver, info)
    finally:
        await driver.destroy(vm_id, info.handle)


async def host(*argv: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True)


def host_mounts_under(folder: Path) -> list[str]:
    return sorted(p for p in rootfs.mount_points() if p.startswith(f"{folder}/") or p == str(folder))


# --- create-time mounts ---------------------------------------------------------------------------------


async def test_create_time_volumes_rw_and_ro_from_inside(driver: Any, tmp_path: Path) -> None:
    with volume(tmp_path, "rw") as rw, volume(tmp_path, "ro") as ro:
        mounts = (Mount(rw, "/data"), Mount(ro, "/home/user/ro", read_only=True))
        async with vm(driver, 1, *mounts) as v:
            assert await v.ok("cat /data/hello.txt /home/user/ro/hello.txt") == "from the host\n" * 2
            # The VM's root owns the volume's root (netns: through the VM's id map) and writes into it.
            await v.ok("echo from the vm > /data/new.txt && mkdir /data/sub && touch /data/sub/f")
            assert (rw / "new.txt").read_text() == "from the vm\n"
            found = os.stat(rw / "sub" / "f")
            assert (found.st_uid, found.st_gid) == (0, 0)  # stored as the VM's root, unshifted
            if driver.name == "netns":
                assert (await v.ok("stat -c %u:%g /data /data/new.txt")).split() == ["0:0", "0:0"]

            code, _, err = await v.sh("echo x > /home/user/ro/new.txt")
            assert code != 0 and "Read-only file system" in err, err
            await assert_read_only_holds(v, "/home/user/ro", ro)
    assert not (ro / "new.txt").exists()


async def assert_read_only_holds(v: Vm, path: str, host_dir: Path) -> None:
    """What a VM's root can try against a read-only volume at ``path``; the host folder stays as it was."""
    before = sorted(os.listdir(host_dir))
    attempts = [
        f"mount -o remount,rw {path}",
        f"mount -o remount,bind,rw {path}",
        # A namespace of its own would give it every capability over its own copy of the mounts.
        f"unshare -Urm sh -c 'mount -o remount,rw {path} && echo x > {path}/escaped'",
        f"mount --bind {path} /mnt && mount -o remount,bind,rw /mnt && echo x > /mnt/escaped",
    ]
    for attempt in attempts:
        await v.sh(attempt)
        code, _, err = await v.sh(f"echo x > {path}/escaped")
        assert code != 0 and "Read-only file system" in err, (attempt, err)
    if v.driver.name == "netns":
        # The strongest root a VM could become: every capability in its user namespace, over its own
        # mount namespace (what seccomp and the capability set deny it). The kernel's lock still holds.
        pid = str(v.info.handle["init_pid"])
        for attempt in (f"mount -o remount,bind,rw {path}", f"mount -o remount,rw {path}"):
            done = await host("nsenter", "-t", pid, "-U", "-m", "--", "/bin/sh", "-c", attempt)
            assert done.returncode != 0, done
            code, _, err = await v.sh(f"echo x > {path}/escaped")
            assert code != 0 and "Read-only file system" in err, (attempt, err)
        await host("nsenter", "-t", pid, "-U", "-m", "--", "/bin/sh", "-c", f"umount {path}")
    # Unmounting it (where the VM can) uncovers its own folder: writes there are the VM's, not the volume's.
    await v.sh(f"umount {path}; umount -l {path}; echo beneath > {path}/beneath")
    await v.sh(f"for d in {STAGING_DIR}/*; do mount -o remount,rw $d; echo x > $d/escaped; done")
    assert sorted(os.listdir(host_dir)) == before


# --- live mounts ----------------------------------------------------------------------------------------


async def test_live_mount_and_unmount(driver: Any, tmp_path: Path) -> None:
    with volume(tmp_path, "live") as live, volume(tmp_path, "liver") as liver:
        async with vm(driver, 2) as v:
            await v.mount(live, "/workspace/project")
            assert await v.ok("cat /workspace/project/hello.txt") == "from the host\n"
            await v.ok("echo written > /workspace/project/out.txt")
            assert (live / "out.txt").read_text() == "written\n"
            with pytest.raises(DriverError, match="already mounted"):
                await v.mount(liver, "/workspace/project")

            await v.mount(liver, "/srv/ro", read_only=True)
            code, _, err = await v.sh("touch /srv/ro/x")
            assert code != 0 and "Read-only file system" in err, err
            await assert_read_only_holds(v, "/srv/ro", liver)

            await v.unmount("/workspace/project")
            await v.unmount("/workspace/project")  # idempotent
            await v.unmount("/srv/ro")
            assert await v.ok("ls -A /workspace/project") == ""
            assert (live / "out.txt").read_text() == "written\n"
            # The same path takes a volume again once it is free.
            await v.mount(liver, "/workspace/project", read_only=True)
            assert await v.ok("cat /workspace/project/hello.txt") == "from the host\n"
        assert (live / "hello.txt").exists()


async def test_planted_links_and_bad_paths_are_refused(driver: Any, tmp_path: Path) -> None:
    with volume(tmp_path, "vol") as vol:
        async with vm(driver, 3) as v:
            outside = tmp_path / "outside"
            outside.mkdir()
            await v.ok(f"ln -s / /evil && ln -s {outside} /evil2 && mkdir -p /a && ln -s /etc /a/b")
            for path in ("/evil", "/evil/data", "/evil2", "/a/b/x"):
                with pytest.raises(DriverError, match="symbolic link"):
                    await v.mount(vol, path)
            for path in ("/data/../etc", "/", "/proc/x", "/etc", "data", "/data/./x", "/dev/shm/x"):
                with pytest.raises(ValueError):
                    await v.mount(vol, path)
            # Nothing was mounted anywhere on the host, and nothing staged is left behind.
            assert host_mounts_under(outside) == [] and os.listdir(outside) == []
            staging = [p for p in rootfs.mount_points() if f"/{v.info.vm_id}/" in p and "/volumes/" in p]
            assert staging == [], staging
            assert await v.ok("readlink /evil; ls /") != ""
            await v.mount(vol, "/real")
            assert await v.ok("cat /real/hello.txt") == "from the host\n"


async def test_a_vm_covering_its_staging_folder_gets_no_mount(driver: Any, tmp_path: Path) -> None:
    if driver.name != "netns":
        pytest.skip("a qemu guest's own mounts are its own kernel's; the host stages through QEMU")
    with volume(tmp_path, "vol") as vol:
        async with vm(driver, 4) as v:
            # Without CAP_SYS_ADMIN it cannot mount; it can try to put folders of its own in the way.
            await v.sh(f"mount -t tmpfs x {STAGING_DIR}")
            await v.mount(vol, "/ok")
            assert await v.ok("cat /ok/hello.txt") == "from the host\n"


async def test_the_volume_goes_with_the_vm(driver: Any, tmp_path: Path) -> None:
    with volume(tmp_path, "vol") as vol:
        async with vm(driver, 5, Mount(vol, "/data")) as v:
            await v.mount(vol, "/again", read_only=True)
            vm_id = v.info.vm_id
        left = [p for p in rootfs.mount_points() if f"/{vm_id}/" in p]
        assert left == [], left
        # The host can unmount the volume at once: nothing of the VM holds it.
        assert (await host("umount", str(vol))).returncode == 0
        assert (await host("mount", "-o", "loop", str(tmp_path / "vol.img"), str(vol))).returncode == 0
