"""Run as a program (host root, the host's Python): bind a staged volume at its path inside a netns VM's
mount namespace, or remove it from there. Not imported by the gateway; ``volmount.in_vm`` runs it.

Why a process of its own: entering a mount namespace (``setns``) needs a single-threaded caller, and
from then on every path is resolved in the VM's root, which the VM controls. So everything this program
needs is loaded before it enters, and the import system is emptied right after: a module file the VM
planted (``/usr/lib/python3.11/...`` as the VM sees it) can never run here. Paths in the VM are walked
one component at a time without following symbolic links (``openat2`` with ``RESOLVE_NO_SYMLINKS``), the
mount point is created folder by folder (owned by the VM's root) and the mount is attached to the very
folder opened (``move_mount`` on descriptors), so nothing the VM does to the path meanwhile can move the
mount out of its root.

Input (stdin, JSON): ``op`` ("mount" or "unmount"), ``staging`` (the staged volume as the VM sees it),
``mount_path``, ``owner`` (host uid/gid of the VM's root), ``read_only``, ``expect`` ([st_dev, st_ino]
of the staged volume's root), ``ns_fd`` (a descriptor of the VM's mount namespace, inherited).
Output: one JSON line, ``{"ok": true}`` or ``{"error": "..."}``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import sys
from typing import Any

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_OPENAT2 = 437
CLONE_NEWNS = 0x00020000
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
MNT_DETACH = 2
_STEP = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_IN_ROOT = RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
UMOUNT_NOFOLLOW = 8
ST_RDONLY = 1
DIR_MODE = 0o755

_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Refused(Exception):
    pass


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _open_beneath(dirfd: int, name: str, resolve: int) -> int:
    """A folder ``name`` (one component or a path) below ``dirfd``, as O_PATH, no links followed."""
    how = _OpenHow(os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW, 0, resolve)
    return _check(
        _libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(name), ctypes.byref(how), ctypes.sizeof(how)),
        f"opening {name}",
    )


def _walk(root: int, path: str, *, create: bool, owner: int) -> int | None:
    """The folder at ``path`` (absolute, checked by the gateway) below ``root``, each component opened
    without following links; missing folders made (owned by the VM's root) when ``create``. None when
    a component is missing and not ``create``."""
    current = os.dup(root)
    try:
        for name in path.strip("/").split("/"):
            try:
                nxt = _open_beneath(current, name, _STEP)
            except OSError as exc:
                if exc.errno == errno.ENOENT and create:
                    try:
                        os.mkdir(name, DIR_MODE, dir_fd=current)
                        os.chown(name, owner, owner, dir_fd=current, follow_symlinks=False)
                    except FileExistsError:
                        pass  # made meanwhile (by the VM): opened below like any other
                    nxt = _open_beneath(current, name, _STEP)
                elif exc.errno == errno.ENOENT:
                    return None
                elif exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                    raise Refused(f"{path}: {name} is a symbolic link or not a folder in the VM") from None
                else:
                    raise
            os.close(current)
            current = nxt
        found, current = current, -1
        return found
    finally:
        if current >= 0:
            os.close(current)


def _staged(root: int, staging: str, expect: list[int]) -> int:
    """The staged volume, checked to be the one the host staged (the VM may have covered the staging
    folder with something of its own)."""
    fd = _open_beneath(root, staging.lstrip("/"), _IN_ROOT)
    st = os.fstat(fd)
    if [st.st_dev, st.st_ino] != list(expect):
        os.close(fd)
        raise Refused(f"the VM has covered {staging}: its volume is not there")
    return fd


def mount(root: int, request: dict[str, Any]) -> None:
    source = _staged(root, request["staging"], request["expect"])
    try:
        tree = _check(
            _libc.syscall(SYS_OPEN_TREE, source, b"", OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH),
            "cloning the staged volume",
        )
    finally:
        os.close(source)
    try:
        if request["read_only"] and not os.fstatvfs(tree).f_flag & ST_RDONLY:
            raise Refused("the staged volume is not read-only")
        target = _walk(root, request["mount_path"], create=True, owner=request["owner"])
        assert target is not None
        try:
            flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
            _check(_libc.syscall(SYS_MOVE_MOUNT, tree, b"", target, b"", flags), "mounting")
        finally:
            os.close(target)
    finally:
        os.close(tree)


def unmount(root: int, request: dict[str, Any]) -> None:
    target = _walk(root, request["mount_path"], create=False, owner=0)
    if target is None:
        return
    try:
        st = os.fstat(target)
    finally:
        os.close(target)
    if [st.st_dev, st.st_ino] != list(request["expect"]) or not stat.S_ISDIR(st.st_mode):
        return  # not our volume there (the VM unmounted it, or put something else there)
    # By path, no final link followed; the components were just walked without links.
    path = os.fsencode(request["mount_path"])
    if _libc.umount2(path, MNT_DETACH | UMOUNT_NOFOLLOW) != 0 and ctypes.get_errno() not in (errno.EINVAL,):
        err = ctypes.get_errno()
        raise OSError(err, f"unmounting {request['mount_path']}: {os.strerror(err)}")


def main() -> None:
    try:
        request = json.loads(sys.stdin.read())
        _check(_libc.setns(int(request["ns_fd"]), CLONE_NEWNS), "entering the VM's mount namespace")
        # From here on paths are the VM's: nothing may be imported (the VM could have planted it).
        sys.meta_path.clear()
        sys.path_hooks.clear()
        sys.path.clear()
        sys.path_importer_cache.clear()
        root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        (mount if request["op"] == "mount" else unmount)(root, request)
        reply: dict[str, object] = {"ok": True}
    except Refused as exc:
        reply = {"error": str(exc), "refused": True}
    except BaseException as exc:  # (a traceback could import: only the message)
        reply = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
