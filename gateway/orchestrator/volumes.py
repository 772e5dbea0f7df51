"""Volumes: an API key's persistent storage, outliving VMs (issue 21), with files and checkpoints.

Records live in Redis (``state/volume_store.py``); bytes in a ``VolumeStore`` (``gateway.volumes``).
Tenancy as elsewhere: another key's volume answers exactly like a missing one. The files calls work
without a VM: the volume is attached for the length of the request under a holder of its own
(``api:<random>``), so a volume being written through the API is "attached" and cannot be deleted.

For VMs (wired by the VM use cases): ``attach_for_vm`` checks the key owns the volume (and checkpoint) and
attaches it for a holder (the VM id); ``detach`` lets go. Holders are the store's: they survive restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import Conflict, NotFound
from gateway.state.records import VolumeCheckpointRecord, VolumeRecord
from gateway.state.volume_store import RedisVolumeStore
from gateway.volumes import tree
from gateway.volumes.local import LocalVolumeStore
from gateway.volumes.paths import PathProblem, components, prefix_start
from gateway.volumes.store import VolumeStore

log = logging.getLogger(__name__)

VOLUME_PREFIX, CHECKPOINT_PREFIX = "vol-", "ckpt-"
ID_RANDOM_BYTES = 10
_VOLUME_ID = re.compile(r"vol-[0-9a-f]{20}\Z")
_CHECKPOINT_ID = re.compile(r"ckpt-[0-9a-f]{20}\Z")
MIN_QUOTA_BYTES = 16 << 20  # below this an ext4 journal leaves next to nothing
MAX_QUOTA_BYTES = 1 << 40
MAX_VOLUMES_PER_OWNER = 100
MAX_CHECKPOINTS_PER_VOLUME = 64
MAX_LIST_LIMIT = 10_000
API_HOLDER_PREFIX = "api:"
VOLUMES_SUBDIR = "volumes"


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(ID_RANDOM_BYTES)


def volume_path(path: str, *, allow_root: bool = False) -> tuple[str, ...]:
    try:
        return components(path, allow_root=allow_root)
    except PathProblem as exc:
        raise tree.InvalidPath(str(exc)) from None


@dataclass
class VolumeView:
    """A volume as the API shows it: its record and who has it attached now."""

    record: VolumeRecord
    holders: set[str]


@dataclass
class VolumeDownload:
    path: str
    size: int
    fd: int
    release: contextlib.AsyncExitStack

    async def chunks(self) -> AsyncIterator[bytes]:
        offset = 0
        while offset < self.size:
            chunk = await asyncio.to_thread(
                os.pread, self.fd, min(tree.READ_BYTES, self.size - offset), offset
            )
            if not chunk:
                return
            offset += len(chunk)
            yield chunk

    async def close(self) -> None:
        os.close(self.fd)
        await self.release.aclose()


class VolumeService:
    def __init__(
        self, records: RedisVolumeStore, store: VolumeStore, *, root_owner: tuple[int, int] = (0, 0)
    ) -> None:
        self.records = records
        self.store = store
        self.root_owner = root_owner
        self._started = False
        self._start_lock = asyncio.Lock()

    async def ready(self) -> VolumeStore:
        """The store, started once (on first use, or at the gateway's start where volumes exist)."""
        if not self._started:
            async with self._start_lock:
                if not self._started:
                    await self.store.start()
                    self._started = True
        return self.store

    # volumes ----------------------------------------------------------------------------------------

    async def create(self, owner: str, name: str, quota_bytes: int) -> VolumeRecord:
        if await self.records.count_owner_volumes(owner) >= MAX_VOLUMES_PER_OWNER:
            raise Conflict(f"at most {MAX_VOLUMES_PER_OWNER} volumes per API key", code="limit_reached")
        store = await self.ready()
        now = time.time()
        rec = VolumeRecord(_new_id(VOLUME_PREFIX), owner, name, quota_bytes, now, now)
        await store.create(rec.volume_id, quota_bytes)
        try:
            await self._measure(rec)
            await self.records.put_volume(rec)
        except BaseException:
            await store.delete(rec.volume_id)
            raise
        return rec

    async def get(self, owner: str, volume_id: str, refresh_usage: bool = False) -> VolumeRecord:
        rec = await self.records.get_volume(volume_id) if _VOLUME_ID.match(volume_id) else None
        if rec is None or rec.owner != owner:
            raise NotFound("volume not found", code="volume_not_found")
        if refresh_usage:
            await self._measure(rec)
            await self._save_usage(rec)
        return rec

    async def view(self, rec: VolumeRecord) -> VolumeView:
        return VolumeView(rec, await (await self.ready()).holders(rec.volume_id))

    async def list_owned(self, owner: str, refresh_usage: bool = False) -> list[VolumeRecord]:
        found = await self.records.get_volumes(await self.records.owner_volume_ids(owner))
        owned = sorted((v for v in found if v.owner == owner), key=lambda v: v.created_at)
        if refresh_usage:
            for rec in owned:
                await self._measure(rec)
                await self._save_usage(rec)
        return owned

    async def update(
        self, owner: str, volume_id: str, name: str | None, quota_bytes: int | None
    ) -> VolumeRecord:
        rec = await self.get(owner, volume_id)
        values = {"updated_at": repr(time.time())}
        if quota_bytes is not None and quota_bytes != rec.quota_bytes:
            await (await self.ready()).set_quota(rec.volume_id, quota_bytes)
            rec.quota_bytes = quota_bytes
            values["quota_bytes"] = str(quota_bytes)
            await self._measure(rec)
            values.update(self._usage_fields(rec))
        if name is not None:
            values["name"] = name
        await self.records.update_volume(rec.volume_id, values)
        return await self.get(owner, volume_id)

    async def delete(self, owner: str, volume_id: str) -> None:
        """The volume and its checkpoints; 409 (VolumeBusy) while anyone has it attached."""
        rec = await self.get(owner, volume_id)
        await (await self.ready()).delete(rec.volume_id)
        await self.records.delete_volume(rec)

    async def _measure(self, rec: VolumeRecord) -> None:
        store = await self.ready()
        rec.used_bytes = await store.usage_bytes(rec.volume_id)
        rec.capacity_bytes = await store.capacity_bytes(rec.volume_id)
        rec.usage_updated_at = time.time()

    @staticmethod
    def _usage_fields(rec: VolumeRecord) -> dict[str, str]:
        return {
            "used_bytes": str(rec.used_bytes),
            "capacity_bytes": str(rec.capacity_bytes),
            "usage_updated_at": repr(rec.usage_updated_at),
        }

    async def _save_usage(self, rec: VolumeRecord) -> None:
        await self.records.update_volume(rec.volume_id, self._usage_fields(rec))

    # checkpoints ------------------------------------------------------------------------------------

    async def create_checkpoint(self, owner: str, volume_id: str, name: str | None) -> VolumeCheckpointRecord:
        rec = await self.get(owner, volume_id)
        if len(await self.records.checkpoints(rec.volume_id)) >= MAX_CHECKPOINTS_PER_VOLUME:
            raise Conflict(
                f"at most {MAX_CHECKPOINTS_PER_VOLUME} checkpoints per volume", code="limit_reached"
            )
        store = await self.ready()
        ck = VolumeCheckpointRecord(
            _new_id(CHECKPOINT_PREFIX), rec.volume_id, time.time(), rec.quota_bytes, name
        )
        await store.checkpoint(rec.volume_id, ck.checkpoint_id)
        ck.used_bytes = await store.usage_bytes(rec.volume_id)
        await self.records.put_checkpoint(ck)
        if await self.records.get_volume(rec.volume_id) is None:  # deleted meanwhile
            await self.records.delete_checkpoint(rec.volume_id, ck.checkpoint_id)
            raise NotFound("volume not found", code="volume_not_found")
        return ck

    async def checkpoints(self, owner: str, volume_id: str) -> list[VolumeCheckpointRecord]:
        rec = await self.get(owner, volume_id)
        return sorted(await self.records.checkpoints(rec.volume_id), key=lambda c: c.created_at)

    async def get_checkpoint(self, owner: str, volume_id: str, checkpoint_id: str) -> VolumeCheckpointRecord:
        for ck in await self.checkpoints(owner, volume_id):
            if ck.checkpoint_id == checkpoint_id:
                return ck
        raise NotFound("checkpoint not found", code="checkpoint_not_found")

    async def delete_checkpoint(self, owner: str, volume_id: str, checkpoint_id: str) -> None:
        ck = await self.get_checkpoint(owner, volume_id, checkpoint_id)
        await (await self.ready()).delete_checkpoint(ck.volume_id, ck.checkpoint_id)
        await self.records.delete_checkpoint(ck.volume_id, ck.checkpoint_id)

    # VMs --------------------------------------------------------------------------------------------

    async def attach_for_vm(
        self, owner: str, volume_id: str, checkpoint_id: str | None, *, read_only: bool, holder: str
    ) -> Path:
        """The host directory to mount into a VM, after checking the key owns the volume (and the
        checkpoint): NotFound otherwise, like for a missing one."""
        rec = await self.get(owner, volume_id)
        if checkpoint_id is not None:
            await self.get_checkpoint(owner, volume_id, checkpoint_id)
        return await (await self.ready()).attach(
            rec.volume_id, checkpoint_id, read_only=read_only, holder=holder
        )

    async def detach(self, volume_id: str, holder: str) -> None:
        await (await self.ready()).detach(volume_id, holder)

    async def held(self) -> dict[str, set[str]]:
        """Who holds which volume on this host (nothing when the store never started: none exists)."""
        return await self.store.held() if self._started else {}

    # files (no VM) ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _attached(self, rec: VolumeRecord) -> AsyncIterator[Path]:
        store = await self.ready()
        holder = API_HOLDER_PREFIX + secrets.token_hex(8)
        root = await store.attach(rec.volume_id, None, read_only=False, holder=holder)
        try:
            yield root
        finally:
            await store.detach(rec.volume_id, holder)

    async def _after_write(self, rec: VolumeRecord, root: Path) -> None:
        st = await asyncio.to_thread(os.statvfs, root)
        rec.used_bytes = (st.f_blocks - st.f_bfree) * st.f_frsize
        rec.capacity_bytes = st.f_blocks * st.f_frsize
        rec.usage_updated_at = time.time()
        await self._save_usage(rec)

    async def list_files(
        self, owner: str, volume_id: str, prefix: str, *, recursive: bool, limit: int
    ) -> list[tree.Entry]:
        rec = await self.get(owner, volume_id)
        try:
            start, name_prefix = prefix_start(prefix)
        except PathProblem as exc:
            raise tree.InvalidPath(str(exc)) from None
        async with self._attached(rec) as root:
            return await asyncio.to_thread(
                tree.list_tree, root, start, name_prefix, recursive=recursive, limit=limit
            )

    async def upload(
        self, owner: str, volume_id: str, path: str, chunks: AsyncIterator[bytes], *, overwrite: bool
    ) -> tuple[str, int]:
        """Stream ``chunks`` into the volume at ``path``: (the path as stored, its size)."""
        parts = volume_path(path)
        rec = await self.get(owner, volume_id)
        async with self._attached(rec) as root:
            writer = await asyncio.to_thread(tree.Writer, root, parts, self.root_owner)
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(writer.write, chunk)
                await asyncio.to_thread(writer.commit, overwrite=overwrite)
            finally:
                await asyncio.to_thread(writer.close)
            await self._after_write(rec, root)
        return "/".join(parts), writer.size

    async def download(self, owner: str, volume_id: str, path: str) -> VolumeDownload:
        """An open file of the volume (the volume stays attached until ``close``)."""
        parts = volume_path(path)
        rec = await self.get(owner, volume_id)
        stack = contextlib.AsyncExitStack()
        try:
            root = await stack.enter_async_context(self._attached(rec))
            fd, size = await asyncio.to_thread(tree.open_file, root, parts)
        except BaseException:
            await stack.aclose()
            raise
        return VolumeDownload("/".join(parts), size, fd, stack)

    async def delete_file(self, owner: str, volume_id: str, path: str) -> str:
        parts = volume_path(path)
        rec = await self.get(owner, volume_id)
        async with self._attached(rec) as root:
            await asyncio.to_thread(tree.delete, root, parts)
            await self._after_write(rec, root)
        return "/".join(parts)


def volume_service(records: RedisVolumeStore, data_path: Path) -> VolumeService | None:
    """Volumes on this host's disk, where it can make them (root: loop devices and mounts; mkfs.xfs and
    mkfs.ext4 installed); None otherwise (the API then explains that volumes are not available)."""
    if os.geteuid() != 0 or not all(
        shutil.which(t) for t in ("mkfs.xfs", "mkfs.ext4", "losetup", "fsfreeze")
    ):
        return None
    return VolumeService(records, LocalVolumeStore(data_path / VOLUMES_SUBDIR))


async def start_if_present(service: VolumeService | None, data_path: Path) -> None:
    """At the gateway's start: reconcile the store if a previous run made one (mounts held by VMs are
    found again; what nobody holds is released). A gateway that never used volumes mounts nothing."""
    if service is not None and (data_path / VOLUMES_SUBDIR / "pool.img").exists():
        await service.ready()
