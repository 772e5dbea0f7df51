"""Rendering shared by the API handlers: JSON bodies, timestamps, VM views."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from aiohttp import web
from pydantic import BaseModel

from gateway.api.schemas import VmResponse
from gateway.routes.model import VM_ACTIVE, VmRecord
from gateway.routes.store import is_live


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


def json_response(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json")


def vm_view(vm: VmRecord, exposed_ports: set[int] | None = None) -> VmResponse:
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
        share=vm.share or None,
        exposed_ports=sorted(exposed_ports or ()),
        error=vm.error,
    )
