"""GET /openapi.json: the API document, generated from the same models that validate requests."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.api import schemas as s

# (method, path, summary, request model, response model, query parameters, auth in body)
OPERATIONS: list[
    tuple[str, str, str, type[BaseModel] | None, type[BaseModel] | None, type[BaseModel] | None]
] = [
    ("post", "/v1/sessions/session", "Create Session", s.CreateSessionRequest, s.CreateSessionResponse, None),
    ("post", "/v1/vms", "Create Vm", s.VMCreateRequest, s.VMCreateResponse, s.VmCreateQuery),
    ("get", "/v1/vms", "List Vms", None, s.VmListResponse, None),
    ("get", "/v1/vms/{vm_id}", "Get Vm", None, s.VmResponse, None),
    ("delete", "/v1/vms/{vm_id}", "Kill Vm", None, s.VmResponse, None),
    ("get", "/v1/sessions/status/{session_id}", "Get Session Status", None, s.SessionStatusResponse, None),
    ("get", "/v1/sessions/app-url/{session_id}", "Get App Url", None, s.AppURLResponse, s.AppUrlQuery),
    ("post", "/execute", "Execute", s.ExecuteRequest, s.ExecuteResponse, None),
    ("get", "/v1/snapshots", "List Snapshots", None, s.SnapshotListResponse, None),
    ("get", "/v1/snapshots/{snapshot_id}", "Get Snapshot", None, s.SnapshotResponse, None),
    ("delete", "/v1/snapshots/{snapshot_id}", "Delete Snapshot", None, None, None),
    ("get", "/v1/custom-domains", "List Custom Domains", None, s.CustomDomainListResponse, None),
    ("get", "/v1/custom-domains/{domain}", "Get Custom Domain", None, s.CustomDomainResponse, None),
    ("post", "/v1/custom-domains/{domain}/retry", "Retry Custom Domain", None, s.CustomDomainResponse, None),
    ("delete", "/v1/custom-domains/{domain}", "Delete Custom Domain", None, None, None),
    ("get", "/orgs/{org_uuid}/api/instances", "List Instances", None, s.InstanceListResponse, None),
    (
        "post",
        "/orgs/{org_uuid}/api/instances",
        "Create Instance",
        s.CreateInstanceRequest,
        s.InstanceResponse,
        None,
    ),
    ("get", "/orgs/{org_uuid}/api/instances/{instance_uuid}", "Get Instance", None, s.InstanceResponse, None),
    ("delete", "/orgs/{org_uuid}/api/instances/{instance_uuid}", "Destroy Instance", None, None, None),
]

VALIDATION_ERROR = {
    "type": "object",
    "title": "HTTPValidationError",
    "properties": {
        "detail": {
            "type": "array",
            "items": {
                "type": "object",
                "title": "ValidationError",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        }
    },
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def build_openapi(title: str = "Sandbox gateway API", version: str = "0.1.0") -> dict[str, Any]:
    models = {m for op in OPERATIONS for m in op[3:] if m is not None} | {s.ErrorResponse}
    _, defs = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    components = defs.get("$defs", {}) | {"HTTPValidationError": VALIDATION_ERROR}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, request, response, query in OPERATIONS:
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in ("session_id", "vm_id", "domain", "org_uuid", "instance_uuid")
            if "{" + name + "}" in path
        ]
        if query is not None:
            for name, field in query.model_fields.items():
                params.append(
                    {"name": name, "in": "query", "required": False, "schema": {"default": field.default}}
                )
        op: dict[str, Any] = {
            "summary": summary,
            "parameters": params,
            "security": [{"APIKeyHeader": []}, {"OAuth2PasswordBearer": []}],
            "responses": {
                **(
                    {"200": {"description": "Successful Response", **_json(_ref(response))}}
                    if response
                    else {"204": {"description": "Done"}}
                ),
                "401": {"description": "Invalid or missing API key", **_json(_ref(s.ErrorResponse))},
                "422": {
                    "description": "Validation Error",
                    **_json({"$ref": "#/components/schemas/HTTPValidationError"}),
                },
            },
        }
        if request is not None:
            op["requestBody"] = {"required": True, **_json(_ref(request))}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "OAuth2PasswordBearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


OPENAPI = web.AppKey("openapi", dict)
