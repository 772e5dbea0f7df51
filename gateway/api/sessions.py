"""Sessions: create, status, app URL (the spec's three session endpoints)."""

from __future__ import annotations

import time

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import CONFIG, ORCHESTRATOR, SIGNED_URLS
from gateway.api.responses import app_url_for, direct_url, iso, json_response, remaining_s, uptime_s
from gateway.api.schemas import (
    AppUrlQuery,
    AppURLResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    SessionStatusResponse,
    VMCreateRequest,
)
from gateway.api.validation import parse_body, parse_query
from gateway.config import Config
from gateway.orchestrator.model import VM_ACTIVE
from gateway.orchestrator.service import VmParams

routes = web.RouteTableDef()


def lifetime_context(config: Config) -> dict[str, int]:
    """The operator's bounds the request models check: vm_lifetime_seconds and idle_timeout_s."""
    vms = config.vms
    return {
        "min_lifetime_s": vms.min_lifetime_s,
        "max_lifetime_s": vms.max_lifetime_s,
        "min_idle_timeout_s": vms.min_idle_timeout_s,
        "max_idle_timeout_s": vms.max_lifetime_s,
    }


def vm_params(
    body: CreateSessionRequest | VMCreateRequest, share: dict[str, object] | None = None
) -> VmParams:
    """What the orchestrator needs from either request that can make a VM."""
    return VmParams(
        vm_lifetime_seconds=body.vm_lifetime_seconds,
        memory_mb=body.memory_mb,
        vcpu_count=body.vcpu_count,
        metadata=body.metadata,
        env=body.env,
        share=share,
    )


@routes.post("/v1/sessions/session")
async def create_session(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    body = await parse_body(request, CreateSessionRequest, lifetime_context(config))
    owner = await authenticate(request, body_key=body.api_key)
    session = await request.app[ORCHESTRATOR].create_session(owner, vm_params(body))
    return json_response(CreateSessionResponse(session_id=session.session_id))


@routes.get("/v1/sessions/status/{session_id}")
async def session_status(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    session_id = request.match_info["session_id"]
    orchestrator = request.app[ORCHESTRATOR]
    session = await orchestrator.get_session(owner, session_id)
    if session is None:
        return json_response(SessionStatusResponse(session_id=session_id, exists=False, vm_assigned=False))
    vm = await orchestrator.session_vm(session)
    status = SessionStatusResponse(
        session_id=session_id,
        exists=True,
        vm_assigned=vm is not None,
        created_at=iso(session.created_at),
        env_status=session.env_status,
        env_error=session.env_error,
    )
    if vm is not None:
        now = time.time()
        status.vm_status = vm.status
        status.vm_id = vm.vm_id
        status.vm_alive = vm.status == VM_ACTIVE
        status.uptime_seconds = uptime_s(vm, now)
        status.expires_in_seconds = round(remaining_s(vm, now), 2)
    return json_response(status)


@routes.get("/v1/sessions/app-url/{session_id}")
async def app_url(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    query = parse_query(request, AppUrlQuery)
    session_id = request.match_info["session_id"]
    orchestrator = request.app[ORCHESTRATOR]
    config = request.app[CONFIG]
    signed = None
    if query.expires_in is None:
        vm = await orchestrator.open_app_url(owner, session_id, query.port)  # exposes the port
    else:
        # A signed URL instead: it opens the port until it expires, and the port stays as it was.
        signed = await request.app[SIGNED_URLS].for_session_port(
            owner, session_id, query.port, query.expires_in
        )
        vm = signed.vm
    suffix = "?" + signed.query if signed is not None else ""
    return json_response(
        AppURLResponse(
            url=app_url_for(config, session_id, query.port) + suffix,
            direct_url=direct_url(config, vm.vm_id, query.port) + suffix,
            vm_ip=vm.ip,
            port=query.port,
            vm_id=vm.vm_id,
            session_id=session_id,
            status=vm.status,
            expires_in_seconds=int(remaining_s(vm, time.time())),
            expires_at=iso(signed.expires) if signed is not None else None,
            key_version=signed.key_version if signed is not None else None,
        )
    )
