"""Use cases of the control plane: sessions, VMs, execute, kill, expire, recover after a restart.

Tenancy is enforced here: every call takes the caller's key id (``owner``), and a record owned by
another key is reported exactly like one that does not exist.

Order of effects when a VM ends: first the record (status, indexes, pub/sub event, so edges stop
routing to it at once), then the driver destroys it, then its slot is released. A slot is never
released while host resources of its VM may remain, so a slot's IP is never handed to a new VM early.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config
from gateway.errors import (
    CapacityExhausted,
    Conflict,
    DriverError,
    NotFound,
    Timeout,
    TooManyRequests,
    Unsupported,
    VmNotRunning,
)
from gateway.ids import new_session_id, new_vm_id
from gateway.images.store import HOST_FILES_DRIVERS, ROOTFS_DRIVERS, ImageStore, image_store
from gateway.orchestrator.domains import DomainRequest, DomainService
from gateway.orchestrator.drivers.base import (
    ExecResult,
    Mount,
    ResourceUsage,
    VmDriver,
    VmInfo,
    VmSpec,
    VmUsage,
    cannot_suspend,
)
from gateway.orchestrator.idle import idle_deadline
from gateway.orchestrator.snapshots import SNAPSHOTS_SUBDIR, SnapshotService
from gateway.orchestrator.vaults import VaultBinding, VaultService
from gateway.orchestrator.vm_volumes import VolumeMountRequest, attach_all, release
from gateway.orchestrator.volumes import VolumeService
from gateway.state.records import (
    ACTIVITY_API,
    ACTIVITY_KEEPALIVE,
    ACTIVITY_STARTED,
    VM_ACTIVE,
    VM_CREATING,
    VM_FAILED,
    VM_KILLED,
    VM_SUSPENDED,
    SessionRecord,
    SnapshotRecord,
    VmRecord,
    is_live,
)
from gateway.state.store import RedisStore

log = logging.getLogger(__name__)

# A VM still 'creating' this long after boot_timeout_s has no live booter anywhere: it failed.
STALE_BOOT_FACTOR = 2
ACTIVE_POLL_S = 0.05
# Where suspended VMs keep their state (drivers that save it: qemu), one folder per VM.
SUSPENDED_SUBDIR = "suspended"
# How often a booting image's port is tried until it accepts connections.
READY_POLL_S = 0.05
# A command's place in its VM's cap outlives its timeout by this much at most (a gateway that died
# holding it); a refused one is told to retry after this many seconds.
PLACE_EXPIRY_MARGIN_S = 60
EXECUTE_RETRY_AFTER_S = 1


def _matches(metadata: Mapping[str, Any], key: str, text: str) -> bool:
    """A filter's text matches a string value as is and any other value by its JSON form (1, true)."""
    if key not in metadata:
        return False
    value = metadata[key]
    return value == text if isinstance(value, str) else json.dumps(value) == text


def boot_failed(vm: VmRecord) -> DriverError:
    """The error for a VM that failed to boot (502 vm_failed), for create and execute alike."""
    return DriverError(f"VM {vm.vm_id} failed to start: {vm.error}", code="vm_failed")


@dataclass(frozen=True)
class VmParams:
    """What a caller may choose for a VM; None means 'the session's value or the default'."""

    vm_lifetime_seconds: int | None = None
    memory_mb: int | None = None
    vcpu_count: int | None = None
    metadata: Mapping[str, Any] | None = None
    env: Mapping[str, str] | None = None
    share: Mapping[str, Any] | None = None
    custom_domain: DomainRequest | None = None
    # An image's init program, and the port it serves: the VM is active once that port accepts.
    command: tuple[str, ...] = ()
    ready_port: int | None = None
    # Snapshot the VM when it is killed or expires; or resume a snapshot instead of booting.
    snapshot_on_terminate: bool = False
    snapshot_name: str | None = None
    restore: SnapshotRecord | None = None
    # The root file system image (image_variant; [images.definitions]): "" is the default one.
    image: str = ""
    auto_suspend: bool = False
    auto_resume: bool = False
    # Suspended (or killed) after this long with no client activity (gateway.orchestrator.idle); None
    # or 0: never.
    idle_timeout_s: int | None = None
    # Its own cap on requests in flight and tunnels (per edge process); None: the operator's.
    max_exchanges: int | None = None
    # What it may reach (the SDK's shape, checked); empty: the operator's default.
    egress_policy: Mapping[str, Any] | None = None
    # Placeholders for the credentials of the vaults asked for (VaultService.bind); each wins over an
    # env variable of the same name.
    vaults: VaultBinding | None = None
    # Volumes mounted before its init runs (checked: vm_volumes.checked).
    volumes: tuple[VolumeMountRequest, ...] = ()


