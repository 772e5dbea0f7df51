"""QEMU microvm driver: every VM is a real virtual machine with its own kernel, in its own namespace.

It is the netns driver with a different inside: the same slots, namespace, veth, cgroups, blackhole
route, teardown and sweep (inherited), but the namespace holds a bridge joining the veth's VM end to a
tap device, and the VM's init is a QEMU process (``-M microvm``) on that tap. It boots the driver's
boot image (``qemu_image``: kernel and a small initramfs) with the VM's image attached read-only: an
ext4 disk made from the shared image store's root file system (``image_variant``; ``qemu_disk``), so a
VM runs on the same files on qemu as on netns. The initramfs's busybox init brings the network up, puts
a tmpfs overlay on the disk, ``switch_root``s into it and runs the agent (``gateway/guest/agent.py``) on
the image's Python; the agent runs ``execute`` commands, and the host reaches it at the VM's address
with the VM's token.

- Acceleration: KVM when it works, TCG otherwise. ``auto`` boots a probe VM under KVM once per host
  kernel, QEMU and image (kept in the image folder), because a usable ``/dev/kvm`` does not mean the
  guest boots under it. Under TCG the kernel is told the TSC rate and loops-per-jiffy, without which
  boots hung under load while calibrating.
- Snapshots: QEMU's own migration stream, written to a file (``snapshot``); a VM created with
  ``restore_from`` starts QEMU with ``-incoming`` and resumes it. Everything a VM writes lives in guest
  RAM (the overlay's tmpfs), so the stream holds its files too; the image disk is not in it, so a
  snapshot (and a boot template) resumes only with the very disk it was taken on (``disk_id``). The
  guest's network needs no per-VM settings (``qemu_net``), so a restored guest works unchanged in
  whichever slot it lands.
- Confinement (``qemu_jail``): each QEMU runs under its seccomp sandbox, as its slot's unprivileged
  uid without capabilities, chrooted in a private mount namespace that shows it its own files only. The
  gateway keeps the files it reads (the record, console, fw_cfg config, snapshots) outside anything
  QEMU can write, and hands QEMU descriptors for what it must write.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import platform
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from gateway.config import QemuConfig
from gateway.errors import DriverError, VmNotRunning
from gateway.guest import egress_setup
from gateway.orchestrator.drivers import (
    _host,
    agent_stream,
    idmap,
    mount_paths,
    qemu_disk,
    qemu_image,
    qemu_jail,
    qemu_net,
    volmount,
)
from gateway.orchestrator.drivers.base import ExecResult, Mount, VmInfo, VmProcess, VmSpec
from gateway.orchestrator.drivers.netns import VM_DEVICE, NetnsSlot, NetnsVmDriver, _Parts
from gateway.orchestrator.drivers.qmp import Qmp, QmpError

log = logging.getLogger(__name__)

# QEMU's own memory beside the guest's: TCG's translation cache (capped below) and device buffers.
QEMU_OVERHEAD_MB = 192
TCG_CACHE_MB = 64
# Guest memory beyond twice the initramfs that a boot needs (the kernel, its page tables and buffers).
GUEST_KERNEL_MB = 96
# The least guest memory accepted whatever the initramfs: the kernel, the image's page cache, the
# agent's Python and a little room on the in-memory overlay (160 MiB left too little to be useful).
GUEST_MIN_MB = 192
GUEST_MAC = "52:54:00:00:00:02"
GUEST_HOME = "/home/vm"
TAP_DEVICE = "tap0"
BRIDGE_DEVICE = "br0"
CONSOLE_FILE = "console.log"
# The folder (the one QEMU may write, owned by its uid) that holds QEMU's control socket.
QMP_DIR = "qmp"
QMP_SOCKET = "qmp.sock"
# The empty folder the QEMU's jail is mounted over (in QEMU's own mount namespace only).
JAIL_DIR = "root"
GUEST_CONFIG_FILE = "guest.json"
FW_CFG_NAME = "opt/gateway/config"
SNAPSHOT_STATE = "state.bin"
SNAPSHOT_META = "snapshot.json"
ACCEL_FILE = "accel.json"
TEMPLATES_SUBDIR = "templates"
PROBE_TIMEOUT_S = 20.0
PROBE_MEMORY_MB = 256
READY_POLL_S = 0.05
AGENT_PROBE_TIMEOUT_S = 1.0
# An execute's HTTP call outlives the command's own timeout by this much (the agent kills at the timeout).
EXECUTE_MARGIN_S = 10.0
MIGRATION_POLL_S = 0.01
# What a call to a VM's agent can fail with (ValueError: a reply that is not JSON).
AGENT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, ValueError)
# The 9p share of a VM's volume staging folder, and the guest's side of a mount (run by its agent as
# root): the share mounted once at the staging path, the volume's folder bound at its path, read-only
# when asked. Convenience only: the guest's kernel is the VM's own, so what it is told proves nothing;
# read-only is the host's mount, which QEMU writes through.
VOLUMES_TAG = "gwvolumes"
GUEST_MOUNT_SCRIPT = """
set -eu
staging=$1 key=$2 path=$3 mode=$4
walked=
for name in $(echo "${path#/}" | tr / ' '); do
    walked="$walked/$name"
    if [ -L "$walked" ] || { [ -e "$walked" ] && [ ! -d "$walked" ]; }; then
        echo "$walked is a symbolic link or not a folder in the VM" >&2
        exit 3
    fi
