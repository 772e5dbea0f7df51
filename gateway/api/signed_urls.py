"""Signed URLs (``POST /v1/shares/{share_id}/signed-url``) and their revocation, all at once for a VM
(``POST /v1/vms/{vm_id}/url-key/rotate``). The app-url call signs too, given ``expires_in``
(``gateway.api.sessions``)."""

from __future__ import annotations

import time

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import CONFIG, SIGNED_URLS
from gateway.api.responses import app_url_for, direct_url, iso, json_response
from gateway.api.schemas import SignedUrlRequest, SignedUrlResponse, UrlKeyRotateResponse
from gateway.api.validation import parse_body

routes = web.RouteTableDef()


@routes.post("/v1/shares/{share_id}/signed-url")
async def sign_share_url(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, SignedUrlRequest)
    signed = await request.app[SIGNED_URLS].for_share(owner, request.match_info["share_id"], body.expires_in)
    config = request.app[CONFIG]
    vm = signed.vm
    return json_response(
        SignedUrlResponse(
            url=app_url_for(config, vm.session_id, signed.port) + "?" + signed.query,
            direct_url=direct_url(config, vm.vm_id, signed.port) + "?" + signed.query,
            expires_at=iso(signed.expires) or "",
            expires=signed.expires,
            expires_in=body.expires_in,
            signature=signed.signature,
            key_version=signed.key_version,
            share_id=signed.share_id or "",
            vm_id=vm.vm_id,
            port=signed.port,
        ),
        status=201,
    )


@routes.post("/v1/vms/{vm_id}/url-key/rotate")
async def rotate_url_key(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    vm, version = await request.app[SIGNED_URLS].rotate(owner, request.match_info["vm_id"])
    return json_response(
        UrlKeyRotateResponse(vm_id=vm.vm_id, key_version=version, rotated_at=iso(time.time()) or "")
    )
