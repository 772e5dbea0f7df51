"""Records kept in Redis and the one place that names every Redis key.

Pure: no I/O. Records serialise to flat string maps (Redis hashes); nested values are JSON.
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

VM_ID_PREFIX = "vmid-"
# 80 random bits: VM ids appear in public host names, so they must not be guessable.
VM_ID_RANDOM_BYTES = 10

# VM lifecycle states.
VM_CREATING = "creating"
VM_ACTIVE = "active"
VM_KILLED = "killed"
VM_FAILED = "failed"
VM_STATES = (VM_CREATING, VM_ACTIVE, VM_KILLED, VM_FAILED)
VM_LIVE_STATES = (VM_CREATING, VM_ACTIVE)


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


class Keys:
    """Every Redis key the gateway uses. One prefix, so several deployments can share a Redis."""

    def __init__(self, prefix: str = "gw:") -> None:
        self.prefix = prefix

    def api_key(self, key_hash: str) -> str:
        return f"{self.prefix}apikey:{key_hash}"

    def api_key_index(self) -> str:
        """Hash: key id -> key hash, for listing and revoking."""
        return f"{self.prefix}apikeys"

    def org_keys(self, org: str) -> str:
        """Set of the key hashes of an organisation's API keys: what opens its instances at the edge."""
        return f"{self.prefix}org:{org}:keys"

    def org_instances(self, org: str) -> str:
        """Set of an organisation's browser-instance ids."""
        return f"{self.prefix}org:{org}:instances"

    def instance(self, instance_id: str) -> str:
        """Hash: a browser instance (``InstanceRecord``)."""
        return f"{self.prefix}instance:{instance_id}"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def vm(self, vm_id: str) -> str:
        return f"{self.prefix}vm:{vm_id}"

    def vm_ports(self, vm_id: str) -> str:
        """Set of ports of a VM exposed publicly (by the app-url call); dropped when the VM ends."""
        return f"{self.prefix}vm:{vm_id}:ports"

    def owner_vms(self, owner: str) -> str:
        """Set of VM ids created with one API key."""
        return f"{self.prefix}owner:{owner}:vms"

    def vm_expiry(self) -> str:
        """Sorted set: live VM id -> expiry (unix seconds). The reaper reads it."""
        return f"{self.prefix}vm-expiry"

    def live_vms(self) -> str:
        """Set of VM ids in a live state (creating or active): what restart recovery reconciles."""
        return f"{self.prefix}vms-live"

    def slots(self, driver: str) -> str:
        """Hash: slot number -> VM id holding it."""
        return f"{self.prefix}slots:{driver}"

    def slot_cursor(self, driver: str) -> str:
        return f"{self.prefix}slot-cursor:{driver}"

    def cert(self, cert_id: str) -> str:
        return f"{self.prefix}cert:{cert_id}"

    def cert_index(self) -> str:
        return f"{self.prefix}certs"

    def cert_lock(self, cert_id: str) -> str:
        return f"{self.prefix}cert-lock:{cert_id}"

    def cert_state(self, cert_id: str) -> str:
        return f"{self.prefix}cert-state:{cert_id}"

    def domain(self, name: str) -> str:
        """Hash: a customer's custom domain (``DomainRecord``)."""
        return f"{self.prefix}domain:{name}"

    def domains(self) -> str:
        """Set of every claimed custom domain: what the domain keeper issues and renews."""
        return f"{self.prefix}domains"

    def owner_domains(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}:domains"

    def retired_domains(self) -> str:
        """Sorted set: released domain -> when; its certificate is deleted after a grace period."""
        return f"{self.prefix}domains-retired"

    def snapshot(self, snapshot_id: str) -> str:
        """Hash: a VM snapshot (``SnapshotRecord``)."""
        return f"{self.prefix}snapshot:{snapshot_id}"

    def owner_snapshots(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}:snapshots"

    def acme_account(self, directory_url: str) -> str:
        return f"{self.prefix}acme-account:{directory_url}"

    def events(self) -> str:
        """Pub/sub channel: VM and route changes, for every edge's route cache."""
        return f"{self.prefix}events"


