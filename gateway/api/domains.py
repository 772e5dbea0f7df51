"""Custom domains: list, get, retry and delete (``/v1/custom-domains``). They are created with a VM
(``custom_domain`` on ``POST /v1/vms``) and released when it ends."""

from __future__ import annotations

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import CONFIG, ORCHESTRATOR
from gateway.api.responses import domain_view, json_response
from gateway.api.schemas import CustomDomainList, CustomDomainResponse
from gateway.errors import NotFound
from gateway.orchestrator.domains import DomainService

routes = web.RouteTableDef()


def _domains(request: web.Request) -> DomainService:
    domains = request.app[ORCHESTRATOR].domains
    if domains is None:
        raise NotFound("custom domains are not available on this gateway", code="domain_not_found")
    return domains


@routes.get("/v1/custom-domains")
async def list_domains(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    records = await _domains(request).list(owner)
    views = [CustomDomainResponse(**domain_view(request.app[CONFIG], rec)) for rec in records]
    return json_response(CustomDomainList(views))


@routes.get("/v1/custom-domains/{domain}")
async def get_domain(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    rec = await _domains(request).get(owner, request.match_info["domain"])
    return json_response(CustomDomainResponse(**domain_view(request.app[CONFIG], rec)))


@routes.post("/v1/custom-domains/{domain}/retry")
async def retry_domain(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    rec = await _domains(request).retry(owner, request.match_info["domain"])
    return json_response(CustomDomainResponse(**domain_view(request.app[CONFIG], rec)), status=202)


@routes.delete("/v1/custom-domains/{domain}")
async def delete_domain(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    await _domains(request).delete(owner, request.match_info["domain"])
    return web.Response(status=204)
