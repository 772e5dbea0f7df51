"""Request and response models of the control-plane API, field for field as the spec documents them.

Validation errors come out of pydantic in exactly the spec's ``detail[].loc/msg/type`` shape. Limits that
the operator configures (the lifetime bounds, the execute timeout) are checked against values passed
in the validation context, with pydantic's own error types and messages, so they read like the rest.
Unknown fields are ignored, as the spec's models do, so newer clients keep working.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from gateway.egress.policy import normalise_name, valid_pattern
from gateway.orchestrator.signed_urls import MAX_EXPIRES_IN_S, MIN_EXPIRES_IN_S
from gateway.orchestrator.vault_rules import MAX_VAULTS_PER_VM

VCPU_COUNTS = (1, 2, 4, 6, 8)
MEMORY_MB_MIN, MEMORY_MB_MAX = 128, 8192
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_ENV_NAME_LENGTH = 255


def _bounded(value: float | None, info: ValidationInfo, low_key: str, high_key: str) -> float | None:
    if value is None or info.context is None:
        return value
    low, high = info.context[low_key], info.context[high_key]
    if value < low:
        raise PydanticCustomError(
            "greater_than_equal", "Input should be greater than or equal to {ge}", {"ge": low}
        )
    if value > high:
        raise PydanticCustomError(
            "less_than_equal", "Input should be less than or equal to {le}", {"le": high}
        )
    return value


def _idle_timeout(value: int | None, info: ValidationInfo) -> int | None:
    """0 (or null) asks for no idle timeout; else within the operator's bounds (vms.min_idle_timeout_s,
    vms.max_lifetime_s)."""
    if not value or info.context is None:
        return value
    low = info.context["min_idle_timeout_s"]
    if value < low:
        raise PydanticCustomError(
            "idle_timeout", "Input should be 0 (no idle timeout) or at least {ge} seconds", {"ge": low}
        )
    return _bounded(value, info, "min_idle_timeout_s", "max_idle_timeout_s")  # type: ignore[return-value]


# A VM's own cap on requests in flight and open tunnels (per edge process): at most this.
MAX_EXCHANGES_PER_VM = 100_000
MAX_EXCHANGES_DOC = (
    "Requests in flight plus open WebSockets and other tunnels to this VM, per edge process, beyond which "
    "a request gets 429 too_many_vm_exchanges with Retry-After (the operator's edge.max_exchanges_per_vm, "
    "when set, is a ceiling: the lower applies). 0 or null: the operator's alone"
)
IDLE_TIMEOUT_DOC = (
    "Seconds without client activity (requests, request bodies, WebSocket data frames from clients, "
    "keep-alive calls, commands and files through the API; not WebSocket pings or pongs, responses, or "
    "an open connection that sends nothing) after which the VM is suspended (drivers that can), else "
    "killed. 0 or null: none"
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class VmResources(_Model):
    vm_lifetime_seconds: int | None = None
    memory_mb: int | None = Field(None, ge=MEMORY_MB_MIN, le=MEMORY_MB_MAX)
    vcpu_count: Literal[1, 2, 4, 6, 8] | None = None
    metadata: dict[str, Any] | None = None
    env: dict[str, str] | None = None

    @field_validator("vm_lifetime_seconds")
    @classmethod
    def _lifetime(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _bounded(value, info, "min_lifetime_s", "max_lifetime_s")  # type: ignore[return-value]

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name, text in (value or {}).items():
            if len(name) > MAX_ENV_NAME_LENGTH or not ENV_NAME.match(name):
                raise PydanticCustomError(
                    "env_name",
                    "Environment variable names must match [A-Za-z_][A-Za-z0-9_]*: {name!r}",
                    {"name": name[:64]},
                )
            if "\0" in text:
                raise PydanticCustomError(
                    "env_value", "Environment variable {name} contains a NUL byte", {"name": name}
                )
        return value


class CreateSessionRequest(VmResources):
    api_key: str


class CreateSessionResponse(_Model):
    session_id: str = Field(json_schema_extra={"format": "uuid"})


HostPolicy = Literal["preserve", "localhost"]
HOST_POLICY_DOC = (
    "The Host the app sees: preserve (the public host, the default) or localhost (localhost:<port>, the "
    "public host in X-Forwarded-Host), for HTTP and WebSocket upgrades alike"
)


class ShareRequest(_Model):
    port: int = Field(ge=1, le=65535)
    is_public: bool = False
    host: HostPolicy = Field("preserve", description=HOST_POLICY_DOC)


class CustomDomainRequest(_Model):
    domain: str
    dns_provider: str | None = None
    dns_credentials: dict[str, str] | None = None


class VMVolumeMountRequest(_Model):
    volume_id: str
    mount_path: str
    mode: str = "rw"
    checkpoint_id: str | None = None


class VMCreateRequest(VmResources):
    session_id: str | None = None
    egress_policy: dict[str, Any] | None = None
    snapshot_id: str | None = None
    snapshot_on_terminate: bool | None = None
    snapshot_name: str | None = None
    share: ShareRequest | None = None
    custom_domain: CustomDomainRequest | None = None
    image_variant: str | None = None
    volumes: list[VMVolumeMountRequest] | None = None
    vault_ids: list[str] | None = Field(None, max_length=MAX_VAULTS_PER_VM)
    # Suspend instead of kill when the lifetime ends; wake on the next request (drivers that suspend).
    auto_suspend: bool | None = None
    auto_resume: bool | None = None
    idle_timeout_s: int | None = Field(None, description=IDLE_TIMEOUT_DOC)
    max_exchanges: int | None = Field(None, ge=0, le=MAX_EXCHANGES_PER_VM, description=MAX_EXCHANGES_DOC)

    @field_validator("idle_timeout_s")
    @classmethod
    def _idle(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _idle_timeout(value, info)


class VMCreateResponse(_Model):
    vm_id: str | None = None
    session_id: str
    status: str
    share: dict[str, Any] | None = None
    custom_domain: dict[str, Any] | None = None
    env_status: str = "none"
    env_error: str | None = None


class VmCreateQuery(_Model):
    wait: bool = True


class SessionStatusResponse(_Model):
    session_id: str
    exists: bool
    vm_assigned: bool
    vm_status: str | None = None
    vm_id: str | None = None
    vm_alive: bool = False
    uptime_seconds: float | None = None
    expires_in_seconds: float | None = None
    created_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    env_status: str = "none"
    env_error: str | None = None


EXPIRES_IN_DOC = (
    "seconds the URL stays valid; the URL then carries signature and expires, opens the port without "
    "making it public, and is revoked by rotating the VM's URL key"
)


class AppUrlQuery(_Model):
    port: int = Field(80, ge=1, le=65535)
    expires_in: int | None = Field(None, ge=MIN_EXPIRES_IN_S, le=MAX_EXPIRES_IN_S, description=EXPIRES_IN_DOC)


class AppURLResponse(_Model):
    url: str
    direct_url: str
    vm_ip: str
    port: int
    vm_id: str
    session_id: str
    status: str
    expires_in_seconds: int | None = None
    # With expires_in: when the signed URL stops working, and the version of the key that signed it.
    expires_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    key_version: int | None = None


class SessionInfoResponse(_Model):
    """A session record (``GET /v1/sessions/session/{id}``): its settings, its current VM, and the names
    of its env variables (never their values: they may be secrets)."""

    session_id: str
    id: str
    created_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    status: Literal["active", "idle", "ended"] = Field(
        description="active: its VM runs or boots; idle: no VM yet; ended: its last VM ended"
    )
    vm_id: str | None = None
    vm_status: str | None = None
    vm_lifetime_seconds: int
    memory_mb: int
    vcpu_count: int
    metadata: dict[str, Any] = Field(default_factory=dict)
    env_keys: list[str] = Field(default_factory=list)
    env_status: str = "none"
    env_error: str | None = None
    executions: int = 0


class SessionUsageResponse(_Model):
    """What a session used, over every VM it has had; null for what this gateway's VM driver cannot
    measure (the process driver has no cgroups)."""

    session_id: str
    vm_count: int
    vm_seconds: float
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    peak_memory_mb: float | None = None
    requests: int = Field(0, description="Requests (and WebSocket upgrades) the edges carried to its VMs")
    open_exchanges: int = Field(
        0, description="Open now through the edges to its live VMs: requests in flight plus tunnels"
    )
    open_tunnels: int = Field(0, description="Of those, open WebSockets and other upgraded connections")
    bytes_in: int = Field(description="Request and upstream tunnel bytes the edges carried to its VMs")
    bytes_out: int = Field(description="Response and downstream tunnel bytes the edges carried from them")
    egress_bytes_out: int = Field(0, description="Bytes its VMs sent out through the egress proxy")
    egress_bytes_in: int = Field(0, description="Bytes that came back to them through the egress proxy")
    executions: int


class SandboxesQuery(_Model):
    metadata: str | None = Field(None, description="A JSON object: every key must match the VM's metadata")
    limit: int = Field(100, ge=1, le=1000)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            parsed = json.loads(value)
        except ValueError:
            raise PydanticCustomError("json_invalid", "metadata must be a JSON object") from None
        if not isinstance(parsed, dict):
            raise PydanticCustomError("dict_type", "metadata must be a JSON object")
        return value


class KillRequest(_Model):
    session_id: str = Field(min_length=1)


class KillResponse(_Model):
    session_id: str
    killed: bool = Field(description="false when the session had no live VM")
    vm_id: str | None = None
    status: str | None = None


class UserResponse(_Model):
    """Who the API key is (``GET /v1/users/me``): the gateway's users are its API keys."""

    id: str
    key_id: str
    name: str
    organization: str | None = Field(None, description="The organisation (UUID) of an Instances API key")
    created_at: str = Field(json_schema_extra={"format": "date-time"})


