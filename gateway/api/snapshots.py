"""Snapshots: list, get and delete the caller's VM snapshots (made by VMs created with
``snapshot_on_terminate``, resumed by creating a VM with ``snapshot_id``)."""

from __future__ import annotations

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import ORCHESTRATOR
from gateway.api.responses import iso, json_response
from gateway.api.schemas import SnapshotList, SnapshotResponse
from gateway.orchestrator.model import SnapshotRecord

routes = web.RouteTableDef()


def snapshot_view(snap: SnapshotRecord) -> SnapshotResponse:
    return SnapshotResponse(
        snapshot_id=snap.snapshot_id,
        id=snap.snapshot_id,
        name=snap.name,
        vm_id=snap.vm_id,
        driver=snap.driver,
        vcpu_count=snap.vcpu_count,
        memory_mb=snap.memory_mb,
        size_bytes=snap.size_bytes,
        created_at=iso(snap.created_at) or "",
    )


@routes.get("/v1/snapshots")
async def list_snapshots(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    views = [snapshot_view(s) for s in await request.app[ORCHESTRATOR].snapshots.list(owner)]
    return json_response(SnapshotList(views))


@routes.get("/v1/snapshots/{snapshot_id}")
async def get_snapshot(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    snap = await request.app[ORCHESTRATOR].snapshots.get(owner, request.match_info["snapshot_id"])
    return json_response(snapshot_view(snap))


@routes.delete("/v1/snapshots/{snapshot_id}")
async def delete_snapshot(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    await request.app[ORCHESTRATOR].snapshots.delete(owner, request.match_info["snapshot_id"])
    return web.Response(status=204)
