"""The VmDriver protocol: what the orchestrator needs from anything that runs VMs.

A driver owns host-side resources only (namespaces, veths, cgroups, processes, work folders). It keeps
no state of its own between calls: everything needed to find a VM again is in the ``handle`` it returns,
which the orchestrator stores in Redis, so a restarted gateway can inspect, execute in and destroy VMs
created by an earlier process.

Slots are allocated by the orchestrator (in Redis, shared by every gateway process); a driver derives
the VM's IP and host-side names from its slot, so two VMs never share either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Mount:
    """A host folder shown inside a VM (a volume): ``host_dir`` appears at ``mount_path``.

    ``mount_path`` must pass ``mount_paths.check_mount_path`` (absolute, normalised, not a system folder).
    Files in ``host_dir`` are stored as the VM's root sees them (uid/gid 0 is the VM's root): each driver
    shifts the ids per VM (``mount_paths`` says how). ``read_only`` is enforced by the host's kernel, in a
    way the VM cannot undo."""

    host_dir: Path
    mount_path: str
    read_only: bool = False


@dataclass(frozen=True)
class VmSpec:
    vm_id: str
    slot: int
    vcpu_count: int
    memory_mb: int
    env: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    # The VM's init program (an image's, e.g. a browser); empty: the driver's idle init. The VM runs
    # while it does.
    command: tuple[str, ...] = ()
    # A snapshot folder to resume instead of booting (drivers that support snapshots; others refuse).
    restore_from: str = ""
    # The image the VM's root file system comes from (``image_variant``); "" means the default image.
    # Drivers without images ignore it.
    image: str = ""
    # Host folders mounted into the VM before its init runs (``VmMounts`` drivers; others refuse any).
    mounts: tuple[Mount, ...] = ()


@dataclass(frozen=True)
class VmInfo:
    vm_id: str
    ip: str
    running: bool
    # Opaque, driver-defined, JSON-serialisable; stored by the orchestrator and handed back on every call.
    handle: Mapping[str, Any]
    # For a VM that is not running: what its init last said, when the driver knows ('' otherwise).
    detail: str = ""


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    # None when the command was killed for its timeout.
    exit_code: int | None
    timed_out: bool
    # True when stdout or stderr was cut at max_output_bytes.
    truncated: bool
    duration_s: float
    # CPU seconds (user + system) of the command itself and the children it waited for, where the
    # driver can measure them; None otherwise (never the VM's whole use, which other commands share).
    cpu_s: float | None = None

    def reported(self) -> dict[str, Any]:
        """As the API reports a command (``/execute`` and an async execution's record): text, times in
        seconds to the millisecond."""
        return {
            "stdout": self.stdout.decode("utf-8", "replace"),
            "stderr": self.stderr.decode("utf-8", "replace"),
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "truncated": self.truncated,
            "execution_time": round(self.duration_s, 3),
            "cpu_time": round(self.cpu_s, 3) if self.cpu_s is not None else None,
        }


@runtime_checkable
class VmDriver(Protocol):
    """Runs VMs.

    Contract:
    - ``start`` prepares the host once (idempotent; e.g. the blackhole route for the VM CIDR); it runs
      before any ``create``.
    - ``create`` returns when the VM is running and reachable at ``VmInfo.ip``. On any failure or
      cancellation it removes everything it made before re-raising: no half-made VM is left.
      It raises ``gateway.errors.DriverError`` for host failures.
    - ``destroy`` is idempotent: destroying a VM that is gone, half-made or never existed succeeds.
      Afterwards no process of the VM runs and no host resource of it remains.
    - ``inspect`` never raises for a missing VM: it reports ``running=False``.
    - ``execute`` runs argv inside the VM with the VM's network, limits and working folder; processes
      the command leaves in the background keep running (and keep the VM's limits) after it returns.
      On timeout it kills the command's process group and reports ``timed_out``. ``env`` overrides
      the VM's create-time env for this command only; ``max_output_bytes`` caps stdout and stderr
      each. On a VM that is not running it raises ``gateway.errors.VmNotRunning``.
    - ``sweep`` removes host resources of this driver whose slot is not in ``live_slots`` (orphans of a
      crash); it never touches resources that belong to other drivers or other name prefixes. It
      tries every orphan and may raise ``DriverError`` at the end, after removing what it could.
    - All methods are safe to call concurrently for different VMs.
    """

    name: str

    @property
    def isolation(self) -> str:
        """One sentence: what stands between code in a VM and the host (``gateway doctor``, the start-up
        line)."""
        ...

    @property
    def capacity(self) -> int:
        """Number of slots (0 .. capacity-1) this driver can address."""
        ...

    def address(self, slot: int) -> str:
        """The VM IP for a slot (pure)."""
        ...

    async def start(self) -> None: ...

    async def create(self, spec: VmSpec) -> VmInfo: ...

    async def destroy(self, vm_id: str, handle: Mapping[str, Any]) -> None: ...

    async def inspect(self, vm_id: str, handle: Mapping[str, Any]) -> VmInfo: ...

    async def execute(
        self,
        vm_id: str,
        handle: Mapping[str, Any],
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        timeout_s: float,
        max_output_bytes: int,
    ) -> ExecResult: ...

    async def sweep(self, live_slots: set[int]) -> int: ...

    async def close(self) -> None: ...


class VmProcess(Protocol):
    """A program running in a VM with its stdin and stdout streamed (files, terminals). stderr is kept
    (its last 64 KiB) for the error message of a program that failed."""

    async def read(self) -> bytes:
        """The next piece of its stdout; b"" once it closed it."""
        ...

    async def write(self, data: bytes) -> None:
        """Write to its stdin, waiting while the pipe is full (back-pressure); OSError once it is gone."""
        ...

    def close_stdin(self) -> None: ...

    async def wait(self) -> int:
        """Its exit code (128 + N for a signal N)."""
        ...

    def stderr_tail(self) -> bytes: ...

    async def aclose(self) -> None:
        """Kill it if it still runs, reap it, free what it held. Idempotent."""
        ...


@runtime_checkable
class VmSpawn(Protocol):
    """An optional capability of a VmDriver: start a program in the VM with streamed stdio.

    The program runs like ``execute``'s commands (the VM's user, env, working folder, limits) but is
    not waited for: the caller reads and writes it, and must ``aclose`` it. Raises ``VmNotRunning`` on
    a VM that is not running, ``DriverError`` when it cannot start."""

    async def spawn(
        self, vm_id: str, handle: Mapping[str, Any], argv: Sequence[str], *, env: Mapping[str, str]
    ) -> VmProcess: ...


@dataclass(frozen=True)
class ResourceUsage:
    """What a VM has used so far, from its cgroup; None for what this host cannot tell."""

    cpu_seconds: float | None
    peak_memory_bytes: int | None


@runtime_checkable
class VmUsage(Protocol):
    """An optional capability of a VmDriver: the VM's resource usage (a session's usage). Called while
    the VM exists, last just before it is destroyed; never raises for a VM that is gone (all None)."""

    async def usage(self, vm_id: str, handle: Mapping[str, Any]) -> ResourceUsage: ...


@runtime_checkable
class VmSuspend(Protocol):
    """An optional capability of a VmDriver: pause a VM with its memory, and bring it back as it was.

    Contract:
    - ``suspend`` stops the VM from running (no CPU, no network answers) and keeps its state, in memory
      or in ``state_dir`` (a folder it may create); it returns the handle to keep. The VM keeps its slot.
    - ``resume`` brings that VM back (same slot, same address, same memory) and returns it running; its
      state in ``state_dir`` is no longer needed afterwards. ``spec`` describes the VM, for drivers
      that start it anew from its saved state.
    - ``destroy`` works on a suspended VM too.
    """

    async def suspend(self, vm_id: str, handle: Mapping[str, Any], state_dir: Path) -> Mapping[str, Any]: ...

    async def resume(self, spec: VmSpec, handle: Mapping[str, Any], state_dir: Path) -> VmInfo: ...


def cannot_suspend(driver: str) -> str:
    """What a driver without ``VmSuspend`` answers when asked to suspend (the API, the orchestrator)."""
    return f"the {driver!r} VM driver cannot suspend VMs (netns and qemu can)"


@runtime_checkable
class VmSnapshots(Protocol):
    """An optional capability of a VmDriver: whole-VM snapshots, and VMs resumed from them.

    Contract:
    - ``snapshot`` writes the running VM's state into ``dest`` (a folder it creates) and returns the
      metadata a restore needs (at least ``vcpu_count`` and ``memory_mb``, and ``size_bytes``). The VM is
      left paused, for the caller to destroy, or with ``keep_running`` goes on where it stopped. On
      failure it raises ``DriverError`` and leaves no ``dest``.
    - ``create`` with ``VmSpec.restore_from`` set to such a folder resumes that state instead of booting,
      with the spec's slot (and so its address); it refuses a snapshot whose machine shape differs.
    - Drivers without this capability refuse ``restore_from`` with ``DriverError``.
    """

    async def snapshot(
        self, vm_id: str, handle: Mapping[str, Any], dest: Path, *, keep_running: bool = False
    ) -> dict[str, Any]: ...


@runtime_checkable
class VmMounts(Protocol):
    """An optional capability of a VmDriver: host folders (volumes) mounted into VMs, at create
    (``VmSpec.mounts``) and into a running VM.

    Contract:
    - ``mount`` makes ``host_dir`` appear at ``mount_path`` in the running VM, creating the missing
      folders of the path. It refuses (ValueError) a path ``mount_paths.check_mount_path`` refuses, and
      (DriverError) a path with a symbolic link among its components as the VM sees it (the VM may have
      planted one), a second mount at the same path, or a ``host_dir`` that is not a folder. On failure
      nothing of the mount is left.
    - ``read_only``: writes fail with EROFS inside the VM, and nothing the VM's root can do (remount,
      unmount and write beneath, mount the folder again elsewhere) gives it a writable view.
    - ``unmount`` removes the mount at ``mount_path``; idempotent (a path with no mount of ours is fine,
      as is a VM that unmounted it itself). The VM may keep copies it made itself (another mount
      namespace of its own) until it dies; the host folder can then still be busy, so whoever owns it
      detaches it lazily.
    - ``destroy`` removes every mount of the VM. Calls for one VM are not concurrent; for different VMs
      they may be. Raises ``VmNotRunning`` on a VM that is not running.
    """

    async def mount(
        self, vm_id: str, handle: Mapping[str, Any], host_dir: Path, mount_path: str, *, read_only: bool
    ) -> None: ...

    async def unmount(self, vm_id: str, handle: Mapping[str, Any], mount_path: str) -> None: ...
