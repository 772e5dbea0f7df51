"""The qemu driver's view of an image: its built root file system as an ext4 disk image.

A qemu guest cannot see a host folder, so each built image of the shared store (``gateway.images``) gets
one disk beside its root file system, made with ``mkfs.ext4 -d`` (e2fsprogs; no mount, no loop device)::

    <images.dir>/<name>/<digest>/rootfs/           the image (netns VMs mount it)
    <images.dir>/<name>/<digest>/qemu-disk.ext4    the same files, for qemu VMs (read-only to them)
    <images.dir>/<name>/<digest>/qemu-disk.json    its id, size and the version of this module

It lives in the image's digest folder, so a changed definition gets a disk of its own and a VM running
on the old one keeps it. Every qemu VM of the image attaches this one file read-only (virtio-blk); its
guest puts a tmpfs overlay on top, so nothing ever writes the file and a memory snapshot holds all of a
VM's writable state.

The disk's ``disk_id`` is random per made file (and is the file system's UUID): a guest's memory holds
cached blocks of its disk, so a snapshot or boot template may resume only on the very file it was taken
on, not on a disk made again from the same image (mkfs places files differently each time).
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import DriverError

DISK_FILE = "qemu-disk.ext4"
DISK_META = "qemu-disk.json"
# Part of what a disk must match: bump it when the mkfs options below change, so disks are made again.
DISK_VERSION = "1"
MIB_BYTES = 1024 * 1024
# Room beyond the files: ext4's metadata (inode tables, directories, bitmaps). The file is sparse, so
# room not used takes no host space.
SIZE_FACTOR = 1.5
SIZE_SLACK_MB = 64
# Inodes beyond the files the root has (the guest writes on its overlay, never on this file system).
SPARE_INODES = 1024
MKFS_TIMEOUT_S = 600
# Unix permissions: read by the unprivileged QEMUs (an image holds no secrets), written by nobody.
DISK_MODE = 0o444


@dataclass(frozen=True)
class Disk:
    path: Path
    disk_id: str


def disk_of(folder: Path) -> Disk | None:
    """The disk made for the image folder ``folder`` (``<name>/<digest>``), or None when there is none
    (never made, made by another version of this module, or half made)."""
    try:
        meta = json.loads((folder / DISK_META).read_text())
    except (OSError, ValueError):
        return None
    path = folder / DISK_FILE
    if not isinstance(meta, dict) or meta.get("version") != DISK_VERSION or not path.is_file():
        return None
    return Disk(path, str(meta["disk_id"]))


def count_entries(rootfs: Path) -> tuple[int, int]:
    """(files and folders, bytes) under ``rootfs``: what the file system must hold."""
    entries = size = 0
    for folder, dirs, files in os.walk(rootfs):
        for name in dirs + files:
            entries += 1
            size += os.lstat(os.path.join(folder, name)).st_size
    return entries, size


def make_disk(folder: Path, rootfs: Path) -> Disk:
    """Make the disk of the image in ``folder`` from ``rootfs`` (about 6 s for 500 MiB), replacing any.

    The caller holds the image's lock (``ImageStore.locked``): two processes never make one disk at once.
    Written under a scratch name and renamed into place, its metadata last: a disk is whole once listed.
    """
    (folder / DISK_META).unlink(missing_ok=True)
    entries, size = count_entries(rootfs)
    size_mb = int(size * SIZE_FACTOR / MIB_BYTES) + SIZE_SLACK_MB
    disk_id = str(uuid.uuid4())
    scratch = folder / f".{DISK_FILE}.tmp"
    scratch.unlink(missing_ok=True)
    with open(scratch, "wb") as fh:
        fh.truncate(size_mb * MIB_BYTES)
    argv = [
        "mkfs.ext4",
        "-q",
        "-F",
        # No journal (nothing writes it) and no reserved blocks; the files' owners and modes as they are.
        "-O",
        "^has_journal",
        "-m",
        "0",
        "-N",
        str(entries + SPARE_INODES),
        "-U",
        disk_id,
        "-L",
        "gateway-image",
        "-d",
        str(rootfs),
        str(scratch),
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=MKFS_TIMEOUT_S)
    except FileNotFoundError:
        scratch.unlink(missing_ok=True)
        raise DriverError("`mkfs.ext4` is missing: apt-get install e2fsprogs") from None
    except subprocess.TimeoutExpired:
        scratch.unlink(missing_ok=True)
        raise DriverError(f"mkfs.ext4 of {rootfs} did not finish within {MKFS_TIMEOUT_S} s") from None
    if done.returncode != 0:
        scratch.unlink(missing_ok=True)
        raise DriverError(f"cannot make the qemu disk of {rootfs}: {done.stderr.strip()[-2000:]}")
    os.chmod(scratch, DISK_MODE)
    os.replace(scratch, folder / DISK_FILE)
    meta = {"disk_id": disk_id, "version": DISK_VERSION, "size_mb": size_mb, "entries": entries}
    (folder / DISK_META).write_text(json.dumps(meta, indent=2))
    return Disk(folder / DISK_FILE, disk_id)
