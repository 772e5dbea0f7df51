"""What the official SDK asks about sessions beyond the spec's three endpoints: the session record, its
usage, the key's sandboxes, and ``POST /kill``."""

from __future__ import annotations

import json
from typing import Literal

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import CONFIG, ORCHESTRATOR
from gateway.api.responses import iso, json_response, vm_view
from gateway.api.schemas import (
    KillRequest,
    KillResponse,
    SandboxesQuery,
    SessionInfoResponse,
    SessionUsageResponse,
    VmList,
)
from gateway.api.validation import parse_body, parse_query
from gateway.errors import NotFound
from gateway.orchestrator.model import is_live

routes = web.RouteTableDef()

MIB = 1024 * 1024


@routes.get("/v1/sessions/session/{session_id}")
async def session_record(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    orchestrator = request.app[ORCHESTRATOR]
    session = await orchestrator.get_session(owner, request.match_info["session_id"])
    if session is None:
        raise NotFound("Session not found", code="session_not_found")
    vm = await orchestrator.session_vm(session)
    status: Literal["active", "idle", "ended"] = (
        "idle" if vm is None else ("active" if is_live(vm) else "ended")
    )
    return json_response(
        SessionInfoResponse(
            session_id=session.session_id,
            id=session.session_id,
            created_at=iso(session.created_at),
            status=status,
            vm_id=vm.vm_id if vm else None,
            vm_status=vm.status if vm else None,
            vm_lifetime_seconds=session.vm_lifetime_seconds,
            memory_mb=session.memory_mb,
            vcpu_count=session.vcpu_count,
            metadata=session.metadata,
            env_keys=sorted(session.env),
            env_status=session.env_status,
            env_error=session.env_error,
            executions=session.executions,
        )
    )


@routes.get("/v1/sessions/usage/{session_id}")
async def session_usage(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    usage = await request.app[ORCHESTRATOR].session_usage(owner, request.match_info["session_id"])
    peak = usage.peak_memory_bytes
    return json_response(
        SessionUsageResponse(
            session_id=usage.session.session_id,
            vm_count=len(usage.vms),
            vm_seconds=round(usage.vm_seconds, 3),
            cpu_seconds=round(usage.cpu_seconds, 3) if usage.cpu_seconds is not None else None,
            peak_memory_bytes=peak,
            peak_memory_mb=round(peak / MIB, 1) if peak is not None else None,
            requests=usage.requests,
            open_exchanges=usage.open_exchanges,
            open_tunnels=usage.open_tunnels,
            bytes_in=usage.bytes_in,
            bytes_out=usage.bytes_out,
            egress_bytes_out=usage.egress_bytes_out,
            egress_bytes_in=usage.egress_bytes_in,
            executions=usage.session.executions,
        )
    )


@routes.get("/v1/sessions/sandboxes")
async def list_sandboxes(request: web.Request) -> web.Response:
    """The key's VMs, newest first, whose metadata holds every key/value of ``metadata`` (a JSON object)."""
    owner = await authenticate(request)
    query = parse_query(request, SandboxesQuery)
    wanted = json.loads(query.metadata) if query.metadata else {}
    records = await request.app[ORCHESTRATOR].list_vms(owner)
    matching = [
        r for r in reversed(records) if all(k in r.metadata and r.metadata[k] == v for k, v in wanted.items())
    ]
    config = request.app[CONFIG]
    return json_response(VmList([vm_view(config, r) for r in matching[: query.limit]]))


@routes.post("/kill")
async def kill(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, KillRequest)
    vm = await request.app[ORCHESTRATOR].kill_session(owner, body.session_id)
    return json_response(
        KillResponse(
            session_id=body.session_id,
            killed=vm is not None,
            vm_id=vm.vm_id if vm else None,
            status=vm.status if vm else None,
        )
    )
