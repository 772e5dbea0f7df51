"""What changes in the shared state, as typed events (pure): the one vocabulary of the events channel.

Every process hears every event (one Redis pub/sub channel per deployment, ``Keys.events``). Events only
say *what* changed, never the new value: a receiver drops its cached copy and reads Redis again, so a lost
or reordered event costs freshness (bounded by each cache's TTL or resync), never correctness.

On the wire an event is a flat JSON object with a ``type`` (the format has not changed since events were
dicts, so processes of the previous release and this one understand each other). ``decode`` answers None
for anything it does not know, so a newer publisher never breaks an older subscriber.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.state.records import VM_ACTIVE


@dataclass(frozen=True, slots=True)
class VmChanged:
    """A VM ended (killed, failed, expired): its routes are gone."""

    TYPE: ClassVar[str] = "vm"
    vm_id: str
    session_id: str
    status: str

    @property
    def gone(self) -> bool:
        """Whether the VM no longer serves (its pooled connections can go)."""
        return self.status != VM_ACTIVE


@dataclass(frozen=True, slots=True)
class PortExposed:
    """A port of a VM became public (the app-url call): cached "no route" answers may be wrong now."""

    TYPE: ClassVar[str] = "vm_ports"
    vm_id: str
    port: int


@dataclass(frozen=True, slots=True)
class ShareChanged:
    """A share of a VM's port was made, changed or revoked: cached routes of that VM are stale, and on
    revocation (``revoked``) its open connections to that port close."""

    TYPE: ClassVar[str] = "share"
    vm_id: str
    port: int
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class UrlKeyChanged:
    """A VM's URL-signing key was made or rotated: cached routes of the VM carry the old one (every URL
    signed before a rotation stops working), and "no route" answers may be wrong now."""

    TYPE: ClassVar[str] = "url_key"
    vm_id: str
    session_id: str


@dataclass(frozen=True, slots=True)
class WakeRequested:
    """An edge holds a request for a suspended VM created with auto_resume: a control plane resumes it."""

    TYPE: ClassVar[str] = "wake"
    vm_id: str


@dataclass(frozen=True, slots=True)
class VmReleased:
    """A destroyed VM's slot (and with it its address) was freed."""

    TYPE: ClassVar[str] = "vm_released"
    vm_id: str
    driver: str
    slot: int


@dataclass(frozen=True, slots=True)
class DomainChanged:
    """A custom domain was claimed, moved, released or asked to retry its certificate."""

    TYPE: ClassVar[str] = "domain"
    domain: str


@dataclass(frozen=True, slots=True)
class OrgKeysChanged:
    """An organisation's API keys changed: who may open its browser instances."""

    TYPE: ClassVar[str] = "org_keys"
    org: str


@dataclass(frozen=True, slots=True)
class CertChanged:
    """A stored certificate was written or deleted: every SNI table reloads it."""

    TYPE: ClassVar[str] = "cert"
    cert_id: str


@dataclass(frozen=True, slots=True)
class EgressPolicyChanged:
    """A VM's egress policy (``vm_id``) or a session's (``session_id``, for its VMs without their own)
    was set: every egress plane reads policies again."""

    TYPE: ClassVar[str] = "egress_policy"
    vm_id: str = ""
    session_id: str = ""


Event = (
    VmChanged
    | PortExposed
    | ShareChanged
    | UrlKeyChanged
    | WakeRequested
    | VmReleased
    | DomainChanged
    | OrgKeysChanged
    | CertChanged
    | EgressPolicyChanged
)

_BY_TYPE: dict[str, type[Event]] = {
    cls.TYPE: cls
    for cls in (
        VmChanged,
        PortExposed,
        ShareChanged,
        UrlKeyChanged,
        WakeRequested,
        VmReleased,
        DomainChanged,
        OrgKeysChanged,
        CertChanged,
        EgressPolicyChanged,
    )
}


def encode(event: Event) -> str:
    return json.dumps({"type": event.TYPE, **dataclasses.asdict(event)}, separators=(",", ":"))


def decode(text: str | bytes) -> Event | None:
    """The event a message carries; None for a malformed or unknown one (it is ignored)."""
    try:
        data: Any = json.loads(text)
    except ValueError:
        return None
    kind = data.get("type") if isinstance(data, dict) else None
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None  # (a list or an object is no key)
    if cls is None:
        return None
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = data.get(f.name)
        if f.type == "bool":
            if not isinstance(value, bool):
                return None
        # bool is an int in Python, never a port or a slot.
        elif not isinstance(value, int if f.type == "int" else str) or isinstance(value, bool):
            return None
        values[f.name] = value
    return cls(**values)
