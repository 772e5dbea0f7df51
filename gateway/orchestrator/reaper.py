"""Lifetimes: kill every VM at its expiry, in whichever gateway process gets there first; and idleness:
suspend (where the driver can, else kill) every VM idle for its ``idle_timeout_s``.

Expiries live in a Redis sorted set, so a restarted gateway reaps what expired while it was down.
Ending a VM is a compare-and-set in Redis (``RedisStore.end_vm``), so when several processes reap at
once exactly one marks it killed; destroying twice is harmless (drivers' destroy is idempotent).
Idle deadlines live in another sorted set that activity moves (``RedisStore.mark_active``); what the
reaper finds there is checked against the record (``gateway.orchestrator.idle``) before it acts, and
a suspend is a compare-and-set too (``transition_vm``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.background import stop_loop
from gateway.errors import GatewayError
from gateway.orchestrator.idle import idle_check, idle_reason
from gateway.orchestrator.service import Orchestrator
from gateway.state.records import VM_KILLED, VM_SUSPENDED, is_live

log = logging.getLogger(__name__)

BATCH = 100


class Reaper:
    def __init__(self, orchestrator: Orchestrator, interval_s: float) -> None:
        self.orchestrator = orchestrator
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def reap_due(self, now: float | None = None) -> int:
        """Kill every VM whose expiry has passed; returns how many this call ended."""
        store = self.orchestrator.store
        now = time.time() if now is None else now
        ended = 0
        for vm_id in await store.due_vm_ids(now, BATCH):
            rec = await store.get_vm(vm_id)
            if rec is None or not is_live(rec):
                await store.drop_expiry(vm_id)
                continue
            hook = self.orchestrator.expiry_hook
            if hook is not None and await hook(rec):
                continue  # suspended instead (auto_suspend): kept for a resume
            reason = "kept suspended for too long" if rec.status == VM_SUSPENDED else "lifetime expired"
            await self.orchestrator.end(rec, VM_KILLED, reason)
            ended += 1
        return ended

    async def reap_idle(self, now: float | None = None) -> int:
        """Suspend (or kill) every VM idle for its idle_timeout_s; returns how many this call acted on."""
        store = self.orchestrator.store
        now = time.time() if now is None else now
        acted = 0
        for vm_id in await store.idle_due_ids(now, BATCH):
            rec = await store.get_vm(vm_id)
            running = rec is not None and await store.execution_places_taken(vm_id) > 0
            check = idle_check(rec, now, running)
            if not check.act:
                await store.set_idle_deadline(vm_id, check.wait_until)
                continue
            assert rec is not None
            if not await store.claim_idle(vm_id):
                continue  # another gateway process took it first
            reason = idle_reason(rec)
            hook = self.orchestrator.idle_hook
            if hook is not None and await hook(rec):
                log.info("VM %s suspended: %s", vm_id, reason)
            else:
                log.info("VM %s killed: %s", vm_id, reason)
                await self.orchestrator.end(rec, VM_KILLED, reason)
            acted += 1
        return acted

    async def _next_at(self) -> float | None:
        """The earliest expiry or idle deadline queued."""
        store = self.orchestrator.store
        times = [t for t in (await store.next_expiry(), await store.next_idle_deadline()) if t is not None]
        return min(times) if times else None

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.reap_due()
                await self.reap_idle()
                next_at = await self._next_at()
            except GatewayError as exc:
                # redis-py may turn a cancellation mid-read into a connection error: stopping decides.
                if self._stopping:
                    return
                log.warning("reaper: %s", exc)
                next_at = None
            except Exception:
                if self._stopping:
                    return
                # A supervisor loop: one bad VM record must not stop every other VM's expiry.
                log.exception("reaper iteration failed")
                next_at = None
            delay = self.interval_s if next_at is None else min(self.interval_s, next_at - time.time())
            await asyncio.sleep(max(delay, 0.0))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reaper")

    async def stop(self) -> None:
        self._stopping = True
        await stop_loop(self._task)
        self._task = None
