"""Terminals (PTY sessions) in a session's or a VM's VM, as the official SDK and the ``instavm`` CLI use
them: REST to create, list, inspect, resize and end them, and a WebSocket to attach.

The WebSocket's framing is the CLI's: binary messages are keystrokes in and terminal output out; text
messages are JSON controls, ``{"type": "resize", "cols", "rows"}`` in and ``{"type": "exit",
"exit_code"}`` out, after which the socket closes (1000). The key may come as ``?api_key=`` (browsers
cannot set headers on a WebSocket); the edge logs no query string, and nothing of it reaches the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import WSMsgType, web

from gateway.api.auth import authenticate
from gateway.api.context import TERMINALS
from gateway.api.responses import iso, json_response
from gateway.api.schemas import PtyCreateRequest, PtyList, PtyResizeRequest, PtyResponse
from gateway.api.validation import parse_body
from gateway.orchestrator.pty import Terminal, Terminals

routes = web.RouteTableDef()

MAX_MESSAGE_BYTES = 1 << 20
# A viewer dropped for falling behind: it may attach again (the scrollback is replayed).
CLOSE_TRY_AGAIN = 1013


def _scope(request: web.Request) -> dict[str, str | None]:
    return {"session_id": request.match_info.get("sid"), "vm_id": request.match_info.get("vm_id")}


def _view(request: web.Request, terminal: Terminal) -> PtyResponse:
    scope = _scope(request)
    base = f"/v1/sessions/{scope['session_id']}" if scope["session_id"] else f"/v1/vms/{scope['vm_id']}"
    return PtyResponse(
        session_id=terminal.pty_id,
        id=terminal.pty_id,
        pty_id=terminal.pty_id,
        sandbox_session_id=terminal.session_id,
        vm_id=terminal.vm_id,
        cols=terminal.cols,
        rows=terminal.rows,
        command=list(terminal.argv),
        alive=terminal.alive,
        exit_code=terminal.exit_code,
        created_at=iso(terminal.created_at) or "",
        ended_at=iso(terminal.ended_at),
        websocket_path=f"{base}/pty/{terminal.pty_id}/connect",
    )


async def _terminal(request: web.Request, owner: str) -> Terminal:
    return request.app[TERMINALS].get(owner, request.match_info["pty_id"], **_scope(request))


@routes.post("/v1/sessions/{sid}/pty/sessions")
@routes.post("/v1/vms/{vm_id}/pty/sessions")
async def create(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, PtyCreateRequest)
    argv = ["/bin/bash", "-lc", body.command] if body.command else ([body.shell] if body.shell else None)
    terminal = await request.app[TERMINALS].create(
        owner, **_scope(request), cols=body.cols, rows=body.rows, argv=argv, pty_id=body.id
    )
    return json_response(_view(request, terminal), status=201)


@routes.get("/v1/sessions/{sid}/pty/sessions")
@routes.get("/v1/vms/{vm_id}/pty/sessions")
async def list_terminals(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    terminals = request.app[TERMINALS].list(owner, **_scope(request))
    return json_response(PtyList([_view(request, t) for t in terminals]))


@routes.get("/v1/sessions/{sid}/pty/sessions/{pty_id}")
@routes.get("/v1/vms/{vm_id}/pty/sessions/{pty_id}")
async def get_terminal(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    return json_response(_view(request, await _terminal(request, owner)))


@routes.post("/v1/sessions/{sid}/pty/sessions/{pty_id}/resize")
@routes.post("/v1/vms/{vm_id}/pty/sessions/{pty_id}/resize")
async def resize(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    terminal = await _terminal(request, owner)
    body = await parse_body(request, PtyResizeRequest)
    await request.app[TERMINALS].resize(terminal, body.cols, body.rows)
    return json_response(_view(request, terminal))


@routes.delete("/v1/sessions/{sid}/pty/sessions/{pty_id}")
@routes.delete("/v1/vms/{vm_id}/pty/sessions/{pty_id}")
async def kill(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    terminal = await _terminal(request, owner)
    await request.app[TERMINALS].kill(terminal)
    return json_response(_view(request, terminal))


@routes.get("/v1/sessions/{sid}/pty/{pty_id}/connect")
@routes.get("/v1/vms/{vm_id}/pty/{pty_id}/connect")
async def connect(request: web.Request) -> web.WebSocketResponse:
    owner = await authenticate(request, body_key=request.query.get("api_key"))
    terminal = await _terminal(request, owner)
    terminals = request.app[TERMINALS]
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)

    async def output() -> None:
        async for chunk in terminals.attach(terminal):
            await ws.send_bytes(chunk)
        if terminal.alive:
            await ws.close(code=CLOSE_TRY_AGAIN, message=b"fell behind the terminal's output")
            return
        code = await terminals.wait_ended(terminal)
        await ws.send_str(json.dumps({"type": "exit", "exit_code": code}))
        await ws.close(code=1000)

    sending = asyncio.create_task(output())
    try:
        async for message in ws:
            if message.type == WSMsgType.BINARY:
                await terminals.write(terminal, message.data)
            elif message.type == WSMsgType.TEXT:
                await _control(terminals, terminal, message.data)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
    return ws


async def _control(terminals: Terminals, terminal: Terminal, text: str) -> None:
    """A JSON control (resize; input as text), or plain text typed."""
    try:
        control = json.loads(text)
    except ValueError:
        control = None
    if isinstance(control, dict) and control.get("type") == "resize":
        cols, rows = control.get("cols"), control.get("rows")
        if isinstance(cols, int) and isinstance(rows, int) and 0 < cols <= 1000 and 0 < rows <= 1000:
            await terminals.resize(terminal, cols, rows)
    elif (
        isinstance(control, dict) and control.get("type") == "input" and isinstance(control.get("data"), str)
    ):
        await terminals.write(terminal, control["data"].encode())
    elif not isinstance(control, dict):
        await terminals.write(terminal, text.encode())
