"""Suspend and resume: a VM paused with its memory and brought back as it was (``VmSuspend`` drivers).

netns freezes the VM's cgroup (its memory stays in place); qemu saves the VM's whole state and stops it
(its memory is freed) and starts it again from that state. Either way the VM keeps its id, slot and
address, so its URLs stay the same. A suspended VM does not age: it is kept for ``max_suspended_s``; a
resume gives it a fresh lifetime. A VM made with ``auto_suspend`` is suspended instead of killed when its
lifetime ends; one made with ``auto_resume`` is resumed by the first request an edge holds for it
(``WakeRequested``), or by execute. A VM idle for its ``idle_timeout_s`` is suspended too (``idle``);
``suspend_reason`` says which of the three it was.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable
from pathlib import Path

from gateway.errors import Conflict, DriverError, GatewayError, Unsupported
from gateway.orchestrator.drivers.base import VmSpec, VmSuspend, cannot_suspend
from gateway.orchestrator.model import VM_ACTIVE, VM_FAILED, VM_SUSPENDED, VmRecord
from gateway.orchestrator.service import SUSPENDED_SUBDIR, Orchestrator
from gateway.state.events import Event, WakeRequested
from gateway.state.records import (
    ACTIVITY_RESUMED,
    SUSPENDED_AT_LIFETIME_END,
    SUSPENDED_BY_REQUEST,
    SUSPENDED_IDLE,
)

log = logging.getLogger(__name__)

# A resume holds its claim at most this long (a process that died mid-resume lets go).
RESUME_CLAIM_S = 300


class Lifecycle:
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator
        self.store = orchestrator.store
        self.config = orchestrator.config
        self.folder = self.config.data_path / SUSPENDED_SUBDIR
        self._waking: set[str] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        if self.available:
            orchestrator.resumer = self.resume
            orchestrator.expiry_hook = self.expire
            orchestrator.idle_hook = self.idle

    @property
    def driver(self) -> VmSuspend:
        driver = self.orchestrator.driver
        if not isinstance(driver, VmSuspend):
            raise Unsupported(cannot_suspend(driver.name))
        return driver

    @property
    def available(self) -> bool:
        return isinstance(self.orchestrator.driver, VmSuspend)

    def _state_dir(self, vm_id: str) -> Path:
        return self.folder / vm_id

    async def suspend(self, rec: VmRecord, reason: str = SUSPENDED_BY_REQUEST) -> VmRecord:
        """Pause an active VM (``reason``: one of SUSPENDED_*); Conflict for one that is not active."""
        driver = self.driver
        if rec.status != VM_ACTIVE:
            raise Conflict(
                f"VM {rec.vm_id} is {rec.status}: only an active VM can be suspended", code="vm_not_active"
            )
        if rec.volumes and rec.driver == "qemu":
            # QEMU cannot save a VM whose 9p share (its volumes) is attached: say so, not a 502.
            raise Conflict(
                f"VM {rec.vm_id} has volumes mounted: a qemu VM is suspended without them (unmount first)",
                code="vm_has_volumes",
            )
        state_dir = self._state_dir(rec.vm_id)
        await asyncio.to_thread(shutil.rmtree, state_dir, True)
        await asyncio.to_thread(self.folder.mkdir, parents=True, exist_ok=True)
        handle = dict(await driver.suspend(rec.vm_id, rec.handle, state_dir))
        now = time.time()
        keep_until = now + self.config.vms.max_suspended_s
        if not await self.store.transition_vm(
            rec, VM_ACTIVE, VM_SUSPENDED, keep_until, handle=handle, suspended_at=now, suspend_reason=reason
        ):
            # Killed meanwhile: what the suspend left is destroyed with it.
            await self.orchestrator.driver.destroy(rec.vm_id, handle)
        return await self._reload(rec)

    def _needs_resume(self, rec: VmRecord) -> bool:
        """True for a suspended VM, False for an active one (nothing to do); Unsupported where the driver
        cannot suspend, Conflict for any other state."""
        self.driver  # noqa: B018 - refuses (Unsupported) where the driver cannot
        if rec.status == VM_ACTIVE:
            return False
        if rec.status != VM_SUSPENDED:
            raise Conflict(
                f"VM {rec.vm_id} is {rec.status}: only a suspended VM can be resumed", code="vm_not_suspended"
            )
        return True

    async def resume(self, rec: VmRecord) -> VmRecord:
        """Bring a suspended VM back, with a fresh lifetime; an active one is returned as it is."""
        if not self._needs_resume(rec):
            return rec
        driver = self.driver
        if not await self.store.claim_resume(rec.vm_id, RESUME_CLAIM_S):
            return await self._until_resumed(rec)
        try:
            spec = VmSpec(
                vm_id=rec.vm_id, slot=rec.slot, vcpu_count=rec.vcpu_count, memory_mb=rec.memory_mb,
                metadata=rec.metadata, image=rec.image_variant or "",
            )  # fmt: skip
            try:
                info = await driver.resume(spec, rec.handle, self._state_dir(rec.vm_id))
            except DriverError as exc:
                await self.orchestrator.end(rec, VM_FAILED, f"resume failed: {exc.message}")
                raise
            now = time.time()
            expires = now + rec.vm_lifetime_seconds
            if not await self.store.transition_vm(
                rec, VM_SUSPENDED, VM_ACTIVE, expires, handle=dict(info.handle), ip=info.ip,
                suspended_at=None, suspend_reason=None,
            ):  # fmt: skip
                await self.orchestrator.driver.destroy(rec.vm_id, info.handle)  # killed while it resumed
            else:
                await self.store.mark_active({rec.vm_id: ACTIVITY_RESUMED}, now)  # its idle clock restarts
        finally:
            await asyncio.shield(self.store.release_resume(rec.vm_id))
        return await self._reload(rec)

    def resume_soon(self, rec: VmRecord) -> None:
        """Start a resume and return (``wait=false``); its outcome shows on the VM."""
        if self._needs_resume(rec):
            self._start(self.resume(rec), f"resume {rec.vm_id}")

    def _start(self, coro: Awaitable[object], name: str) -> None:
        task = asyncio.get_running_loop().create_task(_quietly(coro), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _until_resumed(self, rec: VmRecord) -> VmRecord:
        """Another process resumes it: wait for the outcome."""
        deadline = time.monotonic() + self.config.vms.wake_timeout_s
        while time.monotonic() < deadline:
            rec = await self._reload(rec)
            if rec.status != VM_SUSPENDED:
                return rec
            await asyncio.sleep(0.1)
        return rec

    async def _reload(self, rec: VmRecord) -> VmRecord:
        fresh = await self.store.get_vm(rec.vm_id)
        return fresh if fresh is not None else rec

    # at the end of a lifetime, and on an edge's request ---------------------------------------------

    async def expire(self, rec: VmRecord) -> bool:
        """A VM's lifetime ended: suspend it if it asked for that (True), else leave it to be killed."""
        if not (rec.auto_suspend and rec.status == VM_ACTIVE and self.available):
            return False
        return await self._try_suspend(rec, SUSPENDED_AT_LIFETIME_END, "at the end of its lifetime")

    async def idle(self, rec: VmRecord) -> bool:
        """A VM was idle for its idle_timeout_s: suspend it (True), or leave it to be killed (False: it
        could not be, e.g. a qemu VM with volumes)."""
        if rec.status != VM_ACTIVE:
            return False
        return await self._try_suspend(rec, SUSPENDED_IDLE, "when idle")

    async def _try_suspend(self, rec: VmRecord, reason: str, when: str) -> bool:
        """Suspend (True), or say why it could not be (False: the caller kills it instead)."""
        try:
            await self.suspend(rec, reason)
        except GatewayError as exc:
            log.warning("VM %s could not be suspended %s: %s", rec.vm_id, when, exc)
            return False
        return True

    # EventSubscriber: wake requests from the edges
    def connected(self) -> None:
        """(The events feed is up.)"""

    def disconnected(self) -> None:
        """(Requests missed meanwhile are asked again: an edge repeats while it holds one.)"""

    def handle(self, event: Event) -> None:
        if isinstance(event, WakeRequested) and event.vm_id not in self._waking:
            self._waking.add(event.vm_id)
            self._start(self._wake(event.vm_id), f"wake {event.vm_id}")

    async def _wake(self, vm_id: str) -> None:
        try:
            rec = await self.store.get_vm(vm_id)
            if rec is not None and rec.status == VM_SUSPENDED and rec.auto_resume:
                await self.resume(rec)
        except GatewayError as exc:
            log.warning("waking VM %s failed: %s", vm_id, exc)
        finally:
            self._waking.discard(vm_id)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _quietly(work: Awaitable[object]) -> None:
    """A background resume: its failure shows on the VM (failed), here only in the log."""
    try:
        await work
    except GatewayError as exc:
        log.warning("%s", exc)