class LastActivity(_Model):
    """A VM's last activity: when (edges report theirs at most edge.traffic_flush_s late), and what."""

    at: str = Field(json_schema_extra={"format": "date-time"})
    source: str = Field(
        description="http (a request or its body), websocket (a data frame from the client), tunnel "
        "(client bytes of another upgraded protocol), api (a command, file or terminal through the API), "
        "keepalive (POST /v1/vms/{vm_id}/keepalive), started or resumed (the idle clock's start)"
    )


class VmResponse(_Model):
    """One VM, as GET /v1/vms/{vm_id} and the list show it."""

    vm_id: str
    session_id: str
    status: str
    vm_ip: str
    driver: str
    vcpu_count: int
    memory_mb: int
    vm_lifetime_seconds: int
    created_at: str
    expires_at: str | None = None
    ended_at: str | None = None
    uptime_seconds: float | None = None
    expires_in_seconds: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    share: dict[str, Any] | None = None
    exposed_ports: list[int] = Field(default_factory=list)
    custom_domain: dict[str, Any] | None = None
    error: str | None = None
    # How the VM runs: "kvm" or "tcg" for the qemu driver, null for the others.
    accel: str | None = None
    snapshot_on_terminate: bool = False
    # The snapshot made when this VM terminated (or why it could not be made), and the one it resumed.
    snapshot_id: str | None = None
    snapshot_error: str | None = None
    restored_from: str | None = None
    # The image it runs on (GET /v1/templates); null where the driver runs on no images.
    image_variant: str | None = None
    auto_suspend: bool = False
    auto_resume: bool = False
    suspended_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    suspend_reason: str | None = Field(
        None, description="Why it is suspended: request, lifetime (auto_suspend) or idle (idle_timeout_s)"
    )
    idle_timeout_s: int | None = Field(None, description=IDLE_TIMEOUT_DOC)
    max_exchanges: int | None = Field(None, description=MAX_EXCHANGES_DOC)
    last_activity: LastActivity | None = Field(
        None, description="Its last client activity, from which idle_timeout_s counts"
    )
    volumes: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Volumes mounted into it: volume_id, mount_path, mode, checkpoint_id",
    )


