"""Network-namespace VM driver: a VM is an OCI container (runc) in a namespace + veth /30 of its own.

Why this shape:
- A VM is a tenant boundary, so its processes run under runc with a bundle written here (``oci.py``):
  a user namespace mapping its root to the slot's unprivileged id range, PID/mount/IPC/UTS/cgroup
  namespaces, Docker's seccomp profile and capabilities less NET_RAW and MKNOD, no_new_privs, cgroup
  limits on memory, CPU and pids, and a root file system of its own: the image read-only (idmapped to
  the slot's ids) under a writable ext4 layer whose size is the VM's disk limit (``rootfs.py``).
- The VM's network is real (its own stack, so two VMs can both listen on 0.0.0.0:3000) and reachable
  from the host at its slot's IP; a blackhole route for the whole CIDR means traffic for a VM whose
  namespace is gone dies on this machine instead of following the default route out.
- Every VM process is in the VM's cgroup from its first instruction (runc puts it there), so limits and
  ``destroy`` cover all of it.
- The VM's network namespace belongs to the host's user namespace: root in the VM has no power over its
  own interfaces, addresses, routes or firewall.
- No state lives here: names derive from the slot, and the handle (also mirrored to ``vm.json`` in the
  VM's work folder) lets a restarted gateway find, use and remove the VM.
- We never touch ip_forward, NAT or iptables: a VM reaches the host and nothing else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway import subprocesses as _spawn
from gateway.config import NetnsConfig
from gateway.errors import DriverError, VmNotRunning
from gateway.guest import egress_setup
from gateway.orchestrator.drivers import _host, hostfw, idmap, mount_paths, oci, rootfs, seccomp, volmount
from gateway.orchestrator.drivers._cgroups import CgroupTree
from gateway.orchestrator.drivers.base import (
    ExecResult,
    Mount,
    ResourceUsage,
    VmInfo,
    VmProcess,
    VmSnapshots,
    VmSpec,
)
from gateway.orchestrator.drivers.owner_lock import OwnerLock, claim_host_names

NETNS_RUN_DIR = Path("/var/run/netns")
# How often a starting command's PID file is looked for.
PID_POLL_S = 0.005
SYS_CLASS_NET = Path("/sys/class/net")
# Linux interface names are at most IFNAMSIZ - 1 characters.
IFNAME_MAX_CHARS = 15
SLOT_BLOCK_ADDRESSES = 4
SLOT_PREFIXLEN = 30
VM_DEVICE = "eth0"
INIT_COMMAND = ("sleep", "infinity")
# PID 1 of every VM: it reaps the orphans of background commands (``sleep`` would leave them zombies,
# each holding a pid of pids_max) and forwards signals to the init command.
REAPER = ("/usr/bin/tini", "-s", "--")
VM_HOME = "/root"
IDS_PER_VM = 65536
MAX_HOST_ID = 2**32 - 2
RUNC_STATE_ROOT = Path("/run/gateway-runc")
# Each VM's mounts (rootfs.py), and the guest programs it may run: where the VM's root can reach them.
MOUNT_ROOT = Path("/run/gateway-vms")
SEARCHABLE_DIR_MODE = 0o711
BUNDLE_CONFIG = "config.json"
INIT_PID_FILE = "init.pid"
# Where a VM's Python finds the gateway's guest programs (``python3 -m gateway.guest.browser``): a
# read-only copy of this package's ``guest`` folder on the image's own module path.
GUEST_PACKAGE = Path(__file__).resolve().parents[2] / "guest"
GUEST_COPY = "guest"
GUEST_PACKAGE_IN_VM = "/usr/lib/python3/dist-packages/gateway/guest"
GUEST_PYTHON = "/usr/bin/python3"
# Set in the VM's network namespace before it starts: ping works with ICMP datagram sockets (it has no
# raw ones); no IPv6 (link-local addresses would reach the host's [::] listeners past the firewall).
_NAMESPACE_SYSCTLS = (("net/ipv4/ping_group_range", "0 2147483647"), *hostfw.NAMESPACE_IPV6_OFF)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Joins each cgroup named on the command line, then execs the rest; the PID never changes.
_JOIN_SCRIPT = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n - 1)); done; exec "$@"'
)


class ImageSource(Protocol):
    """Where the root file systems of images are (``gateway.images.store.ImageStore``)."""

    def rootfs(self, name: str) -> Path:
        """The built image's root folder; DriverError when it is unknown or not built."""
        ...


@dataclass(frozen=True)
class NetnsSlot:
    """Everything a slot determines: the VM's /30 and the host-side names."""

    slot: int
    namespace: str
    veth: str
    host_ip: str
    vm_ip: str


def slot_capacity(cidr: str) -> int:
    """Number of /30 blocks in the CIDR."""
    return ipaddress.IPv4Network(cidr).num_addresses // SLOT_BLOCK_ADDRESSES


def plan_slot(cidr: str, name_prefix: str, slot: int) -> NetnsSlot:
    """Pure: slot s -> block base + 4*s, host side .1, VM side .2; names ``<prefix>-<s>``, ``<prefix>h<s>``.

    The host-side name is ``<prefix>h<s>`` (not ``<prefix>-h<s>``) to stay within IFNAMSIZ.
    """
    network = ipaddress.IPv4Network(cidr)
    if not 0 <= slot < slot_capacity(cidr):
        raise DriverError(f"slot {slot} outside 0..{slot_capacity(cidr) - 1} for {cidr}")
    base = network.network_address + SLOT_BLOCK_ADDRESSES * slot
    return NetnsSlot(
        slot=slot,
        namespace=f"{name_prefix}-{slot}",
        veth=f"{name_prefix}h{slot}",
        host_ip=str(base + 1),
        vm_ip=str(base + 2),
    )


