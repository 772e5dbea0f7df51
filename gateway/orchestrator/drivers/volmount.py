"""Volumes in VMs, the host's side: staging a host folder for one VM, and binding it inside a netns VM.

Every VM gets a staging folder at create: a small tmpfs of its own (``make_staging``), a shared mount
with a peer group of its own, so that a mount made beneath it later on the host propagates to where
the VM sees it (netns: bound into the container at ``mount_paths.STAGING_DIR`` with slave propagation;
qemu: QEMU's jail, where it is the 9p share). A volume is staged as ``<staging>/<key>``
(``mount_paths.mount_key``): an idmapped, nosuid, nodev view of the host folder (``stage``), read-only
when asked. The read-only flag is set on the host's mount, so:
- netns: the copy the VM receives crossed into a less privileged user namespace, which the kernel marks
  as locked (MNT_LOCK_READONLY, and MNT_LOCKED: it cannot be unmounted to uncover what is beneath); every
  later copy (the bind at ``mount_path``, one the VM makes itself) inherits the lock, so no remount
  makes it writable;
- qemu: QEMU itself gets EROFS from the host kernel, whatever the guest's kernel was told.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

from gateway import subprocesses as _spawn
from gateway.errors import DriverError
from gateway.orchestrator.drivers import _host, idmap, mount_paths, rootfs

STAGING_NAME = rootfs.VOLUMES_DIR
STAGING_TMPFS_OPTIONS = b"mode=0755,size=64k,nr_inodes=1024"
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 2
HELPER = Path(__file__).with_name("_nsmount.py")
HELPER_TIMEOUT_S = 15.0

_libc = ctypes.CDLL(None, use_errno=True)


def prepare_volume_root(path: Path) -> None:
    """Give a fresh volume's root folder the owner every driver expects (the VM's root, as stored on
    disk: uid/gid 0, mode 0755; see ``mount_paths``). For the volume store, once per volume."""
    uid, gid = mount_paths.VOLUME_ROOT_IDS
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, mount_paths.VOLUME_ROOT_MODE, follow_symlinks=False)


def check_host_dir(host_dir: Path) -> Path:
    """The host folder to mount, as an absolute real path; DriverError when it is not a folder."""
    path = Path(os.path.realpath(host_dir))
    if not path.is_dir():
        raise DriverError(f"{host_dir} is not a folder on the host")
    return path


def _mount_call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise DriverError(f"{what}: {os.strerror(err)}")


def make_staging(folder: Path) -> None:
    """The VM's staging folder: a tmpfs (no file of the host's is ever beneath a volume), shared with a
    peer group of its own (mounts beneath it propagate to the VM's copy and nowhere else)."""
    folder.mkdir(mode=0o755)
    path = os.fsencode(folder)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    made = _libc.mount(b"gateway-volumes", path, b"tmpfs", flags, STAGING_TMPFS_OPTIONS)
    _mount_call(made, f"tmpfs on {folder}")
    _mount_call(_libc.mount(None, path, None, MS_PRIVATE, None), f"making {folder} private")
    _mount_call(_libc.mount(None, path, None, MS_SHARED, None), f"making {folder} shared")


def staged(folder: Path, mount_path: str) -> Path:
    return folder / mount_paths.mount_key(mount_path)


def stage(host_dir: Path, folder: Path, mount_path: str, userns: int, *, read_only: bool) -> Path:
    """Mount an idmapped view of ``host_dir`` (``userns``'s maps) in the staging ``folder``; returns it.
    DriverError when ``mount_path`` already has one."""
    target = staged(folder, mount_path)
    try:
        target.mkdir(mode=0o755)
    except FileExistsError:
        raise DriverError(f"a volume is already mounted at {mount_path}") from None
    try:
        idmap.mount_idmapped(host_dir, target, userns, read_only=read_only, recursive=False)
    except BaseException:
        target.rmdir()
        raise
    return target


def unstage(folder: Path, mount_path: str) -> None:
    """Undo ``stage`` (idempotent). Detached: the kernel lets go of the host folder once nothing uses it
    (the unmount propagates to the VM's copies)."""
    target = staged(folder, mount_path)
    while str(target) in rootfs.mount_points():
        if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise DriverError(f"unmounting {target}: {os.strerror(err)}")
    try:
        target.rmdir()
    except FileNotFoundError:
        pass


def unmount_staging(folder: Path) -> None:
    """Detach the staging folder with every volume beneath it (a VM's teardown)."""
    while str(folder) in rootfs.mount_points():
        if _libc.umount2(os.fsencode(folder), MNT_DETACH) != 0:
            break


async def in_vm(
    op: str,
    *,
    init_pid: int,
    init_ticks: int | None,
    mount_path: str,
    owner: int,
    read_only: bool,
    expect: os.stat_result,
) -> None:
    """Bind the staged volume at ``mount_path`` in the netns VM whose init is ``init_pid`` (``op`` "mount"),
    or remove it from there ("unmount"), through ``_nsmount`` (see why there)."""
    try:
        ns = os.open(f"/proc/{init_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DriverError(f"the VM's mount namespace is gone: {exc}") from None
    try:
        # Opened first, checked after: the descriptor is the VM's namespace, not a recycled PID's.
        if not _host.is_running(init_pid, init_ticks):
            raise DriverError("the VM's init is gone")
        request = {
            "op": op,
            "ns_fd": ns,
            "staging": f"{mount_paths.STAGING_DIR}/{mount_paths.mount_key(mount_path)}",
            "mount_path": mount_paths.check_mount_path(mount_path),
            "owner": owner,
            "read_only": read_only,
            "expect": [expect.st_dev, expect.st_ino],
        }
        proc = _spawn.popen(
            [sys.executable, "-I", "-S", str(HELPER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(ns,),
            env={"PATH": _host.BASE_PATH},
            cwd="/",
        )
    finally:
        os.close(ns)
    try:
        async with asyncio.timeout(HELPER_TIMEOUT_S):
            out, err = await _spawn.communicate(proc, json.dumps(request).encode())
    except TimeoutError:
        proc.kill()
        await _spawn.wait(proc)
        raise DriverError(f"{op} of {mount_path} in the VM timed out") from None
    finally:
        _spawn.close_pipes(proc)
    try:
        reply = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        said = err.decode(errors="replace")[-500:]
        raise DriverError(f"{op} of {mount_path} in the VM failed: {said}") from None
    if "error" in reply:
        raise DriverError(f"{op} of {mount_path} in the VM failed: {reply['error']}")