class SnapshotResponse(_Model):
    snapshot_id: str
    # The official SDK reads ``id`` and ``status``; a listed snapshot is always complete.
    id: str
    status: Literal["ready"] = "ready"
    name: str | None = None
    vm_id: str
    driver: str
    vcpu_count: int
    memory_mb: int
    size_bytes: int
    created_at: str = Field(json_schema_extra={"format": "date-time"})


class SnapshotList(RootModel[list[SnapshotResponse]]):
    """A bare JSON array: the official SDK reads anything else as an empty list."""


class DnsRecordView(_Model):
    name: str
    type: str
    value: str


class CustomDomainResponse(_Model):
    """A custom domain and its certificate's state; ``dns_record`` is the CNAME a delegated one needs."""

    domain: str
    id: str = Field(description="The domain itself: what the /v1/custom-domains/{id} paths take")
    vm_id: str
    dns_provider: str
    state: Literal["pending", "verifying", "issued", "failed"]
    status: Literal["pending", "verified", "issued", "failed"] = Field(
        description="The official SDK's name for the state: verifying is verified (the ACME order runs)"
    )
    last_error: str | None = None
    expires_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    created_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    url: str
    dns_record: DnsRecordView | None = None


class CustomDomainList(RootModel[list[CustomDomainResponse]]):
    """A bare JSON array, as the official SDK reads it."""


