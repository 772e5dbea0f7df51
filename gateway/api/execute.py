"""POST /execute: run a command in the session's VM (booting one if it has none) and return its output;
POST /execute_async: the same in the background, its result read with GET /v1/executions/{id}."""

from __future__ import annotations

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import CONFIG, EXECUTIONS, ORCHESTRATOR
from gateway.api.responses import iso, json_response
from gateway.api.schemas import ExecuteAsyncResponse, ExecuteRequest, ExecuteResponse, ExecutionResponse
from gateway.api.validation import parse_body

routes = web.RouteTableDef()

# Interpreters by language; the command is one argument, never interpolated into a shell line.
INTERPRETERS = {"bash": ("bash", "-c"), "python": ("python3", "-c")}
MIN_TIMEOUT_S = 0.001


async def execute_request(request: web.Request) -> ExecuteRequest:
    limits = request.app[CONFIG].execute
    context = {"min_timeout_s": MIN_TIMEOUT_S, "max_timeout_s": limits.max_timeout_s}
    return await parse_body(request, ExecuteRequest, context)


@routes.post("/execute")
async def execute(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await execute_request(request)
    argv = [*INTERPRETERS[body.language], body.command]
    session, vm, result = await request.app[ORCHESTRATOR].execute(owner, body.session_id, argv, body.timeout)
    return json_response(ExecuteResponse(**result.reported(), session_id=session.session_id, vm_id=vm.vm_id))


@routes.post("/execute_async")
async def execute_async(request: web.Request) -> web.Response:
    """Answered at once (202) with the execution's id; the command runs in the background."""
    owner = await authenticate(request)
    body = await execute_request(request)
    argv = [*INTERPRETERS[body.language], body.command]
    rec = await request.app[EXECUTIONS].start(owner, body.session_id, argv, body.timeout, body.language)
    view = ExecuteAsyncResponse(
        task_id=rec.execution_id, id=rec.execution_id, status="pending", session_id=rec.session_id
    )
    return json_response(view, status=202)


@routes.get("/v1/executions/{execution_id}")
async def get_execution(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    rec = await request.app[EXECUTIONS].get(owner, request.match_info["execution_id"])
    return json_response(
        ExecutionResponse(
            id=rec.execution_id,
            task_id=rec.execution_id,
            session_id=rec.session_id,
            vm_id=rec.vm_id,
            status=rec.status,
            is_complete=rec.completed_at is not None,
            language=rec.language,
            serialized_stdout=rec.stdout,
            serialized_stderr=rec.stderr,
            exit_code=rec.exit_code,
            timed_out=rec.timed_out,
            truncated=rec.truncated,
            cpu_time=rec.cpu_time,
            execution_time=rec.execution_time,
            error=rec.error,
            created_at=iso(rec.created_at) or "",
            started_at=iso(rec.started_at),
            completed_at=iso(rec.completed_at),
        )
    )
