"""VM snapshots: taken when a VM that asked for one terminates, resumed by a new VM, listed, deleted.

A snapshot is a folder on the host that made it (``<data_dir>/snapshots/<id>``: the driver's state
file and metadata) plus a record in Redis that says who owns it. Only drivers with ``snapshots`` make
them (the qemu driver); asking another driver is refused at the API with a 422.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import DriverError, NotFound, Unsupported, VmNotRunning
from gateway.ids import new_snapshot_id
from gateway.orchestrator.drivers.base import VmDriver, VmSnapshots
from gateway.state.records import SnapshotRecord, VmRecord
from gateway.state.store import RedisStore

log = logging.getLogger(__name__)

SNAPSHOTS_SUBDIR = "snapshots"


@dataclass
class SnapshotService:
    store: RedisStore
    driver: VmDriver
    folder: Path

    @property
    def available(self) -> bool:
        return isinstance(self.driver, VmSnapshots)

    async def take(self, rec: VmRecord) -> SnapshotRecord | None:
        """Snapshot a VM that is ending (already out of the routes, not yet destroyed).

        A failure is recorded on the VM (``snapshot_error``) and logged; the VM is destroyed anyway.
        """
        try:
            return await self._take(rec, rec.snapshot_name, keep_running=False)
        except (DriverError, VmNotRunning) as exc:  # (a VM that died has no state left to save)
            log.error("snapshot of VM %s failed: %s", rec.vm_id, exc)
            await self.store.update_vm(rec.vm_id, snapshot_error=str(exc))
            return None

    async def take_live(self, rec: VmRecord, name: str | None) -> SnapshotRecord:
        """Snapshot a running VM, which goes on running (``POST /v1/vms/{id}/snapshot``, clones)."""
        if not isinstance(self.driver, VmSnapshots):
            raise Unsupported(f"the {self.driver.name!r} VM driver cannot snapshot VMs (qemu can)")
        return await self._take(rec, name, keep_running=True)

    async def _take(self, rec: VmRecord, name: str | None, *, keep_running: bool) -> SnapshotRecord:
        snapshot_id = new_snapshot_id()
        dest = self.folder / snapshot_id
        assert isinstance(self.driver, VmSnapshots)
        meta = await self.driver.snapshot(rec.vm_id, rec.handle, dest, keep_running=keep_running)
        snap = SnapshotRecord(
            snapshot_id=snapshot_id,
            owner=rec.owner,
            vm_id=rec.vm_id,
            driver=self.driver.name,
            created_at=time.time(),
            vcpu_count=int(meta["vcpu_count"]),
            memory_mb=int(meta["memory_mb"]),
            size_bytes=int(meta.get("size_bytes") or 0),
            name=name,
            image_variant=rec.image_variant,
        )
        try:
            await self.store.put_snapshot(snap)
            if not keep_running:
                await self.store.update_vm(rec.vm_id, snapshot_id=snapshot_id)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, dest, True)
            raise
        log.info("snapshot %s of VM %s: %d bytes", snapshot_id, rec.vm_id, snap.size_bytes)
        return snap

    async def get(self, owner: str, snapshot_id: str) -> SnapshotRecord:
        """The owner's snapshot; another owner's is reported exactly like a missing one."""
        snap = await self.store.get_snapshot(snapshot_id)
        if snap is None or snap.owner != owner:
            raise NotFound("Snapshot not found", code="snapshot_not_found")
        return snap

    async def list(self, owner: str) -> list[SnapshotRecord]:
        return await self.store.owner_snapshots(owner)

    async def delete(self, owner: str, snapshot_id: str) -> None:
        snap = await self.get(owner, snapshot_id)
        if await self.store.delete_snapshot(snap):
            await asyncio.to_thread(shutil.rmtree, self.path(snap), True)

    def path(self, snap: SnapshotRecord) -> Path:
        """The snapshot's folder, derived from its id (never from a path stored in Redis)."""
        return self.folder / snap.snapshot_id
