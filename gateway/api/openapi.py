"""GET /openapi.json: the API document, generated from the same models that validate requests."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.api import schemas as s
from gateway.api import unsupported
from gateway.api import vault_schemas as vs
from gateway.api import volume_schemas as vols

VAULT = "/v1/vaults/{vault_id}"
VOLUME = "/v1/volumes/{volume_id}"
# (method, path, summary, request model, response model, query parameters, auth in body)
OPERATIONS: list[
    tuple[str, str, str, type[BaseModel] | None, type[BaseModel] | None, type[BaseModel] | None]
] = [
    ("post", "/v1/sessions/session", "Create Session", s.CreateSessionRequest, s.CreateSessionResponse, None),
    ("post", "/v1/vms", "Create Vm", s.VMCreateRequest, s.VMCreateResponse, s.VmCreateQuery),
    ("get", "/v1/vms", "List Running Vms", None, s.VmList, s.VmListQuery),
    ("get", "/v1/vms/", "List All Vm Records", None, s.VmList, s.VmListQuery),
    ("get", "/v1/vms/{vm_id}", "Get Vm", None, s.VmResponse, None),
    ("delete", "/v1/vms/{vm_id}", "Kill Vm", None, s.VmResponse, None),
    ("get", "/v1/sessions/status/{session_id}", "Get Session Status", None, s.SessionStatusResponse, None),
    ("get", "/v1/sessions/app-url/{session_id}", "Get App Url", None, s.AppURLResponse, s.AppUrlQuery),
    ("get", "/v1/sessions/session/{session_id}", "Get Session", None, s.SessionInfoResponse, None),
    ("get", "/v1/sessions/usage/{session_id}", "Get Session Usage", None, s.SessionUsageResponse, None),
    ("get", "/v1/sessions/sandboxes", "List Sandboxes", None, s.VmList, s.SandboxesQuery),
    ("post", "/kill", "Kill Session Vm", s.KillRequest, s.KillResponse, None),
    ("get", "/v1/users/me", "Get Current User", None, s.UserResponse, None),
    ("post", "/v1/sessions/{sid}/pty/sessions", "Create Terminal", s.PtyCreateRequest, s.PtyResponse, None),
    ("get", "/v1/sessions/{sid}/pty/sessions", "List Terminals", None, s.PtyList, None),
    ("get", "/v1/sessions/{sid}/pty/sessions/{pty_id}", "Get Terminal", None, s.PtyResponse, None),
    (
        "post",
        "/v1/sessions/{sid}/pty/sessions/{pty_id}/resize",
        "Resize Terminal",
        s.PtyResizeRequest,
        s.PtyResponse,
        None,
    ),
    ("delete", "/v1/sessions/{sid}/pty/sessions/{pty_id}", "End Terminal", None, s.PtyResponse, None),
    ("post", "/v1/vms/{vm_id}/pty/sessions", "Create Vm Terminal", s.PtyCreateRequest, s.PtyResponse, None),
    ("get", "/v1/vms/{vm_id}/pty/sessions", "List Vm Terminals", None, s.PtyList, None),
    ("get", "/v1/vms/{vm_id}/pty/sessions/{pty_id}", "Get Vm Terminal", None, s.PtyResponse, None),
    (
        "post",
        "/v1/vms/{vm_id}/pty/sessions/{pty_id}/resize",
        "Resize Vm Terminal",
        s.PtyResizeRequest,
        s.PtyResponse,
        None,
    ),
    ("delete", "/v1/vms/{vm_id}/pty/sessions/{pty_id}", "End Vm Terminal", None, s.PtyResponse, None),
    (
        "get",
        "/v1/sessions/{sid}/pty/{pty_id}/connect",
        "Attach Terminal (WebSocket)",
        None,
        None,
        s.PtyConnectQuery,
    ),
    (
        "get",
        "/v1/vms/{vm_id}/pty/{pty_id}/connect",
        "Attach Vm Terminal (WebSocket)",
        None,
        None,
        s.PtyConnectQuery,
    ),
    ("post", "/upload", "Upload File", None, s.FileUploadResponse, None),
    ("post", "/download", "Download File", None, s.FileDownloadResponse, None),
    ("get", "/v1/sessions/{session_id}/files", "Download File Raw", None, None, s.RawFileQuery),
    ("post", "/execute", "Execute", s.ExecuteRequest, s.ExecuteResponse, None),
    ("post", "/execute_async", "Execute In Background", s.ExecuteRequest, s.ExecuteAsyncResponse, None),
    ("get", "/v1/executions/{execution_id}", "Get Execution", None, s.ExecutionResponse, None),
    ("get", "/v1/snapshots", "List Snapshots", None, s.SnapshotList, None),
    ("get", "/v1/snapshots/{snapshot_id}", "Get Snapshot", None, s.SnapshotResponse, None),
    ("delete", "/v1/snapshots/{snapshot_id}", "Delete Snapshot", None, None, None),
    ("get", "/v1/custom-domains", "List Custom Domains", None, s.CustomDomainList, None),
    ("get", "/v1/custom-domains/{domain}", "Get Custom Domain", None, s.CustomDomainResponse, None),
    ("post", "/v1/custom-domains/{domain}/retry", "Retry Custom Domain", None, s.CustomDomainResponse, None),
    ("delete", "/v1/custom-domains/{domain}", "Delete Custom Domain", None, None, None),
    (
        "post",
        "/v1/custom-domains",
        "Create Custom Domain For A Share",
        s.CustomDomainCreateRequest,
        s.CustomDomainResponse,
        None,
    ),
    (
        "get",
        "/v1/custom-domains/{domain}/health",
        "Custom Domain Health",
        None,
        s.CustomDomainHealthResponse,
        None,
    ),
    (
        "post",
        "/v1/custom-domains/{domain}/verify",
        "Verify Custom Domain",
        None,
        s.CustomDomainResponse,
        None,
    ),
    ("post", "/v1/shares", "Create Share", s.ShareCreateRequest, s.ShareResponse, None),
    ("post", "/v1/vms/{vm_id}/suspend", "Suspend Vm", None, s.VmResponse, None),
    ("post", "/v1/vms/{vm_id}/resume", "Resume Vm", None, s.VmResponse, s.VmCreateQuery),
    ("patch", "/v1/vms/{vm_id}", "Update Vm Settings", s.VmUpdateRequest, s.VmResponse, None),
    ("post", "/v1/vms/{vm_id}/keepalive", "Keep Vm Alive (Idle Clock)", None, s.VmResponse, None),
    (
        "post",
        "/v1/vms/{vm_id}/snapshot",
        "Snapshot A Running Vm",
        s.VmSnapshotRequest,
        s.SnapshotResponse,
        s.VmCreateQuery,
    ),
    (
        "post",
        "/v1/vms/{vm_id}/clone",
        "Clone A Running Vm",
        s.VmCloneRequest,
        s.VmCloneResponse,
        s.VmCreateQuery,
    ),
    ("get", "/v1/shares/{share_id}", "Get Share", None, s.ShareResponse, None),
    ("patch", "/v1/shares/{share_id}", "Update Or Revoke Share", s.ShareUpdateRequest, s.ShareResponse, None),
    (
        "post",
        "/v1/shares/{share_id}/signed-url",
        "Sign An Expiring Url For A Share",
        s.SignedUrlRequest,
        s.SignedUrlResponse,
        None,
    ),
    (
        "post",
        "/v1/vms/{vm_id}/url-key/rotate",
        "Rotate The Vm's Url Key (revokes every signed url)",
        None,
        s.UrlKeyRotateResponse,
        None,
    ),
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
    ("get", "/v1/templates", "List Templates", None, s.TemplateListResponse, None),
    ("get", "/v1/templates/{slug}", "Get Template", None, s.TemplateResponse, None),
    ("get", "/v1/egress/vm/{vm_id}", "Get Vm Egress", None, s.EgressPolicyResponse, None),
    ("post", "/v1/egress/vm/{vm_id}", "Set Vm Egress", s.EgressPolicyRequest, s.EgressPolicyResponse, None),
    ("get", "/v1/egress/session/{session_id}", "Get Session Egress", None, s.EgressPolicyResponse, None),
    ("get", "/v1/vms/{vm_id}/volumes", "List Vm Volumes", None, None, None),
    ("post", "/v1/vms/{vm_id}/volumes", "Mount Volume", s.VMVolumeMountRequest, None, None),
    ("delete", "/v1/vms/{vm_id}/volumes/{volume_id}", "Unmount Volume", None, None, None),
    (
        "post",
        "/v1/egress/session/{session_id}",
        "Set Session Egress",
        s.EgressPolicyRequest,
        s.EgressPolicyResponse,
        None,
    ),
    ("get", "/v1/vaults", "List Vaults", None, vs.VaultList, None),
    ("post", "/v1/vaults", "Create Vault", vs.VaultCreateRequest, vs.VaultResponse, None),
    ("get", "/v1/vaults/catalog", "Vault Service Templates", None, vs.CatalogResponse, None),
    ("get", VAULT, "Get Vault", None, vs.VaultResponse, None),
    ("patch", VAULT, "Update Vault", vs.VaultUpdateRequest, vs.VaultResponse, None),
    ("delete", VAULT, "Delete Vault (and everything in it)", None, None, None),
    (
        "get",
        VAULT + "/discover",
        "Discover Vault (names and hosts only)",
        None,
        vs.VaultDiscoverResponse,
        None,
    ),
    ("get", VAULT + "/credentials", "List Vault Credentials (never values)", None, vs.CredentialList, None),
    (
        "post",
        VAULT + "/credentials",
        "Add Vault Credential",
        vs.CredentialCreateRequest,
        vs.CredentialResponse,
        None,
    ),
    (
        "post",
        VAULT + "/credentials/{credential_id}/rotate",
        "Rotate Vault Credential",
        vs.CredentialRotateRequest,
        vs.CredentialResponse,
        None,
    ),
    ("delete", VAULT + "/credentials/{credential_id}", "Delete Vault Credential", None, None, None),
    ("get", VAULT + "/services", "List Vault Services", None, vs.ServiceList, None),
    ("post", VAULT + "/services", "Add Vault Service", vs.ServiceCreateRequest, vs.ServiceResponse, None),
    (
        "post",
        VAULT + "/services:from_template",
        "Add Vault Services From Templates",
        vs.TemplatesRequest,
        vs.TemplatesResponse,
        None,
    ),
    ("delete", VAULT + "/services/{service_id}", "Delete Vault Service", None, None, None),
    ("get", VAULT + "/request-logs", "Vault Request Log", None, vs.RequestLogList, vs.RequestLogQuery),
    ("get", "/v1/volumes", "List Volumes", None, vols.VolumeList, vols.VolumeQuery),
    ("post", "/v1/volumes", "Create Volume", vols.VolumeCreateRequest, vols.VolumeResponse, None),
    ("get", VOLUME, "Get Volume", None, vols.VolumeResponse, vols.VolumeQuery),
    ("patch", VOLUME, "Update Volume (name, quota)", vols.VolumeUpdateRequest, vols.VolumeResponse, None),
    ("delete", VOLUME, "Delete Volume (refused while attached)", None, None, None),
    ("get", VOLUME + "/checkpoints", "List Volume Checkpoints", None, vols.CheckpointList, None),
    (
        "post",
        VOLUME + "/checkpoints",
        "Create Volume Checkpoint",
        vols.CheckpointCreateRequest,
        vols.CheckpointResponse,
        None,
    ),
    ("delete", VOLUME + "/checkpoints/{checkpoint_id}", "Delete Volume Checkpoint", None, None, None),
    ("get", VOLUME + "/files", "List Volume Files", None, vols.FileList, vols.FileListQuery),
    ("delete", VOLUME + "/files", "Delete Volume File", None, None, vols.FilePathQuery),
    (
        "post",
        VOLUME + "/files/upload",
        "Upload Volume File (multipart)",
        None,
        vols.VolumeUploadResponse,
        None,
    ),
    (
        "post",
        VOLUME + "/files/download",
        "Download Volume File (base64 in JSON)",
        vols.FileDownloadRequest,
        vols.VolumeDownloadResponse,
        None,
    ),
    ("get", VOLUME + "/files/download", "Download Volume File Raw", None, None, vols.FilePathQuery),
]
SECURITY: list[dict[str, list[str]]] = [{"APIKeyHeader": []}, {"OAuth2PasswordBearer": []}]
# Operations that take no API key (the SDK lists templates without one): no security, no 401 or 503.
PUBLIC = {("get", "/v1/templates"), ("get", "/v1/templates/{slug}")}

# Success statuses other than 200 (or 204 for operations without a response body).
SUCCESS_STATUS = {
    ("post", "/v1/vms/{vm_id}/snapshot"): "201",
    ("post", "/v1/custom-domains"): "201",
    ("post", "/v1/custom-domains/{domain}/verify"): "202",
    ("post", "/v1/shares"): "201",
    ("post", "/v1/shares/{share_id}/signed-url"): "201",
    ("post", "/v1/vaults"): "201",
    ("post", "/v1/volumes"): "201",
    ("post", VOLUME + "/checkpoints"): "201",
    ("post", VAULT + "/credentials"): "201",
    ("post", VAULT + "/services"): "201",
    ("post", VAULT + "/services:from_template"): "201",
    ("post", "/execute_async"): "202",
    ("get", "/v1/sessions/{sid}/pty/{pty_id}/connect"): "101",
    ("get", "/v1/vms/{vm_id}/pty/{pty_id}/connect"): "101",
    ("post", "/v1/sessions/{sid}/pty/sessions"): "201",
    ("post", "/v1/vms/{vm_id}/pty/sessions"): "201",
    ("post", "/orgs/{org_uuid}/api/instances"): "201",
    ("post", "/v1/custom-domains/{domain}/retry"): "202",
}
ERROR_DESCRIPTIONS = {
    "400": "Bad request (a path that climbs out, say)",
    "401": "Invalid or missing API key",
    "404": "Not found (or not this API key's)",
    "409": "Conflict with the current state",
    "410": "The VM is not running",
    "413": "Request body too large (or, for a volume, past its quota)",
    "429": "Too many at once (Retry-After says when to try again)",
    "415": "Content-Type must be application/json",
    "501": "Not supported by this gateway (the answer says why)",
    "502": "The VM failed (its driver's error)",
    "503": "Unavailable: the state store, or no capacity left",
    "504": "Timed out",
}
# Errors beyond those every operation can answer (401, 422, 503; 413 and 415 with a body; 404 with a
# path parameter).
EXTRA_ERRORS = {
    ("post", "/v1/vms"): ("404", "409", "502"),
    ("get", "/v1/sessions/app-url/{session_id}"): ("409", "410"),
    ("post", "/v1/shares/{share_id}/signed-url"): ("409", "410"),
    ("post", "/v1/vms/{vm_id}/url-key/rotate"): ("410",),
    ("post", "/v1/vms/{vm_id}/keepalive"): ("410",),
    ("post", "/execute"): ("404", "410", "429", "502", "504"),
    ("post", "/execute_async"): ("404", "429"),
    ("post", "/orgs/{org_uuid}/api/instances"): ("404",),
    ("get", "/orgs/{org_uuid}/api/instances"): ("404",),
    ("post", "/v1/vaults"): ("409",),
    ("post", "/v1/volumes"): ("409",),
    ("patch", VOLUME): ("409",),
    ("delete", VOLUME): ("409",),
    ("post", VOLUME + "/checkpoints"): ("409",),
    ("delete", VOLUME + "/checkpoints/{checkpoint_id}"): ("409",),
    ("post", VOLUME + "/files/upload"): ("400", "409", "413"),
    ("post", VOLUME + "/files/download"): ("400", "409"),
    ("get", VOLUME + "/files/download"): ("400", "409"),
    ("delete", VOLUME + "/files"): ("400", "409"),
    ("get", VOLUME + "/files"): ("400",),
    ("post", VAULT + "/credentials"): ("409",),
    ("post", VAULT + "/services"): ("409",),
    ("post", VAULT + "/services:from_template"): ("409",),
}
# Every 429 says when to try again (errors_middleware sets it from TooManyRequests.retry_after).
RETRY_AFTER_HEADER = {
    "Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}
}
VALIDATION_ERROR_REF = {"$ref": "#/components/schemas/HTTPValidationError"}
PATH_PARAMETER = re.compile(r"\{(\w+)\}")

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


def _responses(
    method: str, path: str, request: type[BaseModel] | None, response: type[BaseModel] | None,
    *, has_path_params: bool,
) -> dict[str, Any]:  # fmt: skip
    success = SUCCESS_STATUS.get((method, path), "200" if response else "204")
    responses: dict[str, Any] = {
        success: {"description": "Successful Response", **_json(_ref(response))}
        if response
        else {"description": "Done"},
        "422": {"description": "Validation Error", **_json(VALIDATION_ERROR_REF)},
    }
    errors = set(EXTRA_ERRORS.get((method, path), ()))
    if (method, path) not in PUBLIC:
        errors |= {"401", "503"}
    if request is not None:
        errors |= {"413", "415"}
    if has_path_params:
        errors.add("404")
    for status in errors:
        responses[status] = {"description": ERROR_DESCRIPTIONS[status], **_json(_ref(s.ErrorResponse))}
    if "429" in responses:
        responses["429"]["headers"] = RETRY_AFTER_HEADER
    return dict(sorted(responses.items()))


def build_openapi(title: str = "Sandbox gateway API", version: str = "0.1.0") -> dict[str, Any]:
    models = {m for op in OPERATIONS for m in op[3:] if m is not None} | {s.ErrorResponse}
    _, defs = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    components = defs.get("$defs", {}) | {"HTTPValidationError": VALIDATION_ERROR}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, request, response, query in OPERATIONS:
        path_names = PATH_PARAMETER.findall(path)
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in path_names
        ]
        if query is not None:
            # The same constraints the handler validates with (a port is 1..65535...).
            properties = query.model_json_schema()["properties"]
            for name, field in query.model_fields.items():
                params.append(
                    {"name": name, "in": "query", "required": field.is_required(), "schema": properties[name]}
                )
        op: dict[str, Any] = {
            "summary": summary,
            "parameters": params,
            "security": [] if (method, path) in PUBLIC else SECURITY,
            "responses": _responses(method, path, request, response, has_path_params=bool(path_names)),
        }
        if request is not None:
            op["requestBody"] = {"required": True, **_json(_ref(request))}
        paths.setdefault(path, {})[method] = op
    for method, path, feature in unsupported.ENDPOINTS:
        paths.setdefault(path, {})[method] = {
            "summary": f"Not supported: {feature.replace('_', ' ')}",
            "description": unsupported.FEATURES[feature],
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in PATH_PARAMETER.findall(path)
            ],
            "security": SECURITY,
            "responses": {
                "422": {"description": "Validation Error", **_json(VALIDATION_ERROR_REF)},
                **{
                    status: {"description": ERROR_DESCRIPTIONS[status], **_json(_ref(s.ErrorResponse))}
                    for status in ("401", "501", "503")
                },
            },
        }
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
