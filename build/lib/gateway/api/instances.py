"""The Instances API (spec 004): an organisation's browser instances, under /orgs/{org_uuid}/api/instances.

Auth is an organisation's API key as ``Authorization: Bearer``. A missing or unknown key is 401; a valid
key on another organisation's path (or a key of no organisation) gets the answer a missing organisation
gets, 404, so paths say nothing about which organisations exist.
"""

from __future__ import annotations

from aiohttp import web

from gateway.api.auth import key_from_headers
from gateway.api.context import CONFIG, INSTANCES, KEY_STORE
from gateway.api.responses import instance_url, iso_z, json_response
from gateway.api.schemas import CreateInstanceRequest, InstanceListResponse, InstanceResponse
from gateway.api.validation import RequestValidationError, detail_item, parse_body
from gateway.config import Config
from gateway.errors import NotFound, Unauthorized
from gateway.orchestrator.instances import InstanceView

routes = web.RouteTableDef()

COLLECTION = "/orgs/{org_uuid}/api/instances"


async def _org(request: web.Request) -> str:
    """The organisation in the path, once the caller's key is known to belong to it."""
    record = await request.app[KEY_STORE].authenticate(key_from_headers(request))
    if record is None:
        raise Unauthorized()
    org = request.match_info["org_uuid"]
    if record.org is None or record.org != org:
        raise NotFound("Organization not found", code="org_not_found")
    return org


def _view(config: Config, view: InstanceView) -> InstanceResponse:
    rec = view.record
    return InstanceResponse(
        instance_uuid=rec.instance_uuid,
        status=view.status,  # type: ignore[arg-type]
        image=rec.image,
        size=rec.size,
        created_at=iso_z(rec.created_at),
        access_url=instance_url(config, rec.instance_uuid),
    )


@routes.get(COLLECTION)
async def list_instances(request: web.Request) -> web.Response:
    org = await _org(request)
    views = await request.app[INSTANCES].list(org)
    items = [_view(request.app[CONFIG], v) for v in views]
    return json_response(InstanceListResponse(instances=items, total=len(items)))


@routes.post(COLLECTION)
async def create_instance(request: web.Request) -> web.Response:
    org = await _org(request)
    body = await parse_body(request, CreateInstanceRequest)
    service = request.app[INSTANCES]
    checks = (("image", service.image_problem(body.image)), ("size", service.size_problem(body.size)))
    problems = [detail_item(["body", f], problem, "value_error") for f, problem in checks if problem]
    if problems:
        raise RequestValidationError(problems)
    view = await service.create(org, body.image, body.size)
    response = json_response(_view(request.app[CONFIG], view), status=201)
    response.headers["Location"] = f"{request.path.rstrip('/')}/{view.record.instance_uuid}"
    return response


@routes.get(COLLECTION + "/{instance_uuid}")
async def get_instance(request: web.Request) -> web.Response:
    org = await _org(request)
    view = await request.app[INSTANCES].get(org, request.match_info["instance_uuid"])
    return json_response(_view(request.app[CONFIG], view))


@routes.delete(COLLECTION + "/{instance_uuid}")
async def destroy_instance(request: web.Request) -> web.Response:
    org = await _org(request)
    await request.app[INSTANCES].destroy(org, request.match_info["instance_uuid"])
    return web.Response(status=204)
