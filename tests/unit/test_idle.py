"""Idleness decisions (gateway.orchestrator.idle): when a VM is idle, and what the reaper does with a VM
it finds in the idle queue."""

from __future__ import annotations

import pytest

from gateway.orchestrator.idle import ACT, DROP, IdleCheck, idle_check, idle_deadline, idle_reason
from gateway.state.records import VmRecord

NOW = 10_000.0


def vm(
    status: str = "active",
    idle_timeout_s: int | None = 60,
    last_activity_at: float | None = None,
    started_at: float | None = NOW - 1000,
    source: str | None = None,
) -> VmRecord:
    return VmRecord(
        vm_id="v", session_id="s", owner="o", driver="process", slot=0, ip="127.0.0.2", status=status,
        created_at=NOW - 1001, vm_lifetime_seconds=3600, memory_mb=512, vcpu_count=1,
        started_at=started_at, idle_timeout_s=idle_timeout_s, last_activity_at=last_activity_at,
        last_activity_source=source,
    )  # fmt: skip


CASES = [
    # (what, record, commands running, decision)
    ("gone", None, False, DROP),
    ("killed", vm(status="killed", last_activity_at=NOW - 500), False, DROP),
    ("suspended (already acted on)", vm(status="suspended", last_activity_at=NOW - 500), False, DROP),
    ("still creating", vm(status="creating", started_at=None), False, DROP),
    ("no idle timeout (removed since)", vm(idle_timeout_s=None, last_activity_at=NOW - 500), False, DROP),
    ("idle past its timeout", vm(last_activity_at=NOW - 61), False, ACT),
    ("idle exactly its timeout", vm(last_activity_at=NOW - 60), False, ACT),
    ("active since it was queued", vm(last_activity_at=NOW - 10), False, IdleCheck(wait_until=NOW + 50)),
    ("no activity yet: from its start", vm(started_at=NOW - 30), False, IdleCheck(wait_until=NOW + 30)),
    ("no activity since its start", vm(started_at=NOW - 90), False, ACT),
    ("a command runs in it", vm(last_activity_at=NOW - 500), True, IdleCheck(wait_until=NOW + 60)),
    ("a longer timeout set since", vm(idle_timeout_s=600, last_activity_at=NOW - 500), False,
     IdleCheck(wait_until=NOW + 100)),
]  # fmt: skip


@pytest.mark.parametrize(("what", "rec", "running", "expected"), CASES, ids=[c[0] for c in CASES])
def test_idle_check(what: str, rec: VmRecord | None, running: bool, expected: IdleCheck) -> None:
    assert idle_check(rec, NOW, running) == expected


def test_the_deadline_counts_from_the_last_activity_else_the_start() -> None:
    assert idle_deadline(vm(last_activity_at=NOW - 5)) == NOW + 55
    assert idle_deadline(vm(started_at=NOW - 5)) == NOW + 55
    assert idle_deadline(vm(idle_timeout_s=0)) is None


def test_the_reason_names_the_timeout_and_the_last_activity() -> None:
    assert idle_reason(vm(source="http")) == "idle: no client activity for 60 s (idle_timeout_s; last: http)"
