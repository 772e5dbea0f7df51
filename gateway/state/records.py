"""Records kept in Redis (sessions, VMs, snapshots, domains, instances, API keys) and their states.

Pure: no I/O. Records serialise to flat string maps (Redis hashes); nested values are JSON. Key names
are in ``gateway.state.keyspace``; the id grammar every plane shares is in ``gateway.ids``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Final, Self

# VM lifecycle states.
VM_CREATING = "creating"
VM_ACTIVE = "active"
VM_KILLED = "killed"
VM_FAILED = "failed"
# Paused with its memory kept (netns: its cgroup frozen; qemu: its state saved and the VM stopped); its
# slot and address stay its own, and resume brings it back as it was.
VM_SUSPENDED = "suspended"
VM_STATES = (VM_CREATING, VM_ACTIVE, VM_SUSPENDED, VM_KILLED, VM_FAILED)
VM_LIVE_STATES = (VM_CREATING, VM_ACTIVE, VM_SUSPENDED)

# What a VM's last activity was (``last_activity_source``): the idle clock (``idle_timeout_s``) counts
# from it. Client traffic through an edge: a request head ("http", also an upgrade's) or request body
# bytes, client-to-VM WebSocket data frames ("websocket"; never ping, pong or close), client bytes in
# any other upgraded connection ("tunnel"); the control plane: a command, file transfer or terminal
# for the VM ("api"), an explicit keep-alive call ("keepalive"); and the VM becoming active ("started",
# "resumed"), where the clock starts. The edge spells its three itself (it imports no records).
ACTIVITY_HTTP = "http"
ACTIVITY_WEBSOCKET = "websocket"
ACTIVITY_TUNNEL = "tunnel"
ACTIVITY_API = "api"
ACTIVITY_KEEPALIVE = "keepalive"
ACTIVITY_STARTED = "started"
ACTIVITY_RESUMED = "resumed"
# Why a VM is suspended (``suspend_reason``): asked for, its lifetime ended (auto_suspend), or idle.
SUSPENDED_BY_REQUEST = "request"
SUSPENDED_AT_LIFETIME_END = "lifetime"
SUSPENDED_IDLE = "idle"


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
    def from_hash(cls, raw: dict[str, str]) -> Self:
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
    # Commands run in the session's VMs (POST /execute and /execute_async), for its usage.
    executions: int = 0
    # The egress policy of the session's VMs that have none of their own (the SDK's shape); empty: the
    # operator's default.
    egress_policy: dict[str, Any] = field(default_factory=dict)


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
    # The key that signs its URLs (hex; made at the first signed URL) and its version: a rotation makes a
    # new key and version, and every URL signed before stops working. Never shown by the API.
    url_key: str | None = None
    url_key_version: int = 0
    # Snapshots: asked for at create, made when the VM is killed or expires (not when it failed).
    snapshot_on_terminate: bool = False
    snapshot_name: str | None = None
    snapshot_id: str | None = None  # the snapshot made of this VM
    snapshot_error: str | None = None
    restored_from: str | None = None  # the snapshot this VM resumed
    # The root file system image it runs on (image_variant); None where the driver has no images.
    image_variant: str | None = None
    # Usage: body and tunnel bytes through the edge (added by edges while it lives), and what its cgroup
    # used, read when it ended (None where the driver has no cgroups, or before it ended).
    requests: int = 0  # requests and upgrades the edges carried to it (counted as each ended)
    bytes_in: int = 0
    bytes_out: int = 0
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    # At the end of its lifetime, suspend instead of kill; wake on the next request that needs it.
    auto_suspend: bool = False
    auto_resume: bool = False
    suspended_at: float | None = None
    suspend_reason: str | None = None  # SUSPENDED_* while suspended
    # Suspended (where the driver can) or killed after no client activity for this long; None: never.
    idle_timeout_s: int | None = None
    # Requests in flight plus open tunnels to it, per edge process, beyond which a request gets 429
    # (edge.max_exchanges_per_vm is the operator's ceiling: the lower of the two applies); None: the
    # operator's alone.
    max_exchanges: int | None = None
    # The last activity (ACTIVITY_*) and when: edges write it with their traffic (at most one flush late).
    last_activity_at: float | None = None
    last_activity_source: str | None = None
    # What it may reach (the egress policy, the SDK's shape); empty: its session's, else the operator's
    # default.
    egress_policy: dict[str, Any] = field(default_factory=dict)
    # Bytes the egress proxy carried for it: to destinations, and back.
    egress_bytes_out: int = 0
    egress_bytes_in: int = 0
    # Volumes mounted into it (the SDK's fields: volume_id, mount_path, mode, checkpoint_id).
    volumes: list[dict[str, Any]] = field(default_factory=list)
    # Vaults bound at create (egress puts their secrets in): the VM holds only placeholders.
    vault_ids: list[str] = field(default_factory=list)
    vault_placeholders: dict[str, str] = field(default_factory=dict)  # placeholder -> credential id
    vault_env: dict[str, str] = field(default_factory=dict)  # env name -> placeholder

    @property
    def alive(self) -> bool:
        return self.status == VM_ACTIVE

    def command_env(self, session_env: dict[str, str]) -> dict[str, str]:
        """The env a command in this VM gets on top of its create-time env: the session's, where a vault
        placeholder wins over a value of the same name (as it did when the VM was made)."""
        return {**session_env, **self.vault_env}


def is_live(rec: VmRecord) -> bool:
    """Creating or active: what may still be killed, expire or hold a domain."""
    return rec.status in VM_LIVE_STATES


# A share's Host policy: the app sees the public Host, or localhost:<port> (the public one then only in
# X-Forwarded-Host), for plain requests and upgrades alike.
HOST_PRESERVE: Final = "preserve"
HOST_LOCALHOST: Final = "localhost"


@dataclass
class ShareRecord(_Record):
    """One port of a VM opened through the edge: public, or private behind an access token (stored as
    its SHA-256 only). Revoked ones stay, marked, until they expire with the VM's retention."""

    share_id: str
    owner: str
    vm_id: str
    session_id: str
    port: int
    is_public: bool
    created_at: float
    token_sha256: str | None = None
    revoked_at: float | None = None
    host: str = HOST_PRESERVE  # the Host the app sees: HOST_PRESERVE or HOST_LOCALHOST

    def route_entry(self) -> dict[str, Any]:
        """What the edge reads for the port (the VM's ``share`` shape): port, visibility, token hash, and
        the Host policy when it is not the default."""
        entry: dict[str, Any] = {"share_id": self.share_id, "port": self.port, "is_public": self.is_public}
        if self.token_sha256:
            entry["token_sha256"] = self.token_sha256
        if self.host != HOST_PRESERVE:
            entry["host"] = self.host
        return entry