@dataclass
class _Parts:
    """The host resources of one VM that a teardown may remove (None/empty: not ours or unknown)."""

    vm_id: str
    namespace: str | None = None
    veth: str | None = None
    cgroups: list[Path] = field(default_factory=list)
    vm_dir: Path | None = None
    # The VM's mounts (container VMs only).
    mount_dir: Path | None = None
    init_pid: int | None = None
    init_ticks: int | None = None
    # Sweep removes a non-live slot's namespace/veth whoever labelled it; destroy checks the label.
    check_owner: bool = True


class NetnsVmDriver:
    """VmDriver on network namespaces and cgroups (root only). See the module docstring."""

    name = "netns"
    isolation = (
        "runc containers (user namespace per slot, seccomp, no_new_privs, reduced capabilities, "
        "read-only image, pids/memory/CPU/disk limits)"
    )
    # The Python that runs gateway guest programs (an image's "{python}") inside this driver's VMs.
    guest_python = GUEST_PYTHON
    # False in subclasses that run something else than containers in the namespaces (qemu).
    runs_containers = True

    def __init__(
        self,
        config: NetnsConfig,
        work_dir: Path,
        *,
        cgroup_root: Path | None = None,
        images: ImageSource | None = None,
        runc_state_root: Path | None = None,
    ) -> None:
        self._config = config
        self._images = images
        self._work_dir = Path(work_dir)
        self._network = ipaddress.IPv4Network(config.cidr)
        self._capacity = slot_capacity(config.cidr)
        if not re.fullmatch(r"[a-z][a-z0-9]*", config.name_prefix):
            raise DriverError(f"netns.name_prefix {config.name_prefix!r}: use lowercase letters and digits")
        if self._capacity and len(f"{config.name_prefix}h{self._capacity - 1}") > IFNAME_MAX_CHARS:
            raise DriverError(f"netns.name_prefix {config.name_prefix!r} too long for interface names")
        self._ns_re = re.compile(rf"{re.escape(config.name_prefix)}-([0-9]+)")
        self._veth_re = re.compile(rf"{re.escape(config.name_prefix)}h([0-9]+)")
        self._cgroups = CgroupTree(cgroup_root or CgroupTree.DEFAULT_ROOT, config.cgroup_name)
        # Set where VMs have egress: their TCP and DNS are redirected to the egress plane (hostfw.py).
        self.egress: hostfw.EgressRedirect | None = None
        # With egress: the deployment's egress CA (PEM), which every VM then trusts (``egress_setup``).
        self.egress_ca: bytes | None = None
        self._ip = shutil.which("ip") or "/usr/sbin/ip"
        self._mount_root = MOUNT_ROOT / config.name_prefix
        runtime = getattr(config, "runtime", "runc")
        self._runc = oci.Runc(
            shutil.which(runtime) or runtime, runc_state_root or RUNC_STATE_ROOT / config.name_prefix
        )
        self._owner: OwnerLock | None = None

    @property
    def capacity(self) -> int:
        return self._capacity

    def address(self, slot: int) -> str:
        return self.plan(slot).vm_ip

    def plan(self, slot: int) -> NetnsSlot:
        return plan_slot(self._config.cidr, self._config.name_prefix, slot)

    async def start(self) -> None:
        """Claim this driver's host names, blackhole the CIDR (connected /30s stay more specific) and
        prepare the parent cgroups."""
        if os.geteuid() != 0:
            raise DriverError("the netns driver needs root")
        # First: another live gateway with these names would lose its VMs to our sweep (owner_lock.py).
        self.claim_host_names()
        try:
            if self.runs_containers:
                self._check_container_host()
                self._prepare_mount_root()
            await _host.run_host([self._ip, "route", "replace", "blackhole", str(self._network)])
            # Before any VM: a VM reaches nothing on the host (hostfw.py); fails closed.
            await hostfw.install(self._config.name_prefix, egress=self.egress)
            self._cgroups.prepare()
            self._work_dir.mkdir(parents=True, exist_ok=True)
        except BaseException:
            self.release_host_names()
            raise

    def claim_host_names(self) -> None:
        """Hold this driver's name prefix, cgroup name and CIDR until ``close`` (idempotent)."""
        if self._owner is None or not self._owner.held:
            self._owner = claim_host_names(
                section=self.name,  # the settings' section: netns, or qemu for that subclass
                name_prefix=self._config.name_prefix,
                cgroup_name=self._config.cgroup_name,
                cidr=self._config.cidr,
                data_dir=self._work_dir.parent,
                driver=self.name,
            )

    def release_host_names(self) -> None:
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    def _check_container_host(self) -> None:
        """What containers need of this host, checked once so a create fails for no host-wide reason."""
        if shutil.which(self._runc.binary) is None:
            raise DriverError(f"OCI runtime {self._runc.binary!r} not found: apt-get install runc")
        if self._images is None:
            raise DriverError("the netns driver needs an image store (gateway.images)")
        top = self._config.id_base + self._capacity * IDS_PER_VM
        if self._config.id_base < IDS_PER_VM or top > MAX_HOST_ID:
            raise DriverError(f"netns.id_base: the slots' id ranges must lie in 65536..{MAX_HOST_ID}")
        for tool in ("mkfs.ext4", "mount", "unshare", "nsenter"):
            if shutil.which(tool) is None:
                raise DriverError(f"{tool} not found (e2fsprogs / util-linux)")

    async def container_checks(self) -> list[tuple[str, bool]]:
        """What ``gateway doctor`` reports for containers: (line, whether VMs can run with it)."""
        runtime = shutil.which(self._runc.binary)
        version = await _host.run_host([runtime, "--version"], check=False) if runtime else None
        said = version.stdout.splitlines()[0] if version else "missing (apt-get install runc)"
        checks = [
            (f"OCI runtime: {said}", version is not None),
            (f"cgroups: {'v2 (unified)' if self._cgroups.unified else 'v1 (hybrid)'}", True),
        ]
        for tool, package in (("nft", "nftables"), ("mkfs.ext4", "e2fsprogs"), ("mmdebstrap", "mmdebstrap")):
            found = shutil.which(tool)
            checks.append((f"{tool}: {found or f'missing (apt-get install {package})'}", found is not None))
        try:
            image = self._images.rootfs("default") if self._images else None
            checks.append((f"default image: {image}", image is not None))
        except DriverError as exc:
            # Not fatal: `gateway serve` builds it at start.
            checks.append((f"default image: {exc}", True))
        return checks

    def _prepare_mount_root(self) -> None:
        """The VMs' mount folders' parent, and a copy of the guest programs a VM can read (the package
        itself may sit in a private folder, e.g. a virtualenv under /root)."""
        for folder in (MOUNT_ROOT, self._mount_root):
            folder.mkdir(mode=SEARCHABLE_DIR_MODE, exist_ok=True)
            folder.chmod(SEARCHABLE_DIR_MODE)
        guest = self._mount_root / GUEST_COPY
        fresh = guest.with_name(f".{GUEST_COPY}.new")
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.copytree(GUEST_PACKAGE, fresh, ignore=shutil.ignore_patterns("__pycache__"))
        for path in (fresh, *fresh.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(guest, ignore_errors=True)
        fresh.rename(guest)

    async def close(self) -> None:
        """Release the host names; VMs and the blackhole route outlive the gateway on purpose."""
        self.release_host_names()

    async def create(self, spec: VmSpec) -> VmInfo:
        vm_id = _host.check_vm_id(spec.vm_id)
        plan = self.plan(spec.slot)
        if spec.memory_mb < 1 or spec.vcpu_count < 1:
            raise DriverError("memory_mb and vcpu_count must be positive")
        if spec.restore_from and not isinstance(self, VmSnapshots):
            raise DriverError(f"the {self.name} driver has no snapshots to restore")
        check_mounts(spec.mounts)
        made = _Parts(vm_id)
        try:
            handle = await self._build(spec, plan, made)
        except BaseException as exc:
            try:
                await _host.run_cleanup(self._teardown(made))
            except Exception as cleanup_exc:
                exc.add_note(f"cleanup after failed create also failed: {cleanup_exc}")
            if isinstance(exc, OSError):
                raise DriverError(f"creating VM {vm_id} failed: {exc}") from exc
            raise
        return VmInfo(vm_id=vm_id, ip=plan.vm_ip, running=True, handle=handle)

    async def _build(self, spec: VmSpec, plan: NetnsSlot, made: _Parts) -> dict[str, Any]:
        """Make the VM step by step, recording in ``made`` each thing that exists because of us."""
        vm_id = spec.vm_id
        if (NETNS_RUN_DIR / plan.namespace).exists() or (SYS_CLASS_NET / plan.veth).exists():
            raise DriverError(f"slot {plan.slot} is in use on this host ({plan.namespace} / {plan.veth})")
        vm_dir = self._work_dir / vm_id
        self._work_dir.mkdir(parents=True, exist_ok=True)
        try:
            vm_dir.mkdir()
        except FileExistsError:
            raise DriverError(f"work folder for VM {vm_id} already exists") from None
        made.vm_dir = vm_dir
        (vm_dir / _host.RUN_DIR).mkdir()
        handle: dict[str, Any] = {
            "driver": self.name,
            "vm_id": vm_id,
            "slot": plan.slot,
            "ip": plan.vm_ip,
            "host_ip": plan.host_ip,
            "namespace": plan.namespace,
            "veth": plan.veth,
            "cgroups": [str(d) for d in self._cgroups.vm_dirs(vm_id)],
            "vm_dir": str(vm_dir),
            "env": dict(spec.env),
        }
        # Written before any host resource exists, so sweep can always map a cgroup back to its slot.
        _host.write_json(vm_dir / _host.VM_FILE, handle)

        made.namespace = plan.namespace
        if self.runs_containers:
            mount_dir = self._mount_root / vm_id
            if mount_dir.exists() and not rootfs.mounted(mount_dir):  # left by a crash; ours (vm_dir was not)
                shutil.rmtree(mount_dir)
            mount_dir.mkdir(mode=SEARCHABLE_DIR_MODE)
            made.mount_dir = mount_dir
            userns = mount_dir / rootfs.USERNS_FILE
            await idmap.attach_namespaces(
                plan.namespace, userns, self._host_ids(plan.slot), IDS_PER_VM, ip=self._ip
            )
        else:
            await _host.run_host([self._ip, "netns", "add", plan.namespace])
        # Before eth0 exists, so it never gets an IPv6 address.
        await self._namespace_sysctls(plan.namespace)
        peer = ["peer", "name", VM_DEVICE, "netns", plan.namespace]
        await _host.run_host([self._ip, "link", "add", plan.veth, "type", "veth", *peer])
        made.veth = plan.veth
        hostfw.disable_host_ipv6(plan.veth)
        if self.egress is not None:
            hostfw.enable_route_localnet(plan.veth)  # its traffic may be redirected to the loopback
        host_side = (
            f"link set dev {plan.veth} alias {vm_id}\n"
            f"addr add {self._host_address(plan)} dev {plan.veth}\n"
            f"link set dev {plan.veth} up\n"
        )
        await _host.run_host([self._ip, "-batch", "-"], input=host_side.encode())
        vm_side = f"link set dev {VM_DEVICE} alias {vm_id}\nlink set dev lo up\n{self._namespace_setup(plan)}"
        await _host.run_host([self._ip, "-n", plan.namespace, "-batch", "-"], input=vm_side.encode())

        made.cgroups = self._make_cgroups(spec)
        await self._start_init(spec, plan, made, handle)
        _host.write_json(vm_dir / _host.VM_FILE, handle)
        return handle

    # --- what a driver on top of this one's namespaces changes ----------------------------------------

    def _host_address(self, plan: NetnsSlot) -> str:
        """The host side's address (``ip addr add`` syntax)."""
        return f"{plan.host_ip}/{SLOT_PREFIXLEN}"

    def _namespace_setup(self, plan: NetnsSlot) -> str:
        """``ip -batch`` lines run in the namespace once eth0 (the veth's VM side) is there."""
        return (
            f"addr add {plan.vm_ip}/{SLOT_PREFIXLEN} dev {VM_DEVICE}\n"
            f"link set dev {VM_DEVICE} up\n"
            f"route add default via {plan.host_ip} dev {VM_DEVICE}\n"
        )

    def _memory_limit_mb(self, spec: VmSpec) -> int:
        return spec.memory_mb

    def _make_cgroups(self, spec: VmSpec) -> list[Path]:
        """The VM's cgroup folders: runc makes them (with every controller) from the bundle's cgroupsPath."""
        return self._cgroups.vm_dirs(spec.vm_id)

    def _init_log(self, vm_id: str) -> Path:
        """Where a VM's init writes (an image's program; runc's own errors first): on the VM's own disk, so
        a program that logs without end fills its own layer, not the host's."""
        return self._mount_root / vm_id / rootfs.DISK_DIR / rootfs.OUTPUT_DIR / _host.INIT_LOG

    def _host_ids(self, slot: int) -> int:
        """The host uid (and gid) that is root in the slot's VMs; the next 65535 ids are the VM's too."""
        return self._config.id_base + slot * IDS_PER_VM

    def _vm_env(self, vm_id: str, ip: str, spec_env: Mapping[str, str]) -> dict[str, str]:
        trust = egress_setup.ca_env(self.egress_ca)  # (only with egress: see make_driver)
        return {**_host.base_env(Path(VM_HOME)), **trust, **spec_env, "VM_ID": vm_id, "VM_IP": ip}

    def _process(self, argv: Sequence[str], env: Mapping[str, str]) -> dict[str, Any]:
        return oci.process_spec(argv, env, VM_HOME, seccomp.DEFAULT_CAPABILITIES)

    async def _start_init(self, spec: VmSpec, plan: NetnsSlot, made: _Parts, handle: dict[str, Any]) -> None:
        """Assemble the VM's root, write its bundle and start it with runc; record its init's PID."""
        assert self._images is not None
        vm_dir = Path(handle["vm_dir"])
        image = self._images.rootfs(spec.image or "default")
        host_ids = self._host_ids(plan.slot)
        handle.update(container_id=spec.vm_id, image=spec.image or "default", host_ids=host_ids)
        _host.write_json(vm_dir / _host.VM_FILE, handle)  # before any mount: sweep must find and undo it
        mount_dir = self._mount_root / spec.vm_id
        disk = vm_dir / rootfs.DISK_FILE
        root = await rootfs.assemble(image, mount_dir, disk, host_base=host_ids, disk_mb=self._config.disk_mb)
        volumes = await asyncio.to_thread(self._stage_volumes, spec.mounts, root, mount_dir)
        if self.egress is not None:
            # Before its first process: a nameserver (its gateway address; port 53 goes to the resolver)
            # and the egress CA trusted, owned by the VM's root so that it may change them.
            await asyncio.to_thread(
                egress_setup.install, str(root), plan.host_ip, self.egress_ca, (host_ids, host_ids)
            )
        command = [GUEST_PYTHON if part == "{python}" else part for part in spec.command or INIT_COMMAND]
        if not rootfs.has_command(root, command[0], _host.BASE_PATH):
            raise DriverError(
                f"VM init failed to start: {command[0]}: not found in image {spec.image or 'default'}"
            )
        bundle = oci.container_config(
            process=self._process([*REAPER, *command], self._vm_env(spec.vm_id, plan.vm_ip, spec.env)),
            hostname="sandbox",
            rootfs=root,
            netns_path=NETNS_RUN_DIR / plan.namespace,
            userns_path=mount_dir / rootfs.USERNS_FILE,
            host_base=host_ids,
            id_count=IDS_PER_VM,
            cgroups_path=f"/{self._cgroups.name}/{spec.vm_id}",
            memory_bytes=self._memory_limit_mb(spec) * 1024 * 1024,
            limit_swap=self._cgroups.limits_swap(),
            vcpu_count=spec.vcpu_count,
            pids_max=self._config.pids_max,
            seccomp=seccomp.oci_seccomp(seccomp.DEFAULT_CAPABILITIES),
            bind_mounts=[(self._mount_root / GUEST_COPY, GUEST_PACKAGE_IN_VM)],
            staging=(mount_dir / volmount.STAGING_NAME, mount_paths.STAGING_DIR),
            volumes=volumes,
        )
        _host.write_json(vm_dir / BUNDLE_CONFIG, bundle)
        pid_file = vm_dir / _host.RUN_DIR / INIT_PID_FILE
        start = ["run", "--detach", "--bundle", str(vm_dir), "--pid-file", str(pid_file), spec.vm_id]
        await _host.run_logged(
            self._runc.argv(*start),
            log_path=self._init_log(spec.vm_id),
            what="starting the VM's container",
        )
        pid = int(pid_file.read_text().strip())
        ticks = _host.start_ticks(pid)
        if ticks is None:
            raise DriverError(
                f"VM init exited at once: {_host.log_tail(self._init_log(spec.vm_id)) or 'no output'}"
            )
        made.init_pid, made.init_ticks = pid, ticks
        handle.update(init_pid=pid, init_start_ticks=ticks)

    def _stage_volumes(
        self, mounts: Sequence[Mount], root: Path, mount_dir: Path
    ) -> list[tuple[Path, str, bool]]:
        """The VM's staging folder, with its create-time volumes staged in it (for the bundle)."""
        volmount.make_staging(mount_dir / volmount.STAGING_NAME)
        staged = []
        for mount in mounts:
            # The image is trusted, but a link there would make this mount differ from a live one.
            if (link := rootfs.symlink_on_path(root, mount.mount_path)) is not None:
                raise DriverError(f"cannot mount at {mount.mount_path}: /{link} is a symbolic link or a file")
            with _userns_fd(mount_dir) as userns:
                path = volmount.stage(
                    volmount.check_host_dir(mount.host_dir),
                    mount_dir / volmount.STAGING_NAME,
                    mount.mount_path,
                    userns,
                    read_only=mount.read_only,
                )
            staged.append((path, mount.mount_path, mount.read_only))
        return staged

    # --- VmMounts ------------------------------------------------------------------------------------

    async def mount(
        self, vm_id: str, handle: Mapping[str, Any], host_dir: Path, mount_path: str, *, read_only: bool
    ) -> None:
        """``VmMounts``: stage the folder (idmapped to the VM's ids) in the VM's staging folder, whence
        it propagates into the container, then bind it at ``mount_path`` inside the VM's mount
        namespace (``volmount.in_vm``)."""
        mount_paths.check_mount_path(mount_path)
        parts = self._running_parts(vm_id, handle)
        folder = self._volume_staging(vm_id)
        source = volmount.check_host_dir(host_dir)
        assert parts.init_pid is not None
        with _userns_fd(self._mount_root / vm_id) as userns:
            target = await asyncio.to_thread(
                volmount.stage, source, folder, mount_path, userns, read_only=read_only
            )
        try:
            await volmount.in_vm(
                "mount",
                init_pid=parts.init_pid,
                init_ticks=parts.init_ticks,
                mount_path=mount_path,
                owner=self._vm_root_id(handle),
                read_only=read_only,
                expect=os.stat(target),
            )
        except BaseException:
            await asyncio.to_thread(volmount.unstage, folder, mount_path)
            raise

    async def unmount(self, vm_id: str, handle: Mapping[str, Any], mount_path: str) -> None:
        """``VmMounts``: remove the bind at ``mount_path`` in the VM (if it is still the volume), then the
        staged volume on the host, which takes the VM's staging copy with it."""
        mount_paths.check_mount_path(mount_path)
        parts = self._running_parts(vm_id, handle)
        folder = self._volume_staging(vm_id)
        target = volmount.staged(folder, mount_path)
        if str(target) not in rootfs.mount_points():
            return
        assert parts.init_pid is not None
        await volmount.in_vm(
            "unmount",
            init_pid=parts.init_pid,
            init_ticks=parts.init_ticks,
            mount_path=mount_path,
            owner=self._vm_root_id(handle),
            read_only=False,
            expect=os.stat(target),
        )
        await asyncio.to_thread(volmount.unstage, folder, mount_path)

    def _volume_staging(self, vm_id: str) -> Path:
        folder = self._mount_root / vm_id / volmount.STAGING_NAME
        if str(folder) not in rootfs.mount_points():
            raise DriverError(f"VM {vm_id} was created without volume support: create it again")
        return folder

    def _vm_root_id(self, handle: Mapping[str, Any]) -> int:
        ids = _host.as_int(handle.get("host_ids"))
        if ids is None:
            raise DriverError("the VM's handle names no host ids")
        return ids

    async def _namespace_sysctls(self, namespace: str) -> None:
        await _host.run_host(hostfw.namespace_sysctl_argv(NETNS_RUN_DIR / namespace, _NAMESPACE_SYSCTLS))

    def _enter_prefix(self, namespace: str, cgroups: Sequence[Path]) -> list[str]:
        """argv prefix that puts what follows into the VM's cgroups and namespace before it runs."""
        procs = [str(d / "cgroup.procs") for d in cgroups]
        join = [_host.SH, "-c", _JOIN_SCRIPT, "gateway-vm", str(len(procs)), *procs]
        return [*join, self._ip, "netns", "exec", namespace]

    async def destroy(self, vm_id: str, handle: Mapping[str, Any]) -> None:
        await self._teardown(self._parts(_host.check_vm_id(vm_id), handle))

    async def inspect(self, vm_id: str, handle: Mapping[str, Any]) -> VmInfo:
        try:
            parts = self._parts(_host.check_vm_id(vm_id), handle)
        except DriverError:
            return VmInfo(vm_id=vm_id, ip=str(handle.get("ip", "")), running=False, handle=handle)
        running = self._running(parts)
        detail = "" if running else _host.log_tail(self._init_log(vm_id)) or _host.init_log_tail(parts.vm_dir)
        return VmInfo(vm_id=vm_id, ip=self._ip_of(handle), running=running, handle=handle, detail=detail)

    async def suspend(self, vm_id: str, handle: Mapping[str, Any], state_dir: Path) -> Mapping[str, Any]:
        """``VmSuspend``: freeze every process of the VM (runc pause: the freezer cgroup). Its memory
        stays where it is; ``state_dir`` is not needed."""
        self._running_parts(vm_id, handle)
        container = str(handle.get("container_id") or vm_id)
        await _host.run_host(self._runc.argv("pause", container))
        return handle

    async def resume(self, spec: VmSpec, handle: Mapping[str, Any], state_dir: Path) -> VmInfo:
        """``VmSuspend``: thaw it (runc resume); it goes on where it stopped."""
        parts = self._running_parts(spec.vm_id, handle)
        container = str(handle.get("container_id") or spec.vm_id)
        await _host.run_host(self._runc.argv("resume", container))
        return VmInfo(vm_id=spec.vm_id, ip=self._ip_of(handle), running=self._running(parts), handle=handle)

    async def usage(self, vm_id: str, handle: Mapping[str, Any]) -> ResourceUsage:
        """From the VM's cgroup (``VmUsage``): CPU seconds and peak memory."""
        cpu_s, peak = self._cgroups.usage(_host.check_vm_id(vm_id))
        return ResourceUsage(cpu_seconds=cpu_s, peak_memory_bytes=peak)

    def _command_env(
        self, vm_id: str, handle: Mapping[str, Any], argv: Sequence[str], env: Mapping[str, str]
    ) -> tuple[_Parts, dict[str, str]]:
        """A running VM's parts and a command's whole env; VmNotRunning when the VM is not running."""
        if not argv:
            raise DriverError("empty command")
        parts = self._running_parts(vm_id, handle)
        assert parts.namespace is not None and parts.vm_dir is not None
        cgroups = self._cgroups.vm_dirs(vm_id)
        if not all(d.is_dir() for d in cgroups):
            raise VmNotRunning(f"VM {vm_id} has lost its cgroup")
        spec_env = handle.get("env") or _host.read_json(parts.vm_dir / _host.VM_FILE).get("env") or {}
        return parts, {**self._vm_env(vm_id, self._ip_of(handle), spec_env), **env}

    async def spawn(
        self, vm_id: str, handle: Mapping[str, Any], argv: Sequence[str], *, env: Mapping[str, str]
    ) -> VmProcess:
        """``VmSpawn``: ``runc exec`` in the foreground, its stdio our pipes, which runc hands straight to
        the command. Killed by the PID runc reports (runc cannot pass SIGKILL on), once the VM's cgroup
        confirms the PID is still the command's."""
        parts, full_env = self._command_env(vm_id, handle, argv, env)
        assert parts.vm_dir is not None
        token = os.urandom(8).hex()
        run_dir = parts.vm_dir / _host.RUN_DIR
        process_file, pid_file = run_dir / f"{token}.process.json", run_dir / f"{token}.pid"
        _host.write_json(process_file, self._process(list(argv), full_env))  # 0600: the env may hold secrets
        container = str(handle.get("container_id") or vm_id)
        launch = self._runc.argv(
            "exec", "--process", str(process_file), "--pid-file", str(pid_file), container
        )

        def cleanup() -> None:
            process_file.unlink(missing_ok=True)
            pid_file.unlink(missing_ok=True)

        try:
            proc = _spawn.popen(launch, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            cleanup()
            raise DriverError(f"cannot start command in VM: {exc}") from exc

        # The command may run (and write) before runc writes its PID: wait for the PID, so that a kill
        # right after the start still reaches the command.
        started = await _pid_written(pid_file, proc)
        if started is None:
            _, err = await _spawn.communicate(proc)
            cleanup()
            raise DriverError(
                f"cannot start command in VM: {err.decode(errors='replace').strip() or 'runc exec failed'}"
            )

        def kill() -> None:
            _host.kill_if_member(started, lambda pid: self._cgroups.contains(pid, vm_id))
            proc.kill()  # runc itself

        return _spawn.PipeProcess(proc, kill=kill, cleanup=cleanup)

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
        parts, full_env = self._command_env(vm_id, handle, argv, env)
        assert parts.vm_dir is not None
        run_dir = parts.vm_dir / _host.RUN_DIR
        token = os.urandom(8).hex()
        process_file, pid_file = run_dir / f"{token}.process.json", run_dir / f"{token}.pid"
        # The wrapper reports the command's status on descriptor 3 (which the command itself does not
        # get): runc exec --detach hands the command our files as its stdio, so a background child of it
        # (``server &``) holds no pipe that would keep the call open, and its status is not runc's to tell.
        # Then ``times``: the wrapper is the command's parent, so its children's CPU is the command's.
        wrapped = [_host.SH, "-c", '"$@" 3>&-; echo $? >&3; times >&3', "gateway-exec", *argv]
        _host.write_json(process_file, self._process(wrapped, full_env))  # 0600: the env may hold secrets
        container = str(handle.get("container_id") or vm_id)
        try:
            return await _host.run_captured_detached(
                self._runc.exec_argv(container, process_file, pid_file),
                pid_file=pid_file,
                scratch_dir=self._mount_root / vm_id / rootfs.DISK_DIR / rootfs.OUTPUT_DIR,
                timeout_s=timeout_s,
                max_output_bytes=max_output_bytes,
                is_member=lambda pid: self._cgroups.contains(pid, vm_id),
            )
        finally:
            process_file.unlink(missing_ok=True)
            pid_file.unlink(missing_ok=True)

    async def sweep(self, live_slots: set[int]) -> int:
        """Destroy VMs, namespaces, veths and cgroups of this prefix whose slot is not live.

        Returns the number of orphans removed (a VM and its slot's network count once). A driver that
        was not started claims its host names for the sweep: what another live gateway holds is not
        ours to sweep (DriverError).
        """
        if self._owner is not None and self._owner.held:
            return await self._sweep(live_slots)
        self.claim_host_names()
        try:
            return await self._sweep(live_slots)
        finally:
            self.release_host_names()

    async def _sweep(self, live_slots: set[int]) -> int:
        removed: set[str] = set()
        failures: list[str] = []
        live_vm_ids: set[str] = set()

        async def remove(key: str, parts: _Parts) -> None:
            # One stubborn orphan must not keep the others around: try all, report at the end.
            try:
                await self._teardown(parts)
            except DriverError as exc:
                failures.append(str(exc))
            else:
                removed.add(key)

        for vm_id, record in self._records().items():
            slot = _host.as_int(record.get("slot"))
            if slot is not None and slot in live_slots:
                live_vm_ids.add(vm_id)
                continue
            await remove(f"slot:{slot}" if slot is not None else f"vm:{vm_id}", self._parts(vm_id, record))
        slots: set[int] = set()
        for directory, pattern in ((NETNS_RUN_DIR, self._ns_re), (SYS_CLASS_NET, self._veth_re)):
            for entry in _listdir(directory):
                if (match := pattern.fullmatch(entry)) and int(match[1]) not in live_slots:
                    slots.add(int(match[1]))
        for slot in sorted(s for s in slots if s < self._capacity):
            plan = self.plan(slot)
            orphan = _Parts(vm_id="", namespace=plan.namespace, veth=plan.veth, check_owner=False)
            await remove(f"slot:{slot}", orphan)
        # VMs that left no record (their work folder is gone): their cgroups, and for containers runc's
        # state and their mount folder, still name them.
        orphans = self._cgroups.vm_ids()
        if self.runs_containers:
            orphans |= set(await self._runc.containers()) | set(_listdir(self._mount_root)) - {GUEST_COPY}
        for vm_id in sorted(orphans - live_vm_ids):
            if _host.is_vm_id(vm_id):
                parts = _Parts(vm_id=vm_id, cgroups=self._cgroups.vm_dirs(vm_id))
                if self.runs_containers:
                    parts.mount_dir = self._mount_root / vm_id
                await remove(f"vm:{vm_id}", parts)
        if failures:
            raise DriverError(f"sweep removed {len(removed)} orphan(s) but failed on: {'; '.join(failures)}")
        return len(removed)

    # --- internals -----------------------------------------------------------------------------------

    def _records(self) -> dict[str, dict[str, Any]]:
        """This driver's VM records in the work folder, by VM id."""
        records = {}
        for entry in _listdir(self._work_dir):
            record = _host.read_json(self._work_dir / entry / _host.VM_FILE)
            if record.get("driver") == self.name and record.get("vm_id") == entry:
                records[entry] = record
        return records

    def _ip_of(self, handle: Mapping[str, Any]) -> str:
        slot = _host.as_int(handle.get("slot"))
        if isinstance(handle.get("ip"), str):
            return str(handle["ip"])
        return self.address(slot) if slot is not None and 0 <= slot < self._capacity else ""

    def _parts(self, vm_id: str, handle: Mapping[str, Any]) -> _Parts:
        """Resolve a handle (possibly partial) plus the on-disk record into validated resource names."""
        vm_dir = self._work_dir / vm_id
        data = {**_host.read_json(vm_dir / _host.VM_FILE), **handle}
        parts = _Parts(vm_id=vm_id, vm_dir=vm_dir, cgroups=self._cgroups.vm_dirs(vm_id))
        if self.runs_containers:
            parts.mount_dir = self._mount_root / vm_id
        slot = _host.as_int(data.get("slot"))
        if slot is not None and 0 <= slot < self._capacity:
            plan = self.plan(slot)
            parts.namespace, parts.veth = plan.namespace, plan.veth
        for key in ("namespace", "veth"):
            value = data.get(key)
            if isinstance(value, str):
                if not _NAME_RE.fullmatch(value) or (key == "veth" and len(value) > IFNAME_MAX_CHARS):
                    raise DriverError(f"handle of VM {vm_id} has an invalid {key}")
                setattr(parts, key, value)
        for raw in data.get("cgroups") or ():
            path = Path(str(raw))
            if path.name == vm_id and self._cgroups.root in path.parents and path not in parts.cgroups:
                parts.cgroups.append(path)
        parts.init_pid = _host.as_int(data.get("init_pid"))
        parts.init_ticks = _host.as_int(data.get("init_start_ticks"))
        return parts

    def _running_parts(self, vm_id: str, handle: Mapping[str, Any]) -> _Parts:
        """The parts of a VM that runs (its namespace and folder known), or VmNotRunning."""
        parts = self._parts(_host.check_vm_id(vm_id), handle)
        if not self._running(parts) or parts.namespace is None or parts.vm_dir is None:
            raise VmNotRunning(f"VM {vm_id} is not running")
        return parts

    def _running(self, parts: _Parts) -> bool:
        if parts.namespace is None or parts.init_pid is None or parts.init_ticks is None:
            return False
        return (NETNS_RUN_DIR / parts.namespace).exists() and _host.is_running(
            parts.init_pid, parts.init_ticks
        )

    async def _namespace_owner(self, namespace: str) -> str | None:
        """The VM id labelled on the namespace's eth0 (None: no label yet, a half-made VM)."""
        result = await _host.run_host(
            [self._ip, "-j", "-n", namespace, "link", "show", "dev", VM_DEVICE], check=False
        )
        if result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout)[0].get("ifalias") or None
        except (ValueError, IndexError, AttributeError):
            return None

    async def _teardown(self, parts: _Parts) -> None:
        """Kill every process of the VM, then remove veth, namespace, cgroups and work folder.

        A namespace or veth labelled with another VM's id is left alone: the slot has been reused.
        """
        namespace, veth = parts.namespace, parts.veth
        if namespace and not (NETNS_RUN_DIR / namespace).exists():
            namespace = None
        if namespace and parts.check_owner:
            if await self._namespace_owner(namespace) not in (None, parts.vm_id):
                namespace = None
        if veth and parts.check_owner and _read(SYS_CLASS_NET / veth / "ifalias") not in ("", parts.vm_id):
            veth = None
        ns_ident = _ns_ident(NETNS_RUN_DIR / namespace) if namespace else None

        async def candidates() -> set[int]:
            pids = self._cgroups.pids(parts.cgroups)
            if namespace:
                result = await _host.run_host([self._ip, "netns", "pids", namespace], check=False)
                pids.update(int(x) for x in result.stdout.split() if x.isdigit())
            if parts.init_pid is not None and _host.is_running(parts.init_pid, parts.init_ticks):
                pids.add(parts.init_pid)
            return pids

        def is_member(pid: int) -> bool:
            if parts.vm_id and self._cgroups.contains(pid, parts.vm_id):
                return True
            if ns_ident is not None and _ns_ident(Path(f"/proc/{pid}/ns/net")) == ns_ident:
                return True
            return pid == parts.init_pid and _host.is_running(pid, parts.init_ticks)

        if parts.vm_id:
            self._cgroups.thaw(parts.vm_id)  # a suspended VM's processes die only once thawed
        if parts.vm_id and (self._runc.state_root / parts.vm_id).exists():
            await self._runc.delete(parts.vm_id)
        all_dead = await _host.kill_until_gone(candidates, is_member)
        if veth and (SYS_CLASS_NET / veth).exists():
            await _host.run_host([self._ip, "link", "del", veth], check=False)
        if namespace:
            await _host.run_host([self._ip, "netns", "del", namespace], check=False)
        left = await self._cgroups.remove(parts.cgroups)
        problems = [f"cgroup {p}" for p in left]
        if parts.mount_dir is not None:
            problems += [f"mount {m}" for m in rootfs.disassemble(parts.mount_dir)]
            # Never through a mount: the image (read-only, but still) or a layer still in use.
            if not rootfs.mounted(parts.mount_dir):
                await _host.remove_tree(parts.mount_dir)
        if parts.vm_dir is not None:
            # (qemu's volume staging folder is in the work folder: never remove a volume's files with it)
            staging = parts.vm_dir / volmount.STAGING_NAME
            volmount.unmount_staging(staging)
            if str(staging) in rootfs.mount_points():
                problems.append(f"mount {staging}")
            elif not (parts.mount_dir and rootfs.mounted(parts.mount_dir)):
                await _host.remove_tree(parts.vm_dir)
        if veth and (SYS_CLASS_NET / veth).exists():
            problems.append(f"veth {veth}")
        if namespace and (NETNS_RUN_DIR / namespace).exists():
            problems.append(f"namespace {namespace}")
        if not all_dead:
            problems.append("processes that would not die")
        if problems:
            raise DriverError(f"destroying VM {parts.vm_id or namespace} left: {', '.join(problems)}")


def check_mounts(mounts: Sequence[Mount]) -> None:
    """Create-time mounts: each path allowed (ValueError), no path twice."""
    paths = [mount_paths.check_mount_path(m.mount_path) for m in mounts]
    if len(set(paths)) != len(paths):
        raise ValueError("two volumes at one mount_path")


class _userns_fd:
    """The VM's user namespace (kept on its ``userns`` file), as a descriptor, for idmapped mounts."""

    def __init__(self, mount_dir: Path) -> None:
        self._path = mount_dir / rootfs.USERNS_FILE
        self._fd = -1

    def __enter__(self) -> int:
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DriverError(f"the VM's user namespace is gone: {exc}") from None
        return self._fd

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


async def _pid_written(pid_file: Path, runtime: subprocess.Popen[bytes]) -> int | None:
    """The PID ``runc exec --pid-file`` wrote, once it has; None when runc ended without starting it."""
    deadline = time.monotonic() + _host.HOST_COMMAND_TIMEOUT_S
    while time.monotonic() < deadline:
        pid = _read_pid(pid_file)
        if pid is not None:
            return pid
        if runtime.poll() is not None:
            return None
        await asyncio.sleep(PID_POLL_S)
    return None


def _read_pid(path: Path) -> int | None:
    """A PID file's number (a few bytes: read inline), or None while it is not there."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _ns_ident(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
