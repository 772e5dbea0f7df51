"""Templates: the images VMs can run on (``image_variant``), as the official SDK's ``templates`` lists them.

Public, like the SDK calls it (no API key): the list is the operator's catalog, the same for everyone.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gateway.api.context import ORCHESTRATOR
from gateway.api.responses import json_response
from gateway.api.schemas import TemplateListResponse, TemplateResponse
from gateway.errors import NotFound

routes = web.RouteTableDef()


def template_view(image: dict[str, Any]) -> TemplateResponse:
    return TemplateResponse(slug=image["name"], **image)


async def _templates(request: web.Request) -> list[TemplateResponse]:
    # Reads each built image's manifest: off the loop.
    images = await asyncio.to_thread(request.app[ORCHESTRATOR].images.describe)
    return [template_view(image) for image in images]


@routes.get("/v1/templates")
async def list_templates(request: web.Request) -> web.Response:
    views = await _templates(request)
    return json_response(TemplateListResponse(templates=views, total=len(views)))


@routes.get("/v1/templates/{slug}")
async def get_template(request: web.Request) -> web.Response:
    slug = request.match_info["slug"]
    for view in await _templates(request):
        if view.slug == slug:
            return json_response(view)
    raise NotFound(f"no template {slug!r}", code="template_not_found")