done
mkdir -p "$staging"
mountpoint -q "$staging" || mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 TAG "$staging"
mkdir -p "$path"
mount --bind "$staging/$key" "$path"
if [ "$mode" = ro ]; then mount -o remount,bind,ro "$path"; fi
""".replace("TAG", VOLUMES_TAG)
# The share is let go once no volume is mounted: QEMU refuses to migrate (snapshot) a VM while it is.
GUEST_UNMOUNT_SCRIPT = """
staging=$1 path=$2
if mountpoint -q "$path" && [ ! -L "$path" ]; then umount -l "$path"; fi
if mountpoint -q "$staging" && [ "$(grep -c ' 9p ' /proc/self/mountinfo)" -le 1 ]; then
    umount -l "$staging"
fi
exit 0
"""
# Not a program: the monkeypatchable seam the contract's failed-start test uses (as in the other drivers).
INIT_COMMAND: tuple[str, ...] = ()
# Run in the guest by its agent (``python3 -c``): the guest holds no copy of the gateway's package.
EGRESS_SETUP_SOURCE = Path(egress_setup.__file__).read_text()
# A guest's own route out, for egress: its init gives it none that works (``qemu_init.sh``: it answers on
# any address of its half, but has no address of its own to send from), so once the host knows its slot
# it is told to send everything to its slot's host address (the host's nftables take it from there),
# from its slot's address. Then the files (``egress_setup``). An image without iproute2 keeps no route
# out (said on stderr), which leaves such a VM as it was: without egress. And the host's time: the guest
# has no clock of its own to start from (``rtc=off``), and one restored from a snapshot or template runs
# from the moment it was taken; certificates (the egress CA's leaves among them) need the real one.
EGRESS_ROUTE_SCRIPT = """
gateway=$1 address=$2 now=$3; shift 3
date -u -s "@$now" >/dev/null || exit 1
if command -v ip >/dev/null; then
    ip route replace default via "$gateway" dev eth0 onlink src "$address" || exit 1
else
    echo "no ip command (iproute2) in this image: the VM has no route out" >&2
fi
exec python3 -I -c "$@"
"""


class QemuImages(Protocol):
    """The shared image store as this driver uses it (``gateway.images.store.ImageStore``)."""

    def resolve(self, name: str | None) -> str:
        """The image a request means ("" or None: the default one)."""
        ...

    def rootfs(self, name: str) -> Path:
        """The built image's root folder (in its digest folder); DriverError when unknown or not built."""
        ...

    def locked(self, name: str) -> AbstractContextManager[Path]:
        """The image's lock (across processes), yielding its digest folder."""
        ...


