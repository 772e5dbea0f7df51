"""Records and ids: unguessable ids, lossless round trips through Redis hashes."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from gateway.ids import is_session_id, is_vm_id, new_session_id, new_vm_id
from gateway.orchestrator.service import _matches
from gateway.state.keyspace import Keys
from gateway.state.records import (
    EXECUTION_COMPLETED,
    EXECUTION_FAILED,
    EXECUTION_PENDING,
    EXECUTION_RUNNING,
    ExecutionRecord,
    SessionRecord,
    VmRecord,
)


def test_ids_are_random_and_well_formed() -> None:
    vm_ids = {new_vm_id() for _ in range(1000)}
    assert len(vm_ids) == 1000 and all(is_vm_id(v) for v in vm_ids)
    assert all(len(v) - len("vmid-") >= 16 for v in vm_ids)  # >= 64 random bits in hex
    sid = new_session_id()
    assert uuid.UUID(sid).version == 4 and is_session_id(sid)


def test_id_grammar_rejects_lookalikes() -> None:
    assert not is_vm_id("vmid-abc-15")
    assert not is_vm_id("vmid-" + "G" * 20)
    assert not is_session_id(str(uuid.uuid4()).upper())
    assert not is_session_id(str(uuid.uuid1()))


@given(
    metadata=st.dictionaries(
        st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5), st.booleans())
    ),
    share=st.dictionaries(st.text(max_size=5), st.integers()),
    error=st.one_of(st.none(), st.text(min_size=1, max_size=20)),
)
def test_vm_record_round_trips(metadata: dict, share: dict, error: str | None) -> None:
    rec = VmRecord(
        vm_id=new_vm_id(),
        session_id=new_session_id(),
        owner="key_1",
        driver="netns",
        slot=7,
        ip="172.30.0.30",
        status="active",
        created_at=1.5,
        vm_lifetime_seconds=300,
        memory_mb=512,
        vcpu_count=2,
        started_at=2.25,
        expires_at=301.5,
        ended_at=None,
        error=error,
        metadata=metadata,
        share=share,
        handle={"slot": 7, "ns": "gw-7"},
    )
    assert VmRecord.from_hash(rec.to_hash()) == rec


def test_session_record_round_trips() -> None:
    rec = SessionRecord(
        session_id=new_session_id(),
        owner="k",
        created_at=3.0,
        vm_lifetime_seconds=20,
        memory_mb=128,
        vcpu_count=1,
        metadata={"a": [1]},
        env={"X": "1"},
    )
    assert SessionRecord.from_hash(rec.to_hash()) == rec


def test_keys_share_one_prefix() -> None:
    keys = Keys("tenant1:")
    names = [
        keys.vm("v"),
        keys.session("s"),
        keys.api_key("h"),
        keys.vm_expiry(),
        keys.events(),
        keys.slots("netns"),
        keys.owner_vms("o"),
        keys.vm_ports("v"),
        keys.live_vms(),
    ]
    assert all(n.startswith("tenant1:") for n in names) and len(set(names)) == len(names)


def test_metadata_filter_matches_text_and_typed_values() -> None:
    meta = {"team": "red", "n": 2, "on": True}
    assert _matches(meta, "team", "red") and _matches(meta, "n", "2") and _matches(meta, "on", "true")
    assert not _matches(meta, "team", "blue") and not _matches(meta, "missing", "x")
    assert not _matches({"n": "2"}, "n", '"2"')


@given(
    status=st.sampled_from([EXECUTION_PENDING, EXECUTION_RUNNING, EXECUTION_COMPLETED, EXECUTION_FAILED]),
    output=st.text(max_size=50),
    exit_code=st.one_of(st.none(), st.integers(-255, 255)),
    times=st.one_of(st.none(), st.floats(0, 1e6, allow_nan=False)),
    error=st.one_of(st.none(), st.text(min_size=1, max_size=20)),
)
def test_execution_record_round_trips(
    status: str, output: str, exit_code: int | None, times: float | None, error: str | None
) -> None:
    """What a command printed comes back as it was (empty, newlines, any text), and an unknown number
    (exit code of a timed-out command, CPU a driver cannot measure) stays unknown, not 0."""
    rec = ExecutionRecord(
        execution_id="exec-" + "0" * 24,
        owner="key_1",
        session_id=new_session_id(),
        status=status,
        created_at=1.5,
        language="bash",
        runner="ab" * 8,
        vm_id=new_vm_id(),
        started_at=times,
        completed_at=times,
        stdout=output,
        stderr=output[::-1],
        exit_code=exit_code,
        timed_out=exit_code is None,
        truncated=True,
        execution_time=times,
        cpu_time=times,
        error=error,
    )
    assert ExecutionRecord.from_hash(rec.to_hash()) == rec