class VmListQuery(_Model):
    """``?status=`` picks one state (both lists); ``?metadata.<key>=<value>`` filters by metadata."""

    status: Literal["creating", "active", "killed", "failed"] | None = None


class VmList(RootModel[list[VmResponse]]):
    """A bare JSON array, as the official SDK reads it (``instavm ls``)."""


class TemplateResponse(_Model):
    """An image VMs can run on: what POST /v1/vms takes as ``image_variant`` (the official SDK's
    ``templates.list()`` reads ``slug``, ``name`` and ``description``)."""

    slug: str = Field(description="The value of image_variant that names this image")
    name: str
    description: str
    # The Debian packages asked for (their dependencies come with them).
    packages: list[str]
    suite: str
    # The definition's digest: a changed definition or builder is a new digest, built anew.
    digest: str
    # Whether this gateway has built it; a VM of an image that is not built is refused (422) by drivers
    # that run VMs on images (netns).
    built: bool
    default: bool = Field(description="The image of VMs whose request names none")
    size_bytes: int | None = None
    built_at: str | None = None


class TemplateListResponse(_Model):
    templates: list[TemplateResponse]
    total: int


class ExecuteRequest(_Model):
    command: str = Field(min_length=1)
    # Python when none is given: the official SDK's first example sends Python without a language.
    language: Literal["bash", "python"] = "python"
    session_id: str | None = None
    timeout: float | None = Field(None, gt=0)

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float | None, info: ValidationInfo) -> float | None:
        return _bounded(value, info, "min_timeout_s", "max_timeout_s")


class ExecuteResponse(_Model):
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    truncated: bool
    execution_time: float
    session_id: str
    vm_id: str
    # CPU seconds the VM used while the command ran (its cgroup); null where the driver cannot tell.
    cpu_time: float | None = None


class ExecuteAsyncResponse(_Model):
    task_id: str
    id: str
    status: Literal["pending"]
    session_id: str


class ExecutionResponse(_Model):
    """A background execution, as the official SDK's ``get_task_result`` reads it: ``is_complete``, then
    ``serialized_stdout`` and ``serialized_stderr`` (plain text, not base64 despite the names)."""

    id: str
    task_id: str
    session_id: str
    vm_id: str | None = None
    status: str = Field(description="pending, running, completed or failed")
    is_complete: bool
    language: str
    serialized_stdout: str
    serialized_stderr: str
    exit_code: int | None = None
    timed_out: bool = False
    truncated: bool = False
    cpu_time: float | None = None
    execution_time: float | None = None
    error: str | None = Field(None, description="Why a failed one failed (its VM ended, the gateway stopped)")
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    started_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    completed_at: str | None = Field(None, json_schema_extra={"format": "date-time"})


