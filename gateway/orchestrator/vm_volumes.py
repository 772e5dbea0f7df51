"""Volumes in VMs: mounted at create (``volumes`` on POST /v1/vms) and into a running VM (the SDK's
``mount_volume`` / ``list_volumes`` / ``unmount_volume``), released when the VM goes.

Each mount is its own holder of the volume in the store (``<vm id>:<mount path>``), so one mount can go
while the VM keeps others, and a volume with any holder cannot be deleted (409). The VM record keeps its
mounts (``VmRecord.volumes``): whoever ends the VM, on any gateway, releases them; a gateway that
starts releases holders whose VM is no longer live (one that died between a VM's end and the release).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.errors import Conflict, GatewayError, NotFound, Unsupported, VmNotRunning
from gateway.orchestrator.drivers.base import Mount, VmMounts
from gateway.orchestrator.drivers.mount_paths import check_mount_path
from gateway.orchestrator.volumes import VolumeService
from gateway.state.records import VM_ACTIVE, is_live

if TYPE_CHECKING:
    from gateway.orchestrator.service import Orchestrator
    from gateway.state.store import RedisStore

log = logging.getLogger(__name__)

MAX_MOUNTS_PER_VM = 16


@dataclass(frozen=True)
class VolumeMountRequest:
    volume_id: str
    mount_path: str
    read_only: bool = False
    checkpoint_id: str | None = None

    def entry(self) -> dict[str, Any]:
        """As the VM record keeps it and the API shows it (the SDK's fields)."""
        return {
            "volume_id": self.volume_id,
            "mount_path": self.mount_path,
            "mode": "ro" if self.read_only else "rw",
            "checkpoint_id": self.checkpoint_id,
        }


def holder_of(vm_id: str, mount_path: str) -> str:
    return f"{vm_id}:{mount_path}"


def vm_of_holder(holder: str) -> str | None:
    """The VM a holder is a mount of (None: another kind of holder, e.g. the files API's)."""
    vm_id, colon, _ = holder.partition(":")
    return vm_id if colon and vm_id.startswith("vmid-") else None


def checked(requests: Sequence[VolumeMountRequest]) -> list[VolumeMountRequest]:
    """The mount paths normalised and checked; ValueError (position, why) otherwise."""
    if len(requests) > MAX_MOUNTS_PER_VM:
        raise ValueError(f"at most {MAX_MOUNTS_PER_VM} volumes per VM")
    seen: set[str] = set()
    for request in requests:
        path = check_mount_path(request.mount_path)
        if path in seen:
            raise ValueError(f"two volumes at {path}")
        seen.add(path)
    return list(requests)


async def attach_all(
    volumes: VolumeService, owner: str, vm_id: str, requests: Sequence[VolumeMountRequest]
) -> tuple[Mount, ...]:
    """Attach every volume asked for (NotFound for one the key does not own); on any failure the ones
    already attached are released again."""
    mounts: list[Mount] = []
    try:
        for request in requests:
            host_dir = await volumes.attach_for_vm(
                owner,
                request.volume_id,
                request.checkpoint_id,
                read_only=request.read_only,
                holder=holder_of(vm_id, request.mount_path),
            )
            mounts.append(Mount(host_dir, request.mount_path, request.read_only))
    except BaseException:
        await release(volumes, vm_id, [r.entry() for r in requests])
        raise
    return tuple(mounts)


async def release(volumes: VolumeService, vm_id: str, entries: Sequence[dict[str, Any]]) -> None:
    """Let go of a VM's mounts in the store (after the VM has gone, or a mount failed)."""
    for entry in entries:
        try:
            await volumes.detach(str(entry["volume_id"]), holder_of(vm_id, str(entry["mount_path"])))
        except GatewayError as exc:
            log.warning("releasing volume %s of %s failed: %s", entry.get("volume_id"), vm_id, exc)


class VmVolumes:
    """Live mounts into running VMs, and the release of what dead VMs held."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    @property
    def available(self) -> bool:
        return self.orchestrator.volumes is not None and isinstance(self.orchestrator.driver, VmMounts)

    def _parts(self) -> tuple[VolumeService, VmMounts]:
        volumes, driver = self.orchestrator.volumes, self.orchestrator.driver
        if volumes is None or not isinstance(driver, VmMounts):
            raise Unsupported(f"volumes cannot be mounted into {driver.name!r} VMs on this gateway")
        return volumes, driver

    async def list(self, owner: str, vm_id: str) -> list[dict[str, Any]]:
        return list((await self.orchestrator.get_vm(owner, vm_id)).volumes)

    async def mount(self, owner: str, vm_id: str, request: VolumeMountRequest) -> dict[str, Any]:
        volumes, driver = self._parts()
        vm = await self.orchestrator.get_vm(owner, vm_id)
        if vm.status != VM_ACTIVE:
            raise VmNotRunning(f"VM {vm_id} is {vm.status}: volumes are mounted into running VMs")
        if any(e["mount_path"] == request.mount_path for e in vm.volumes):
            raise Conflict(f"a volume is mounted at {request.mount_path} already", code="mount_path_taken")
        if len(vm.volumes) >= MAX_MOUNTS_PER_VM:
            raise Conflict(f"a VM has at most {MAX_MOUNTS_PER_VM} volumes", code="too_many_volumes")
        (mount,) = await attach_all(volumes, owner, vm_id, [request])
        try:
            await driver.mount(vm_id, vm.handle, mount.host_dir, mount.mount_path, read_only=mount.read_only)
        except BaseException:
            await release(volumes, vm_id, [request.entry()])
            raise
        entries = [*vm.volumes, request.entry()]
        await self.orchestrator.store.update_vm(vm_id, volumes=entries)
        return request.entry()

    async def unmount(self, owner: str, vm_id: str, volume_id: str, mount_path: str) -> None:
        volumes, driver = self._parts()
        vm = await self.orchestrator.get_vm(owner, vm_id)
        entries = [e for e in vm.volumes if e["volume_id"] == volume_id and e["mount_path"] == mount_path]
        if not entries:
            raise NotFound(f"volume {volume_id} is not mounted at {mount_path}", code="mount_not_found")
        if is_live(vm) and vm.status == VM_ACTIVE:
            await driver.unmount(vm_id, vm.handle, mount_path)
        await release(volumes, vm_id, entries)
        rest = [e for e in vm.volumes if e not in entries]
        await self.orchestrator.store.update_vm(vm_id, volumes=rest)


async def sweep_holders(volumes: VolumeService | None, store: RedisStore) -> None:
    """Release holders whose VM is no longer live (a gateway died between a VM's end and the release)."""
    if volumes is None:
        return
    for volume_id, holders in (await volumes.held()).items():
        for holder in holders:
            vm_id = vm_of_holder(holder)
            if vm_id is None:
                continue
            vm = await store.get_vm(vm_id)
            if vm is None or not is_live(vm):
                log.info("releasing volume %s of VM %s, which is gone", volume_id, vm_id)
                await volumes.detach(volume_id, holder)
