"""Custom domains: create for a share, list, get, health, verify (retry) and delete
(``/v1/custom-domains``, the ``id`` is the domain). They are also made with a VM (``custom_domain`` on
``POST /v1/vms``), and released when their VM ends."""

from __future__ import annotations

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import CONFIG, ORCHESTRATOR, SHARES
from gateway.api.responses import SDK_DOMAIN_STATUS, domain_view, iso, json_response
from gateway.api.schemas import (
    CustomDomainCreateRequest,
    CustomDomainHealthResponse,
    CustomDomainList,
    CustomDomainResponse,
)
from gateway.api.validation import RequestValidationError, detail_item, parse_body
from gateway.errors import NotFound
from gateway.orchestrator.domains import DomainRequest, DomainService
from gateway.orchestrator.model import DOMAIN_ISSUED, VM_ACTIVE

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


@routes.post("/v1/custom-domains")
async def create_domain(request: web.Request) -> web.Response:
    """Serve a customer's domain from a share's port (the official SDK's ``custom_domains.create``)."""
    owner = await authenticate(request)
    body = await parse_body(request, CustomDomainCreateRequest)
    domain_request = DomainRequest(body.domain, body.dns_provider, body.dns_credentials)
    problems = _domains(request).problems(domain_request)
    if problems:
        raise RequestValidationError(
            [detail_item(["body", field if field != "custom_domain" else "domain"], msg, "value_error")
             for field, msg in problems]
        )  # fmt: skip
    rec = await request.app[SHARES].point_domain(owner, body.share_id, domain_request)
    return json_response(CustomDomainResponse(**domain_view(request.app[CONFIG], rec)), status=201)


@routes.get("/v1/custom-domains/{domain}/health")
async def domain_health(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    rec = await _domains(request).get(owner, request.match_info["domain"])
    vm = await request.app[ORCHESTRATOR].store.get_vm(rec.vm_id)
    problems = []
    if rec.state != DOMAIN_ISSUED:
        problems.append(f"no certificate yet ({rec.state}{': ' + rec.last_error if rec.last_error else ''})")
    if vm is None or vm.status != VM_ACTIVE:
        problems.append("its VM is not running")
    port = (vm.share or {}).get("port") if vm is not None else None
    return json_response(
        CustomDomainHealthResponse(
            id=rec.domain,
            domain=rec.domain,
            status=SDK_DOMAIN_STATUS.get(rec.state, rec.state),
            healthy=not problems,
            certificate_issued=rec.state == DOMAIN_ISSUED,
            certificate_expires_at=iso(rec.not_after),
            vm_id=rec.vm_id,
            vm_status=vm.status if vm is not None else None,
            port=port if isinstance(port, int) else None,
            problems=problems,
        )
    )


@routes.post("/v1/custom-domains/{domain}/verify")
async def verify_domain(request: web.Request) -> web.Response:
    """Check the DNS and issue now (the SDK's ``verify``): the same as retry."""
    owner = await authenticate(request)
    rec = await _domains(request).retry(owner, request.match_info["domain"])
    return json_response(CustomDomainResponse(**domain_view(request.app[CONFIG], rec)), status=202)
