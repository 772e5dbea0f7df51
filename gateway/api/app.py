"""The control-plane application: routes, the error middleware, limits.

Every failure leaves as JSON with a precise status: ``{"detail": ..., "code": ...}`` for errors and the
spec's ``{"detail": [{"loc", "msg", "type"}]}`` for validation, never an HTML page or a stack trace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from gateway.api import (
    domains,
    egress,
    execute,
    files,
    instances,
    pty,
    session_records,
    sessions,
    shares,
    signed_urls,
    snapshots,
    templates,
    unsupported,
    users,
    vaults,
    vm_lifecycle,
    vm_volumes,
    vms,
    volumes,
)
from gateway.api.context import (
    CONFIG,
    EGRESS,
    EXECUTIONS,
    FILES,
    INSTANCES,
    KEY_STORE,
    LIFECYCLE,
    ORCHESTRATOR,
    SHARES,
    SIGNED_URLS,
    TERMINALS,
    VM_VOLUMES,
)
from gateway.api.openapi import OPENAPI, build_openapi, openapi_handler
from gateway.api.validation import RequestValidationError
from gateway.background import stop_loop
from gateway.config import Config
from gateway.errors import GatewayError, TooManyRequests, Unauthorized
from gateway.keys import ApiKeyStore
from gateway.log import REQUEST_ID
from gateway.orchestrator.egress import EgressPolicies
from gateway.orchestrator.executions import Executions
from gateway.orchestrator.files import VmFiles
from gateway.orchestrator.instances import InstanceService
from gateway.orchestrator.lifecycle import Lifecycle
from gateway.orchestrator.pty import Terminals
from gateway.orchestrator.service import Orchestrator
from gateway.orchestrator.shares import Shares
from gateway.orchestrator.signed_urls import SignedUrls
from gateway.orchestrator.vm_volumes import VmVolumes
from gateway.server_header import use_neutral_server_header

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, detail: object, code: str) -> web.Response:
    body = {"detail": detail} if isinstance(detail, list) else {"detail": detail, "code": code}
    response = web.json_response(body, status=status, headers={"X-Gateway-Error": code})
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # The edge's id for this request: every log record made while handling it carries it.
    REQUEST_ID.set(request.headers.get("X-Request-Id"))
    try:
        return await handler(request)
    except RequestValidationError as exc:
        return error_response(422, exc.detail, exc.code)
    except Unauthorized as exc:
        return error_response(exc.status, exc.message, exc.code)
    except GatewayError as exc:
        if exc.status >= 500:
            log.warning("%s %s -> %s %s", request.method, request.path, exc.status, exc.message)
        response = error_response(exc.status, exc.message, exc.code)
        if isinstance(exc, TooManyRequests):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return error_response(exc.status, exc.reason, code)


def make_api_app(
    config: Config, orchestrator: Orchestrator, key_store: ApiKeyStore, lifecycle: Lifecycle | None = None
) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=config.api.max_body_bytes)
    use_neutral_server_header(app)
    app[CONFIG] = config
    app[ORCHESTRATOR] = orchestrator
    app[KEY_STORE] = key_store
    app[INSTANCES] = InstanceService(orchestrator, config)
    app[FILES] = VmFiles(orchestrator)
    app[TERMINALS] = terminals = Terminals(orchestrator)
    app[EXECUTIONS] = executions = Executions(orchestrator)
    app[SHARES] = shares_service = Shares(orchestrator)
    app[SIGNED_URLS] = SignedUrls(orchestrator, shares_service)
    app[EGRESS] = EgressPolicies(orchestrator)
    app[VM_VOLUMES] = VmVolumes(orchestrator)
    app[LIFECYCLE] = lifecycle or Lifecycle(orchestrator)
    app[OPENAPI] = build_openapi()
    app.add_routes(sessions.routes)
    app.add_routes(session_records.routes)
    app.add_routes(users.routes)
    app.add_routes(vms.routes)
    app.add_routes(domains.routes)
    app.add_routes(execute.routes)
    app.add_routes(files.routes)
    app.add_routes(pty.routes)
    app.add_routes(shares.routes)
    app.add_routes(signed_urls.routes)
    app.add_routes(vm_lifecycle.routes)
    app.add_routes(instances.routes)
    app.add_routes(snapshots.routes)
    app.add_routes(templates.routes)
    app.add_routes(egress.routes)
    app.add_routes(vm_volumes.routes)
    app.add_routes(vaults.routes)
    app.add_routes(volumes.routes)
    app.router.add_get("/openapi.json", openapi_handler)
    unsupported.add_routes(app.router)  # last: what the SDK calls and this gateway does not offer (501)

    async def hang_up_terminals(_app: web.Application) -> None:
        await terminals.close()  # open WebSockets then end with the shells' exit

    app.on_shutdown.append(hang_up_terminals)

    async def running_executions(_app: web.Application) -> AsyncIterator[None]:
        await executions.beat()  # before serving: alive, and what a dead runner left is failed
        beat = asyncio.get_running_loop().create_task(executions.keep_alive(), name="executions")
        yield
        await stop_loop(beat)
        await executions.close()  # what still runs ends failed: the gateway stopped

    app.cleanup_ctx.append(running_executions)
    return app
