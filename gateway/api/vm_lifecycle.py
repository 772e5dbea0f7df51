"""A VM's lifecycle beyond create and kill, as the official SDK calls it: suspend, resume, the
``auto_suspend`` / ``auto_resume`` / ``idle_timeout_s`` settings (``PATCH /v1/vms/{id}``), keep-alive
(the idle clock starts again), and snapshots and clones of a running VM (drivers with snapshots:
qemu)."""

from __future__ import annotations

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import CONFIG, LIFECYCLE, ORCHESTRATOR
from gateway.api.responses import json_response, vm_view
from gateway.api.schemas import (
    VmCloneRequest,
    VmCloneResponse,
    VmCreateQuery,
    VmSnapshotRequest,
    VmUpdateRequest,
)
from gateway.api.sessions import lifetime_context
from gateway.api.snapshots import snapshot_view
from gateway.api.validation import RequestValidationError, detail_item, parse_body, parse_query
from gateway.errors import VmNotRunning
from gateway.orchestrator.model import VM_ACTIVE, VM_FAILED, VmRecord
from gateway.orchestrator.service import VmParams, boot_failed

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
    body = await parse_body(request, VmUpdateRequest, lifetime_context(request.app[CONFIG]))
    changes = body.model_dump(exclude_none=True)
    if not changes:
        raise RequestValidationError(
            [
                detail_item(
                    ["body"], "give auto_suspend, auto_resume, idle_timeout_s or max_exchanges", "value_error"
                )
            ]
        )
    orchestrator = request.app[ORCHESTRATOR]
    vm = await orchestrator.update_vm_settings(owner, request.match_info["vm_id"], **changes)
    return json_response(vm_view(request.app[CONFIG], vm))


@routes.post("/v1/vms/{vm_id}/keepalive")
async def keepalive(request: web.Request) -> web.Response:
    """The VM's idle clock (idle_timeout_s) starts again now; its lifetime is not changed."""
    owner = await authenticate(request)
    vm = await request.app[ORCHESTRATOR].keep_alive(owner, request.match_info["vm_id"])
    return json_response(vm_view(request.app[CONFIG], vm))


@routes.post("/v1/vms/{vm_id}/snapshot")
async def snapshot(request: web.Request) -> web.Response:
    """The running VM's whole state, kept as a snapshot (it goes on running); a VM made with its
    ``snapshot_id`` resumes it."""
    owner = await authenticate(request)
    body = await parse_body(request, VmSnapshotRequest) if request.can_read_body else VmSnapshotRequest()
    orchestrator = request.app[ORCHESTRATOR]
    vm = await _active_vm(request, owner)
    snap = await orchestrator.snapshots.take_live(vm, body.name)
    return json_response(snapshot_view(snap), status=201)


@routes.post("/v1/vms/{vm_id}/clone")
async def clone(request: web.Request) -> web.Response:
    """A new VM (in a new session) resumed from a snapshot of this one, taken now; both go on."""
    owner = await authenticate(request)
    config = request.app[CONFIG]
    body = (
        await parse_body(request, VmCloneRequest, lifetime_context(config))
        if request.can_read_body
        else VmCloneRequest()
    )
    orchestrator = request.app[ORCHESTRATOR]
    vm = await _active_vm(request, owner)
    snap = await orchestrator.snapshots.take_live(vm, body.snapshot_name)
    params = VmParams(
        vm_lifetime_seconds=body.vm_lifetime_seconds or vm.vm_lifetime_seconds,
        metadata=body.metadata if body.metadata is not None else vm.metadata,
        idle_timeout_s=vm.idle_timeout_s,
        restore=snap,
        image=snap.image_variant or "",
    )
    session, copy = await orchestrator.create_vm(owner, None, params, wait=True)
    if copy.status == VM_FAILED:
        raise boot_failed(copy)
    return json_response(
        VmCloneResponse(
            vm_id=copy.vm_id,
            session_id=session.session_id,
            status=copy.status,
            snapshot_id=snap.snapshot_id,
            source_vm_id=vm.vm_id,
        )
    )


async def _active_vm(request: web.Request, owner: str) -> VmRecord:
    vm = await request.app[ORCHESTRATOR].get_vm(owner, request.match_info["vm_id"])
    if vm.status != VM_ACTIVE:
        raise VmNotRunning(f"VM {vm.vm_id} is {vm.status}: only a running VM can be snapshotted")
    return vm
