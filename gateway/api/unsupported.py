"""What the official SDK can call but this gateway does not offer: each answers 501 with a JSON error
that names the feature and why, never a bare 404 (which would read as "no such VM" or "wrong URL").

The table is the SDK's own paths (``instavm/sandbox_client.py``), method by method, so the OpenAPI
document lists them too; the README's SDK table says the same.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.api.auth import authenticate

# feature -> why it is not here
FEATURES: dict[str, str] = {
    "api_keys": "keys are made on the command line (gateway keys create); there are no accounts",
    "audit": "the gateway keeps no audit trail beyond its logs",
    "browser": "there is no hosted browser service; run a browser image in a VM (the Instances API)",
    "computer_use": "there is no desktop streaming (VNC) service",
    "credits": "the gateway does no billing",
    "recordings": "there is no session recording service",
    "ssh_keys": "VMs have no SSH server; use terminals (PTY sessions) instead",
    "tapes": "there is no time-travel recorder of VM history",
    "templates_publish": "images are built by operators (gateway image build), not published through the API",
    "usage_breakdown": "the gateway does no billing; per-session usage is GET /v1/sessions/usage/{id}",
    "stage_env": "secrets are not staged into running VMs; pass env when the session or VM is made",
    "webhooks": "the gateway sends no webhooks",
    "snapshot_build": "snapshots are taken of running VMs (snapshot_on_terminate), not built from images",
}

_ANY = ("get", "post", "put", "patch", "delete", "options")

# (method, path, feature), as the SDK sends them.
ENDPOINTS: list[tuple[str, str, str]] = [
    *[("get", p, "api_keys") for p in ("/v1/api-keys/", "/v1/api-keys/{id}")],
    ("post", "/v1/api-keys/", "api_keys"),
    ("patch", "/v1/api-keys/{id}", "api_keys"),
    ("delete", "/v1/api-keys/{id}", "api_keys"),
    *[("get", p, "audit") for p in ("/v1/audit/catalog", "/v1/audit/events", "/v1/audit/events/{id}")],
    ("get", "/v1/browser/sessions/", "browser"),
    ("post", "/v1/browser/sessions/", "browser"),
    ("get", "/v1/browser/sessions/{id}", "browser"),
    ("delete", "/v1/browser/sessions/{id}", "browser"),
    ("post", "/v1/browser/interactions/{action}", "browser"),
    ("get", "/v1/computeruse/{session_id}/viewer-url", "computer_use"),
    ("get", "/v1/computeruse/{session_id}/vnc/websockify", "computer_use"),
    *[(m, "/v1/computeruse/{session_id}/{path}", "computer_use") for m in _ANY],
    *[
        ("get", f"/v1/credits/{p}", "credits")
        for p in ("allocation", "check", "rates", "summary", "usage", "usage/forecasting", "usage/trends")
    ],
    ("get", "/v1/recordings", "recordings"),
    ("get", "/v1/recordings/{id}", "recordings"),
    ("delete", "/v1/recordings/{id}", "recordings"),
    ("get", "/v1/recordings/{id}/download", "recordings"),
    ("get", "/v1/ssh-keys", "ssh_keys"),
    ("post", "/v1/ssh-keys", "ssh_keys"),
    ("delete", "/v1/ssh-keys/{id}", "ssh_keys"),
    ("post", "/v1/sessions/{session_id}/tape/start", "tapes"),
    ("get", "/v1/tapes", "tapes"),
    ("get", "/v1/tapes/{id}", "tapes"),
    ("delete", "/v1/tapes/{id}", "tapes"),
    *[("post", f"/v1/tapes/{{id}}/{p}", "tapes") for p in ("stop", "events", "branch")],
    *[("get", f"/v1/tapes/{{id}}/{p}", "tapes") for p in ("events", "diff", "lanes", "export")],
    ("post", "/v1/templates", "templates_publish"),
    ("post", "/v1/templates/{slug}/runs", "templates_publish"),
    ("get", "/v1/users/me/usage-breakdown", "usage_breakdown"),
    ("post", "/v1/vms/{vm_id}/stage-env", "stage_env"),
    ("post", "/v1/snapshots", "snapshot_build"),
    ("get", "/v1/webhooks/deliveries", "webhooks"),
    ("post", "/v1/webhooks/deliveries/{id}/replay", "webhooks"),
    ("get", "/v1/webhooks/endpoints", "webhooks"),
    ("post", "/v1/webhooks/endpoints", "webhooks"),
    *[(m, "/v1/webhooks/endpoints/{id}", "webhooks") for m in ("get", "patch", "delete")],
    *[
        ("post", f"/v1/webhooks/endpoints/{{id}}/{p}", "webhooks")
        for p in ("rotate-secret", "test", "verify")
    ],
]


def _handler(feature: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def not_supported(request: web.Request) -> web.Response:
        await authenticate(request)  # a caller without a key learns nothing, not even this
        body = {
            "detail": f"{feature.replace('_', ' ')} is not supported by this gateway: {FEATURES[feature]}",
            "code": "not_supported",
            "feature": feature,
        }
        return web.json_response(body, status=501, headers={"X-Gateway-Error": "not_supported"})

    return not_supported


def add_routes(router: web.UrlDispatcher) -> None:
    for method, path, feature in ENDPOINTS:
        # The computer-use proxy takes any path below it.
        route = path.replace("{path}", "{path:.*}")
        router.add_route(method.upper(), route, _handler(feature))
