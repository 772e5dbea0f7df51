"""Volumes in VMs as the official SDK calls them: ``volumes`` on POST /v1/vms (see ``vms.py``), and
``mount_volume`` / ``list_volumes`` / ``unmount_volume`` on a running VM (``/v1/vms/{id}/volumes``)."""

from __future__ import annotations

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import ORCHESTRATOR, VM_VOLUMES
from gateway.api.schemas import VMVolumeMountRequest
from gateway.api.validation import RequestValidationError, detail_item, parse_body
from gateway.errors import NotFound
from gateway.orchestrator.vm_volumes import VolumeMountRequest, checked
from gateway.orchestrator.volumes import VolumeService

routes = web.RouteTableDef()


def mount_request(body: VMVolumeMountRequest, *where: str | int) -> VolumeMountRequest:
    """One mount as asked, checked (a 422 naming the field under ``where``)."""
    if body.mode not in ("rw", "ro"):
        raise RequestValidationError([detail_item([*where, "mode"], "mode is rw or ro", "value_error")])
    request = VolumeMountRequest(body.volume_id, body.mount_path, body.mode == "ro", body.checkpoint_id)
    try:
        checked([request])
    except ValueError as exc:
        raise RequestValidationError([detail_item([*where, "mount_path"], str(exc), "value_error")]) from None
    return request


async def create_time_mounts(
    volumes: VolumeService | None, owner: str, asked: list[VMVolumeMountRequest]
) -> tuple[VolumeMountRequest, ...]:
    """``volumes`` of POST /v1/vms, checked: the fields, the paths (no two alike), and that each volume
    (and checkpoint) is the key's own (a 422 naming its position otherwise, like a missing one)."""
    requests = [mount_request(item, "body", "volumes", i) for i, item in enumerate(asked)]
    try:
        checked(requests)
    except ValueError as exc:
        raise RequestValidationError([detail_item(["body", "volumes"], str(exc), "value_error")]) from None
    assert volumes is not None  # (refused earlier where there are none)
    missing = []
    for i, request in enumerate(requests):
        try:
            await volumes.get(owner, request.volume_id)
            if request.checkpoint_id is not None:
                await volumes.get_checkpoint(owner, request.volume_id, request.checkpoint_id)
        except NotFound as exc:
            missing.append(detail_item(["body", "volumes", i, "volume_id"], exc.message, "value_error"))
    if missing:
        raise RequestValidationError(missing)
    return tuple(requests)


@routes.get("/v1/vms/{vm_id}/volumes")
async def list_vm_volumes(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    return web.json_response(await request.app[VM_VOLUMES].list(owner, request.match_info["vm_id"]))


@routes.post("/v1/vms/{vm_id}/volumes")
async def mount_volume(request: web.Request) -> web.Response:
    """Into the running VM; returns once it is there (``wait`` is accepted and always true)."""
    owner = await authenticate(request)
    body = await parse_body(request, VMVolumeMountRequest)
    mount = mount_request(body, "body")
    vm_id = request.match_info["vm_id"]
    entry = await request.app[VM_VOLUMES].mount(owner, vm_id, mount)
    return web.json_response({"vm_id": vm_id, **entry})


@routes.delete("/v1/vms/{vm_id}/volumes/{volume_id}")
async def unmount_volume(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    vm_id, volume_id = request.match_info["vm_id"], request.match_info["volume_id"]
    mount_path = request.query.get("mount_path", "")
    if not mount_path:
        raise RequestValidationError(
            [detail_item(["query", "mount_path"], "the mount path to unmount", "missing")]
        )
    await request.app[ORCHESTRATOR].get_vm(owner, vm_id)  # (404 first for another key's VM)
    await request.app[VM_VOLUMES].unmount(owner, vm_id, volume_id, mount_path)
    return web.json_response(
        {"vm_id": vm_id, "volume_id": volume_id, "mount_path": mount_path, "unmounted": True}
    )
