"""The egress plane running: the proxy and the VMs' resolver listening where the host's nftables
redirects VM traffic, with the VMs' policies read from the state.

It runs in the process that owns the VMs. Policies are re-read every ``REFRESH_S``, so a change applies
to new connections within that (connections already open keep going). What the proxy saw (bytes per VM,
denials) goes to the state every ``REPORT_S``. The listeners are on the
loopback (the host's nftables send VM traffic there), answer VMs only, and nothing else can reach them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from gateway.config import EgressConfig, comma_list
from gateway.egress.ca import LeafMinter
from gateway.egress.policy import EgressPolicy, OperatorRules, effective_policy
from gateway.egress.proxy import EgressProxy, ProxySettings
from gateway.egress.resolved import ResolvedNames
from gateway.egress.resolver import ResolverProtocol, VmResolver
from gateway.errors import GatewayError, ListenFailed
from gateway.state.events import EgressPolicyChanged, Event, VmChanged, VmReleased
from gateway.state.ports import EgressSink, EventFeed, PolicySource, VaultSource

log = logging.getLogger(__name__)

REFRESH_S = 0.5  # while events cannot be heard
FULL_REFRESH_S = 5.0  # while they can (a safety net: events say what changed)
# A connection or DNS question from an unknown address reads the state again, at most this often.
MISS_REFRESH_S = 0.05
REPORT_S = 1.0
RESOLV_CONF = Path("/etc/resolv.conf")


def operator_rules(config: EgressConfig, closed: list[str]) -> OperatorRules:
    """The operator's part: the registries, and what no policy opens (``egress.denied_networks`` and
    ``closed``: the VM ranges, Redis). The host's own addresses are refused by the proxy itself."""
    denied = [*comma_list(config.denied_networks), *closed]
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


class EgressState(PolicySource, EgressSink, Protocol):
    """What the egress plane reads from and writes to the state."""


async def report(proxy: EgressProxy, sink: EgressSink) -> None:
    """One report of what the proxy saw to the state; kept for the next one when it cannot be written."""
    seen = proxy.take_report()
    if not seen:
        return
    try:
        await sink.add_egress(seen.counts, seen.denials)
    except GatewayError as exc:
        log.warning("egress: cannot report to the state (%s); kept for later", exc)
        proxy.put_back(seen)


async def keep_reporting(proxy: EgressProxy, sink: EgressSink) -> None:
    try:
        while True:
            await asyncio.sleep(REPORT_S)
            await report(proxy, sink)
    finally:
        with contextlib.suppress(GatewayError):
            await report(proxy, sink)  # the last one, as the plane stops


class Policies:
    """``VmPolicies`` from the state. Read again at once when an event says something changed (a policy
    set, a VM ended or its address released: that VM is forgotten first, its address may soon be another
    VM's), every ``FULL_REFRESH_S`` anyway, every ``REFRESH_S`` while events cannot be heard, and for an
    address not known yet (a VM's first DNS question may come before any of those, and a dropped one
    costs its program a resolver timeout, 5 s)."""

    def __init__(self, source: PolicySource) -> None:
        self.source = source
        self._by_address: dict[str, tuple[str, EgressPolicy]] = {}
        self._reading: tuple[asyncio.Future[None], float] | None = None  # the read under way, its start
        self._refreshed_at = 0.0
        self._changed = asyncio.Event()
        self._hearing = False

    async def vm_at(self, address: str) -> tuple[str, EgressPolicy] | None:
        found = self._by_address.get(address)
        if found is None:
            # Read again, but not more often than every MISS_REFRESH_S: a question waits rather than
            # being dropped (the read just made may have missed a VM that started right after it).
            wait_s = self._refreshed_at + MISS_REFRESH_S - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            with contextlib.suppress(GatewayError):
                await self.refresh()
            found = self._by_address.get(address)
        return found

    async def refresh(self) -> None:
        """A read of the state that started after this call; callers at the same time share it."""
        asked = time.monotonic()
        while True:
            if self._reading is None:
                self._reading = (asyncio.ensure_future(self._read()), time.monotonic())
            reading, started = self._reading
            try:
                await asyncio.shield(reading)
            finally:
                if reading.done() and self._reading is not None and self._reading[0] is reading:
                    self._reading = None
            if started >= asked:
                return

    async def _read(self) -> None:
        found = await self.source.egress_policies()
        self._by_address = {ip: (vm_id, effective_policy(stored)) for ip, (vm_id, stored) in found.items()}
        self._refreshed_at = time.monotonic()

    async def follow(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FULL_REFRESH_S if self._hearing else REFRESH_S):
                    await self._changed.wait()
            self._changed.clear()
            with contextlib.suppress(GatewayError):
                await self.refresh()

    # EventSubscriber: told on the feed's task; never blocks.

    def connected(self) -> None:
        self._hearing = True
        self._changed.set()  # what changed while nothing was heard

    def disconnected(self) -> None:
        self._hearing = False

    def handle(self, event: Event) -> None:
        if isinstance(event, VmReleased) or (isinstance(event, VmChanged) and event.gone):
            self._by_address = {a: v for a, v in self._by_address.items() if v[0] != event.vm_id}
        if isinstance(event, (VmChanged, VmReleased, EgressPolicyChanged)):
            self._changed.set()


@contextlib.asynccontextmanager
async def running_egress(
    config: EgressConfig,
    state: EgressState,
    closed: list[str],
    *,
    minter: LeafMinter | None = None,
    vaults: VaultSource | None = None,
    events: EventFeed | None = None,
) -> AsyncIterator[EgressProxy]:
    """The proxy and the resolver listening; ``minter``: the deployment CA's (the proxy's, for the
    hosts it terminates TLS for)."""
    rules = operator_rules(config, closed)
    policies = Policies(state)
    await policies.refresh()
    resolved = ResolvedNames()
    settings = ProxySettings(
        rules=rules, dial_networks=tuple(ipaddress.ip_network(n) for n in comma_list(config.dial_networks))
    )
    upstream_tls = ssl.create_default_context(cafile=config.upstream_ca_file or None)
    proxy = EgressProxy(settings, policies, resolved, minter=minter, vaults=vaults, upstream_tls=upstream_tls)
    resolver = VmResolver(
        policies, rules, resolved, list(config.upstreams()) or system_resolvers(), record=proxy.record
    )
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
    if events is not None:
        events.add(policies)
    reporting = loop.create_task(keep_reporting(proxy, state), name="egress reports")
    log.info("egress: proxy on :%d, resolver on :%d", config.proxy_port, config.resolver_port)
    try:
        yield proxy
    finally:
        if events is not None:
            events.remove(policies)
        following.cancel()
        server.close()
        await proxy.close()
        await server.wait_closed()
        transport.close()
        reporting.cancel()  # after the connections ended: their bytes are in the last report
        for task in (following, reporting):
            with contextlib.suppress(asyncio.CancelledError):
                await task
