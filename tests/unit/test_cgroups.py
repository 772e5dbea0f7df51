"""CgroupTree's layout and limits on both cgroup versions.

This machine mounts cgroup v1, so the netns integration tests exercise v1 for real; v2 is checked here
against a directory laid out like a cgroup2 mount (the kernel's pseudo-files are plain files), which is
what the code reads and writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import DriverError
from gateway.orchestrator.drivers._cgroups import CgroupTree

VM = "vmid-0123456789abcdef0123"


def make_v2_root(tmp_path: Path) -> Path:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    return tmp_path


def test_v2_delegates_controllers_and_writes_limits(tmp_path: Path) -> None:
    tree = CgroupTree(make_v2_root(tmp_path), "gw")
    assert tree.unified
    tree.prepare()
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (tmp_path / "gw" / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    (vm_dir,) = tree.create(VM, memory_mb=256, vcpu_count=2)
    assert vm_dir == tmp_path / "gw" / VM
    assert (vm_dir / "memory.max").read_text() == str(256 * 1024 * 1024)
    assert (vm_dir / "cpu.max").read_text() == "200000 100000"
    assert tree.vm_ids() == {VM}


def test_v1_uses_memory_and_cpu_hierarchies(tmp_path: Path) -> None:
    for controller in ("memory", "cpu"):
        (tmp_path / controller).mkdir()
    tree = CgroupTree(tmp_path, "gw")
    assert not tree.unified
    tree.prepare()
    memory_dir, cpu_dir = tree.create(VM, memory_mb=128, vcpu_count=1)
    assert memory_dir == tmp_path / "memory" / "gw" / VM
    assert (memory_dir / "memory.limit_in_bytes").read_text() == str(128 * 1024 * 1024)
    # memsw exists only where swap accounting is on: not written when the kernel does not offer it.
    assert not (memory_dir / "memory.memsw.limit_in_bytes").exists()
    assert (cpu_dir / "cpu.cfs_quota_us").read_text() == "100000"
    assert (cpu_dir / "cpu.cfs_period_us").read_text() == "100000"


def test_v1_without_a_controller_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    with pytest.raises(DriverError, match="'cpu' is not mounted"):
        CgroupTree(tmp_path, "gw").prepare()


def test_create_never_takes_over_an_existing_cgroup(tmp_path: Path) -> None:
    tree = CgroupTree(make_v2_root(tmp_path), "gw")
    tree.prepare()
    (tmp_path / "gw" / VM).mkdir()  # taken: create must fail without touching the existing one
    with pytest.raises(DriverError):
        tree.create(VM, memory_mb=128, vcpu_count=1)
    assert (tmp_path / "gw" / VM).is_dir()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "gw\n"])
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(DriverError):
        CgroupTree(tmp_path, name)
