"""What one edge process is told by the config: ``EdgeSettings``, derived from ``[edge]`` and friends.

It has no defaults of its own (config/gateway.toml and ``gateway.config`` hold every default), so the
two can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import Config, split_host_port

from .target import RoutingConfig


@dataclass(frozen=True)
class EdgeSettings:
    routing: RoutingConfig
    # The control plane: its unix socket's path, or HOST:PORT (``gateway api`` on another machine).
    api_upstream: str
    scheme: str  # what clients of the plain listener use (server.public_url's scheme)
    header_timeout_s: float
    keepalive_timeout_s: float
    first_byte_timeout_s: float
    # A request for a suspended auto_resume VM is held this long while it resumes.
    wake_timeout_s: float
    stream_idle_timeout_s: float
    tunnel_idle_timeout_s: float
    send_timeout_s: float
    ws_max_frame_bytes: int
    ws_max_message_bytes: int
    max_body_bytes: int
    max_header_count: int
    max_header_bytes: int
    max_connections: int
    max_exchanges_per_vm: int  # 0: no cap
    api_rate_per_key: float  # 0: no limit
    api_burst_per_key: int
    trusted_proxies: frozenset[str]
    # With TLS on: plain-HTTP requests get a 308 to https on this port (0: none), except under these
    # path prefixes.
    https_redirect_port: int
    plain_http_paths: tuple[bytes, ...]

    @classmethod
    def from_config(cls, config: Config, api_upstream: str) -> EdgeSettings:
        edge = config.edge
        return cls(
            routing=RoutingConfig(
                api_hosts=edge.api_host_names,
                sandbox_domains=config.sandbox_domains,
                max_target_bytes=edge.max_target_bytes,
                instance_domains=(config.instances.domain,),
            ),
            api_upstream=api_upstream,
            scheme=config.server.public_url.partition(":")[0] or "http",
            header_timeout_s=edge.header_timeout_s,
            keepalive_timeout_s=edge.keepalive_timeout_s,
            first_byte_timeout_s=edge.upstream_first_byte_timeout_s,
            wake_timeout_s=config.vms.wake_timeout_s,
            stream_idle_timeout_s=edge.stream_idle_timeout_s,
            tunnel_idle_timeout_s=edge.tunnel_idle_timeout_s,
            send_timeout_s=edge.send_timeout_s,
            ws_max_frame_bytes=edge.ws_max_frame_bytes,
            ws_max_message_bytes=edge.ws_max_message_bytes,
            max_body_bytes=edge.max_body_bytes,
            max_header_count=edge.max_header_count,
            max_header_bytes=edge.max_header_bytes,
            max_connections=edge.max_connections,
            max_exchanges_per_vm=edge.max_exchanges_per_vm,
            api_rate_per_key=edge.api_rate_per_key,
            api_burst_per_key=edge.api_burst_per_key,
            trusted_proxies=edge.trusted_proxy_addresses,
            https_redirect_port=https_redirect_port(config),
            plain_http_paths=tuple(p.encode() for p in config.tls.plain_http_path_list),
        )


def https_redirect_port(config: Config) -> int:
    """The port plain-HTTP requests are redirected to; 0: no redirect (no TLS, or turned off)."""
    if not config.tls.listen or not config.tls.redirect_http:
        return 0
    return config.tls.public_port or split_host_port(config.tls.listen)[1]