def dump_field(value: Any) -> str:
    """One record field as hash text: JSON for containers, '1'/'0' for booleans, '' for None."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


class _Record:
    """Flat-hash (de)serialisation for the dataclasses below, driven by their field types."""

    def to_hash(self) -> dict[str, str]:
        return {f.name: dump_field(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> Any:
        kwargs: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in raw:
                continue
            text = raw[f.name]
            kind = str(f.type)
            if kind.startswith("dict") or kind.startswith("list"):
                kwargs[f.name] = json.loads(text) if text else ({} if kind.startswith("dict") else [])
            elif kind == "bool":
                kwargs[f.name] = text == "1"
            elif kind.startswith("float"):
                kwargs[f.name] = float(text) if text else None
            elif kind.startswith("int"):
                kwargs[f.name] = int(text) if text else None
            elif kind.startswith("str | None"):
                kwargs[f.name] = text or None
            else:
                kwargs[f.name] = text
        return cls(**kwargs)


@dataclass
class ApiKeyRecord(_Record):
    key_id: str
    name: str
    created_at: float
    # The organisation (a UUID) whose Instances API the key opens; None: a sandbox API key only.
    org: str | None = None


ORG_OWNER_PREFIX = "org:"


def org_owner(org: str) -> str:
    """The owner of an organisation's VMs: never a key id, so no sandbox API key sees them."""
    return ORG_OWNER_PREFIX + org


@dataclass
class InstanceRecord(_Record):
    """A browser instance: a VM of a catalog image, owned by an organisation."""

    instance_uuid: str
    org: str
    vm_id: str
    image: str
    size: str
    port: int  # the image's port inside the VM, reached through access_url
    created_at: float


@dataclass
class SessionRecord(_Record):
    session_id: str
    owner: str
    created_at: float
    vm_lifetime_seconds: int
    memory_mb: int
    vcpu_count: int
    metadata: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    vm_id: str | None = None
    env_status: str = "none"
    env_error: str | None = None


@dataclass
class VmRecord(_Record):
    vm_id: str
    session_id: str
    owner: str
    driver: str
    slot: int
    ip: str
    status: str
    created_at: float
    vm_lifetime_seconds: int
    memory_mb: int
    vcpu_count: int
    # Set when the VM became active; the lifetime counts from spawn (creation), the spec says.
    started_at: float | None = None
    expires_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    share: dict[str, Any] = field(default_factory=dict)
    handle: dict[str, Any] = field(default_factory=dict)
    custom_domain: str | None = None
    # Snapshots: asked for at create, made when the VM is killed or expires (not when it failed).
    snapshot_on_terminate: bool = False
    snapshot_name: str | None = None
    snapshot_id: str | None = None  # the snapshot made of this VM
    snapshot_error: str | None = None
    restored_from: str | None = None  # the snapshot this VM resumed
    # The root file system image it runs on (image_variant); None where the driver has no images.
    image_variant: str | None = None

    @property
    def alive(self) -> bool:
        return self.status == VM_ACTIVE


SNAPSHOT_ID_PREFIX = "snap-"
SNAPSHOT_ID_RANDOM_BYTES = 10


def new_snapshot_id() -> str:
    return SNAPSHOT_ID_PREFIX + secrets.token_hex(SNAPSHOT_ID_RANDOM_BYTES)


@dataclass
class SnapshotRecord(_Record):
    """A VM's whole state (memory, devices, and with it the in-RAM root file system), kept in
    ``<data_dir>/snapshots/<id>`` on the host that made it; a VM created with its id resumes it."""

    snapshot_id: str
    owner: str
    vm_id: str  # the VM it was taken of
    driver: str
    created_at: float
    vcpu_count: int
    memory_mb: int
    size_bytes: int
    name: str | None = None
    # The image the VM ran on (image_variant): the snapshot resumes on that image only.
    image_variant: str | None = None


# Custom-domain certificate states, as the API shows them.
DOMAIN_PENDING = "pending"  # claimed; no attempt yet (or a retry was asked for)
DOMAIN_VERIFYING = "verifying"  # an ACME order is running
DOMAIN_ISSUED = "issued"
DOMAIN_FAILED = "failed"  # last_error says why; retried after a back-off, or at once on request


@dataclass
class DomainRecord(_Record):
    """A customer's own domain, routed to one VM and served with its own certificate."""

    domain: str
    owner: str
    vm_id: str
    dns_provider: str  # "delegated", "rfc2136" or a dns-lexicon provider
    state: str
    created_at: float
    # The customer's dns_credentials as JSON, sealed with the storage key; "" for delegated.
    credentials_sealed: str = ""
    last_error: str | None = None
    not_after: float | None = None
    updated_at: float | None = None