class CreateInstanceRequest(_Model):
    """The Instances API's create body: both names come from the gateway's catalog."""

    image: str = Field(min_length=1, max_length=64, examples=["debian-12"])
    size: str = Field(min_length=1, max_length=64, examples=["small"])


class InstanceResponse(_Model):
    instance_uuid: str
    status: Literal["running", "stopped", "terminated"]
    image: str
    size: str
    created_at: str = Field(json_schema_extra={"format": "date-time"}, examples=["2025-01-10T12:00:00Z"])
    access_url: str


class InstanceListResponse(_Model):
    instances: list[InstanceResponse]
    total: int


class ErrorResponse(_Model):
    detail: str
    code: str


PTY_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class PtyCreateRequest(_Model):
    """A terminal: ``shell`` is a program run as the interactive shell, ``command`` a command line run
    by ``/bin/bash -lc`` (it wins when both are given); neither: ``/bin/bash -il``."""

    cols: int = Field(80, ge=1, le=1000)
    rows: int = Field(24, ge=1, le=1000)
    command: str | None = Field(None, min_length=1, max_length=65536)
    shell: str | None = Field(None, min_length=1, max_length=4096)
    id: str | None = Field(None, pattern=PTY_ID)


class PtyResizeRequest(_Model):
    cols: int = Field(ge=1, le=1000)
    rows: int = Field(ge=1, le=1000)


class PtyResponse(_Model):
    """A terminal. ``session_id`` is the terminal's own id (as the official SDK reads it); the sandbox
    session it runs in is ``sandbox_session_id``."""

    session_id: str
    id: str
    pty_id: str
    sandbox_session_id: str
    vm_id: str
    cols: int
    rows: int
    command: list[str]
    alive: bool
    exit_code: int | None = None
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    ended_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    websocket_path: str = Field(description="Open with ?api_key=<key> (or the key in a header)")


class PtyList(RootModel[list[PtyResponse]]):
    """A bare JSON array."""


class FileUploadResponse(_Model):
    """``POST /upload`` takes multipart/form-data: ``session_id`` and ``remote_path`` (before) ``file``;
    relative paths are in the VM's home folder; missing parent folders are made."""

    success: bool
    remote_path: str
    path: str = Field(description="Where the file is, as the VM sees it")
    size: int
    filename: str | None = None


class FileDownloadResponse(_Model):
    """``POST /download`` takes a form (``session_id``, ``filename``); the file's bytes come in base64."""

    filename: str
    path: str
    size: int
    encoding: Literal["base64"]
    content: str


class RawFileQuery(_Model):
    path: str = Field(description="The file in the VM (relative: in its home folder)")


class PtyConnectQuery(_Model):
    """A WebSocket: binary messages are keystrokes and output; text ones JSON controls
    (``{"type": "resize", "cols", "rows"}`` in, ``{"type": "exit", "exit_code"}`` out)."""

    api_key: str | None = Field(None, description="The API key, for clients that cannot set headers")


class ShareCreateRequest(_Model):
    port: int = Field(ge=1, le=65535)
    session_id: str | None = None
    vm_id: str | None = None
    is_public: bool = False
    host: HostPolicy = Field("preserve", description=HOST_POLICY_DOC)


class ShareUpdateRequest(_Model):
    is_public: bool | None = None
    revoke: bool | None = None
    host: HostPolicy | None = Field(None, description=HOST_POLICY_DOC)


class SignedUrlRequest(_Model):
    expires_in: int = Field(ge=MIN_EXPIRES_IN_S, le=MAX_EXPIRES_IN_S, description=EXPIRES_IN_DOC)


class SignedUrlResponse(_Model):
    """A signed URL of a share (both forms of its address, the same signature): valid until
    ``expires_at`` (``expires``: the same, unix seconds), the share's revocation or a key rotation."""

    url: str
    direct_url: str
    expires_at: str = Field(json_schema_extra={"format": "date-time"})
    expires: int
    expires_in: int
    signature: str
    key_version: int
    share_id: str
    vm_id: str
    port: int


