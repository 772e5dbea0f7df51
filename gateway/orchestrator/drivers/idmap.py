"""Idmapped mounts: one read-only image tree shown to each VM as owned by that VM's own id range.

Why: every VM's root is an unprivileged range of host ids (one range per slot), while an image is one
tree on disk owned by host root. An idmapped mount (Linux >= 5.12; overlayfs takes one as a lower layer
since 5.19) shows the same inodes with uid 0 as the slot's base id, in O(1), without copying or
chowning the image per slot. runc learns idmapped mounts only in 1.2 (Debian 12 ships 1.1), so the driver
makes the mount itself before runc starts the container, with the kernel's mount API:
``open_tree(OPEN_TREE_CLONE)`` -> ``mount_setattr(MOUNT_ATTR_IDMAP)`` -> ``move_mount``.

The mount needs a user namespace whose maps are the slot's: the VM's own, made here too, with its
network namespace (``attach_namespaces``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from gateway import subprocesses as _spawn
from gateway.errors import DriverError
from gateway.orchestrator.drivers import _host

# x86_64 and aarch64 share these numbers (the new mount API came after the generic table).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x100000
MS_BIND = 0x1000
USERNS_START_TIMEOUT_S = 5.0

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise DriverError(f"{what}: {os.strerror(errno)}")
    return result


async def _map_when_ready(proc: subprocess.Popen[bytes], host_id: int, count: int) -> None:
    """Once the ``unshare`` child says it is in its namespaces, map its ids 0..count-1 to host_id.."""
    assert proc.stdout is not None
    async with asyncio.timeout(USERNS_START_TIMEOUT_S):
        async for chunk in _spawn.chunks(proc.stdout):
            if b"ready" in chunk:  # printed after unshare(2): the child is in its namespaces
                break
        else:
            raise DriverError("unshare exited before its namespaces were ready")
    for name in ("uid_map", "gid_map"):
        fd = os.open(f"/proc/{proc.pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, f"0 {host_id} {count}\n".encode())
        finally:
            os.close(fd)


async def attach_namespaces(
    namespace: str, userns_file: Path, host_base: int, size: int, *, ip: str = "ip"
) -> None:
    """Make the VM's user namespace (ids 0..size-1 -> host_base..) and, owned by it, its network namespace
    named ``namespace`` (``ip netns``); the user namespace stays alive bind-mounted on ``userns_file``.

    Why the network namespace belongs to the VM's user namespace: runc (before 1.2) joins the user
    namespace first on ``exec`` and may then not enter a network namespace the host's owns. Root in the
    VM still cannot configure it: NET_ADMIN is not among its capabilities.
    """
    proc = _spawn.popen(
        ["unshare", "--user", "--net", "/bin/sh", "-c", "echo ready; exec cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _map_when_ready(proc, host_base, size)
        os.close(os.open(userns_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        _check(
            _libc.mount(
                os.fsencode(f"/proc/{proc.pid}/ns/user"), os.fsencode(userns_file), None, MS_BIND, None
            ),
            f"keeping the user namespace on {userns_file}",
        )
        await _host.run_host([ip, "netns", "attach", namespace, str(proc.pid)])
    except (OSError, TimeoutError) as exc:
        raise DriverError(f"cannot make the VM's namespaces: {exc}") from exc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        _spawn.close_pipes(proc)
        await _spawn.wait(proc)


def mount_idmapped(
    source: Path, target: Path, userns: int, *, read_only: bool = True, recursive: bool = True
) -> None:
    """Mount a nosuid, nodev view of ``source`` (read-only unless told) on ``target`` with ``userns``'s
    id maps; ``recursive``: with the mounts beneath ``source``."""
    deep = AT_RECURSIVE if recursive else 0
    clone = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | deep
    tree = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), clone), f"open_tree {source}")
    try:
        flags = MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
        attr = _MountAttr(flags | (MOUNT_ATTR_RDONLY if read_only else 0), 0, 0, userns)
        _check(
            _libc.syscall(
                SYS_MOUNT_SETATTR,
                tree,
                b"",
                AT_EMPTY_PATH | deep,
                ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            f"idmapping {source}",
        )
        _check(
            _libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH),
            f"mounting {source} on {target}",
        )
    finally:
        os.close(tree)


@contextlib.asynccontextmanager
async def scratch_userns(host_id: int, count: int) -> AsyncIterator[int]:
    """A descriptor of a fresh user namespace whose ids 0..count-1 are host ids host_id.. (for an
    idmapped mount's map only: no process stays in it)."""
    proc = _spawn.popen(
        ["unshare", "--user", "/bin/sh", "-c", "echo ready; exec cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    fd = -1
    try:
        await _map_when_ready(proc, host_id, count)
        fd = os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, TimeoutError) as exc:
        raise DriverError(f"cannot make a user namespace for an id map: {exc}") from exc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        _spawn.close_pipes(proc)
        await _spawn.wait(proc)
    try:
        yield fd
    finally:
        os.close(fd)