def host_tsc_khz() -> int | None:
    """The host's TSC rate (TCG's guest TSC runs at it), from /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return None


class QemuVmDriver(NetnsVmDriver):
    """VmDriver on QEMU microvms in network namespaces (root only). See the module docstring."""

    name = "qemu"
    # QEMU runs in the namespaces, not containers: no OCI runtime, image store or id-mapped namespace.
    runs_containers = False

    def __init__(
        self,
        config: QemuConfig,
        work_dir: Path,
        *,
        image_dir: Path,
        boot_timeout_s: float,
        images: QemuImages | None = None,
        cgroup_root: Path | None = None,
    ) -> None:
        super().__init__(config, work_dir, cgroup_root=cgroup_root)  # type: ignore[arg-type]
        self._image_store = images
        self._qemu = config
        self._capacity = qemu_net.slot_capacity(config.cidr)
        self._image_dir = Path(image_dir)
        self._boot_timeout_s = boot_timeout_s
        self._accel: str | None = None
        self._manifest: dict[str, Any] = {}
        # Absolute paths, checked by detect() (the jail shows QEMU the host's /usr only).
        self._qemu_path = config.qemu_binary
        self._setpriv = "/usr/bin/setpriv"

    def plan(self, slot: int) -> NetnsSlot:
        return qemu_net.plan_slot(self._qemu.cidr, self._qemu.name_prefix, slot)

    @property
    def accel(self) -> str | None:
        """ "kvm" or "tcg" once started."""
        return self._accel

    @property
    def image_id(self) -> str:
        return str(self._manifest.get("image_id", ""))

    # A class attribute in NetnsVmDriver (read from the class too); here it names the accelerator in use.
    @property
    def isolation(self) -> str:  # type: ignore[override]
        """What stands between a VM and the host (``gateway doctor``, the start-up line)."""
        accel = self._accel.upper() if self._accel else "KVM or TCG"
        first = qemu_jail.vm_ids(self._qemu.id_base, 0)
        return (
            f"QEMU microVMs ({accel}), each QEMU confined: seccomp sandbox (-sandbox {qemu_jail.SANDBOX}), "
            f"uid/gid {first} + slot with no capabilities and no_new_privs, chroot in a private mount "
            "namespace (read-only /usr, its kernel, initramfs and image disk, its control socket)"
        )

    async def start(self) -> None:
        await self.detect()
        await super().start()

    async def detect(self) -> dict[str, Any]:
        """Check QEMU and the image, and choose the accelerator (what ``gateway doctor`` shows)."""
        if shutil.which(self._qemu.qemu_binary) is None:
            raise DriverError(f"{self._qemu.qemu_binary} is missing: apt-get install qemu-system-x86")
        try:
            self._manifest = qemu_image.load_manifest(self._image_dir)
        except qemu_image.ImageError as missing:
            # First start, or a gateway upgrade: build it (about 15 s, from the machine's apt sources),
            # as `gateway image build` does. (Its boot templates go with the old image.)
            log.warning("%s: building it now", missing)
            try:
                self._manifest = await asyncio.to_thread(
                    qemu_image.build_image, self._image_dir, say=lambda line: log.info("image: %s", line)
                )
            except qemu_image.ImageError as exc:
                raise DriverError(f"cannot build the qemu boot image: {exc}") from None
        self._qemu_path, self._setpriv = qemu_jail.host_tools(self._qemu.qemu_binary)
        qemu_jail.check_ids(self._qemu.id_base, self._capacity)
        for name in (qemu_image.KERNEL, qemu_image.INITRD):
            qemu_jail.readable_by_all(self._image_dir / name)
        if self._accel is None:
            self._accel = await self._choose_accel()
        try:
            # Made now rather than at the first VM's boot (about 6 s): `gateway serve` has built the image.
            default_disk = (await self.image_disk("")).path
        except DriverError as exc:
            default_disk = None
            log.warning("qemu: %s", exc)
        return {
            "qemu": await asyncio.to_thread(self._qemu_version),
            "kvm_device": os.access("/dev/kvm", os.R_OK | os.W_OK),
            "accel": self._accel,
            "image_id": self.image_id,
            "image_dir": str(self._image_dir),
            "kernel": self._manifest.get("kernel_release"),
            "image_built_at": self._manifest.get("built_at"),
            "default_disk": str(default_disk) if default_disk else None,
            "isolation": self.isolation,
        }

    async def image_disk(self, image: str) -> qemu_disk.Disk:
        """The disk of image ``image`` ("": the default), made from its root file system the first time
        (under the image's lock); DriverError when the image is unknown or not built."""
        store = self._image_store
        if store is None:
            raise DriverError("the qemu driver needs an image store (gateway.images)")

        def ensure() -> qemu_disk.Disk:
            rootfs = store.rootfs(image)
            found = qemu_disk.disk_of(rootfs.parent)
            if found is not None:
                return found
            with store.locked(image) as folder:
                if (found := qemu_disk.disk_of(folder)) is not None:  # made while we waited
                    return found
                log.info("qemu: making the disk of image %s from %s", store.resolve(image), rootfs)
                return qemu_disk.make_disk(folder, rootfs)

        disk = await asyncio.to_thread(ensure)
        qemu_jail.readable_by_all(disk.path)
        return disk

    # --- create ---------------------------------------------------------------------------------------

    def min_memory_mb(self) -> int:
        """The least guest memory a VM is given: the kernel holds the initramfs archive and the files
        unpacked from it at once, plus itself; and never less than GUEST_MIN_MB."""
        try:
            archive = (self._image_dir / qemu_image.INITRD).stat().st_size
        except OSError:
            return 0
        return max(GUEST_MIN_MB, -(-2 * archive // 2**20) + GUEST_KERNEL_MB)

    async def create(self, spec: VmSpec) -> VmInfo:
        least = self.min_memory_mb()
        if spec.memory_mb < least:
            # Refused before anything is made: such a guest boots without its files and never answers.
            raise DriverError(
                f"memory_mb {spec.memory_mb} is too little for the qemu guest, whose kernel, page cache "
                f"and written files are held in its memory: at least {least}"
            )
        return await super().create(spec)

    def _host_address(self, plan: NetnsSlot) -> str:
        return f"{plan.host_ip} peer {plan.vm_ip}"

    def _namespace_setup(self, plan: NetnsSlot) -> str:
        # Pure layer 2 inside the namespace: the veth's VM end and QEMU's tap on one bridge, no address.
        # The tap is the slot's QEMU's to open (it has no capabilities to open any other).
        ids = qemu_jail.vm_ids(self._qemu.id_base, plan.slot)
        return (
            f"link add {BRIDGE_DEVICE} type bridge\n"
            f"link set dev {VM_DEVICE} master {BRIDGE_DEVICE}\n"
            f"tuntap add dev {TAP_DEVICE} mode tap user {ids} group {ids}\n"
            f"link set dev {TAP_DEVICE} master {BRIDGE_DEVICE}\n"
            f"link set dev {VM_DEVICE} up\n"
            f"link set dev {TAP_DEVICE} up\n"
            f"link set dev {BRIDGE_DEVICE} up\n"
        )

    def _memory_limit_mb(self, spec: VmSpec) -> int:
        return spec.memory_mb + QEMU_OVERHEAD_MB + TCG_CACHE_MB

    def _make_cgroups(self, spec: VmSpec) -> list[Path]:
        # No runtime makes them here: QEMU's launcher joins them itself (``_enter_prefix``).
        return self._cgroups.create(
            spec.vm_id, memory_mb=self._memory_limit_mb(spec), vcpu_count=spec.vcpu_count
        )

    async def _start_init(self, spec: VmSpec, plan: NetnsSlot, made: _Parts, handle: dict[str, Any]) -> None:
        if spec.command:
            raise DriverError("the qemu driver runs no image program as init (only /execute commands)")
        vm_dir = Path(handle["vm_dir"])
        ids = qemu_jail.vm_ids(self._qemu.id_base, plan.slot)
        disk = await self.image_disk(spec.image)
        assert self._image_store is not None  # (_image_disk checked)
        handle.update(image=self._image_store.resolve(spec.image), disk_id=disk.disk_id)
        restore = Path(spec.restore_from) if spec.restore_from else None
        template = None if restore is not None else self._template_for(spec, handle)
        source = restore or template
        config_path = vm_dir / GUEST_CONFIG_FILE
        if source is not None:
            meta = read_snapshot_meta(source)
            self._check_restorable(meta, spec, handle)
            token = str(meta["token"])
            # The resumed machine gets the fw_cfg it was started with, byte for byte.
            shutil.copyfile(source / GUEST_CONFIG_FILE, config_path)
        else:
            token = secrets.token_urlsafe(32)
            config_path.write_text(json.dumps({"token": token, "agent_port": self._qemu.agent_port}))
        config_path.chmod(0o600)
        # The console is the gateway's file (QEMU writes it through a descriptor); the socket's folder is
        # the one QEMU may write; the jail's folder stays empty on the host.
        os.close(os.open(vm_dir / CONSOLE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        (vm_dir / QMP_DIR).mkdir(mode=0o700)
        os.chown(vm_dir / QMP_DIR, ids, ids)
        (vm_dir / JAIL_DIR).mkdir()
        volmount.make_staging(vm_dir / volmount.STAGING_NAME)
        handle.update(
            qemu_ids=ids,
            agent_token=token,
            accel=self._accel,
            image_id=self.image_id,
            vcpu_count=spec.vcpu_count,
            memory_mb=spec.memory_mb,
            booted_from="snapshot" if restore else ("template" if template else "kernel"),
        )
        launcher = self._launcher(
            ids,
            vm_dir,
            self._accel or "tcg",
            fw_cfg=config_path,
            qmp_dir=vm_dir / QMP_DIR,
            disk=disk.path,
            volumes=vm_dir / volmount.STAGING_NAME,
        )
        argv = [
            *(INIT_COMMAND or [*launcher, *self._qemu_argv(spec)]),
            *(["-incoming", "defer"] if source else []),
        ]
        pid, ticks = await _host.spawn_detached(
            self._enter_prefix(plan.namespace, made.cgroups),
            argv,
            env=_host.base_env(vm_dir),
            cwd=vm_dir,
            log_path=vm_dir / _host.RUN_DIR / _host.INIT_LOG,
        )
        made.init_pid, made.init_ticks = pid, ticks
        handle.update(init_pid=pid, init_start_ticks=ticks)
        if source is not None:
            try:
                await asyncio.to_thread(self._incoming, handle, source / SNAPSHOT_STATE)
            except DriverError as exc:
                # A QEMU that could not start says why in its log; that beats "connection reset".
                if not _host.is_running(pid, ticks):
                    said = _host.init_log_tail(vm_dir) or self._console_tail(handle)
                    raise DriverError(f"QEMU exited while VM {spec.vm_id} resumed: {said}") from exc
                raise
        await self._wait_agent(spec.vm_id, handle)
        if source is None and self._qemu.boot_templates:
            await self._save_template(spec, handle)
        # Before anything runs in it, the VM becomes itself: a token, env and entropy of its own (a
        # resumed VM is otherwise a copy of its snapshot's or template's).
        handle["agent_token"] = await self._configure(spec, handle)
        if self.egress is not None:
            await self._prepare_egress(spec.vm_id, handle)
        for mount in spec.mounts:
            await self._mount(spec.vm_id, handle, mount)

    # --- boot templates -------------------------------------------------------------------------------

    def _template_dir(self, spec: VmSpec, handle: Mapping[str, Any]) -> Path:
        """One template per machine shape, accelerator, boot image, image disk and guest network."""
        half = str(qemu_net.guest_half(self._qemu.cidr)).replace("/", "_")
        image = f"{handle['image']}.{handle['disk_id']}"
        name = f"{self.image_id}-{image}-{self._accel}-{spec.vcpu_count}cpu-{spec.memory_mb}mb-{half}"
        return self._image_dir / TEMPLATES_SUBDIR / name

    def _template_for(self, spec: VmSpec, handle: Mapping[str, Any]) -> Path | None:
        """The template a new VM of this shape and image resumes instead of booting, if one was saved."""
        if not self._qemu.boot_templates or INIT_COMMAND:
            return None
        folder = self._template_dir(spec, handle)
        return folder if (folder / SNAPSHOT_META).is_file() else None

    async def _save_template(self, spec: VmSpec, handle: Mapping[str, Any]) -> None:
        """Right after the first boot of a shape (nothing has run in it yet): save it, then let it go on.

        Written beside the final folder and renamed into place, so a racing VM of the same shape or
        another gateway process never sees half a template; the loser's copy is dropped. A failure only
        costs the next VM a full boot.
        """
        final = self._template_dir(spec, handle)
        scratch = final.with_name(f".{final.name}.{secrets.token_hex(4)}")
        try:
            await asyncio.to_thread(scratch.mkdir, parents=True)
            await self._save_state(handle, scratch, resume=True)
            try:
                await asyncio.to_thread(scratch.rename, final)
            except OSError:
                pass  # another VM saved this shape's template first
        except (DriverError, OSError) as exc:
            log.warning("could not save the boot template %s: %s", final.name, exc)
        finally:
            await _host.remove_tree(scratch)

    async def _configure(self, spec: VmSpec, handle: Mapping[str, Any]) -> str:
        token = secrets.token_urlsafe(32)
        env = {**egress_setup.ca_env(self.egress_ca), **spec.env}  # (the CA only with egress)
        body = {"token": token, "env": env, "seed": base64.b64encode(os.urandom(64)).decode()}
        try:
            status, reply = await self._agent_post(handle, "/configure", body, EXECUTE_MARGIN_S)
        except AGENT_ERRORS as exc:
            raise DriverError(f"VM {spec.vm_id}'s agent failed: {exc or type(exc).__name__}") from None
        if status != 200:
            raise DriverError(f"VM {spec.vm_id}'s agent refused its configuration: {status} {reply}")
        return token

    async def _prepare_egress(self, vm_id: str, handle: Mapping[str, Any]) -> None:
        """The guest's route out, its nameserver and its trust in the egress CA (``EGRESS_ROUTE_SCRIPT``,
        run in the guest: its root lives in its memory). Again after every resume: it is idempotent, and
        the route and nameserver name the slot's addresses, which a VM restored into another slot must
        learn."""
        ca = [self.egress_ca.decode("ascii")] if self.egress_ca else []
        host_ip, ip = str(handle["host_ip"]), str(handle["ip"])
        args = [host_ip, ip, f"{time.time():.3f}", EGRESS_SETUP_SOURCE, host_ip, *ca]
        code, said = await self._guest_script(
            handle, EGRESS_ROUTE_SCRIPT, args, name="gateway-egress", vm_id=vm_id
        )
        if code != 0:
            raise DriverError(f"VM {vm_id}: preparing its egress (DNS, CA) failed: {code} {said}")
        if said:
            log.warning("VM %s: %s", vm_id, said)

    async def _agent_post(
        self, record: Mapping[str, Any], path: str, body: Mapping[str, Any], timeout_s: float
    ) -> tuple[int, Any]:
        """POST JSON to the VM's agent with its token; (status, the reply's JSON)."""
        url = f"http://{self._ip_of(record)}:{self._qemu.agent_port}{path}"
        headers = {"Authorization": f"Bearer {record.get('agent_token', '')}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.post(url, json=body, headers=headers) as response:
                return response.status, await response.json(content_type=None)

    def _launcher(
        self,
        ids: int,
        folder: Path,
        accel: str,
        *,
        fw_cfg: Path | None = None,
        qmp_dir: Path | None = None,
        disk: Path | None = None,
        volumes: Path | None = None,
    ) -> list[str]:
        """What runs QEMU confined (``qemu_jail``), the argv before QEMU's own; ``folder`` holds the
        console file and the jail's empty folder."""
        return qemu_jail.launcher(
            jail=folder / JAIL_DIR,
            ids=ids,
            kernel=self._image_dir / qemu_image.KERNEL,
            initrd=self._image_dir / qemu_image.INITRD,
            console=folder / CONSOLE_FILE,
            fw_cfg=fw_cfg,
            qmp_dir=qmp_dir,
            accel=accel,
            setpriv=self._setpriv,
            disk=disk,
            volumes=volumes,
        )

    def _qemu_argv(self, spec: VmSpec) -> list[str]:
        """QEMU's command line for a VM; its paths are the jail's."""
        accel = self._accel or "tcg"
        cmdline = [
            "console=ttyS0",
            "quiet",
            "panic=-1",
            "rdinit=/init",
            # Freed pages are zeroed, and QEMU's migration skips zero pages: smaller snapshots.
            "init_on_free=1",
            # microvm has no PCI bus; and the guest is isolated by the hypervisor, not by its own kernel's
            # side-channel mitigations, which cost much under emulation.
            "pci=off",
            "mitigations=off",
            f"gw.anyip={qemu_net.guest_half(self._qemu.cidr)}",
        ]
        if accel == "tcg":
            cmdline += self._tcg_timing()
        return [
            *self._machine_argv(accel, spec.vcpu_count, spec.memory_mb, cmdline),
            "-qmp",
            f"unix:{qemu_jail.QMP_SOCKET},server=on,wait=off",
            "-fw_cfg",
            f"name={FW_CFG_NAME},file={qemu_jail.FW_CFG_FILE}",
            "-netdev",
            f"tap,id=net0,ifname={TAP_DEVICE},script=no,downscript=no",
            "-device",
            f"virtio-net-device,netdev=net0,mac={GUEST_MAC}",
            # The image, read-only (the guest's writes go to its in-memory overlay); QEMU takes a shared
            # lock only, so every VM of the image attaches the one file.
            "-drive",
            f"file={qemu_jail.DISK},format=raw,if=none,id=image,readonly=on",
            "-device",
            "virtio-blk-device,drive=image",
            # The VM's volumes (``volmount``): its staging folder, which QEMU serves as the VM's root
            # would act (on-disk 0 is QEMU's uid there); ``none``: QEMU cannot chown, and says nothing
            # of it. Volumes are file systems of their own beneath it: their inode numbers are remapped.
            "-fsdev",
            f"local,id=volumes,path={qemu_jail.VOLUMES},security_model=none,multidevs=remap",
            "-device",
            f"virtio-9p-device,fsdev=volumes,mount_tag={VOLUMES_TAG}",
        ]

    def _machine_argv(self, accel: str, vcpus: int, memory_mb: int, cmdline: list[str]) -> list[str]:
        """The microvm, its CPUs, memory, serial console, the image's kernel and the seccomp sandbox:
        every VM and the probe (paths as the jail shows them)."""
        if accel == "tcg":
            accel_args = ["-accel", f"tcg,thread=multi,tb-size={TCG_CACHE_MB}", "-cpu", "max"]
        else:
            accel_args = ["-accel", "kvm", "-cpu", "host"]
        return [
            self._qemu_path,
            "-M",
            "microvm,pit=off,pic=off,isa-serial=on,rtc=off",
            *accel_args,
            "-smp",
            str(vcpus),
            "-m",
            str(memory_mb),
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            *qemu_jail.CONSOLE,
            "-monitor",
            "none",
            "-kernel",
            qemu_jail.KERNEL,
            "-initrd",
            qemu_jail.INITRD,
            "-append",
            " ".join(cmdline),
            "-sandbox",
            qemu_jail.SANDBOX,
        ]

    def _tcg_timing(self) -> list[str]:
        khz = host_tsc_khz()
        if not khz:
            return []
        hz = int(self._manifest.get("kernel_hz") or 250)
        return [f"tsc_early_khz={khz}", f"lpj={khz * 1000 // hz}"]

    async def _wait_agent(self, vm_id: str, handle: Mapping[str, Any]) -> None:
        """Until the guest's agent answers; a QEMU that exits first fails the create with its console."""
        url = f"http://{handle['ip']}:{self._qemu.agent_port}/health"
        headers = {"Authorization": f"Bearer {handle['agent_token']}"}
        deadline = time.monotonic() + self._boot_timeout_s
        timeout = aiohttp.ClientTimeout(total=AGENT_PROBE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with session.get(url, headers=headers) as response:
                        if response.status == 200:
                            return
                if not _host.is_running(int(handle["init_pid"]), handle.get("init_start_ticks")):
                    said = _host.init_log_tail(Path(handle["vm_dir"])) or self._console_tail(handle)
                    raise DriverError(f"QEMU exited while VM {vm_id} booted: {said}")
                if time.monotonic() >= deadline:
                    raise DriverError(
                        f"VM {vm_id}'s agent did not answer within {self._boot_timeout_s} s: "
                        f"{self._console_tail(handle)}"
                    )
                await asyncio.sleep(READY_POLL_S)

    def _console_tail(self, handle: Mapping[str, Any], lines: int = 5) -> str:
        try:
            text = (Path(handle["vm_dir"]) / CONSOLE_FILE).read_text(errors="replace")
        except OSError:
            return "no console output"
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip()) or "no output"

    def _running_record(self, vm_id: str, handle: Mapping[str, Any]) -> tuple[_Parts, dict[str, Any]]:
        """A running VM's parts, and its record on disk completed by the handle (which wins)."""
        parts = self._running_parts(vm_id, handle)
        assert parts.vm_dir is not None
        return parts, {**_host.read_json(parts.vm_dir / _host.VM_FILE), **handle}

    # --- execute --------------------------------------------------------------------------------------

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
        if not argv:
            raise DriverError("empty command")
        parts, record = self._running_record(vm_id, handle)
        ip = self._ip_of(record)
        body = {
            "argv": list(argv),
            "env": {**(record.get("env") or {}), "VM_ID": vm_id, "VM_IP": ip, **env},
            "cwd": GUEST_HOME,
            "timeout_s": timeout_s,
            "max_output_bytes": max_output_bytes,
        }
        try:
            status, reply = await self._agent_post(record, "/execute", body, timeout_s + EXECUTE_MARGIN_S)
        except AGENT_ERRORS as exc:
            if not self._running(parts):
                raise VmNotRunning(f"VM {vm_id} is not running") from None
            raise DriverError(f"the agent of VM {vm_id} failed: {exc or type(exc).__name__}") from None
        if status != 200 or not isinstance(reply, dict):
            raise DriverError(f"the agent of VM {vm_id} refused the command: {reply}")
        return ExecResult(
            stdout=base64.b64decode(reply["stdout"]),
            stderr=base64.b64decode(reply["stderr"]),
            exit_code=reply["exit_code"],
            timed_out=bool(reply["timed_out"]),
            truncated=bool(reply["truncated"]),
            duration_s=float(reply["duration_s"]),
            # An agent of an image built before it reported CPU sends none.
            cpu_s=float(reply["cpu_s"]) if isinstance(reply.get("cpu_s"), int | float) else None,
        )

    async def spawn(
        self, vm_id: str, handle: Mapping[str, Any], argv: Sequence[str], *, env: Mapping[str, str]
    ) -> VmProcess:
        """``VmSpawn``: through the guest agent's ``/spawn`` (frames over one connection)."""
        if not argv:
            raise DriverError("empty command")
        parts, record = self._running_record(vm_id, handle)
        ip = self._ip_of(record)
        full_env = {**(record.get("env") or {}), "VM_ID": vm_id, "VM_IP": ip, **env}
        try:
            return await agent_stream.spawn(
                ip,
                self._qemu.agent_port,
                str(record.get("agent_token", "")),
                argv,
                full_env,
                EXECUTE_MARGIN_S,
            )
        except DriverError:
            if not self._running(parts):
                raise VmNotRunning(f"VM {vm_id} is not running") from None
            raise

    # --- VmMounts -----------------------------------------------------------------------------------

    async def mount(
        self, vm_id: str, handle: Mapping[str, Any], host_dir: Path, mount_path: str, *, read_only: bool
    ) -> None:
        """``VmMounts``: stage the folder for QEMU (idmapped: on-disk 0 is the slot's QEMU uid), where it
        appears in the VM's 9p share, then have the guest bind it at ``mount_path``."""
        mount_paths.check_mount_path(mount_path)
        _, record = self._running_record(vm_id, handle)
        await self._mount(vm_id, record, Mount(host_dir, mount_path, read_only))

    async def _mount(self, vm_id: str, record: Mapping[str, Any], mount: Mount) -> None:
        folder = self._qemu_staging(record)
        source = volmount.check_host_dir(mount.host_dir)
        ids = _host.as_int(record.get("qemu_ids"))
        assert ids is not None
        async with idmap.scratch_userns(ids, 1) as userns:
            await asyncio.to_thread(
                volmount.stage, source, folder, mount.mount_path, userns, read_only=mount.read_only
            )
        try:
            key = mount_paths.mount_key(mount.mount_path)
            mode = "ro" if mount.read_only else "rw"
            args = [mount_paths.STAGING_DIR, key, mount.mount_path, mode]
            code, said = await self._guest_script(record, GUEST_MOUNT_SCRIPT, args)
            if code == 3:
                raise DriverError(f"cannot mount at {mount.mount_path}: {said}")
            if code != 0:
                raise DriverError(f"VM {vm_id} could not mount its volume at {mount.mount_path}: {said}")
        except BaseException:
            await asyncio.to_thread(volmount.unstage, folder, mount.mount_path)
            raise

    async def unmount(self, vm_id: str, handle: Mapping[str, Any], mount_path: str) -> None:
        """``VmMounts``: the guest lets go of it (and of the share when it was the last), then the host."""
        mount_paths.check_mount_path(mount_path)
        _, record = self._running_record(vm_id, handle)
        folder = self._qemu_staging(record)
        if str(volmount.staged(folder, mount_path)) not in volmount.rootfs.mount_points():
            return
        code, said = await self._guest_script(
            record, GUEST_UNMOUNT_SCRIPT, [mount_paths.STAGING_DIR, mount_path]
        )
        if code != 0:
            log.warning("VM %s: unmounting %s: %s", vm_id, mount_path, said)
        await asyncio.to_thread(volmount.unstage, folder, mount_path)

    def _qemu_staging(self, record: Mapping[str, Any]) -> Path:
        folder = Path(record["vm_dir"]) / volmount.STAGING_NAME
        if str(folder) not in volmount.rootfs.mount_points():
            raise DriverError(f"VM {record.get('vm_id')} was created without volume support: create it again")
        return folder

    async def _guest_script(
        self,
        record: Mapping[str, Any],
        script: str,
        args: list[str],
        *,
        name: str = "gateway-volume",
        vm_id: str | None = None,
    ) -> tuple[int, str]:
        """Run a shell script (``$0``: ``name``) as root in the guest (its agent): (exit code, its
        stderr)."""
        vm_id = vm_id or record.get("vm_id")
        body = {
            "argv": ["/bin/sh", "-c", script, name, *args],
            "env": {},
            "cwd": "/",
            "timeout_s": EXECUTE_MARGIN_S,
            "max_output_bytes": 4096,
        }
        try:
            status, reply = await self._agent_post(record, "/execute", body, 2 * EXECUTE_MARGIN_S)
        except AGENT_ERRORS as exc:
            said = exc or type(exc).__name__
            raise DriverError(f"VM {vm_id}'s agent failed: {said}") from None
        if status != 200 or not isinstance(reply, dict):
            raise DriverError(f"VM {vm_id}'s agent refused: {status} {reply}")
        said = base64.b64decode(reply.get("stderr", "")).decode(errors="replace").strip()
        code = reply.get("exit_code")
        return (code if isinstance(code, int) else -1), said

    # --- suspend ------------------------------------------------------------------------------------

    async def suspend(self, vm_id: str, handle: Mapping[str, Any], state_dir: Path) -> Mapping[str, Any]:
        """``VmSuspend``, snapshot-based: the VM's whole state goes to ``state_dir`` and the VM is destroyed,
        freeing its memory; its slot (held by the orchestrator) keeps its address for the resume."""
        await self.snapshot(vm_id, handle, state_dir)
        await self.destroy(vm_id, handle)
        return {"slot": handle.get("slot"), "suspended": True}

    async def resume(self, spec: VmSpec, handle: Mapping[str, Any], state_dir: Path) -> VmInfo:
        """``VmSuspend``: the VM started again from ``state_dir``, on its own slot; the state is dropped."""
        info = await self.create(dataclasses.replace(spec, restore_from=str(state_dir)))
        await _host.remove_tree(state_dir)
        return info

    # --- snapshots ------------------------------------------------------------------------------------

    async def snapshot(
        self, vm_id: str, handle: Mapping[str, Any], dest: Path, *, keep_running: bool = False
    ) -> dict[str, Any]:
        """Stop the VM and write its whole state to ``dest`` (a new folder); the VM stays paused, or with
        ``keep_running`` goes on.

        Returns the snapshot's metadata (what a restore needs). On failure nothing is left in ``dest``.
        """
        _, record = self._running_record(vm_id, handle)
        await asyncio.to_thread(dest.mkdir, parents=True)
        try:
            return await self._save_state(record, dest, resume=keep_running)
        except BaseException:
            await _host.remove_tree(dest)
            raise

    async def _save_state(self, record: Mapping[str, Any], dest: Path, *, resume: bool) -> dict[str, Any]:
        """The VM's migration stream, fw_cfg config and metadata into ``dest`` (an existing folder)."""
        vm_dir = Path(record["vm_dir"])
        meta = {
            "vm_id": record["vm_id"],
            "token": record["agent_token"],
            "vcpu_count": record["vcpu_count"],
            "memory_mb": record["memory_mb"],
            "accel": record.get("accel"),
            "image_id": record.get("image_id"),
            "image": record.get("image"),
            "disk_id": record.get("disk_id"),
            "guest_half": str(qemu_net.guest_half(self._qemu.cidr)),
            "created_at": time.time(),
        }
        state = dest / SNAPSHOT_STATE
        meta["size_bytes"] = await asyncio.to_thread(self._outgoing, record, state, resume)
        await asyncio.to_thread(shutil.copyfile, vm_dir / GUEST_CONFIG_FILE, dest / GUEST_CONFIG_FILE)
        (dest / GUEST_CONFIG_FILE).chmod(0o600)
        _host.write_json(dest / SNAPSHOT_META, meta)  # (0600 too)
        return meta

    @contextlib.contextmanager
    def _qmp(self, record: Mapping[str, Any]) -> Iterator[Qmp]:
        """A QMP session with the VM's QEMU, through a socket in a folder QEMU may write (see
        ``qemu_jail.open_socket``)."""
        vm_dir = Path(record["vm_dir"])
        owner = _host.as_int(record.get("qemu_ids"))
        if owner is None:  # a VM started before QEMU was confined: root's socket in the VM's folder
            path, owner = vm_dir / QMP_SOCKET, 0
        else:
            path = vm_dir / QMP_DIR / QMP_SOCKET
        pid, ticks = _host.as_int(record.get("init_pid")), _host.as_int(record.get("init_start_ticks"))

        def alive() -> bool:
            return pid is not None and _host.is_running(pid, ticks)

        with qemu_jail.open_socket(path, owner, alive=alive) as socket_path, Qmp(socket_path) as qmp:
            yield qmp

    def _outgoing(self, record: Mapping[str, Any], state: Path, resume: bool) -> int:
        # The gateway opens the state file and QEMU writes it through the descriptor: QEMU's uid needs
        # no access to the snapshot folders (nor could it open anything outside its jail).
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with self._qmp(record) as qmp:
                qmp.call("getfd", fds=[fd], fdname="snapshot")
                qmp.call("stop")
                # The default cap (32 MiB/s) is for live migration over a network; this is a local file.
                bandwidth: dict[str, Any] = {"max-bandwidth": 1 << 40}  # (not a Python name)
                qmp.call("migrate-set-parameters", **bandwidth)
                qmp.call("migrate", uri="fd:snapshot")
                self._await_migration(qmp)
                if resume:
                    qmp.call("cont")
        except QmpError as exc:
            raise DriverError(f"snapshot failed: {exc}") from None
        finally:
            os.close(fd)
        return state.stat().st_size

    def _incoming(self, record: Mapping[str, Any], state: Path) -> None:
        fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with self._qmp(record) as qmp:
                qmp.call("getfd", fds=[fd], fdname="snapshot")
                qmp.call("migrate-incoming", uri="fd:snapshot")
                self._await_migration(qmp)
                qmp.call("cont")
        except QmpError as exc:
            raise DriverError(f"restore failed: {exc}") from None
        finally:
            os.close(fd)

    def _await_migration(self, qmp: Qmp) -> None:
        deadline = time.monotonic() + self._boot_timeout_s
        while time.monotonic() < deadline:
            status = (qmp.call("query-migrate") or {}).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QmpError(f"migration {status}")
            time.sleep(MIGRATION_POLL_S)
        raise QmpError(f"migration did not finish within {self._boot_timeout_s} s")

    def _check_restorable(self, meta: Mapping[str, Any], spec: VmSpec, handle: Mapping[str, Any]) -> None:
        """A migration stream resumes only on the same machine shape, accelerator, guest network, boot
        image and image disk."""
        wanted = {
            "vcpu_count": spec.vcpu_count,
            "memory_mb": spec.memory_mb,
            "accel": self._accel,
            "guest_half": str(qemu_net.guest_half(self._qemu.cidr)),
            # The kernel and initramfs are part of the machine's memory map: another image's differ.
            "image_id": self.image_id,
            # The guest's memory holds the disk's blocks and the overlay's view of them: only that file.
            "image": handle.get("image"),
            "disk_id": handle.get("disk_id"),
        }
        different = [f"{k} {meta.get(k)} (now {v})" for k, v in wanted.items() if meta.get(k) != v]
        if different:
            raise DriverError(f"the snapshot cannot resume here: {', '.join(different)}")

    # --- acceleration ---------------------------------------------------------------------------------

    async def _choose_accel(self) -> str:
        if self._qemu.accel != "auto":
            return self._qemu.accel
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg"
        key = {
            "host_kernel": platform.release(),
            "qemu": await asyncio.to_thread(self._qemu_version),
            "image_id": self.image_id,
            # A verdict of an unconfined probe says nothing of a confined QEMU: probe again.
            "confined": qemu_jail.SANDBOX,
        }
        cache = self._image_dir / ACCEL_FILE
        known = _host.read_json(cache)
        if known.get("key") == key and known.get("accel") in ("kvm", "tcg"):
            return str(known["accel"])
        accel = "kvm" if await self._kvm_boots() else "tcg"
        with contextlib.suppress(OSError):
            _host.write_json(cache, {"key": key, "accel": accel, "probed_at": time.time()})
        return accel

    def _qemu_version(self) -> str:
        done = subprocess.run([self._qemu.qemu_binary, "--version"], capture_output=True, text=True)
        return done.stdout.splitlines()[0] if done.stdout else ""

    async def _kvm_boots(self) -> bool:
        """Boot the image under KVM with ``gw.probe`` (its init reports and powers off at once), confined
        as the VMs' QEMUs are: what it proves is that they can boot under KVM."""
        with tempfile.TemporaryDirectory(prefix=".probe-", dir=self._image_dir) as scratch:
            console = Path(scratch) / CONSOLE_FILE
            console.touch(mode=0o600)
            (Path(scratch) / JAIL_DIR).mkdir()
            probe = ["console=ttyS0", "quiet", "panic=-1", "rdinit=/init", "gw.probe"]
            launcher = self._launcher(qemu_jail.probe_ids(self._qemu.id_base), Path(scratch), "kvm")
            argv = [*launcher, *self._machine_argv("kvm", 1, PROBE_MEMORY_MB, probe)]
            try:
                # A guest that hangs under KVM (seen on nested hosts) ends with the timeout: TCG then.
                await _host.run_host(argv, check=False, timeout_s=PROBE_TIMEOUT_S)
            except DriverError:
                return False
            with contextlib.suppress(OSError):
                return "gateway-probe: booted" in console.read_text(errors="replace")
        return False


def read_snapshot_meta(folder: Path) -> dict[str, Any]:
    meta = _host.read_json(folder / SNAPSHOT_META)
    if not meta or not all((folder / name).is_file() for name in (SNAPSHOT_STATE, GUEST_CONFIG_FILE)):
        raise DriverError(f"no snapshot in {folder}")
    return meta
