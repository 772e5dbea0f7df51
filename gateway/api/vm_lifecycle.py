"""A VM's lifecycle beyond create and kill, as the official SDK calls it: suspend, resume, and the
``auto_suspend`` / ``auto_resume`` settings (``PATCH /v1/vms/{id}``)."""

from __future__ import annotations

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import CONFIG, LIFECYCLE, ORCHESTRATOR
from gateway.api.responses import json_response, vm_view
from gateway.api.schemas import VmCreateQuery, VmUpdateRequest
from gateway.api.validation import RequestValidationError, detail_item, parse_body, parse_query

routes = web.RouteTableDef()


@routes.post("/v1/vms/{vm_id}/suspend")
async def suspend(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    vm = await request.app[ORCHESTRATOR].get_vm(owner, request.match_info["vm_id"])
    vm = await request.app[LIFECYCLE].suspend(vm)
    return json_response(vm_view(request.app[CONFIG], vm))


@routes.post("/v1/vms/{vm_id}/resume")
async def resume(request: web.Request) -> web.Response:
    """Returns once the VM runs again (``wait=false`` returns at once, the resume under way)."""
    owner = await authenticate(request)
    query = parse_query(request, VmCreateQuery)
    lifecycle = request.app[LIFECYCLE]
    vm = await request.app[ORCHESTRATOR].get_vm(owner, request.match_info["vm_id"])
    if query.wait:
        vm = await lifecycle.resume(vm)
    else:
        lifecycle.resume_soon(vm)
    return json_response(vm_view(request.app[CONFIG], vm))


@routes.patch("/v1/vms/{vm_id}")
async def update(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, VmUpdateRequest)
    changes = body.model_dump(exclude_none=True)
    if not changes:
        raise RequestValidationError(
            [detail_item(["body"], "give auto_suspend or auto_resume", "value_error")]
        )
    orchestrator = request.app[ORCHESTRATOR]
    vm = await orchestrator.update_vm_settings(owner, request.match_info["vm_id"], **changes)
    return json_response(vm_view(request.app[CONFIG], vm))
