"""The edge listener: builds the shared Edge from the config, accepts connections, drains on stop.

Stop order (uvicorn's): stop accepting -> let in-flight exchanges finish -> after the grace, close what
is left (tunnels included) -> close pooled upstream connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.config import Config, EdgeConfig
from gateway.edge.protocol import Edge, EdgeProtocol, EdgeSettings
from gateway.edge.resolver import Resolver
from gateway.edge.target import RoutingConfig
from gateway.edge.upstream import UpstreamPool
from gateway.routes.store import RedisStore


def edge_settings(config: Config, api_socket: str) -> EdgeSettings:
    edge = config.edge
    domains = (config.api.sandbox_domain.lower(), *EdgeConfig.split(edge.extra_sandbox_domains))
    return EdgeSettings(
        routing=RoutingConfig(
            api_hosts=EdgeConfig.split(edge.api_hosts),
            sandbox_domains=domains,
            max_target_bytes=edge.max_target_bytes,
        ),
        api_socket=api_socket,
        scheme=config.server.public_url.partition(":")[0] or "http",
        header_timeout_s=edge.header_timeout_s,
        keepalive_timeout_s=edge.keepalive_timeout_s,
        first_byte_timeout_s=edge.upstream_first_byte_timeout_s,
        stream_idle_timeout_s=edge.stream_idle_timeout_s,
        tunnel_idle_timeout_s=edge.tunnel_idle_timeout_s,
        max_body_bytes=edge.max_body_bytes,
        max_header_count=edge.max_header_count,
        max_header_bytes=edge.max_header_bytes,
        max_connections=edge.max_connections,
        trusted_proxies=frozenset(EdgeConfig.split(edge.trusted_proxies)),
    )


@asynccontextmanager
async def running_edge(
    config: Config, store: RedisStore, vm_networks: list[str], api_socket: str, *, reuse_port: bool = False
) -> AsyncIterator[Edge]:
    """The edge on config.server.listen; ``reuse_port`` lets other processes listen there too."""
    resolver = Resolver(store, vm_networks)
    pool = UpstreamPool(config.edge.upstream_connect_timeout_s)
    edge = Edge(edge_settings(config, api_socket), resolver, pool)
    resolver.start()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: EdgeProtocol(edge),
        config.server.host,
        config.server.port,
        reuse_address=True,
        reuse_port=reuse_port or None,
        backlog=4096,
    )
    try:
        yield edge
    finally:
        server.close()
        await edge.drain(config.server.shutdown_grace_s)
        pool.close_all()
        await resolver.stop()
        await server.wait_closed()
