"""Who is calling: the API key from X-API-Key, Authorization: Bearer, or the body where the spec says.

The answer is the key's id, the owner of every session and VM it creates. A missing, malformed, unknown
or revoked key is one and the same 401, so the answer says nothing about which keys exist.
"""

from __future__ import annotations

from aiohttp import web

from gateway.api.context import KEY_STORE
from gateway.errors import Unauthorized
from gateway.keys import ApiKeyRecord


def key_from_headers(request: web.Request) -> str | None:
    key = request.headers.get("X-API-Key")
    if key:
        return key.strip()
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def authenticated_key(request: web.Request, body_key: str | None = None) -> ApiKeyRecord:
    """The caller's key record, or Unauthorized. A key in the body wins over the headers."""
    record = await request.app[KEY_STORE].authenticate(body_key or key_from_headers(request))
    if record is None:
        raise Unauthorized()
    return record


async def authenticate(request: web.Request, body_key: str | None = None) -> str:
    """Return the caller's key id (the owner of what it makes) or raise Unauthorized."""
    return (await authenticated_key(request, body_key)).key_id
