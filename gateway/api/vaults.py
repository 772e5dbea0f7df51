"""Vaults (``/v1/vaults``), as the official SDK calls them: vaults, their credentials (values go in,
never out), the services (hosts) the credentials are for, the template catalog and the request log.

Another key's vault answers 404, exactly like a vault that does not exist.
"""

from __future__ import annotations

from aiohttp import web

from gateway.api import vault_schemas as vs
from gateway.api.auth import authenticate
from gateway.api.context import ORCHESTRATOR
from gateway.api.responses import iso, json_response
from gateway.api.validation import parse_body, parse_query
from gateway.errors import Unsupported
from gateway.orchestrator import vault_rules as rules
from gateway.orchestrator.model import VaultCredentialRecord, VaultRecord, VaultServiceRecord
from gateway.orchestrator.vaults import VaultService

routes = web.RouteTableDef()

BASE = "/v1/vaults/{vault_id}"


def _vaults(request: web.Request) -> VaultService:
    vaults = request.app[ORCHESTRATOR].vaults
    if vaults is None:
        raise Unsupported("vaults are not available on this gateway")
    return vaults


def vault_view(rec: VaultRecord) -> vs.VaultResponse:
    return vs.VaultResponse(
        id=rec.vault_id,
        vault_id=rec.vault_id,
        name=rec.name,
        description=rec.description,
        created_at=iso(rec.created_at) or "",
        updated_at=iso(rec.updated_at),
    )


def credential_view(rec: VaultCredentialRecord) -> vs.CredentialResponse:
    return vs.CredentialResponse(
        id=rec.credential_id,
        credential_id=rec.credential_id,
        vault_id=rec.vault_id,
        name=rec.name,
        credential_type=rec.credential_type,
        description=rec.description,
        created_at=iso(rec.created_at) or "",
        updated_at=iso(rec.updated_at),
        rotated_at=iso(rec.rotated_at),
    )


def service_view(rec: VaultServiceRecord) -> vs.ServiceResponse:
    return vs.ServiceResponse(
        id=rec.service_id,
        service_id=rec.service_id,
        vault_id=rec.vault_id,
        host=rec.host,
        auth_config={k: str(v) for k, v in rec.auth_config.items()},
        enabled=rec.enabled,
        description=rec.description,
        created_at=iso(rec.created_at) or "",
    )


# The catalog first: its path would otherwise read as a vault id.
@routes.get("/v1/vaults/catalog")
async def catalog(request: web.Request) -> web.Response:
    await authenticate(request)
    return json_response(
        vs.CatalogResponse(templates=[vs.CatalogTemplate(**t.view()) for t in rules.CATALOG])
    )


@routes.get("/v1/vaults")
async def list_vaults(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    found = await _vaults(request).list_owned(owner)
    return json_response(vs.VaultList(vaults=[vault_view(v) for v in found]))


@routes.post("/v1/vaults")
async def create_vault(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, vs.VaultCreateRequest)
    rec = await _vaults(request).create(owner, body.name, body.description)
    return json_response(vault_view(rec), status=201)


@routes.get(BASE)
async def get_vault(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    return json_response(vault_view(await _vaults(request).get(owner, request.match_info["vault_id"])))


@routes.patch(BASE)
async def update_vault(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, vs.VaultUpdateRequest)
    rec = await _vaults(request).update(owner, request.match_info["vault_id"], body.name, body.description)
    return json_response(vault_view(rec))


@routes.delete(BASE)
async def delete_vault(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    await _vaults(request).delete(owner, request.match_info["vault_id"])
    return web.Response(status=204)


@routes.get(BASE + "/discover")
async def discover_vault(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    vaults, vault_id = _vaults(request), request.match_info["vault_id"]
    rec = await vaults.get(owner, vault_id)
    credentials = await vaults.credentials(owner, vault_id)
    services = await vaults.services(owner, vault_id)
    return json_response(
        vs.VaultDiscoverResponse(
            id=rec.vault_id,
            vault_id=rec.vault_id,
            name=rec.name,
            credential_names=[c.name for c in credentials],
            service_hosts=sorted({s.host for s in services}),
        )
    )


@routes.get(BASE + "/credentials")
async def list_credentials(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    found = await _vaults(request).credentials(owner, request.match_info["vault_id"])
    return json_response(vs.CredentialList(credentials=[credential_view(c) for c in found]))


@routes.post(BASE + "/credentials")
async def add_credential(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, vs.CredentialCreateRequest)
    rec = await _vaults(request).add_credential(
        owner,
        request.match_info["vault_id"],
        name=body.name,
        value=body.value,
        credential_type=body.credential_type,
        description=body.description,
    )
    return json_response(credential_view(rec), status=201)


@routes.post(BASE + "/credentials/{credential_id}/rotate")
async def rotate_credential(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, vs.CredentialRotateRequest)
    info = request.match_info
    rec = await _vaults(request).rotate_credential(owner, info["vault_id"], info["credential_id"], body.value)
    return json_response(credential_view(rec))


@routes.delete(BASE + "/credentials/{credential_id}")
async def delete_credential(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    info = request.match_info
    await _vaults(request).delete_credential(owner, info["vault_id"], info["credential_id"])
    return web.Response(status=204)


@routes.get(BASE + "/services")
async def list_services(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    found = await _vaults(request).services(owner, request.match_info["vault_id"])
    return json_response(vs.ServiceList(services=[service_view(s) for s in found]))


@routes.post(BASE + "/services")
async def add_service(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, vs.ServiceCreateRequest)
    wanted = [(body.host, body.auth_config, body.enabled, body.description)]
    (rec,) = await _vaults(request).add_services(owner, request.match_info["vault_id"], wanted)
    return json_response(service_view(rec), status=201)


@routes.post(BASE + "/services:from_template")
async def add_services_from_templates(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, vs.TemplatesRequest)
    vault_id = request.match_info["vault_id"]
    added = await _vaults(request).add_templates(owner, vault_id, body.template_ids)
    return json_response(
        vs.TemplatesResponse(vault_id=vault_id, services=[service_view(s) for s in added]), status=201
    )


@routes.delete(BASE + "/services/{service_id}")
async def delete_service(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    info = request.match_info
    await _vaults(request).delete_service(owner, info["vault_id"], info["service_id"])
    return web.Response(status=204)


@routes.get(BASE + "/request-logs")
async def request_logs(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    query = parse_query(request, vs.RequestLogQuery)
    entries = await _vaults(request).request_log(owner, request.match_info["vault_id"], query.limit)
    return json_response(
        vs.RequestLogList(
            logs=[
                vs.RequestLogEntry(
                    timestamp=iso(e.get("at")) or "",
                    vm_id=e.get("vm_id", ""),
                    host=e.get("host", ""),
                    method=e.get("method", ""),
                    path=e.get("path", ""),
                    status=e.get("status"),
                    credential_id=e.get("credential_id"),
                )
                for e in entries
            ]
        )
    )
