"""The edge listener: builds the shared Edge from the config, accepts connections, drains on stop.

Stop order (uvicorn's): stop accepting -> let in-flight exchanges finish -> after the grace, close what
is left (tunnels included) -> close pooled upstream connections.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.background import stop_loop
from gateway.config import Config, split_host_port
from gateway.edge import http2
from gateway.edge.h2c import h2c_dial
from gateway.edge.impl import select
from gateway.edge.observe import FLUSH_INTERVAL_S, AccessLog, VmTraffic
from gateway.edge.protocol import Edge
from gateway.edge.resolver import Resolver
from gateway.edge.upstream import UpstreamPool
from gateway.errors import ListenFailed, StoreUnavailable
from gateway.state.ports import EventFeed, RouteSource, TrafficSink, Waker
from gateway.tls.sni import SniTable


async def flush_access_log(access_log: AccessLog) -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        access_log.flush()


async def flush_traffic(edge: Edge, sink: TrafficSink, interval_s: float) -> None:
    """Hand the bytes counted and the activity seen per VM to the state every ``interval_s``
    (edge.traffic_flush_s); what cannot be written now is kept for the next round (Redis may be away
    for a while)."""
    while True:
        await asyncio.sleep(interval_s)
        await flush_once(edge, sink, interval_s)


async def flush_once(edge: Edge, sink: TrafficSink, interval_s: float) -> None:
    """One flush: the counts and activity, then what is open per VM."""
    # What is open is read before the counts are taken: an exchange that ends meanwhile is still open
    # in this report and counted in the next flush, never missing from both.
    open_now = edge.traffic.open_now()
    await write_traffic(edge.traffic, sink)
    await report_open(edge, sink, open_now, interval_s)


async def write_traffic(traffic: VmTraffic, sink: TrafficSink) -> None:
    counts = traffic.take()
    active = traffic.take_active()
    # The activity happened since the last flush: stamped now, it is at most one interval late (an idle
    # deadline errs by that much on the side of keeping the VM).
    at = time.time()
    try:
        await sink.add_traffic(counts)
        counts = {}
        await sink.mark_active(active, at)
    except StoreUnavailable:
        traffic.give_back(counts, active)


# An edge's report of what it has open per VM holds for this many flush intervals, and at least
# OPEN_REPORT_MIN_S (a busy loop may flush late), then it is gone: a dead edge stops counting.
OPEN_REPORT_FLUSHES = 3
OPEN_REPORT_MIN_S = 10.0


async def report_open(
    edge: Edge, sink: TrafficSink, counts: dict[str, tuple[int, int]], interval_s: float
) -> None:
    """Exchanges and tunnels open per VM (``VmTraffic.open_now()``: a session's usage, /metrics/vms):
    reported while there are any, and once more when there are none."""
    if not counts and not edge.open_reported:
        return
    try:
        await sink.report_open(
            edge.instance_id, counts, max(interval_s * OPEN_REPORT_FLUSHES, OPEN_REPORT_MIN_S)
        )
    except StoreUnavailable:
        return  # reported again at the next flush
    edge.open_reported = bool(counts)


@asynccontextmanager
async def running_edge(
    config: Config,
    routes: RouteSource,
    events: EventFeed,
    vm_networks: list[str],
    api_upstream: str,
    *,
    reuse_port: bool = False,
    sni: SniTable | None = None,
    traffic: TrafficSink | None = None,
    waker: Waker | None = None,
) -> AsyncIterator[Edge]:
    """The edge on config.server.listen, and with ``sni`` on tls.listen too; ``reuse_port`` lets other
    processes listen there as well. Routes come from ``routes``, kept fresh by ``events`` (the process's
    one subscription, which the caller runs); the bytes it carries per VM go to ``traffic``; requests for
    suspended auto_resume VMs ask ``waker``. The edge is the one edge.implementation selects (its
    ``implementation`` says which)."""
    impl = select(config.edge.implementation)
    resolver: Resolver = impl.resolver.Resolver(routes, vm_networks, config.edge.redis_grace_s)
    pool: UpstreamPool = impl.upstream.UpstreamPool(config.edge.upstream_connect_timeout_s)
    access_log: AccessLog | None = (
        impl.observe.AccessLog(config.log.format, sys.stderr.fileno()) if config.log.access_log else None
    )
    settings = impl.settings.EdgeSettings.from_config(config, api_upstream)
    edge: Edge = impl.protocol.Edge(settings, resolver, pool, access_log, waker)
    if config.edge.http2:
        edge.start_h2 = http2.starter(
            config.edge.http2_max_streams, config.edge.keepalive_timeout_s, config.edge.max_header_bytes
        )
        h2c_pool: UpstreamPool = impl.upstream.UpstreamPool(config.edge.upstream_connect_timeout_s)
        h2c_pool.dial = h2c_dial(h2c_pool, impl.upstream.UpstreamConnection)
        edge.h2c_pool = h2c_pool
    edge_protocol = impl.protocol.EdgeProtocol
    events.add(resolver)
    flusher = asyncio.create_task(flush_access_log(access_log)) if access_log is not None else None
    traffic_flusher = (
        asyncio.create_task(flush_traffic(edge, traffic, config.edge.traffic_flush_s)) if traffic else None
    )
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    try:
        # Inside the try: when a listener cannot bind, what was started is stopped again.
        try:
            servers.append(
                await loop.create_server(
                    lambda: edge_protocol(edge),
                    config.server.host,
                    config.server.port,
                    reuse_address=True,
                    reuse_port=reuse_port or None,
                    backlog=4096,
                )
            )
        except OSError as exc:
            raise ListenFailed("server.listen", config.server.listen, exc) from exc
        if sni is not None:
            host, port = split_host_port(config.tls.listen)
            try:
                servers.append(
                    await loop.create_server(
                        lambda: edge_protocol(edge, tls=True),
                        host,
                        port,
                        ssl=sni.context,
                        ssl_handshake_timeout=config.tls.handshake_timeout_s,
                        reuse_address=True,
                        reuse_port=reuse_port or None,
                        backlog=4096,
                    )
                )
            except OSError as exc:
                raise ListenFailed("tls.listen", config.tls.listen, exc) from exc
        yield edge
    finally:
        for server in servers:
            server.close()
        await edge.drain(config.server.shutdown_grace_s)
        pool.close_all()
        if edge.h2c_pool is not None:
            edge.h2c_pool.close_all()
        events.remove(resolver)
        if traffic is not None:
            await stop_loop(traffic_flusher)
            # What the drain counted (and nothing open any more).
            await flush_once(edge, traffic, config.edge.traffic_flush_s)
        if access_log is not None:
            await stop_loop(flusher)
            await asyncio.to_thread(access_log.close)
        for server in servers:
            await server.wait_closed()
