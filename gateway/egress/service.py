"""The egress plane running: the proxy and the VMs' resolver listening where the host's nftables
redirects VM traffic, with the VMs' policies read from the state.

It runs in the process that owns the VMs. Policies are re-read every ``REFRESH_S``, so a change applies
to new connections within that (connections already open keep going). The listeners are on the
loopback (the host's nftables send VM traffic there), answer VMs only, and nothing else can reach them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from gateway.config import EgressConfig, comma_list
from gateway.egress.ca import LeafMinter
from gateway.egress.policy import EgressPolicy, OperatorRules
from gateway.egress.proxy import EgressProxy, ProxySettings
from gateway.egress.resolved import ResolvedNames
from gateway.egress.resolver import ResolverProtocol, VmResolver
from gateway.errors import GatewayError, ListenFailed
from gateway.state.ports import PolicySource

log = logging.getLogger(__name__)

REFRESH_S = 0.5
# A VM whose record names no policy: the package registries only (pip install works, nothing else
# does); what a user opens more of is theirs to say.
DEFAULT_POLICY = EgressPolicy(allow_public_repos=True, allow_http=True, allow_https=True)
RESOLV_CONF = Path("/etc/resolv.conf")


def policy_of(stored: Mapping[str, Any]) -> EgressPolicy:
    """A stored policy (the SDK's fields) as the decision takes it; an empty one is the default."""
    if not stored:
        return DEFAULT_POLICY
    return EgressPolicy(
        allow_public_repos=bool(stored.get("allow_public_repos")),
        allow_http=bool(stored.get("allow_http")),
        allow_https=bool(stored.get("allow_https")),
        allowed_domains=tuple(str(d) for d in stored.get("allowed_domains") or ()),
        allowed_cidrs=tuple(str(c) for c in stored.get("allowed_cidrs") or ()),
    )


def operator_rules(config: EgressConfig, vm_networks: list[str]) -> OperatorRules:
    denied = [*comma_list(config.denied_networks), *vm_networks]
    return OperatorRules(
        public_repos=comma_list(config.public_repos),
        denied_networks=tuple(ipaddress.ip_network(n, strict=False) for n in denied),
    )


def system_resolvers() -> list[tuple[str, int]]:
    """The host's nameservers (what a VM's resolver asks when none are configured)."""
    found = []
    with contextlib.suppress(OSError):
        for line in RESOLV_CONF.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                found.append((parts[1], 53))
    return found


class Policies:
    """``VmPolicies`` from the state, refreshed in the background."""

    def __init__(self, source: PolicySource) -> None:
        self.source = source
        self._by_address: dict[str, tuple[str, EgressPolicy]] = {}

    def vm_at(self, address: str) -> tuple[str, EgressPolicy] | None:
        return self._by_address.get(address)

    async def refresh(self) -> None:
        found = await self.source.egress_policies()
        self._by_address = {ip: (vm_id, policy_of(stored)) for ip, (vm_id, stored) in found.items()}

    async def follow(self) -> None:
        while True:
            with contextlib.suppress(GatewayError):
                await self.refresh()
            await asyncio.sleep(REFRESH_S)


@contextlib.asynccontextmanager
async def running_egress(
    config: EgressConfig, source: PolicySource, vm_networks: list[str], *, minter: LeafMinter | None = None
) -> AsyncIterator[EgressProxy]:
    """The proxy and the resolver listening; ``minter``: the deployment CA's (the proxy's, for the
    hosts it terminates TLS for)."""
    rules = operator_rules(config, vm_networks)
    policies = Policies(source)
    await policies.refresh()
    resolved = ResolvedNames()
    settings = ProxySettings(
        rules=rules, dial_networks=tuple(ipaddress.ip_network(n) for n in comma_list(config.dial_networks))
    )
    proxy = EgressProxy(settings, policies, resolved, minter=minter)
    resolver = VmResolver(policies, rules, resolved, list(config.upstreams()) or system_resolvers())
    loop = asyncio.get_running_loop()
    try:
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", config.proxy_port, reuse_address=True)
    except OSError as exc:
        raise ListenFailed("egress.proxy_port", f"127.0.0.1:{config.proxy_port}", exc) from exc
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: ResolverProtocol(resolver), local_addr=("127.0.0.1", config.resolver_port)
        )
    except OSError as exc:
        server.close()
        raise ListenFailed("egress.resolver_port", f"127.0.0.1:{config.resolver_port}", exc) from exc
    following = loop.create_task(policies.follow(), name="egress policies")
    log.info("egress: proxy on :%d, resolver on :%d", config.proxy_port, config.resolver_port)
    try:
        yield proxy
    finally:
        following.cancel()
        server.close()
        await proxy.close()
        await server.wait_closed()
        transport.close()
        with contextlib.suppress(asyncio.CancelledError):
            await following