class UrlKeyRotateResponse(_Model):
    """The VM's new URL key's version: every URL signed before no longer works."""

    vm_id: str
    key_version: int
    rotated_at: str = Field(json_schema_extra={"format": "date-time"})


class ShareResponse(_Model):
    """A share. ``access_token`` only in the answer that made it (or made it private again)."""

    share_id: str
    id: str
    vm_id: str
    session_id: str
    port: int
    is_public: bool
    host: HostPolicy = "preserve"
    status: Literal["active", "revoked"]
    url: str
    direct_url: str
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    revoked_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    access_token: str | None = None
    access: str | None = None


class CustomDomainCreateRequest(_Model):
    domain: str = Field(min_length=1, max_length=253)
    share_id: str = Field(min_length=1)
    dns_provider: str | None = None
    dns_credentials: dict[str, str] | None = None


class CustomDomainHealthResponse(_Model):
    """Whether a custom domain serves: its certificate, and the VM and share behind it."""

    id: str
    domain: str
    status: str
    healthy: bool
    certificate_issued: bool
    certificate_expires_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    vm_id: str
    vm_status: str | None = None
    port: int | None = None
    problems: list[str] = Field(default_factory=list)


class VmUpdateRequest(_Model):
    """What may change on a VM once made (``PATCH /v1/vms/{id}``)."""

    auto_suspend: bool | None = None
    auto_resume: bool | None = None
    idle_timeout_s: int | None = Field(None, description=IDLE_TIMEOUT_DOC + " (0 removes it)")
    max_exchanges: int | None = Field(
        None, ge=0, le=MAX_EXCHANGES_PER_VM, description=MAX_EXCHANGES_DOC + " (0 removes it)"
    )

    @field_validator("idle_timeout_s")
    @classmethod
    def _idle(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _idle_timeout(value, info)


class VmSnapshotRequest(_Model):
    name: str | None = Field(None, max_length=255)


class VmCloneRequest(VmResources):
    """A clone: its own lifetime and metadata (the source's when not given); the machine shape is the
    source's (a snapshot resumes on the shape it was taken on)."""

    snapshot_name: str | None = Field(None, max_length=255)


class VmCloneResponse(_Model):
    vm_id: str
    session_id: str
    status: str
    snapshot_id: str
    source_vm_id: str


class EgressPolicyRequest(_Model):
    """What a VM may reach (the official SDK's shape): package registries, plain HTTP, HTTPS, names
    (exact or ``*.suffix``) and CIDRs. Private ranges open only by a CIDR that names them."""

    allow_public_repos: bool = False
    allow_http: bool = False
    allow_https: bool = False
    allowed_domains: list[str] = Field(default_factory=list, max_length=256)
    allowed_cidrs: list[str] = Field(default_factory=list, max_length=256)

    @field_validator("allowed_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        for name in value:
            if not valid_pattern(name):
                raise PydanticCustomError(
                    "domain_pattern", "not a DNS name or *.suffix: {name!r}", {"name": name[:64]}
                )
        return [normalise_name(n) for n in value]

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        found = []
        for cidr in value:
            try:
                found.append(str(ipaddress.ip_network(cidr, strict=False)))
            except ValueError:
                raise PydanticCustomError("cidr", "not a network: {cidr!r}", {"cidr": cidr[:64]}) from None
        return found


class EgressDenial(_Model):
    """A refused egress connection: when, what the VM asked for, and the rule that refused it."""

    at: str | None
    protocol: str
    address: str
    port: int
    name: str | None
    rule: str


class EgressPolicyResponse(_Model):
    """``/v1/egress/vm/{id}`` and ``/v1/egress/session/{id}``: the policy that applies (the SDK's fields),
    where it comes from (``vm``, ``session`` or ``default``), and what the VM's egress did."""

    session_id: str
    vm_id: str | None
    source: Literal["vm", "session", "default"]
    egress_enabled: bool
    allow_public_repos: bool
    allow_http: bool
    allow_https: bool
    allowed_domains: list[str]
    allowed_cidrs: list[str]
    bytes_out: int = 0
    bytes_in: int = 0
    recent_denials: list[EgressDenial] = Field(default_factory=list)
