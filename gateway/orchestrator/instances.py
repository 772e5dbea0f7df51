"""Browser instances: VMs of a catalog image, owned by an organisation (the Instances API's use cases).

An instance is a VM underneath: the orchestrator creates, times out, reaps and destroys it like any
other. This module adds what the Instances API needs around it: the image and size catalog, the
organisation as owner (``org:<uuid>``, never an API key id, so the sandbox API never shows these VMs), an
instance record that the edge routes ``instance-<uuid>.<domain>`` by, and the status the API shows.

Tenancy: an instance of another organisation is reported exactly like one that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from dataclasses import dataclass

from gateway.config import Config, ImageConfig, SizeConfig
from gateway.errors import GatewayError, NotFound
from gateway.ids import is_session_id
from gateway.orchestrator.service import Orchestrator, VmParams
from gateway.state.records import VM_ACTIVE, VM_CREATING, VM_KILLED, InstanceRecord, VmRecord, org_owner

log = logging.getLogger(__name__)

# The statuses the Instances API shows.
RUNNING = "running"
STOPPED = "stopped"  # the VM exists but its browser is not serving (still starting, or it exited)
TERMINATED = "terminated"  # the VM ended (lifetime reached, failed, stopped by the operator)

PYTHON_PLACEHOLDER = "{python}"


class InstanceFailed(GatewayError):
    status, code, message = 503, "instance_failed", "the instance failed to start"


@dataclass(frozen=True)
class InstanceView:
    record: InstanceRecord
    status: str


class InstanceService:
    def __init__(self, orchestrator: Orchestrator, config: Config) -> None:
        self.orchestrator = orchestrator
        self.store = orchestrator.store
        self.catalog = config.instances
        self.config = config

    # catalog --------------------------------------------------------------------------------------

    def image_problem(self, name: str) -> str | None:
        """Why ``name`` cannot be created here (unknown, or not runnable by this driver), or None."""
        image = self.catalog.images.get(name)
        driver = self.orchestrator.driver.name
        runnable = sorted(n for n, i in self.catalog.images.items() if driver in i.drivers)
        if image is None:
            return f"unknown image {name!r}; available: {', '.join(runnable) or 'none'}"
        if driver not in image.drivers:
            reason = image.unavailable or f"it does not run on the {driver!r} VM driver"
            return f"image {name!r} cannot run on this gateway: {reason}; available: {', '.join(runnable)}"
        rootfs_problem = self.orchestrator.image_problem(image.rootfs)
        if rootfs_problem:
            return f"image {name!r} cannot run on this gateway yet: its root file system {rootfs_problem}"
        return None

    def size_problem(self, name: str) -> str | None:
        if name in self.catalog.sizes:
            return None
        return f"unknown size {name!r}; available: {', '.join(self.catalog.sizes) or 'none'}"

    # use cases ------------------------------------------------------------------------------------

    async def create(self, org: str, image_name: str, size_name: str) -> InstanceView:
        """Start an instance and return once its browser accepts connections (image and size checked)."""
        image: ImageConfig = self.catalog.images[image_name]
        size: SizeConfig = self.catalog.sizes[size_name]
        # "{python}": the Python inside the VM where the driver says (netns: the image's), else this one.
        python = getattr(self.orchestrator.driver, "guest_python", None) or sys.executable
        command = tuple(part.replace(PYTHON_PLACEHOLDER, python) for part in image.command)
        params = VmParams(
            vm_lifetime_seconds=self.catalog.default_lifetime_s,
            memory_mb=size.memory_mb,
            vcpu_count=size.vcpu_count,
            metadata={"instance_image": image_name, "instance_size": size_name},
            command=command,
            ready_port=image.port,
            image=image.rootfs,
        )
        _, vm = await self.orchestrator.create_vm(org_owner(org), None, params, wait=False)
        rec = InstanceRecord(
            instance_uuid=str(uuid.uuid4()),
            org=org,
            vm_id=vm.vm_id,
            image=image_name,
            size=size_name,
            port=image.port,
            created_at=vm.created_at,
        )
        try:
            await self.store.put_instance(rec)
        except BaseException:
            await asyncio.shield(self.orchestrator.end(vm, VM_KILLED, "instance could not be recorded"))
            raise
        vm = await self.orchestrator.wait_active(vm)
        if vm.status != VM_ACTIVE:
            # Nothing half-made stays: the VM already ended (the orchestrator cleaned it up).
            await self.store.delete_instance(org, rec.instance_uuid)
            raise InstanceFailed(f"the instance failed to start: {vm.error or vm.status}")
        return InstanceView(rec, RUNNING)

    async def list(self, org: str) -> list[InstanceView]:
        """The organisation's instances, oldest first, with their current status."""
        ids = await self.store.org_instance_ids(org)
        records = await self.store.get_instances(ids)
        vms = {vm.vm_id: vm for vm in await self.store.get_vms([r.vm_id for r in records])}
        views = []
        for rec in records:
            vm = vms.get(rec.vm_id)
            if vm is None:  # its VM's record passed retention: the instance is long gone
                await self.store.delete_instance(org, rec.instance_uuid)
                continue
            views.append(InstanceView(rec, await self._status(vm)))
        return sorted(views, key=lambda v: v.record.created_at)

    async def get(self, org: str, instance_uuid: str) -> InstanceView:
        rec = await self._owned(org, instance_uuid)
        vm = await self.store.get_vm(rec.vm_id)
        if vm is None:
            await self.store.delete_instance(org, instance_uuid)
            raise _not_found()
        return InstanceView(rec, await self._status(vm))

    async def destroy(self, org: str, instance_uuid: str) -> None:
        """End the instance's VM and forget the instance (its data goes with the VM's folder)."""
        rec = await self._owned(org, instance_uuid)
        if not await self.store.delete_instance(org, instance_uuid):
            raise _not_found()  # a concurrent destroy got there first
        vm = await self.store.get_vm(rec.vm_id)
        if vm is not None:
            await self.orchestrator.end(vm, VM_KILLED, "instance destroyed")

    async def _owned(self, org: str, instance_uuid: str) -> InstanceRecord:
        rec = await self.store.get_instance(instance_uuid) if is_session_id(instance_uuid) else None
        if rec is None or rec.org != org:
            raise _not_found()
        return rec

    async def _status(self, vm: VmRecord) -> str:
        if vm.status == VM_CREATING:
            return STOPPED
        if vm.status != VM_ACTIVE or (vm.expires_at is not None and vm.expires_at <= time.time()):
            return TERMINATED
        driver = self.orchestrator.driver
        if vm.driver != driver.name:
            return RUNNING  # another driver's VM: its record is all this process can know
        return RUNNING if (await driver.inspect(vm.vm_id, vm.handle)).running else STOPPED


def _not_found() -> NotFound:
    return NotFound("Instance not found", code="instance_not_found")
