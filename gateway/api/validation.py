"""Parse request bodies and query strings into models; failures become the spec's 422 shape.

The shape and wording follow FastAPI (which the spec's documents come from): invalid JSON is
``loc: ["body", <position>]`` with type ``json_invalid``, a missing body is ``loc: ["body"]`` with type
``missing``, and field errors are pydantic's own with ``body`` or ``query`` in front of their location.
Input values are never echoed back (they may hold secrets such as the api_key).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.api.context import CONFIG
from gateway.errors import GatewayError, PayloadTooLarge, UnsupportedMediaType

M = TypeVar("M", bound=BaseModel)

JSON_TYPES = ("application/json",)


class RequestValidationError(GatewayError):
    status, code, message = 422, "validation_error", "validation error"

    def __init__(self, detail: list[dict[str, Any]]) -> None:
        super().__init__("validation error")
        self.detail = detail


def detail_item(loc: list[str | int], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind}


def _detail(exc: ValidationError, *where: str) -> list[dict[str, Any]]:
    return [
        detail_item([*where, *err["loc"]], err["msg"], err["type"])
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def parse_part(model: type[M], data: object, *where: str) -> M:
    """A part of a request (a nested object the spec keeps loose) as ``model``; its errors are located
    under ``where`` (``"body", "egress_policy"``)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(_detail(exc, *where)) from None


def _is_json(content_type: str) -> bool:
    return content_type in JSON_TYPES or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def parse_body(request: web.Request, model: type[M], context: dict[str, Any] | None = None) -> M:
    # No Content-Type at all is read as JSON (curl -d without -H, like FastAPI); any other type is refused.
    if "Content-Type" in request.headers and not _is_json(request.content_type):
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {request.content_type}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].api.max_body_bytes
        raise PayloadTooLarge(f"request body larger than {limit} bytes") from None
    if not raw.strip():
        raise RequestValidationError([detail_item(["body"], "Field required", "missing")])
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        pos = getattr(exc, "pos", 0)
        raise RequestValidationError(
            [detail_item(["body", pos], "JSON decode error", "json_invalid")]
        ) from None
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise RequestValidationError(_detail(exc, "body")) from None


def parse_query(request: web.Request, model: type[M], context: dict[str, Any] | None = None) -> M:
    try:
        return model.model_validate(dict(request.query), context=context)
    except ValidationError as exc:
        raise RequestValidationError(_detail(exc, "query")) from None
