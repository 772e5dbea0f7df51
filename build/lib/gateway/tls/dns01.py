"""DNS-01: the provider contract, and the check that a TXT record is served by every authoritative server.

A ``DnsProvider`` (lego's shape) publishes and removes the challenge's TXT record. ``present`` adds a
value without removing others (a wildcard and its bare name share one record name); ``cleanup`` removes
exactly that value and succeeds when it is already gone, so it is safe in ``finally``. Both may be
retried. Errors are ``DnsProviderError`` naming the provider.

``wait_until_served`` asks the zone's authoritative servers directly (recursion off), every
``POLL_INTERVAL_S``, until each serves the value: an ACME server that validates sees it too. Resolvers'
caches play no part.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

POLL_INTERVAL_S = 0.05
QUERY_TIMEOUT_S = 2.0
PROPAGATION_TIMEOUT_S = 120.0


class DnsProviderError(Exception):
    def __init__(self, provider: str, message: str) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider


class DnsProvider(Protocol):
    """Publishes ACME DNS-01 TXT records. Concurrency: calls for different names may overlap."""

    name: str

    async def present(self, fqdn: str, value: str) -> None:
        """Add ``value`` to the TXT record at ``fqdn`` (absolute, with the trailing dot)."""
        ...

    async def cleanup(self, fqdn: str, value: str) -> None:
        """Remove ``value`` from the TXT record at ``fqdn``; succeeds when it is not there."""
        ...


@runtime_checkable
class RedirectingProvider(Protocol):
    """Optional: a provider that writes the record somewhere else than the challenge's name (the delegated
    mode writes it at the target of the customer's CNAME). Propagation is checked where it is written."""

    def record_name(self, fqdn: str) -> str:
        """The absolute name where ``present(fqdn, ...)`` writes."""
        ...


@dataclass(frozen=True)
class DnsLookup:
    """Where zones and their servers are looked up: the system's resolvers, or given ones (tests, and
    split-horizon setups). Authoritative servers are asked on ``authoritative_port``."""

    nameservers: tuple[str, ...] = ()
    port: int = 53
    authoritative_port: int = 53

    def resolver(self) -> dns.asyncresolver.Resolver:
        if not self.nameservers:
            return dns.asyncresolver.Resolver()
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = list(self.nameservers)
        resolver.port = self.port
        return resolver


async def zone_of(fqdn: str, lookup: DnsLookup, *, provider: str = "dns") -> dns.name.Name:
    try:
        return await dns.asyncresolver.zone_for_name(fqdn, resolver=lookup.resolver())
    except dns.exception.DNSException as exc:
        raise DnsProviderError(provider, f"no zone found for {fqdn}: {exc}") from None


async def authoritative_addresses(zone: dns.name.Name, lookup: DnsLookup) -> list[str]:
    resolver = lookup.resolver()
    try:
        ns_names = [r.target for r in await resolver.resolve(zone, dns.rdatatype.NS)]
        addresses: list[str] = []
        for ns in ns_names:
            addresses += [r.address for r in await resolver.resolve(ns, dns.rdatatype.A)]
    except dns.exception.DNSException as exc:
        raise DnsProviderError("dns", f"the servers of {zone} could not be found: {exc}") from None
    if not addresses:
        raise DnsProviderError("dns", f"{zone} has no name server addresses")
    return sorted(set(addresses))


async def _serves(address: str, port: int, fqdn: str, value: str) -> bool:
    query = dns.message.make_query(fqdn, dns.rdatatype.TXT)
    query.flags &= ~dns.flags.RD
    try:
        answer = await dns.asyncquery.udp(query, address, port=port, timeout=QUERY_TIMEOUT_S)
    except (OSError, dns.exception.DNSException):
        return False
    for rrset in answer.answer:
        for rdata in rrset:
            if rdata.rdtype == dns.rdatatype.TXT and b"".join(rdata.strings).decode() == value:
                return True
    return False


async def wait_until_served(
    fqdn: str, value: str, lookup: DnsLookup, *, timeout_s: float = PROPAGATION_TIMEOUT_S
) -> None:
    """Return once every authoritative server of ``fqdn``'s zone serves ``value``; TimeoutError if not."""
    addresses = await authoritative_addresses(await zone_of(fqdn, lookup), lookup)
    async with asyncio.timeout(timeout_s):
        while True:
            served = await asyncio.gather(
                *(_serves(a, lookup.authoritative_port, fqdn, value) for a in addresses)
            )
            if all(served):
                return
            await asyncio.sleep(POLL_INTERVAL_S)
