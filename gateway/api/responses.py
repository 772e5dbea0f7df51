"""Rendering shared by the API handlers: JSON bodies, timestamps, VM views."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from aiohttp import web
from pydantic import BaseModel

from gateway.api.schemas import LastActivity, VmResponse
from gateway.config import Config
from gateway.orchestrator.model import VM_ACTIVE, DomainRecord, VmRecord, is_live
from gateway.tls.providers.delegated import challenge_name, delegation_target
from gateway.tls.providers.registry import DELEGATED

# A custom domain's state as the official SDK names it (its wait and verify helpers read ``status``).
SDK_DOMAIN_STATUS = {"verifying": "verified"}


def iso(ts: float | None) -> str | None:
    """UTC time as the spec's examples show it: 2025-01-10T12:34:56 (no offset, always UTC)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None).isoformat(timespec="seconds")


def remaining_s(vm: VmRecord, now: float) -> float:
    """Seconds until a live VM is reaped; 0 once it has ended."""
    return max(0.0, (vm.expires_at or now) - now) if is_live(vm) else 0.0


def uptime_s(vm: VmRecord, now: float) -> float | None:
    """Seconds since the VM became active, while it is active."""
    if vm.status != VM_ACTIVE:
        return None
    return round(now - (vm.started_at or vm.created_at), 2)


class StreamedFile(Protocol):
    """A file read from a VM or a volume: its path and size, then its bytes."""

    path: str
    size: int

    def chunks(self) -> AsyncIterator[bytes]: ...


async def stream_file(request: web.Request, file: StreamedFile) -> web.StreamResponse:
    """The file's bytes as an attachment, with its length, streamed as they are read."""
    name = file.path.rsplit("/", 1)[-1] or "file"
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}",
        }
    )
    response.content_length = file.size
    await response.prepare(request)
    async for chunk in file.chunks():
        await response.write(chunk)
    await response.write_eof()
    return response


B64_GROUP = 3  # bytes that base64 turns into 4 characters with no padding


async def stream_base64_json(
    request: web.Request, fields: dict[str, Any], file: StreamedFile
) -> web.StreamResponse:
    """``fields``, the file's path and size, and its bytes in base64 under ``content``: one JSON object
    (as the SDK reads a download), written as the file is read, never whole in memory."""
    head = json.dumps({**fields, "path": file.path, "size": file.size, "encoding": "base64"})
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(head) - 1 + len(', "content": "') + 4 * -(-file.size // 3) + len('"}')
    await response.prepare(request)
    await response.write(head[:-1].encode() + b', "content": "')
    carry = b""
    async for chunk in file.chunks():
        data = carry + chunk
        whole = len(data) - len(data) % B64_GROUP
        carry = data[whole:]
        await response.write(base64.b64encode(data[:whole]))
    await response.write(base64.b64encode(carry) + b'"}')
    await response.write_eof()
    return response


def json_response(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json")


def app_url_for(config: Config, session_id: str, port: int) -> str:
    return f"{config.server.public_url.rstrip('/')}/v1/app/{session_id}/{port}/"


def direct_url(config: Config, vm_id: str, port: int) -> str:
    public = urlsplit(config.server.public_url)
    suffix = f":{public.port}" if public.port else ""
    return f"{public.scheme}://{vm_id}-{port}.{config.api.sandbox_domain}{suffix}/"


def instance_url(config: Config, instance_uuid: str) -> str:
    public = urlsplit(config.server.public_url)
    suffix = f":{public.port}" if public.port else ""
    return f"{public.scheme}://instance-{instance_uuid}.{config.instances.domain}{suffix}/"


def iso_z(ts: float) -> str:
    """UTC time with a Z, as the Instances API's document shows it: 2025-01-10T12:00:00Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def share_view(config: Config, vm: VmRecord, token: str | None = None) -> dict[str, Any] | None:
    """The share as the API shows it: port, visibility, URLs; the token only in the create answer."""
    if not vm.share:
        return None
    port = vm.share["port"]
    view: dict[str, Any] = {
        "share_id": vm.share.get("share_id"),
        "port": port,
        "is_public": bool(vm.share.get("is_public")),
        "url": app_url_for(config, vm.session_id, port),
        "direct_url": direct_url(config, vm.vm_id, port),
    }
    if token is not None:
        view["access_token"] = token
        view["access"] = "send it as X-Access-Token, or once as ?gw_access_token=... to get a cookie"
    return view


def domain_view(config: Config, rec: DomainRecord) -> dict[str, Any]:
    """A custom domain as the API shows it: never its credentials. A delegated one shows the record the
    customer must add."""
    view: dict[str, Any] = {
        "domain": rec.domain, "id": rec.domain, "vm_id": rec.vm_id, "dns_provider": rec.dns_provider,
        "state": rec.state, "status": SDK_DOMAIN_STATUS.get(rec.state, rec.state),
        "last_error": rec.last_error, "expires_at": iso(rec.not_after), "created_at": iso(rec.created_at),
        "url": f"https://{rec.domain}/",
    }  # fmt: skip
    if rec.dns_provider == DELEGATED:
        target = delegation_target(rec.domain, config.acme.delegation_zone)
        view["dns_record"] = {"name": challenge_name(rec.domain).rstrip("."), "type": "CNAME",
                              "value": target.rstrip(".")}  # fmt: skip
    return view


def vm_view(
    config: Config, vm: VmRecord, exposed_ports: set[int] | None = None, domain: DomainRecord | None = None
) -> VmResponse:
    now = time.time()
    return VmResponse(
        vm_id=vm.vm_id,
        session_id=vm.session_id,
        status=vm.status,
        vm_ip=vm.ip,
        driver=vm.driver,
        vcpu_count=vm.vcpu_count,
        memory_mb=vm.memory_mb,
        vm_lifetime_seconds=vm.vm_lifetime_seconds,
        created_at=iso(vm.created_at) or "",
        expires_at=iso(vm.expires_at),
        ended_at=iso(vm.ended_at),
        uptime_seconds=uptime_s(vm, now),
        expires_in_seconds=round(remaining_s(vm, now), 2),
        metadata=vm.metadata,
        share=share_view(config, vm),
        exposed_ports=sorted(exposed_ports or ()),
        custom_domain=domain_view(config, domain) if domain is not None else None,
        error=vm.error,
        accel=vm.handle.get("accel"),
        snapshot_on_terminate=vm.snapshot_on_terminate,
        snapshot_id=vm.snapshot_id,
        snapshot_error=vm.snapshot_error,
        restored_from=vm.restored_from,
        image_variant=vm.image_variant,
        auto_suspend=vm.auto_suspend,
        auto_resume=vm.auto_resume,
        suspended_at=iso(vm.suspended_at),
        suspend_reason=vm.suspend_reason,
        idle_timeout_s=vm.idle_timeout_s,
        max_exchanges=vm.max_exchanges,
        last_activity=(
            LastActivity(at=iso(vm.last_activity_at) or "", source=vm.last_activity_source or "")
            if vm.last_activity_at is not None
            else None
        ),
        volumes=list(vm.volumes),
    )
