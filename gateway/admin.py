"""The admin listener (``admin.listen``, never the public one): /metrics, /healthz, /readyz.

- ``/healthz``: the process is alive and its loop answers (200, always, while it runs).
- ``/readyz``: it can serve: Redis answers, the route cache follows Redis's events, the listeners accept,
  and with TLS the certificate table is loaded and followed. 503 with the failing checks otherwise, so a
  load balancer takes the edge out of rotation until it recovers by itself.
- ``/metrics``: Prometheus text format (``gateway.metrics``), labels bounded (no VM ids).
- ``/metrics/vms``: one series per live VM (requests, bytes, open exchanges and tunnels), where the
  control plane runs: a separate scrape, so per-VM series are an operator's choice, not a side effect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from aiohttp import web

from gateway import metrics
from gateway.config import Config, split_host_port
from gateway.edge.protocol import Edge
from gateway.egress.proxy import EgressProxy
from gateway.errors import GatewayError, ListenFailed
from gateway.server_header import use_neutral_server_header
from gateway.state.connection import guarded
from gateway.state.store import RedisStore
from gateway.tls.serving import TlsServing


@dataclass
class AdminView:
    """What the admin endpoints look at; ``store`` only where the control plane runs (VM counts)."""

    client: aioredis.Redis
    edge: Edge | None
    store: RedisStore | None = None
    tls: TlsServing | None = None
    worker_dir: Path | None = None
    egress: EgressProxy | None = None  # in the process that owns the VMs, where VMs have egress


ADMIN_VIEW = web.AppKey("admin_view", AdminView)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    view = request.app[ADMIN_VIEW]
    checks: dict[str, bool] = {}
    try:
        checks["redis"] = bool(await guarded(view.client.ping()))
    except GatewayError:
        checks["redis"] = False
    if view.edge is not None:
        checks["routes"] = view.edge.resolver.following.is_set()
        checks["listeners"] = not view.edge.draining
    if view.tls is not None:
        checks["certificates"] = view.tls.follower.following.is_set()
    ready = all(checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    view = request.app[ADMIN_VIEW]
    try:
        data = await metrics.gather(
            view.edge, view.store, view.tls.store if view.tls else None, view.worker_dir, view.egress
        )
    except GatewayError:
        # Redis is down: the process's own counters still tell the story (and count the failures).
        data = await metrics.gather(view.edge, None, None, view.worker_dir, view.egress)
    return web.Response(body=metrics.render(data), headers={"Content-Type": metrics.CONTENT_TYPE})


async def vm_metrics_handler(request: web.Request) -> web.Response:
    view = request.app[ADMIN_VIEW]
    if view.store is None:
        message = "per-VM metrics are served where the control plane runs (gateway serve or gateway api)\n"
        return web.Response(status=404, text=message)
    try:
        body = await metrics.render_vms(view.store)
    except GatewayError as exc:
        return web.Response(status=503, text=f"the state is unavailable: {exc}\n")
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


def make_admin_app(view: AdminView) -> web.Application:
    app = web.Application()
    use_neutral_server_header(app)
    app[ADMIN_VIEW] = view
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/metrics/vms", vm_metrics_handler)
    return app


@asynccontextmanager
async def running_admin(config: Config, view: AdminView) -> AsyncIterator[None]:
    """The admin listener on ``admin.listen`` while the context runs (nothing when it is empty)."""
    if not config.admin.listen:
        yield
        return
    runner = web.AppRunner(make_admin_app(view), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        host, port = split_host_port(config.admin.listen)
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:
            raise ListenFailed("admin.listen", config.admin.listen, exc) from exc
        yield
    finally:
        await runner.cleanup()