@dataclass
class SessionUsage:
    """A session's usage (``GET /v1/sessions/usage/{id}``); None for what the driver cannot measure."""

    session: SessionRecord
    vms: list[VmRecord]
    vm_seconds: float = 0.0
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    requests: int = 0
    # Open now through the edges to its live VMs: requests in flight and tunnels, and the tunnels alone.
    open_exchanges: int = 0
    open_tunnels: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    egress_bytes_out: int = 0
    egress_bytes_in: int = 0


@dataclass
class Orchestrator:
    store: RedisStore
    driver: VmDriver
    config: Config
    domains: DomainService | None = None
    vaults: VaultService | None = None
    volumes: VolumeService | None = None
    _boots: dict[str, asyncio.Task[VmRecord]] = field(default_factory=dict)
    # Set by the lifecycle use cases (gateway.orchestrator.lifecycle), where the driver can suspend: what
    # brings a suspended auto_resume VM back for execute, and what may suspend an expiring VM instead.
    resumer: Callable[[VmRecord], Awaitable[VmRecord]] | None = None
    expiry_hook: Callable[[VmRecord], Awaitable[bool]] | None = None
    # And what suspends a VM idle for its idle_timeout_s (else the reaper kills it).
    idle_hook: Callable[[VmRecord], Awaitable[bool]] | None = None
    snapshots: SnapshotService = field(init=False)
    images: ImageStore = field(init=False)

    def __post_init__(self) -> None:
        self.snapshots = SnapshotService(self.store, self.driver, self.config.data_path / SNAPSHOTS_SUBDIR)
        self.images = image_store(self.config)

    async def start(self) -> None:
        await self.driver.start()
        await self.recover()

    async def close(self) -> None:
        """Stop boots in flight; their drivers clean up what they made, their records end as failed."""
        tasks = list(self._boots.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # sessions -------------------------------------------------------------------------------------

    async def create_session(self, owner: str, params: VmParams) -> SessionRecord:
        vms = self.config.vms
        session = SessionRecord(
            session_id=new_session_id(),
            owner=owner,
            created_at=time.time(),
            vm_lifetime_seconds=params.vm_lifetime_seconds or vms.default_lifetime_s,
            memory_mb=params.memory_mb or vms.default_memory_mb,
            vcpu_count=params.vcpu_count or vms.default_vcpu_count,
            metadata=dict(params.metadata or {}),
            env=dict(params.env or {}),
            env_status="none",
        )
        await self.store.put_session(session)
        if params.env:
            # The spec: a session created with env spawns its VM at once, with the env configured.
            vm = await self._create_vm(owner, session, VmParams(), wait=True)
            session.vm_id = vm.vm_id
            session.env_status, session.env_error = (
                ("configured", None) if vm.status == VM_ACTIVE else ("failed", vm.error)
            )
            await self.store.update_session(
                session.session_id, env_status=session.env_status, env_error=session.env_error
            )
        return session

    async def get_session(self, owner: str, session_id: str) -> SessionRecord | None:
        session = await self.store.get_session(session_id)
        return session if session is not None and session.owner == owner else None

    async def session_vm(self, session: SessionRecord) -> VmRecord | None:
        """The VM the session holds (live, or ended and still retained), if it has one yet."""
        return await self.store.get_vm(session.vm_id) if session.vm_id else None

    async def open_app_url(self, owner: str, session_id: str, port: int) -> VmRecord:
        """The session's VM, for its app URL on ``port``. The spec: asking for the app URL is what makes
        the port public (while the VM is active). NotFound for an unknown (or another key's) session,
        Conflict while it has no VM."""
        vm = await self.app_vm(owner, session_id)
        if vm.status == VM_ACTIVE:
            await self.store.expose_port(vm.vm_id, port)
        return vm

    async def app_vm(self, owner: str, session_id: str) -> VmRecord:
        """The session's VM, whose apps its app URLs reach. NotFound for an unknown (or another key's)
        session, Conflict while it has no VM."""
        session = await self.owned_session(owner, session_id)
        vm = await self.session_vm(session)
        if vm is None:
            raise Conflict(
                "session has no VM yet: create one with POST /v1/vms or run code with POST /execute",
                code="no_vm",
            )
        return vm

    async def session_usage(self, owner: str, session_id: str) -> SessionUsage:
        """What the session's VMs used: their running time, CPU and peak memory (from cgroups, where the
        driver has them), the bytes the edges carried for them, and the commands run."""
        session = await self.owned_session(owner, session_id)
        # Every VM the session has had, retained ones included.
        vms = [vm for vm in await self.list_vms(owner) if vm.session_id == session.session_id]
        now = time.time()
        usage = SessionUsage(session=session, vms=vms)
        for vm in vms:
            if vm.started_at is not None:
                usage.vm_seconds += max(0.0, (vm.ended_at or now) - vm.started_at)
            usage.requests += vm.requests
            usage.bytes_in += vm.bytes_in
            usage.bytes_out += vm.bytes_out
            usage.egress_bytes_out += vm.egress_bytes_out
            usage.egress_bytes_in += vm.egress_bytes_in
            used = await self.resource_usage(vm)
            if used is not None and used.cpu_seconds is not None:
                usage.cpu_seconds = (usage.cpu_seconds or 0.0) + used.cpu_seconds
            if used is not None and used.peak_memory_bytes is not None:
                usage.peak_memory_bytes = max(usage.peak_memory_bytes or 0, used.peak_memory_bytes)
        live = [vm.vm_id for vm in vms if is_live(vm)]
        for exchanges, tunnels in (await self.store.open_counts(live)).values():
            usage.open_exchanges += exchanges
            usage.open_tunnels += tunnels
        return usage

    async def kill_session(self, owner: str, session_id: str) -> VmRecord | None:
        """Kill the session's VM (``POST /kill``); the VM as it ended, or None when it had none live."""
        session = await self.owned_session(owner, session_id)
        vm = await self.session_vm(session)
        if vm is None or not is_live(vm):
            return None
        await self.end(vm, VM_KILLED, "killed by request")
        return await self._reload(vm)

    async def exposed_ports(self, vm_id: str) -> set[int]:
        """The VM's ports made public by the app-url call."""
        return await self.store.exposed_ports(vm_id)

    async def owned_session(self, owner: str, session_id: str) -> SessionRecord:
        session = await self.get_session(owner, session_id)
        if session is None:
            raise NotFound("Session not found", code="session_not_found")
        return session

    # VMs ------------------------------------------------------------------------------------------

    def image_problem(self, variant: str | None) -> str | None:
        """Why a VM of image ``variant`` cannot be created on this gateway (a 422's message), or None.

        Drivers that run VMs on images (netns, qemu) need it built (operators build what they offer: a VM
        create does not wait a minute for a build); the process driver runs on the host's files whatever
        the image.
        """
        name = self.images.resolve(variant)
        available = self.images.names()
        if name not in available:
            return f"unknown image variant {variant!r}; available: {', '.join(available) or 'none'}"
        driver = self.driver.name
        if driver in ROOTFS_DRIVERS:
            if not self.images.is_built(name):
                return f"image {name!r} is not built on this gateway: run `gateway image build {name}`"
        elif driver not in HOST_FILES_DRIVERS and name != self.images.default:
            return f"the {driver!r} VM driver runs on no images; image variants need the netns or qemu driver"
        return None

    def image_name(self, variant: str | None) -> str:
        """The image a VM of ``variant`` runs on (its record's image_variant); "" for drivers without."""
        driver = self.driver.name
        return self.images.resolve(variant) if driver in ROOTFS_DRIVERS | HOST_FILES_DRIVERS else ""

    async def create_vm(
        self, owner: str, session_id: str | None, params: VmParams, *, wait: bool
    ) -> tuple[SessionRecord, VmRecord]:
        session = None if session_id is None else await self.owned_session(owner, session_id)
        if session is not None and session.vm_id:
            current = await self.store.get_vm(session.vm_id)
            if current is not None and is_live(current):
                raise Conflict(
                    f"session already has a live VM ({current.vm_id}); kill it first",
                    code="session_has_vm",
                )
        vm_id = new_vm_id()
        # The domain first: a 409 must leave nothing behind (no session, no VM).
        domain = await self._claim_domain(owner, vm_id, params.custom_domain)
        try:
            if session is None:
                session = await self.create_session(
                    owner,
                    VmParams(
                        vm_lifetime_seconds=params.vm_lifetime_seconds,
                        memory_mb=params.memory_mb,
                        vcpu_count=params.vcpu_count,
                        metadata=params.metadata,
                    ),
                )
            vm = await self._create_vm(owner, session, params, wait=wait, vm_id=vm_id, domain=domain)
        except BaseException:
            if domain is not None:
                await asyncio.shield(self.store.release_domain(domain, owner, vm_id))
            raise
        return session, vm

    async def _claim_domain(self, owner: str, vm_id: str, request: DomainRequest | None) -> str | None:
        if request is None:
            return None
        if self.domains is None:
            raise Unsupported("custom domains are not available on this gateway (acme.directory_url)")
        return (await self.domains.claim(owner, vm_id, request)).domain

    async def _create_vm(
        self,
        owner: str,
        session: SessionRecord,
        params: VmParams,
        *,
        wait: bool,
        vm_id: str | None = None,
        domain: str | None = None,
    ) -> VmRecord:
        vm_id = vm_id or new_vm_id()
        slot = await self.store.claim_slot(self.driver.name, self.driver.capacity, vm_id)
        if slot is None:
            raise CapacityExhausted(f"no free VM slots ({self.driver.capacity} in use)")
        now = time.time()
        lifetime = params.vm_lifetime_seconds or session.vm_lifetime_seconds
        metadata = dict(session.metadata) | dict(params.metadata or {})
        rec = VmRecord(
            vm_id=vm_id,
            session_id=session.session_id,
            owner=owner,
            driver=self.driver.name,
            slot=slot,
            ip=self.driver.address(slot),
            status=VM_CREATING,
            created_at=now,
            vm_lifetime_seconds=lifetime,
            memory_mb=params.restore.memory_mb if params.restore else params.memory_mb or session.memory_mb,
            vcpu_count=params.restore.vcpu_count
            if params.restore
            else params.vcpu_count or session.vcpu_count,
            expires_at=now + lifetime,
            metadata=metadata,
            share=dict(params.share or {}),
            custom_domain=domain,
            snapshot_on_terminate=params.snapshot_on_terminate,
            snapshot_name=params.snapshot_name,
            restored_from=params.restore.snapshot_id if params.restore else None,
            image_variant=self.image_name(params.image) or None,
            auto_suspend=params.auto_suspend,
            auto_resume=params.auto_resume,
            idle_timeout_s=params.idle_timeout_s or None,
            max_exchanges=params.max_exchanges or None,
            egress_policy=dict(params.egress_policy or {}),
            vault_ids=list(params.vaults.vault_ids) if params.vaults else [],
            vault_placeholders=dict(params.vaults.placeholders) if params.vaults else {},
            vault_env=dict(params.vaults.env) if params.vaults else {},
            volumes=[request.entry() for request in params.volumes],
            # Until the driver reports its own handle, the slot is enough to find and destroy a half-made VM.
            handle={"slot": slot},
        )
        env = dict(session.env) | dict(params.env or {})
        if params.env:
            await self.store.update_session(session.session_id, env=env)
            session.env = env
        env = rec.command_env(env)  # (the placeholders are the VM's own, not the session's)
        mounts: tuple[Mount, ...] = ()
        try:
            if params.volumes:
                if self.volumes is None:
                    raise Unsupported("volumes are not available on this gateway")
                mounts = await attach_all(self.volumes, owner, vm_id, params.volumes)
            await self.store.add_vm(rec)
        except BaseException:
            await asyncio.shield(self._release(rec, slot_too=True))
            raise
        session.vm_id = vm_id
        restore_from = str(self.snapshots.path(params.restore)) if params.restore else ""
        boot = self._boot(rec, env, params.command, params.ready_port, restore_from, mounts)
        task = asyncio.create_task(boot, name=f"boot {vm_id}")
        self._boots[vm_id] = task
        task.add_done_callback(lambda _t: self._boots.pop(vm_id, None))
        if not wait:
            return rec
        # shield: a caller that goes away must not cancel the boot half-way.
        return await asyncio.shield(task)

    async def _boot(
        self,
        rec: VmRecord,
        env: Mapping[str, str],
        command: tuple[str, ...],
        ready_port: int | None,
        restore_from: str = "",
        mounts: tuple[Mount, ...] = (),
    ) -> VmRecord:
        spec = VmSpec(
            vm_id=rec.vm_id,
            slot=rec.slot,
            vcpu_count=rec.vcpu_count,
            memory_mb=rec.memory_mb,
            env=env,
            metadata=rec.metadata,
            command=command,
            restore_from=restore_from,
            image=rec.image_variant or "",
            mounts=mounts,
        )
        try:
            info = await asyncio.wait_for(self._start(spec, ready_port), self.config.vms.boot_timeout_s)
        except (DriverError, TimeoutError) as exc:
            reason = str(exc) or f"boot timed out after {self.config.vms.boot_timeout_s} s"
            log.warning("VM %s failed to boot: %s", rec.vm_id, reason)
            await self.store.end_vm(rec, VM_FAILED, reason)
            await self._release(rec, slot_too=True)
            return await self._reload(rec)
        except asyncio.CancelledError:
            await asyncio.shield(self._fail_cancelled(rec))
            raise
        started = time.time()
        handle = dict(info.handle)
        if not await self.store.activate_vm(rec.vm_id, ip=info.ip, handle=handle, started_at=started):
            # Killed while it booted: the killer could not destroy what did not exist yet.
            await self.driver.destroy(rec.vm_id, handle)
            await self._release(rec, slot_too=True)
        else:
            await self.store.mark_active({rec.vm_id: ACTIVITY_STARTED}, started)  # its idle clock starts
        return await self._reload(rec)

    async def _start(self, spec: VmSpec, ready_port: int | None) -> VmInfo:
        """Create the VM and, for an image that serves a port, wait until it accepts connections there."""
        info = await self.driver.create(spec)
        if ready_port is None:
            return info
        try:
            await self._wait_listening(info, ready_port)
        except BaseException:
            await asyncio.shield(self.driver.destroy(spec.vm_id, info.handle))
            raise
        return info

    async def _wait_listening(self, info: VmInfo, port: int) -> None:
        while True:
            try:
                _, writer = await asyncio.open_connection(info.ip, port)
            except OSError:
                pass
            else:
                writer.close()
                return
            now = await self.driver.inspect(info.vm_id, info.handle)
            if not now.running:
                said = f": {now.detail}" if now.detail else ""
                raise DriverError(f"the VM's program exited before port {port} accepted connections{said}")
            await asyncio.sleep(READY_POLL_S)

    async def _fail_cancelled(self, rec: VmRecord) -> None:
        await self.store.end_vm(rec, VM_FAILED, "boot cancelled (gateway stopping)")
        await self._release(rec, slot_too=True)

    async def _release(self, rec: VmRecord, *, slot_too: bool) -> None:
        """What a VM that is gone (or never came) held: its volumes' mounts, and its slot."""
        if rec.volumes and self.volumes is not None:
            await release(self.volumes, rec.vm_id, rec.volumes)
        if slot_too:
            await self.store.release_slot(rec.driver, rec.slot, rec.vm_id)

    async def _reload(self, rec: VmRecord) -> VmRecord:
        fresh = await self.store.get_vm(rec.vm_id)
        return fresh if fresh is not None else rec

    async def get_vm(self, owner: str, vm_id: str) -> VmRecord:
        rec = await self.store.get_vm(vm_id)
        if rec is None or rec.owner != owner:
            raise NotFound("VM not found", code="vm_not_found")
        return rec

    async def list_vms(self, owner: str, metadata: Mapping[str, str] | None = None) -> list[VmRecord]:
        """The owner's VMs (retained ones included), oldest first, whose metadata matches every filter."""
        ids = await self.store.owner_vm_ids(owner)
        records = await self.store.get_vms(ids)
        present = {r.vm_id for r in records}
        for gone in set(ids) - present:  # expired past retention
            await self.store.forget_owner_vm(owner, gone)
        wanted = dict(metadata or {})
        matching = [r for r in records if all(_matches(r.metadata, k, v) for k, v in wanted.items())]
        return sorted(matching, key=lambda r: r.created_at)

    async def update_vm_settings(self, owner: str, vm_id: str, **settings: bool | int) -> VmRecord:
        """Change ``auto_suspend`` / ``auto_resume`` / ``idle_timeout_s`` / ``max_exchanges`` (0: none) of
        a live VM. A new idle timeout counts from the VM's last activity, as the old one did; a new cap
        applies on every edge at once (its cached routes go)."""
        rec = await self.get_vm(owner, vm_id)
        if not is_live(rec):
            raise VmNotRunning(f"VM {vm_id} is {rec.status}")
        suspending = [settings.get(name) for name in ("auto_suspend", "auto_resume")]
        if any(suspending) and self.resumer is None:
            raise Unsupported(cannot_suspend(self.driver.name))
        for name in ("idle_timeout_s", "max_exchanges"):
            if name in settings:
                settings[name] = settings[name] or None  # type: ignore[assignment]
        await self.store.update_vm(vm_id, **settings)
        if "max_exchanges" in settings:
            await self.store.routes_changed(rec)
        fresh = await self._reload(rec)
        if "idle_timeout_s" in settings:
            await self.store.set_idle_deadline(vm_id, idle_deadline(fresh))
        return fresh

    async def keep_alive(self, owner: str, vm_id: str) -> VmRecord:
        """An explicit keep-alive: the VM's idle clock starts again now (an active VM only)."""
        rec = await self.get_vm(owner, vm_id)
        if rec.status != VM_ACTIVE:
            raise VmNotRunning(f"VM {vm_id} is {rec.status}: only a running VM is kept alive")
        await self.store.mark_active({vm_id: ACTIVITY_KEEPALIVE}, time.time())
        return await self._reload(rec)

    async def kill_vm(self, owner: str, vm_id: str) -> VmRecord:
        rec = await self.get_vm(owner, vm_id)
        await self.end(rec, VM_KILLED, "killed by request")
        return await self._reload(rec)

    async def end(self, rec: VmRecord, status: str, reason: str) -> None:
        """End a VM: record first (routes stop), then destroy, then free the slot. Idempotent.

        A VM created with ``snapshot_on_terminate`` is snapshotted between the two, by the call that
        ended it, when it is killed or expires (not when it failed).
        """
        ended = await self.store.end_vm(rec, status, reason)
        if rec.vm_id in self._boots:
            return  # the boot task sees the VM ended when it tries to activate it, and cleans up
        fresh = await self._reload(rec)
        if ended:
            await self._record_usage(fresh)
        wanted = fresh.snapshot_on_terminate and status == VM_KILLED and fresh.started_at is not None
        if ended and wanted and self.snapshots.available:
            await self.snapshots.take(fresh)
        try:
            await self.driver.destroy(fresh.vm_id, fresh.handle)
            # A VM ended while suspended leaves its saved state (qemu) behind: it goes too.
            await asyncio.to_thread(
                shutil.rmtree, self.config.data_path / SUSPENDED_SUBDIR / fresh.vm_id, True
            )
        except DriverError as exc:
            # Keep the slot held: recovery retries the destroy, and the IP is not reused meanwhile.
            log.error("destroying VM %s failed: %s", fresh.vm_id, exc)
            return
        await self._release(fresh, slot_too=True)

    async def _record_usage(self, rec: VmRecord) -> None:
        """Keep what the VM's cgroup used on its record, read before the driver removes the cgroup."""
        if rec.driver != self.driver.name or not isinstance(self.driver, VmUsage):
            return
        usage = await self.driver.usage(rec.vm_id, rec.handle)
        if usage.cpu_seconds is not None or usage.peak_memory_bytes is not None:
            await self.store.update_vm(
                rec.vm_id, cpu_seconds=usage.cpu_seconds, peak_memory_bytes=usage.peak_memory_bytes
            )
            rec.cpu_seconds, rec.peak_memory_bytes = usage.cpu_seconds, usage.peak_memory_bytes

    async def resource_usage(self, rec: VmRecord) -> ResourceUsage | None:
        """What a VM's cgroup has used: read live while it runs, kept on the record once it ended.
        None where the driver cannot tell (the process driver has no cgroups)."""
        if not is_live(rec):
            if rec.cpu_seconds is None and rec.peak_memory_bytes is None:
                return None
            return ResourceUsage(rec.cpu_seconds, rec.peak_memory_bytes)
        if rec.driver != self.driver.name or not isinstance(self.driver, VmUsage):
            return None
        return await self.driver.usage(rec.vm_id, rec.handle)

    async def wait_active(self, rec: VmRecord) -> VmRecord:
        """Wait for a creating VM to finish booting (in this process or another)."""
        task = self._boots.get(rec.vm_id)
        if task is not None:
            return await asyncio.shield(task)
        deadline = time.monotonic() + self.config.vms.boot_timeout_s
        while rec.status == VM_CREATING and time.monotonic() < deadline:
            await asyncio.sleep(ACTIVE_POLL_S)
            rec = await self._reload(rec)
        return rec

    # execute --------------------------------------------------------------------------------------

    async def running_vm(self, owner: str, session_id: str | None) -> tuple[SessionRecord, VmRecord]:
        """The session's active VM, booted first if it has none live (a new session if none is given):
        what running code and moving files need."""
        if session_id is None:
            session = await self.create_session(owner, VmParams())
        else:
            session = await self.owned_session(owner, session_id)
        vm = await self.store.get_vm(session.vm_id) if session.vm_id else None
        if vm is None or not is_live(vm):
            vm = await self._create_vm(owner, session, VmParams(), wait=True)
        if vm.status == VM_CREATING:
            vm = await self.wait_active(vm)
        if vm.status == VM_SUSPENDED and vm.auto_resume and self.resumer is not None:
            vm = await self.resumer(vm)
        if vm.status == VM_FAILED:
            raise boot_failed(vm)  # the same answer as a create whose VM failed to boot
        if vm.status != VM_ACTIVE:
            raise VmNotRunning(f"VM {vm.vm_id} is {vm.status}: {vm.error or 'not running'}")
        # A command, a file or a terminal for the VM: client activity the edges do not see.
        await self.store.mark_active({vm.vm_id: ACTIVITY_API}, time.time())
        return session, vm

    def _too_many_executions(self, vm: VmRecord) -> TooManyRequests:
        cap = self.config.execute.max_concurrent_per_vm
        return TooManyRequests(
            f"VM {vm.vm_id} already runs {cap} commands (execute.max_concurrent_per_vm)",
            code="too_many_executions",
            retry_after=EXECUTE_RETRY_AFTER_S,
        )

    async def check_execution_room(self, owner: str, session_id: str) -> None:
        """TooManyRequests now when the session's VM runs as many commands as it may (a background
        execution is refused at once, not failed later)."""
        session = await self.owned_session(owner, session_id)
        vm = await self.session_vm(session)
        if vm is not None and vm.status == VM_ACTIVE:
            if await self.store.execution_places_taken(vm.vm_id) >= self.config.execute.max_concurrent_per_vm:
                raise self._too_many_executions(vm)

    async def execute(
        self, owner: str, session_id: str | None, argv: Sequence[str], timeout_s: float | None
    ) -> tuple[SessionRecord, VmRecord, ExecResult]:
        session, vm = await self.running_vm(owner, session_id)
        limit = self.config.execute
        timeout = min(timeout_s or limit.default_timeout_s, limit.max_timeout_s)
        remaining = (vm.expires_at or 0) - time.time()
        if remaining <= 0:
            raise Timeout("the VM reached the end of its lifetime", code="vm_expired")
        run_for = min(timeout, remaining)
        if not await self.store.take_execution_place(
            vm.vm_id, limit.max_concurrent_per_vm, int(run_for) + PLACE_EXPIRY_MARGIN_S
        ):
            raise self._too_many_executions(vm)
        try:
            await self.store.count_execution(session.session_id)
            result = await self.driver.execute(
                vm.vm_id,
                vm.handle,
                argv,
                env=vm.command_env(session.env),
                timeout_s=run_for,
                max_output_bytes=limit.max_output_bytes,
            )
        finally:
            await asyncio.shield(self.store.release_execution_place(vm.vm_id))
        # Its end is activity too: a command longer than the idle timeout leaves the VM a full one.
        await self.store.mark_active({vm.vm_id: ACTIVITY_API}, time.time())
        after = await self._reload(vm)
        if after.status != VM_ACTIVE:
            raise VmNotRunning(f"VM {vm.vm_id} ended while the command ran: {after.error or after.status}")
        # result.cpu_s is the driver's measure of the command itself: the VM's cgroup would count every
        # other command and server in the VM too.
        return session, vm, result

    # restart recovery -----------------------------------------------------------------------------

    async def recover(self) -> None:
        """Reconcile Redis with the host after a restart or crash."""
        now = time.time()
        stale_boot_s = self.config.vms.boot_timeout_s * STALE_BOOT_FACTOR
        for vm_id in await self.store.live_vm_ids():
            rec = await self.store.get_vm(vm_id)
            if rec is None or rec.driver != self.driver.name:
                continue
            if rec.status == VM_CREATING and vm_id not in self._boots and now - rec.created_at > stale_boot_s:
                await self.end(rec, VM_FAILED, "boot did not finish (gateway restarted)")
            elif rec.status == VM_ACTIVE:
                info = await self.driver.inspect(vm_id, rec.handle)
                if not info.running:
                    await self.end(rec, VM_KILLED, "VM stopped unexpectedly")
        live = set(await self.store.live_vm_ids())
        for slot, vm_id in (await self.store.held_slots(self.driver.name)).items():
            if vm_id in live:
                continue
            rec = await self.store.get_vm(vm_id)
            await self.end(rec, VM_KILLED, "cleanup") if rec else await self.store.release_slot(
                self.driver.name, slot, vm_id
            )
        held = set((await self.store.held_slots(self.driver.name)).keys())
        removed = await self.driver.sweep(held)
        if removed:
            log.warning("removed %d orphaned VM(s) left on the host", removed)
