"""POST /execute: run a command in the session's VM (booting one if it has none) and return its output."""

from __future__ import annotations

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import CONFIG, ORCHESTRATOR
from gateway.api.responses import json_response
from gateway.api.schemas import ExecuteRequest, ExecuteResponse
from gateway.api.validation import parse_body

routes = web.RouteTableDef()

# Interpreters by language; the command is one argument, never interpolated into a shell line.
INTERPRETERS = {"bash": ("bash", "-c"), "python": ("python3", "-c")}
MIN_TIMEOUT_S = 0.001


@routes.post("/execute")
async def execute(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    limits = request.app[CONFIG].execute
    body = await parse_body(
        request, ExecuteRequest, {"min_timeout_s": MIN_TIMEOUT_S, "max_timeout_s": limits.max_timeout_s}
    )
    argv = [*INTERPRETERS[body.language], body.command]
    session, vm, result = await request.app[ORCHESTRATOR].execute(owner, body.session_id, argv, body.timeout)
    return json_response(
        ExecuteResponse(
            stdout=result.stdout.decode("utf-8", "replace"),
            stderr=result.stderr.decode("utf-8", "replace"),
            exit_code=result.exit_code,
            timed_out=result.timed_out,
            truncated=result.truncated,
            execution_time=round(result.duration_s, 3),
            session_id=session.session_id,
            vm_id=vm.vm_id,
        )
    )
