"""One ``Server`` header for the gateway's aiohttp listeners (the API and the admin listener).

aiohttp names itself and the Python version (``Server: Python/3.11 aiohttp/3.x``): a free hint for an
attacker looking for a known flaw. The edge passes an app's own ``Server`` through untouched.
"""

from __future__ import annotations

from aiohttp import web

SERVER_HEADER = "gateway"


async def neutral_server_header(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER


def use_neutral_server_header(app: web.Application) -> None:
    app.on_response_prepare.append(neutral_server_header)
