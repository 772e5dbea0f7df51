"""Process VM driver: a VM is a set of ordinary host processes; development-only isolation, no root needed.

Why this shape:
- The VM's address is a loopback alias of its slot (127.x.y.z; Linux routes all of 127/8 to ``lo``), so
  apps that bind ``$HOST`` are reachable at ``VmInfo.ip`` without any host configuration.
- There are no cgroups to find a VM's processes after a gateway restart, so every process of the VM is
  started with marker variables (``GATEWAY_VM_ID``, ``GATEWAY_VM_DIR``, ``GATEWAY_VM_SLOT``) that its
  children inherit; ``destroy`` and ``sweep`` scan ``/proc/*/environ`` for them. Only environments we
  can read are scanned, and a PID is signalled only after its marker is re-checked on a pinned pidfd.
  A process that clears its own environment escapes; that is the isolation this driver does not give.
- It isolates nothing: VM code runs as the gateway's own user, with the host's files and network. So run
  as root it refuses to start unless ``process.allow_root`` says so (VM code would be host root).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway import subprocesses as _spawn
from gateway.config import ProcessConfig
from gateway.errors import DriverError, VmNotRunning
from gateway.orchestrator.drivers import _host
from gateway.orchestrator.drivers.base import ExecResult, VmInfo, VmProcess, VmSpec

INIT_COMMAND = ("sleep", "infinity")
MARK_ID = "GATEWAY_VM_ID"
MARK_DIR = "GATEWAY_VM_DIR"
MARK_SLOT = "GATEWAY_VM_SLOT"
ROOT_REFUSED = (
    "the process driver isolates nothing: VM code would run as root on this host, with all its files "
    'and network. Use vms.driver = "netns" (or "auto") or "qemu" as root, run the gateway as '
    "another user, or set process.allow_root = true (GATEWAY_PROCESS_ALLOW_ROOT=true) to accept that "
    "(development only)"
)


def slot_capacity(cidr: str) -> int:
    """Addresses of the CIDR minus its network and broadcast addresses."""
    return max(0, ipaddress.IPv4Network(cidr).num_addresses - 2)


def slot_address(cidr: str, slot: int) -> str:
    """Pure: slot s -> the (s+1)-th address of the CIDR (the network address is skipped)."""
    if not 0 <= slot < slot_capacity(cidr):
        raise DriverError(f"slot {slot} outside 0..{slot_capacity(cidr) - 1} for {cidr}")
    return str(ipaddress.IPv4Network(cidr).network_address + 1 + slot)


def _scan_markers() -> dict[int, dict[str, str]]:
    """Marker variables of every process whose environment we can read and that carries MARK_DIR."""
    found: dict[int, dict[str, str]] = {}
    wanted = {f"{k}=".encode(): k for k in (MARK_ID, MARK_DIR, MARK_SLOT)}
    for pid in _host.list_pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if MARK_DIR.encode() not in environ:
            continue
        marks = {}
        for entry in environ.split(b"\0"):
            for prefix, key in wanted.items():
                if entry.startswith(prefix):
                    marks[key] = entry[len(prefix) :].decode(errors="replace")
        if MARK_DIR in marks:
            found[pid] = marks
    return found


def _has_marker(pid: int, vm_dir: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARK_DIR}={vm_dir}".encode() in environ.split(b"\0")


class ProcessVmDriver:
    """VmDriver on plain processes. See the module docstring."""

    name = "process"
    isolation = "NONE (process driver: development only; VM code runs as the gateway's user on the host)"

    def __init__(self, config: ProcessConfig, work_dir: Path) -> None:
        self._config = config
        self._work_dir = Path(work_dir).resolve()
        self._capacity = slot_capacity(config.cidr)

    @property
    def capacity(self) -> int:
        return self._capacity

    def address(self, slot: int) -> str:
        return slot_address(self._config.cidr, slot)

    async def start(self) -> None:
        if os.geteuid() == 0 and not self._config.allow_root:
            raise DriverError(ROOT_REFUSED)
        self._work_dir.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        """Nothing to release: VMs outlive the gateway on purpose."""

    def _vm_env(self, vm_id: str, slot: int, ip: str, spec_env: Mapping[str, str]) -> dict[str, str]:
        vm_dir = self._work_dir / vm_id
        return {
            **_host.base_env(vm_dir / _host.HOME_DIR),
            **spec_env,
            "VM_ID": vm_id,
            "VM_IP": ip,
            "HOST": ip,
            "PORT": str(self._config.app_port),
        }

    def _markers(self, vm_id: str, slot: int) -> dict[str, str]:
        return {MARK_ID: vm_id, MARK_DIR: str(self._work_dir / vm_id), MARK_SLOT: str(slot)}

    async def create(self, spec: VmSpec) -> VmInfo:
        vm_id = _host.check_vm_id(spec.vm_id)
        if spec.restore_from:
            raise DriverError("the process driver has no snapshots to restore")
        if spec.mounts:
            # (no VmMounts: a process shares the host's mount namespace, so there is nowhere to mount)
            raise DriverError("the process driver cannot mount volumes (use netns or qemu)")
        ip = self.address(spec.slot)
        vm_dir = self._work_dir / vm_id
        made_dir = False
        try:
            self._work_dir.mkdir(parents=True, exist_ok=True)
            try:
                vm_dir.mkdir()
            except FileExistsError:
                raise DriverError(f"work folder for VM {vm_id} already exists") from None
            made_dir = True
            home = vm_dir / _host.HOME_DIR
            home.mkdir()
            (vm_dir / _host.RUN_DIR).mkdir()
            handle: dict[str, Any] = {
                "driver": self.name,
                "vm_id": vm_id,
                "slot": spec.slot,
                "ip": ip,
                "vm_dir": str(vm_dir),
                "env": dict(spec.env),
            }
            _host.write_json(vm_dir / _host.VM_FILE, handle)
            env = {**self._vm_env(vm_id, spec.slot, ip, spec.env), **self._markers(vm_id, spec.slot)}
            log_path = vm_dir / _host.RUN_DIR / _host.INIT_LOG
            command = spec.command or INIT_COMMAND
            pid, ticks = await _host.spawn_detached((), command, env=env, cwd=home, log_path=log_path)
            handle.update(init_pid=pid, init_start_ticks=ticks)
            _host.write_json(vm_dir / _host.VM_FILE, handle)
        except BaseException as exc:
            if made_dir:
                try:
                    await _host.run_cleanup(self._teardown(vm_id))
                except Exception as cleanup_exc:
                    exc.add_note(f"cleanup after failed create also failed: {cleanup_exc}")
            if isinstance(exc, OSError):
                raise DriverError(f"creating VM {vm_id} failed: {exc}") from exc
            raise
        return VmInfo(vm_id=vm_id, ip=ip, running=True, handle=handle)

    async def destroy(self, vm_id: str, handle: Mapping[str, Any]) -> None:
        await self._teardown(_host.check_vm_id(vm_id))

    async def inspect(self, vm_id: str, handle: Mapping[str, Any]) -> VmInfo:
        if not _host.is_vm_id(vm_id):
            return VmInfo(vm_id=vm_id, ip=str(handle.get("ip", "")), running=False, handle=handle)
        record = self._record(vm_id, handle)
        running = self._running(record)
        detail = "" if running else _host.init_log_tail(self._work_dir / vm_id)
        return VmInfo(vm_id=vm_id, ip=self._ip_of(record), running=running, handle=handle, detail=detail)

    async def execute(
        self,
        vm_id: str,
        handle: Mapping[str, Any],
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        timeout_s: float,
        max_output_bytes: int,
    ) -> ExecResult:
        vm_dir, full_env = self._command_env(vm_id, handle, argv, env)
        return await _host.run_captured(
            argv,
            env=full_env,
            cwd=vm_dir / _host.HOME_DIR,
            scratch_dir=vm_dir / _host.RUN_DIR,
            timeout_s=timeout_s,
            max_output_bytes=max_output_bytes,
        )

    async def spawn(
        self, vm_id: str, handle: Mapping[str, Any], argv: Sequence[str], *, env: Mapping[str, str]
    ) -> VmProcess:
        """``VmSpawn``: the command as ``execute`` runs it, its stdin and stdout streamed."""
        vm_dir, full_env = self._command_env(vm_id, handle, argv, env)
        try:
            proc = _spawn.popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full_env,
                cwd=vm_dir / _host.HOME_DIR,
                process_group=0,
            )
        except OSError as exc:
            raise DriverError(f"cannot start command in VM: {exc}") from exc
        return _spawn.PipeProcess(proc, kill=lambda: _host.kill_process_group(proc.pid))

    def _command_env(
        self, vm_id: str, handle: Mapping[str, Any], argv: Sequence[str], env: Mapping[str, str]
    ) -> tuple[Path, dict[str, str]]:
        """The VM's folder and a command's whole env; VmNotRunning when the VM is not running."""
        vm_dir = self._work_dir / _host.check_vm_id(vm_id)
        if not argv:
            raise DriverError("empty command")
        record = self._record(vm_id, handle)
        if not self._running(record):
            raise VmNotRunning(f"VM {vm_id} is not running")
        slot = _host.as_int(record.get("slot"))
        if slot is None:
            raise DriverError(f"handle of VM {vm_id} has no slot")
        spec_env = record.get("env") or {}
        full_env = {**self._vm_env(vm_id, slot, self._ip_of(record), spec_env), **env}
        full_env.update(self._markers(vm_id, slot))
        return vm_dir, full_env

    async def sweep(self, live_slots: set[int]) -> int:
        """Destroy VMs of this work folder whose slot is not live: by record, and by process markers."""
        slots_by_vm: dict[str, int | None] = {}
        for entry in _listdir(self._work_dir):
            record = _host.read_json(self._work_dir / entry / _host.VM_FILE)
            if record.get("driver") == self.name and record.get("vm_id") == entry:
                slots_by_vm[entry] = _host.as_int(record.get("slot"))
        for marks in (await asyncio.to_thread(_scan_markers)).values():
            vm_dir = Path(marks[MARK_DIR])
            if vm_dir.parent == self._work_dir and _host.is_vm_id(vm_dir.name):
                mark = marks.get(MARK_SLOT, "")
                slots_by_vm.setdefault(vm_dir.name, int(mark) if mark.isdigit() else None)
        removed = 0
        failures: list[str] = []
        for vm_id, slot in slots_by_vm.items():
            if slot is None or slot not in live_slots:
                # One stubborn orphan must not keep the others around: try all, report at the end.
                try:
                    await self._teardown(vm_id)
                except DriverError as exc:
                    failures.append(str(exc))
                else:
                    removed += 1
        if failures:
            raise DriverError(f"sweep removed {removed} orphan(s) but failed on: {'; '.join(failures)}")
        return removed

    # --- internals -----------------------------------------------------------------------------------

    def _record(self, vm_id: str, handle: Mapping[str, Any]) -> dict[str, Any]:
        """The handle completed from ``vm.json``, so a partial handle (just the slot) still finds the VM."""
        return {**_host.read_json(self._work_dir / vm_id / _host.VM_FILE), **handle}

    def _ip_of(self, handle: Mapping[str, Any]) -> str:
        if isinstance(handle.get("ip"), str):
            return str(handle["ip"])
        slot = _host.as_int(handle.get("slot"))
        return self.address(slot) if slot is not None and 0 <= slot < self._capacity else ""

    def _running(self, handle: Mapping[str, Any]) -> bool:
        pid, ticks = _host.as_int(handle.get("init_pid")), _host.as_int(handle.get("init_start_ticks"))
        return pid is not None and ticks is not None and _host.is_running(pid, ticks)

    async def _teardown(self, vm_id: str) -> None:
        """Kill every process marked with this VM's folder, then remove the folder."""
        vm_dir = str(self._work_dir / vm_id)

        async def candidates() -> list[int]:
            found = await asyncio.to_thread(_scan_markers)
            return [pid for pid, marks in found.items() if marks.get(MARK_DIR) == vm_dir]

        all_dead = await _host.kill_until_gone(candidates, lambda pid: _has_marker(pid, vm_dir))
        await _host.remove_tree(self._work_dir / vm_id)
        if not all_dead:
            raise DriverError(f"destroying VM {vm_id} left processes that would not die")


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
