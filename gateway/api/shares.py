"""Shares as a resource (``/v1/shares``): open a port of a VM, publicly or behind a token; make it
public or private; revoke it, which closes its open connections on every edge."""

from __future__ import annotations

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import CONFIG, SHARES
from gateway.api.responses import app_url_for, direct_url, iso, json_response
from gateway.api.schemas import ShareCreateRequest, ShareResponse, ShareUpdateRequest
from gateway.api.validation import RequestValidationError, detail_item, parse_body
from gateway.config import Config
from gateway.orchestrator.model import HOST_LOCALHOST, HOST_PRESERVE, ShareRecord

routes = web.RouteTableDef()

TOKEN_USE = "send it as X-Access-Token, or once as ?gw_access_token=... to get a cookie"


def share_response(config: Config, rec: ShareRecord, token: str | None = None) -> ShareResponse:
    return ShareResponse(
        share_id=rec.share_id,
        id=rec.share_id,
        vm_id=rec.vm_id,
        session_id=rec.session_id,
        port=rec.port,
        is_public=rec.is_public,
        host=HOST_LOCALHOST if rec.host == HOST_LOCALHOST else HOST_PRESERVE,
        status="revoked" if rec.revoked_at is not None else "active",
        url=app_url_for(config, rec.session_id, rec.port),
        direct_url=direct_url(config, rec.vm_id, rec.port),
        created_at=iso(rec.created_at) or "",
        revoked_at=iso(rec.revoked_at),
        access_token=token,
        access=TOKEN_USE if token else None,
    )


@routes.post("/v1/shares")
async def create_share(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, ShareCreateRequest)
    if body.session_id is None and body.vm_id is None:
        message = "give session_id or vm_id"
        raise RequestValidationError([detail_item(["body", "session_id"], message, "missing")])
    # vm_id wins: the official SDK sends its current session along with a VM it names.
    rec, _, token = await request.app[SHARES].create(
        owner,
        session_id=None if body.vm_id else body.session_id,
        vm_id=body.vm_id,
        port=body.port,
        is_public=body.is_public,
        host=body.host,
    )
    return json_response(share_response(request.app[CONFIG], rec, token), status=201)


@routes.get("/v1/shares/{share_id}")
async def get_share(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    rec = await request.app[SHARES].get(owner, request.match_info["share_id"])
    return json_response(share_response(request.app[CONFIG], rec))


@routes.patch("/v1/shares/{share_id}")
async def update_share(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, ShareUpdateRequest)
    if body.is_public is None and body.revoke is None and body.host is None:
        message = "give is_public, host or revoke"
        raise RequestValidationError([detail_item(["body"], message, "value_error")])
    rec, token = await request.app[SHARES].update(
        owner, request.match_info["share_id"], is_public=body.is_public, revoke=body.revoke, host=body.host
    )
    return json_response(share_response(request.app[CONFIG], rec, token))
