"""``GET /v1/users/me``: who the calling API key is (the gateway's users are its keys)."""

from __future__ import annotations

from aiohttp import web

from gateway.api.auth import authenticated_key
from gateway.api.responses import iso, json_response
from gateway.api.schemas import UserResponse

routes = web.RouteTableDef()


@routes.get("/v1/users/me")
async def me(request: web.Request) -> web.Response:
    key = await authenticated_key(request)
    return json_response(
        UserResponse(
            id=key.key_id,
            key_id=key.key_id,
            name=key.name,
            organization=key.org,
            created_at=iso(key.created_at) or "",
        )
    )
