"""A VM's root file system: the image, read-only and idmapped, under a writable layer of its own.

Layout:
- ``disk.img`` in the VM's work folder: a sparse file of ``disk_mb`` holding an ext4 file system (no
  journal: the layer dies with the VM); its size is the VM's disk limit, enforced by the file system,
  and only the blocks written take space on the host;
- in the VM's mount folder (under /run, every level searchable by anyone: runc prepares the root as the
  VM's root, an unprivileged host id, which could not walk into a private data folder):
  ``disk/`` (the loop-mounted layer), ``lower/`` (the image, read-only, with the slot's id map: see
  ``idmap``), ``rootfs/`` (overlayfs of ``lower`` under ``disk/upper``: the container's root) and
  ``userns`` (the VM's user namespace, kept by a bind mount).

Why overlay and not a per-VM copy: an image is hundreds of MiB; a copy costs seconds and the space of
every byte, an overlay costs a mount and only what the VM changes.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
from pathlib import Path

from gateway.errors import DriverError
from gateway.orchestrator.drivers import _host, idmap

DISK_FILE = "disk.img"
DISK_DIR = "disk"
LOWER_DIR = "lower"
ROOTFS_DIR = "rootfs"
OUTPUT_DIR = "output"
# The VM's volume staging folder (``volmount``): a tmpfs with the VM's volumes mounted beneath it.
VOLUMES_DIR = "volumes"
# The VM's user namespace, kept alive by a bind mount (``idmap.attach_namespaces``).
USERNS_FILE = "userns"
MIB_BYTES = 1024 * 1024
MNT_DETACH = 2
# Innermost first: the order a teardown unmounts in.
MOUNT_POINTS = (VOLUMES_DIR, ROOTFS_DIR, LOWER_DIR, DISK_DIR, USERNS_FILE)

_libc = ctypes.CDLL(None, use_errno=True)


async def assemble(image: Path, mount_dir: Path, disk: Path, *, host_base: int, disk_mb: int) -> Path:
    """Build the VM's root in ``mount_dir`` (whose ``userns`` is the VM's user namespace) with its layer in
    ``disk``, and return it. On failure, ``disassemble`` removes what was made."""
    if not (image / "usr").is_dir():
        raise DriverError(f"image {image} has no /usr: not a root file system")
    disk_dir, lower, rootfs = (mount_dir / n for n in (DISK_DIR, LOWER_DIR, ROOTFS_DIR))
    for folder in (disk_dir, lower, rootfs):
        folder.mkdir()
    os.close(os.open(disk, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    os.truncate(disk, disk_mb * MIB_BYTES)  # sparse: blocks are taken as the VM writes them
    owner = f"root_owner={host_base}:{host_base}"
    await _host.run_host(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-E",
            f"lazy_itable_init=1,{owner}",
            str(disk),
        ]
    )
    await _host.run_host(["mount", "-o", "loop,nodev,nosuid,noatime", str(disk), str(disk_dir)])
    for name in ("upper", "work"):
        (disk_dir / name).mkdir()
        os.chown(disk_dir / name, host_base, host_base)
    # Commands' captured output: on the VM's own disk, so a background process that keeps writing to
    # its inherited stdout fills the VM's layer, not the host's (and never shown in the VM's root).
    (disk_dir / OUTPUT_DIR).mkdir(mode=0o700)
    ns = os.open(mount_dir / USERNS_FILE, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await asyncio.to_thread(idmap.mount_idmapped, image, lower, ns)
    finally:
        os.close(ns)
    layers = f"lowerdir={lower},upperdir={disk_dir / 'upper'},workdir={disk_dir / 'work'}"
    await _host.run_host(["mount", "-t", "overlay", "overlay", "-o", f"{layers},nodev", str(rootfs)])
    return rootfs


def disassemble(mount_dir: Path) -> list[str]:
    """Unmount what ``assemble`` mounted (idempotent); returns the mount points still mounted.

    Detached unmounts: the kernel lets go once nothing uses them, and the loop device (autoclear) with it.
    """
    for name in MOUNT_POINTS:
        point = mount_dir / name
        while str(point) in mount_points():  # (mounted twice: once per umount)
            if _libc.umount2(os.fsencode(point), MNT_DETACH) != 0:
                break
    return [str(mount_dir / name) for name in MOUNT_POINTS if str(mount_dir / name) in mount_points()]


def mounted(mount_dir: Path) -> bool:
    """Whether any of the VM's mounts is still there (a work folder must never be removed through one)."""
    points = mount_points()
    return any(str(mount_dir / name) in points for name in MOUNT_POINTS)


def symlink_on_path(root: Path, path: str) -> str | None:
    """The first component of ``path`` (absolute, normal) under ``root`` that is a symbolic link or not a
    folder, or None (missing components are fine: they will be made). For the VM's root before it runs."""
    current = root
    for name in path.strip("/").split("/"):
        current = current / name
        if current.is_symlink() or (current.exists() and not current.is_dir()):
            return str(current.relative_to(root))
        if not current.exists():
            return None
    return None


def has_command(root: Path, command: str, search_path: str) -> bool:
    """Whether ``command`` names a file in the VM's root (a path, or a name on ``search_path``), checked
    before the VM starts so that a missing program fails the create rather than the VM a moment later.
    Links are not followed (they point into the VM's root, not the host's)."""
    if "/" in command:
        return os.path.lexists(root / command.lstrip("/"))
    return any(os.path.lexists(root / folder.lstrip("/") / command) for folder in search_path.split(":"))


def mount_points() -> set[str]:
    """This mount namespace's mount points: ``os.path.ismount`` misses a bind mount of a folder on the
    same file system (the image, idmapped, usually is one)."""
    with open("/proc/self/mountinfo", "rb") as fh:
        return parse_mount_points(fh.read())


def parse_mount_points(mountinfo: bytes) -> set[str]:
    """Pure: the mount points a mountinfo text lists (its fifth field, with space, tab, newline and
    backslash octal-escaped)."""
    points = set()
    for line in mountinfo.splitlines():
        fields = line.split(b" ", 5)
        if len(fields) > 4:
            raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4])
            points.add(raw.decode(errors="replace"))
    return points
