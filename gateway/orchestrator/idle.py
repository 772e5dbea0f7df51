"""Idleness (pure): when a VM with an ``idle_timeout_s`` counts as idle, and what the reaper does about it.

A VM's idle clock starts when it becomes active (started, resumed) and is reset by its client activity
(``last_activity_at``: what edges flush with their traffic, keep-alive calls, commands and files through
the API). The reaper keeps a queue of idle deadlines (``Keys.vm_idle``) that may be stale in either
direction (a newer activity, a changed timeout), so it asks ``idle_check`` about each VM it finds due.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.state.records import VM_ACTIVE, VmRecord


@dataclass(frozen=True)
class IdleCheck:
    """What to do with a VM found in the idle queue: ``act`` (suspend or kill it now); else wait until
    ``wait_until``, or drop it from the queue when that is None."""

    act: bool = False
    wait_until: float | None = None


DROP = IdleCheck()
ACT = IdleCheck(act=True)


def idle_since(rec: VmRecord) -> float:
    """When the VM's idle clock started: its last activity, else when it started or was created."""
    return rec.last_activity_at or rec.started_at or rec.created_at


def idle_deadline(rec: VmRecord) -> float | None:
    """When the VM is idle for its timeout; None for a VM that is not active or has no timeout."""
    if rec.status != VM_ACTIVE or not rec.idle_timeout_s:
        return None
    return idle_since(rec) + rec.idle_timeout_s


def idle_check(rec: VmRecord | None, now: float, commands_running: bool) -> IdleCheck:
    """The reaper's decision for a VM in the idle queue. A command running in it keeps it up: it is
    looked at again one timeout from now (a command is activity the edges cannot see)."""
    deadline = idle_deadline(rec) if rec is not None else None
    if rec is None or deadline is None:
        return DROP
    if deadline > now:
        return IdleCheck(wait_until=deadline)
    if commands_running:
        return IdleCheck(wait_until=now + (rec.idle_timeout_s or 0))
    return ACT


def idle_reason(rec: VmRecord) -> str:
    """Why an idle VM was ended (its ``error``), and what the log says."""
    since = rec.last_activity_source or "start"
    return f"idle: no client activity for {rec.idle_timeout_s} s (idle_timeout_s; last: {since})"
