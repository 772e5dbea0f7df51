"""Egress policies read and changed live, as the official SDK calls them: ``GET``/``POST
/v1/egress/vm/{id}`` (one VM) and ``/v1/egress/session/{id}`` (the session's VMs that have no policy of
their own). The answer carries the VM's recent denials, so a user can see why ``pip install`` failed."""

from __future__ import annotations

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import EGRESS
from gateway.api.responses import iso, json_response
from gateway.api.schemas import EgressDenial, EgressPolicyRequest, EgressPolicyResponse
from gateway.api.validation import RequestValidationError, detail_item, parse_body
from gateway.orchestrator.egress import EGRESS_OFF, EgressView

routes = web.RouteTableDef()


def egress_view(session_id: str, view: EgressView) -> EgressPolicyResponse:
    vm = view.vm
    return EgressPolicyResponse(
        session_id=session_id,
        vm_id=vm.vm_id if vm else None,
        source=view.source,
        egress_enabled=view.enabled,
        **view.policy.sdk_fields(),
        bytes_out=vm.egress_bytes_out if vm else 0,
        bytes_in=vm.egress_bytes_in if vm else 0,
        recent_denials=[EgressDenial(**{**d, "at": iso(d.get("at"))}) for d in view.denials],
    )


async def policy_body(request: web.Request) -> dict[str, object]:
    body = await parse_body(request, EgressPolicyRequest)
    if not request.app[EGRESS].available:
        raise RequestValidationError([detail_item(["body"], EGRESS_OFF, "egress_off")])
    return body.model_dump()


@routes.get("/v1/egress/vm/{vm_id}")
async def get_vm_egress(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    view = await request.app[EGRESS].of_vm(owner, request.match_info["vm_id"])
    assert view.vm is not None
    return json_response(egress_view(view.vm.session_id, view))


@routes.post("/v1/egress/vm/{vm_id}")
async def set_vm_egress(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    fields = await policy_body(request)
    view = await request.app[EGRESS].set_vm(owner, request.match_info["vm_id"], fields)
    assert view.vm is not None
    return json_response(egress_view(view.vm.session_id, view))


@routes.get("/v1/egress/session/{session_id}")
async def get_session_egress(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    session_id = request.match_info["session_id"]
    return json_response(egress_view(session_id, await request.app[EGRESS].of_session(owner, session_id)))


@routes.post("/v1/egress/session/{session_id}")
async def set_session_egress(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    fields = await policy_body(request)
    session_id = request.match_info["session_id"]
    view = await request.app[EGRESS].set_session(owner, session_id, fields)
    return json_response(egress_view(session_id, view))
