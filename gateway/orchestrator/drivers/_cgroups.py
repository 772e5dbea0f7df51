"""Per-VM cgroups for the netns driver: v1 (memory + cpu hierarchies) or v2 (one unified tree).

The layout is ``<root>/<controller>/<cgroup_name>/<vm_id>`` on v1 and ``<root>/<cgroup_name>/<vm_id>`` on
v2, so every VM of one gateway sits under one parent and ``sweep`` can list them. Writes are tiny
pseudo-file writes that never block for long, so they run inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from gateway.errors import DriverError

CFS_PERIOD_US = 100_000
V1_CONTROLLERS = ("memory", "cpu")
V2_CONTROLLERS = "+memory +cpu +pids"
MIB_BYTES = 1024 * 1024
# rmdir can see EBUSY for a moment after the last process died.
RMDIR_RETRY_S = 2.0
RMDIR_POLL_INTERVAL_S = 0.01


class CgroupTree:
    """The parent cgroup(s) of one driver and the VM cgroups below them."""

    DEFAULT_ROOT = Path("/sys/fs/cgroup")

    def __init__(self, root: Path, name: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
            raise DriverError(f"invalid cgroup name {name!r}")
        self.root = root
        self.name = name

    @property
    def unified(self) -> bool:
        """True when the root itself is cgroup2 (not the hybrid ``unified`` side mount)."""
        return (self.root / "cgroup.controllers").exists()

    def parents(self) -> list[Path]:
        if self.unified:
            return [self.root / self.name]
        return [self.root / controller / self.name for controller in V1_CONTROLLERS]

    def vm_dirs(self, vm_id: str) -> list[Path]:
        return [parent / vm_id for parent in self.parents()]

    def prepare(self) -> None:
        """Create the parents (idempotent); on v2 delegate memory and cpu down to the VM cgroups."""
        try:
            if self.unified:
                _write(self.root / "cgroup.subtree_control", V2_CONTROLLERS)
                (self.root / self.name).mkdir(exist_ok=True)
                _write(self.root / self.name / "cgroup.subtree_control", V2_CONTROLLERS)
                return
            for controller in V1_CONTROLLERS:
                if not (self.root / controller).is_dir():
                    raise DriverError(f"cgroup v1 controller {controller!r} is not mounted under {self.root}")
                (self.root / controller / self.name).mkdir(exist_ok=True)
        except OSError as exc:
            raise DriverError(f"cannot prepare cgroup {self.name!r}: {exc}") from exc

    def create(self, vm_id: str, *, memory_mb: int, vcpu_count: int) -> list[Path]:
        """Make the VM's cgroup(s) with limits; returns the directories made (removed again on failure)."""
        made: list[Path] = []
        memory_bytes = memory_mb * MIB_BYTES
        quota_us = vcpu_count * CFS_PERIOD_US
        try:
            for directory in self.vm_dirs(vm_id):
                directory.mkdir()
                made.append(directory)
            if self.unified:
                directory = made[0]
                _write(directory / "memory.max", str(memory_bytes))
                _write(directory / "memory.swap.max", "0", optional=True)
                _write(directory / "cpu.max", f"{quota_us} {CFS_PERIOD_US}")
            else:
                memory_dir, cpu_dir = made
                _write(memory_dir / "memory.limit_in_bytes", str(memory_bytes))
                # Memory + swap at the same cap: the limit means what it says even where swap is on.
                _write(memory_dir / "memory.memsw.limit_in_bytes", str(memory_bytes), optional=True)
                _write(cpu_dir / "cpu.cfs_period_us", str(CFS_PERIOD_US))
                _write(cpu_dir / "cpu.cfs_quota_us", str(quota_us))
        except OSError as exc:
            _rmdir_all(made)
            raise DriverError(f"cannot create cgroup for VM {vm_id}: {exc}") from exc
        except BaseException:
            _rmdir_all(made)
            raise
        return made

    def limits_swap(self) -> bool:
        """Whether memory + swap can be limited here (v1 needs swap accounting in the kernel)."""
        if self.unified:
            return True
        return (self.root / "memory" / self.name / "memory.memsw.limit_in_bytes").exists()

    def vm_ids(self) -> set[str]:
        """Names of the VM cgroups currently under any parent."""
        names: set[str] = set()
        for parent in self.parents():
            with contextlib.suppress(FileNotFoundError):
                names.update(entry.name for entry in os.scandir(parent) if entry.is_dir())
        return names

    def pids(self, dirs: Iterable[Path]) -> set[int]:
        pids: set[int] = set()
        for directory in dirs:
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in (directory / "cgroup.procs").read_text().split())
        return pids

    def contains(self, pid: int, vm_id: str) -> bool:
        """Whether /proc/<pid>/cgroup places the process in this VM's cgroup (any hierarchy)."""
        suffix = f"/{self.name}/{vm_id}"
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return False
        return any(line.split(":", 2)[-1].endswith(suffix) for line in lines)

    def thaw(self, vm_id: str) -> None:
        """Unfreeze the VM's cgroup if it is frozen (suspended): frozen processes cannot die."""
        if self.unified:
            target, value = self.root / self.name / vm_id / "cgroup.freeze", "0"
        else:
            target, value = self.root / "freezer" / self.name / vm_id / "freezer.state", "THAWED"
        with contextlib.suppress(OSError):
            target.write_text(value)

    def usage(self, vm_id: str) -> tuple[float | None, int | None]:
        """CPU seconds and peak memory bytes the VM's cgroup has used (None for what this host's
        cgroups cannot tell). Read before the cgroup is removed."""
        if self.unified:
            directory = self.root / self.name / vm_id
            stat = _read_text(directory / "cpu.stat")
            usec = next(
                (int(line.split()[1]) for line in stat.splitlines() if line.startswith("usage_usec ")), None
            )
            cpu_s = usec / 1e6 if usec is not None else None
            peak = _read_int(directory / "memory.peak")
        else:
            # v1: cpuacct is its own hierarchy (runc makes the VM's cgroup there too); where it is not
            # (qemu's cgroups), the CPU time of the processes alive in it now.
            ns = _read_int(self.root / "cpuacct" / self.name / vm_id / "cpuacct.usage")
            cpu_s = ns / 1e9 if ns is not None else _proc_cpu_s(self.pids(self.vm_dirs(vm_id)))
            peak = _read_int(self.root / "memory" / self.name / vm_id / "memory.max_usage_in_bytes")
        return cpu_s, peak

    async def remove(self, dirs: Iterable[Path]) -> list[Path]:
        """rmdir each existing directory, retrying briefly while the kernel lets go; returns leftovers."""
        left: list[Path] = []
        for directory in dirs:
            deadline = time.monotonic() + RMDIR_RETRY_S
            while not _rmdir_all([directory]):
                if time.monotonic() >= deadline:
                    left.append(directory)
                    break
                await asyncio.sleep(RMDIR_POLL_INTERVAL_S)
        return left


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _read_int(path: Path) -> int | None:
    text = _read_text(path).strip()
    return int(text) if text.isdigit() else None


def _proc_cpu_s(pids: Iterable[int]) -> float | None:
    """User + system time of processes (and their reaped children), from /proc/<pid>/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    found = False
    for pid in pids:
        stat = _read_text(Path(f"/proc/{pid}/stat"))
        if not stat:
            continue
        # The fields after the command name (which may hold spaces), from field 3 on: utime is field 14.
        after = stat.rsplit(")", 1)[-1].split()
        total += sum(int(x) for x in after[11:15])
        found = True
    return total / ticks if found else None


def _rmdir_all(dirs: Iterable[Path]) -> bool:
    """rmdir what exists; True when none of the directories is left."""
    ok = True
    for directory in dirs:
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            ok = False
    return ok


def _write(path: Path, value: str, *, optional: bool = False) -> None:
    if optional and not path.exists():
        return
    path.write_text(value)
