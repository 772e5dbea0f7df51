"""OCI bundles for the netns driver: the ``config.json`` runc runs a VM with, and runc itself.

What a VM gets (runtime-spec 1.0 fields; the choices follow what Docker gives a container, tightened):
- namespaces: pid, mount, ipc, uts and cgroup of its own, and the user namespace (its root is the
  slot's unprivileged range of host ids) and network namespace the driver made for it, joined by path;
- the root file system the driver assembled (``rootfs.py``), ``/proc`` with Docker's masked and
  read-only paths, ``/sys`` read-only, a small ``/dev``;
- Docker's default capabilities less NET_RAW and MKNOD, ``no_new_privs``, Docker's seccomp profile
  (``seccomp.py``), an OOM score that makes the kernel pick a VM before the gateway;
- cgroup limits: memory (and memory+swap where the host accounts swap), CPU quota, pids.

Pure except for ``Runc``, which runs the runtime's commands.
"""

from __future__ import annotations

import json
import resource
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.orchestrator.drivers import _host

OCI_VERSION = "1.0.2"
CFS_PERIOD_US = 100_000
# The VM's processes go first when the host runs out of memory (the gateway has 0).
VM_OOM_SCORE_ADJ = 500
OPEN_FILES_LIMIT = 65536
DEV_SHM_SIZE = "67108864"  # 64 MiB, as Docker
# Docker's (moby oci/defaults.go) and ours: what /proc and /sys must not show or let a VM change.
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    # Ours, because /sys is the host's: other VMs' veths (with their traffic counters) and cgroups (with
    # their memory and CPU use) would be readable there.
    "/sys/class/net",
    "/sys/devices/virtual/net",
    "/sys/fs/cgroup",
    "/sys/kernel",
)
READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)
_NOSUID_NOEXEC_NODEV = ["nosuid", "noexec", "nodev"]


def process_spec(
    args: Sequence[str], env: Mapping[str, str], cwd: str, capabilities: Sequence[str]
) -> dict[str, Any]:
    """A process of the VM (its init or a command run in it): root of the VM, no privileges to gain."""
    caps = list(capabilities)
    # A user namespace cannot raise a hard limit above the one it starts with (the gateway's).
    open_files = min(OPEN_FILES_LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    return {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": list(args),
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": cwd,
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": open_files, "soft": open_files}],
        "noNewPrivileges": True,
        "oomScoreAdj": VM_OOM_SCORE_ADJ,
    }


def container_config(
    *,
    process: Mapping[str, Any],
    hostname: str,
    rootfs: Path,
    netns_path: Path,
    userns_path: Path,
    host_base: int,
    id_count: int,
    cgroups_path: str,
    memory_bytes: int,
    limit_swap: bool,
    vcpu_count: int,
    pids_max: int,
    seccomp: Mapping[str, Any],
    bind_mounts: Sequence[tuple[Path, str]] = (),
    staging: tuple[Path, str] | None = None,
    volumes: Sequence[tuple[Path, str, bool]] = (),
) -> dict[str, Any]:
    """The bundle's config.json. ``bind_mounts``: (host path, VM path) pairs, mounted read-only.
    ``staging``: (host folder, VM path) of the VM's volume staging folder, a slave of the host's (volumes
    mounted beneath it later reach the VM: ``volmount``); ``volumes``: (staged host folder, VM path,
    read-only) mounted before the VM's init runs."""
    # runc 1.1 wants the maps even when it joins the user namespace by path: the namespace's own.
    ids = [{"containerID": 0, "hostID": host_base, "size": id_count}]
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": _NOSUID_NOEXEC_NODEV},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": [*_NOSUID_NOEXEC_NODEV, "mode=1777", f"size={DEV_SHM_SIZE}"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": _NOSUID_NOEXEC_NODEV},
        # The network namespace belongs to the host's user namespace, so a VM may not mount a sysfs of its
        # own: it sees the host's, read-only, with the masked paths over it.
        {
            "destination": "/sys",
            "type": "none",
            "source": "/sys",
            "options": ["rbind", *_NOSUID_NOEXEC_NODEV, "ro"],
        },
    ]
    for source, destination in bind_mounts:
        options = ["rbind", *_NOSUID_NOEXEC_NODEV, "ro"]
        options.remove("noexec")
        mounts.append({"destination": destination, "type": "none", "source": str(source), "options": options})
    if staging is not None:
        source, destination = staging
        options = ["rbind", "rslave", *_NOSUID_NOEXEC_NODEV, "ro"]
        mounts.append({"destination": destination, "type": "none", "source": str(source), "options": options})
    for source, destination, read_only in volumes:
        options = ["rbind", "nosuid", "nodev", "ro" if read_only else "rw"]
        mounts.append({"destination": destination, "type": "none", "source": str(source), "options": options})
    memory: dict[str, int] = {"limit": memory_bytes}
    if limit_swap:
        memory["swap"] = memory_bytes  # memory + swap: the limit means what it says where swap is on
    return {
        "ociVersion": OCI_VERSION,
        "process": dict(process),
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "uidMappings": ids,
            "gidMappings": ids,
            "namespaces": [
                {"type": "user", "path": str(userns_path)},
                {"type": "pid"},
                {"type": "mount"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "cgroup"},
                {"type": "network", "path": str(netns_path)},
            ],
            "cgroupsPath": cgroups_path,
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": memory,
                "cpu": {"quota": vcpu_count * CFS_PERIOD_US, "period": CFS_PERIOD_US},
                "pids": {"limit": pids_max},
            },
            "seccomp": dict(seccomp),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


class Runc:
    """The runtime's commands, with one state folder (``--root``) per driver."""

    def __init__(self, binary: str, state_root: Path) -> None:
        self.binary = binary
        self.state_root = state_root

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.state_root), *args]

    def exec_argv(self, container_id: str, process_file: Path, pid_file: Path) -> list[str]:
        # Detached: the command keeps the caller's stdio (files) and descriptor 3, and runc returns once
        # it runs.
        return self.argv(
            "exec", "--detach", "--preserve-fds", "1", "--process", str(process_file),
            "--pid-file", str(pid_file), container_id,
        )  # fmt: skip

    async def delete(self, container_id: str) -> None:
        """Kill every process of the container and remove it (and its cgroups); gone already is fine."""
        await _host.run_host(self.argv("delete", "--force", container_id), check=False)

    async def containers(self) -> list[str]:
        """Ids of the containers this state folder knows (running or not)."""
        if not self.state_root.is_dir():
            return []
        result = await _host.run_host(self.argv("list", "--format", "json"), check=False)
        try:
            listed = json.loads(result.stdout or "null") or []
        except ValueError:
            return []
        return [str(entry.get("id")) for entry in listed if isinstance(entry, dict) and entry.get("id")]
