"""The ``VolumeStore`` contract: where volumes' bytes live and how a host directory with them is made.

A volume is a file system of a fixed size (its quota), so a writer past the quota gets ``ENOSPC`` from
the kernel and nothing else is touched. A checkpoint is a frozen copy of it. ``attach`` hands out a host
directory with a volume's (or a checkpoint's) files for a *holder* (a VM id, or anything the caller names),
reference-counted: the directory stays until every holder of it detached. Drivers mount that directory
into VMs; the API's files calls attach it for the length of a request.

Contract for every implementation:
- Ids (volume, checkpoint) are the caller's, matching ``paths.is_safe_id``; holders are any string.
- Every method is idempotent where it can be: create of an existing volume, delete of a missing one,
  attach by a holder that has that view already (same path), detach of a holder that has nothing.
- Methods may be called concurrently; per volume they are serialised.
- What was attached stays attached when the process stops or dies (VMs keep running); ``start`` finds it
  again (and drops what nobody holds), so a restarted gateway neither loses writes nor leaks devices.
- Cancellation: a cancelled call leaves the volume consistent (a half-made clone or image is removed
  when the next call for the volume runs, or at ``start``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from gateway.errors import Conflict, GatewayError, NotFound


class VolumeMissing(NotFound):
    code, message = "volume_not_found", "volume not found"


class CheckpointMissing(NotFound):
    code, message = "checkpoint_not_found", "checkpoint not found"


class VolumeBusy(Conflict):
    """The volume (or checkpoint) is attached and the operation needs it not to be."""

    code, message = "volume_attached", "the volume is attached"


class QuotaTooSmall(Conflict):
    code, message = "quota_below_usage", "the volume holds more than that quota"


class InsufficientStorage(GatewayError):
    """A write past a volume's quota (ENOSPC from its file system). 413, not 507: the official SDK takes
    any 5xx for a network failure and sends the whole upload again, which would fail the same way."""

    status, code, message = 413, "quota_exceeded", "the volume is full (its quota is reached)"


class VolumeStoreFailed(GatewayError):
    """A host command the store needs failed (mount, mkfs...): the message names it."""

    status, code, message = 500, "volume_store_failed", "volume storage failed"


@runtime_checkable
class VolumeStore(Protocol):
    async def start(self) -> None:
        """Make or find the store's own storage; reconcile what a previous process left (mounts that
        are still held are kept and reused, devices and mounts nobody holds are released)."""

    async def create(self, volume_id: str, quota_bytes: int) -> None:
        """An empty volume of ``quota_bytes``; the files its root holds belong to the store's
        ``root_owner``."""

    async def delete(self, volume_id: str) -> None:
        """The volume and its checkpoints. VolumeBusy while anyone holds it (or one of its
        checkpoints)."""

    async def usage_bytes(self, volume_id: str) -> int:
        """Bytes the volume's files use now (mounting it briefly when nobody holds it)."""

    async def capacity_bytes(self, volume_id: str) -> int:
        """Bytes its files may use in all (the quota less the file system's own overhead)."""

    async def set_quota(self, volume_id: str, quota_bytes: int) -> None:
        """Grow (also while attached) or shrink (only while nobody holds it, and never below what its
        files use: QuotaTooSmall)."""

    async def checkpoint(self, volume_id: str, checkpoint_id: str) -> None:
        """A point-in-time copy of the volume, consistent even while VMs write to it (the file system
        is frozen for the moment of the copy)."""

    async def delete_checkpoint(self, volume_id: str, checkpoint_id: str) -> None:
        """VolumeBusy while a holder has the checkpoint itself attached (read-only); copies made from it
        for read-write holders are theirs and stay."""

    async def attach(
        self, volume_id: str, checkpoint_id: str | None, *, read_only: bool, holder: str
    ) -> Path:
        """A host directory with the volume's files (its filesystem mounted; reference-counted per
        holder, e.g. a VM id). checkpoint_id: that checkpoint's content — read_only: the checkpoint
        itself, mounted ro; else a private copy-on-write clone for this holder, dropped at its detach (the
        volume is unchanged). Without checkpoint_id: the volume itself, shared by all its holders;
        read_only gives a read-only bind of it. A holder may hold several views; detach drops them all."""
        ...

    async def detach(self, volume_id: str, holder: str) -> None:
        """Drop every view ``holder`` has of the volume; what nobody holds any more is flushed and
        unmounted (a holder's private clone is deleted)."""

    async def holders(self, volume_id: str) -> set[str]:
        """Who has it attached (any view); delete is refused while this is not empty."""
        ...

    async def held(self) -> dict[str, set[str]]:
        """Every volume that has holders, with them (what a starting gateway checks against live VMs)."""
        ...
