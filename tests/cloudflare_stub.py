"""A local stand-in for Cloudflare's v4 API, so the lexicon provider is tested without the internet.

It speaks what dns-lexicon's cloudflare provider calls (zones by page or by id; DNS records listed with
filters, created, updated, deleted) in Cloudflare's JSON envelope, and refuses a wrong API token with
Cloudflare's 403. Every TXT record it creates or deletes is mirrored into the test environment's bind9
through a ``DnsProvider`` given to it (RFC 2136), so that the records are really served and the shared
provider contract, which asks DNS, holds for it as for any other provider.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any

from aiohttp import web

from gateway.tls.dns01 import DnsProvider, DnsProviderError
from tests.acme_env import ZONES

API_PREFIX = "/client/v4"
DEFAULT_PER_PAGE = 100  # Cloudflare's default for DNS records; lexicon always asks for 100 anyway

Handler = Callable[[web.Request], Awaitable[web.Response]]


def _envelope(result: Any, status: int = 200, **extra: Any) -> web.Response:
    return web.json_response(
        {"success": True, "errors": [], "messages": [], "result": result, **extra}, status=status
    )


def _error(status: int, code: int, message: str) -> web.Response:
    body = {"success": False, "errors": [{"code": code, "message": message}], "messages": [], "result": None}
    return web.json_response(body, status=status)


def _page(request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    page = max(1, int(request.query.get("page", "1")))
    per_page = max(1, int(request.query.get("per_page", str(DEFAULT_PER_PAGE))))
    chosen = items[(page - 1) * per_page : page * per_page]
    info = {
        "page": page, "per_page": per_page, "count": len(chosen), "total_count": len(items),
        "total_pages": math.ceil(len(items) / per_page),
    }  # fmt: skip
    return _envelope(chosen, result_info=info)


class CloudflareStub:
    """Cloudflare's API on 127.0.0.1 (a free port) for ``zones``, with one valid bearer ``token``."""

    def __init__(self, mirror: DnsProvider, zones: Iterable[str] = ZONES, token: str | None = None) -> None:
        self.mirror = mirror
        self.token = token or secrets.token_urlsafe(30)
        self.zone_ids = {zone.rstrip("."): secrets.token_hex(16) for zone in zones}
        self.records: dict[str, dict[str, dict[str, Any]]] = {zid: {} for zid in self.zone_ids.values()}
        self.calls: list[str] = []  # "METHOD /path", for tests that check what lexicon asked
        self._lock = asyncio.Lock()  # a duplicate check and its insert stay one step across the mirroring
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The API base URL, as lexicon's ``api_endpoint`` (Cloudflare's is https://api.cloudflare.com/client/v4)."""
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._authenticate])
        app.router.add_get(API_PREFIX + "/zones", self._list_zones)
        app.router.add_get(API_PREFIX + "/zones/{zone_id}", self._get_zone)
        app.router.add_get(API_PREFIX + "/zones/{zone_id}/dns_records", self._list_records)
        app.router.add_post(API_PREFIX + "/zones/{zone_id}/dns_records", self._create_record)
        app.router.add_put(API_PREFIX + "/zones/{zone_id}/dns_records/{record_id}", self._update_record)
        app.router.add_delete(API_PREFIX + "/zones/{zone_id}/dns_records/{record_id}", self._delete_record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> CloudflareStub:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- handlers --------------------------------------------------------------------------------

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.calls.append(f"{request.method} {request.path}")
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _error(403, 10000, "Authentication error")
        return await handler(request)

    def _zone(self, request: web.Request) -> tuple[str, str] | web.Response:
        zone_id = request.match_info["zone_id"]
        for name, zid in self.zone_ids.items():
            if zid == zone_id:
                return zid, name
        message = f"Could not route to {request.path}, perhaps your object identifier is invalid?"
        return _error(400, 7003, message)

    @staticmethod
    def _zone_object(name: str, zone_id: str) -> dict[str, Any]:
        return {"id": zone_id, "name": name, "status": "active", "paused": False, "type": "full"}

    async def _list_zones(self, request: web.Request) -> web.Response:
        wanted = request.query.get("name")
        zones = [self._zone_object(n, zid) for n, zid in self.zone_ids.items() if wanted in (None, n)]
        return _page(request, zones)

    async def _get_zone(self, request: web.Request) -> web.Response:
        found = self._zone(request)
        if isinstance(found, web.Response):
            return found
        zone_id, name = found
        return _envelope(self._zone_object(name, zone_id))

    async def _list_records(self, request: web.Request) -> web.Response:
        found = self._zone(request)
        if isinstance(found, web.Response):
            return found
        filters = {key: request.query[key] for key in ("type", "name", "content") if key in request.query}
        records = [r for r in self.records[found[0]].values() if all(r[k] == v for k, v in filters.items())]
        return _page(request, records)

    async def _create_record(self, request: web.Request) -> web.Response:
        found = self._zone(request)
        if isinstance(found, web.Response):
            return found
        zone_id, zone = found
        body = await request.json()
        problem = self._invalid(body, zone)
        if problem is not None:
            return problem
        async with self._lock:
            for r in self.records[zone_id].values():
                if (r["type"], r["name"], r["content"]) == (body["type"], body["name"], body["content"]):
                    return _error(400, 81058, "An identical record already exists.")
            if (failed := await self._mirror(body["name"], body["content"], add=True)) is not None:
                return failed
            record = self._record(zone_id, zone, secrets.token_hex(16), body)
            self.records[zone_id][record["id"]] = record
        return _envelope(record)

    async def _update_record(self, request: web.Request) -> web.Response:
        found = self._zone(request)
        if isinstance(found, web.Response):
            return found
        zone_id, zone = found
        body = await request.json()
        async with self._lock:
            old = self.records[zone_id].get(request.match_info["record_id"])
            if old is None:
                return _error(404, 81044, "Record does not exist.")
            body = {**old, **body}
            problem = self._invalid(body, zone)
            if problem is not None:
                return problem
            if (failed := await self._mirror(old["name"], old["content"], add=False)) is not None:
                return failed
            if (failed := await self._mirror(body["name"], body["content"], add=True)) is not None:
                return failed
            record = self._record(zone_id, zone, old["id"], body)
            self.records[zone_id][old["id"]] = record
        return _envelope(record)

    async def _delete_record(self, request: web.Request) -> web.Response:
        found = self._zone(request)
        if isinstance(found, web.Response):
            return found
        zone_id = found[0]
        async with self._lock:
            record = self.records[zone_id].get(request.match_info["record_id"])
            if record is None:
                return _error(404, 81044, "Record does not exist.")
            if (failed := await self._mirror(record["name"], record["content"], add=False)) is not None:
                return failed
            del self.records[zone_id][record["id"]]
        return _envelope({"id": record["id"]})

    # --- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _invalid(body: dict[str, Any], zone: str) -> web.Response | None:
        if body.get("type") != "TXT":  # all DNS-01 needs; the mirror's update policy allows TXT
            return _error(400, 1004, "DNS Validation Error: this stub serves TXT records only")
        name, content = body.get("name"), body.get("content")
        if not isinstance(name, str) or not (name == zone or name.endswith("." + zone)):
            return _error(400, 1004, f"DNS Validation Error: the name is not in the zone {zone}")
        if not isinstance(content, str) or not content:
            return _error(400, 1004, "DNS Validation Error: content is required")
        return None

    async def _mirror(self, name: str, content: str, *, add: bool) -> web.Response | None:
        try:
            if add:
                await self.mirror.present(name + ".", content)
            else:
                await self.mirror.cleanup(name + ".", content)
        except DnsProviderError as exc:
            return _error(500, 10001, f"the stub's mirror into DNS failed: {exc}")
        return None

    @staticmethod
    def _record(zone_id: str, zone: str, record_id: str, body: dict[str, Any]) -> dict[str, Any]:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {
            "id": record_id, "zone_id": zone_id, "zone_name": zone, "name": body["name"],
            "type": body["type"], "content": body["content"], "ttl": int(body.get("ttl") or 1),
            "proxiable": False, "proxied": False, "locked": False, "created_on": now, "modified_on": now,
        }  # fmt: skip
