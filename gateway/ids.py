"""Identifier grammar shared by every plane: VM, session and snapshot ids (pure).

The edge checks ids from URLs, the API from request bodies, the state store makes them; one module
spells them so that the three can never disagree, and none of them has to import another for it.
"""

from __future__ import annotations

import secrets
import uuid

VM_ID_PREFIX = "vmid-"
# 80 random bits: VM ids appear in public host names, so they must not be guessable.
VM_ID_RANDOM_BYTES = 10


def new_vm_id() -> str:
    return VM_ID_PREFIX + secrets.token_hex(VM_ID_RANDOM_BYTES)


def new_session_id() -> str:
    return str(uuid.uuid4())


def is_session_id(value: str) -> bool:
    """Session ids are canonical lowercase UUID4 text; anything else cannot exist."""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return False
    return str(parsed) == value and parsed.version == 4


def is_uuid(value: str) -> bool:
    """Canonical lowercase UUID text of any version (organisation ids come from operators)."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def is_vm_id(value: str) -> bool:
    rest = value[len(VM_ID_PREFIX) :]
    return (
        value.startswith(VM_ID_PREFIX)
        and len(rest) == 2 * VM_ID_RANDOM_BYTES
        and all(c in "0123456789abcdef" for c in rest)
    )


SNAPSHOT_ID_PREFIX = "snap-"
SNAPSHOT_ID_RANDOM_BYTES = 10


def new_snapshot_id() -> str:
    return SNAPSHOT_ID_PREFIX + secrets.token_hex(SNAPSHOT_ID_RANDOM_BYTES)
