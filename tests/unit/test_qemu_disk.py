"""The qemu driver's disk of an image: made from the image's root once, found again, never half made."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.errors import DriverError
from gateway.orchestrator.drivers import qemu_disk

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="e2fsprogs is missing")


def small_root(folder: Path) -> Path:
    rootfs = folder / "rootfs"
    (rootfs / "usr/bin").mkdir(parents=True)
    (rootfs / "usr/bin/python3").write_text("#!/bin/sh\n")
    (rootfs / "usr/bin/python3").chmod(0o755)
    (rootfs / "etc").mkdir()
    (rootfs / "etc/hostname").write_text("sandbox\n")
    return rootfs


def test_a_disk_holds_the_images_files_and_is_found_again(tmp_path: Path) -> None:
    rootfs = small_root(tmp_path)
    assert qemu_disk.disk_of(tmp_path) is None
    disk = qemu_disk.make_disk(tmp_path, rootfs)
    assert disk == qemu_disk.disk_of(tmp_path)
    assert disk.path == tmp_path / qemu_disk.DISK_FILE and disk.path.stat().st_mode & 0o777 == 0o444
    # The file system's UUID is the disk's id; its files are the root's (e2fsprogs' debugfs reads them).
    said = subprocess.run(["dumpe2fs", "-h", str(disk.path)], capture_output=True, text=True).stdout
    assert f"Filesystem UUID:          {disk.disk_id}" in said
    listed = subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(disk.path)], capture_output=True)
    assert listed.stdout == b"sandbox\n"
    assert not list(tmp_path.glob(".*"))  # no scratch file left


def test_a_disk_made_again_is_another_disk(tmp_path: Path) -> None:
    """(A guest's memory caches its disk's blocks: a snapshot must not resume on a remade file.)"""
    rootfs = small_root(tmp_path)
    first = qemu_disk.make_disk(tmp_path, rootfs)
    assert qemu_disk.make_disk(tmp_path, rootfs).disk_id != first.disk_id


def test_a_disk_of_another_version_or_without_its_file_is_none(tmp_path: Path) -> None:
    disk = qemu_disk.make_disk(tmp_path, small_root(tmp_path))
    meta = json.loads((tmp_path / qemu_disk.DISK_META).read_text())
    (tmp_path / qemu_disk.DISK_META).write_text(json.dumps({**meta, "version": "0"}))
    assert qemu_disk.disk_of(tmp_path) is None
    (tmp_path / qemu_disk.DISK_META).write_text(json.dumps(meta))
    disk.path.unlink()
    assert qemu_disk.disk_of(tmp_path) is None


def test_a_failed_mkfs_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="cannot make the qemu disk"):
        qemu_disk.make_disk(tmp_path, tmp_path / "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