EXECUTION_PENDING = "pending"
EXECUTION_RUNNING = "running"
EXECUTION_COMPLETED = "completed"
EXECUTION_FAILED = "failed"


@dataclass
class ExecutionRecord(_Record):
    """A command run in the background (``POST /execute_async``), and once done its result."""

    execution_id: str
    owner: str
    session_id: str
    status: str
    created_at: float
    language: str
    # The gateway process running it: a restart fails what a vanished runner left.
    runner: str
    vm_id: str | None = None
    started_at: float | None = None
    completed_at: float | None = None
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    timed_out: bool = False
    truncated: bool = False
    execution_time: float | None = None
    cpu_time: float | None = None
    error: str | None = None


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


@dataclass
class VaultRecord(_Record):
    """A named set of credentials and the services (hosts) they are for; one API key's."""

    vault_id: str
    owner: str
    name: str
    created_at: float
    description: str | None = None
    updated_at: float | None = None


@dataclass
class VaultCredentialRecord(_Record):
    """A secret of a vault, sealed with the storage key; ``name`` is the env variable VMs see."""

    credential_id: str
    vault_id: str
    name: str
    credential_type: str
    created_at: float
    value_sealed: str = ""
    description: str | None = None
    updated_at: float | None = None
    rotated_at: float | None = None


@dataclass
class VaultServiceRecord(_Record):
    """A host (exact or ``*.suffix``) whose requests get a credential, as ``auth_config`` says."""

    service_id: str
    vault_id: str
    host: str
    auth_config: dict[str, Any]
    enabled: bool
    created_at: float
    description: str | None = None


@dataclass
class VolumeRecord(_Record):
    """Persistent storage of one API key (its bytes are in the ``VolumeStore``); usage as last measured."""

    volume_id: str
    owner: str
    name: str
    quota_bytes: int
    created_at: float
    updated_at: float | None = None
    used_bytes: int | None = None
    capacity_bytes: int | None = None  # what files may use: the quota less the file system's overhead
    usage_updated_at: float | None = None


@dataclass
class VolumeCheckpointRecord(_Record):
    """A point-in-time copy of a volume (kept in the ``VolumeStore`` beside it)."""

    checkpoint_id: str
    volume_id: str
    created_at: float
    quota_bytes: int
    name: str | None = None
    used_bytes: int | None = None


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
