"""The records the orchestrator's use cases take and return, as the control plane sees them.

The API imports them from here, never from ``gateway.state``: the orchestrator is the API's only way to
the state, so if the stored shapes change, this is the one seam to adapt. They are the state's own pure
dataclasses (``gateway.state.records``), re-exported rather than copied: a second set of classes would
be converted field by field on every call for no gain while the shapes agree.
"""

from __future__ import annotations

from gateway.state.records import (
    DOMAIN_ISSUED,
    EXECUTION_COMPLETED,
    EXECUTION_FAILED,
    EXECUTION_PENDING,
    EXECUTION_RUNNING,
    HOST_LOCALHOST,
    HOST_PRESERVE,
    VM_ACTIVE,
    VM_CREATING,
    VM_FAILED,
    VM_KILLED,
    VM_SUSPENDED,
    DomainRecord,
    ExecutionRecord,
    InstanceRecord,
    SessionRecord,
    ShareRecord,
    SnapshotRecord,
    VaultCredentialRecord,
    VaultRecord,
    VaultServiceRecord,
    VmRecord,
    VolumeCheckpointRecord,
    VolumeRecord,
    is_live,
)

__all__ = [
    "DOMAIN_ISSUED",
    "EXECUTION_COMPLETED",
    "EXECUTION_FAILED",
    "EXECUTION_PENDING",
    "EXECUTION_RUNNING",
    "HOST_LOCALHOST",
    "HOST_PRESERVE",
    "VM_ACTIVE",
    "VM_CREATING",
    "VM_FAILED",
    "VM_KILLED",
    "VM_SUSPENDED",
    "DomainRecord",
    "ExecutionRecord",
    "InstanceRecord",
    "SessionRecord",
    "ShareRecord",
    "SnapshotRecord",
    "VaultCredentialRecord",
    "VaultRecord",
    "VaultServiceRecord",
    "VmRecord",
    "VolumeCheckpointRecord",
    "VolumeRecord",
    "is_live",
]
