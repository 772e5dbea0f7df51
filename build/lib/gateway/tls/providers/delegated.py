"""Delegated DNS-01: the customer gives no credentials; they point ``_acme-challenge.<domain>`` at a name in
the operator's zone with a CNAME once, and the gateway writes every challenge there with the operator's
own provider. ACME servers follow the CNAME (RFC 8555 allows it; Let's Encrypt documents it).

The CNAME is checked before anything is written, so a customer who has not added it yet gets an error that
says exactly which record to add, not an ACME validation failure.
"""

from __future__ import annotations

import hashlib

import dns.asyncresolver
import dns.exception
import dns.rdatatype

from gateway.tls.dns01 import DnsLookup, DnsProvider, DnsProviderError

CHALLENGE_LABEL = "_acme-challenge."
# 128 bits of the domain's hash: a stable name per domain that reveals nothing about it.
TARGET_LABEL_HEX = 32


def challenge_name(domain: str) -> str:
    """Where ACME looks for a domain's DNS-01 record (absolute)."""
    return f"{CHALLENGE_LABEL}{domain.lower().rstrip('.')}."


def delegation_target(domain: str, zone: str) -> str:
    """The name in the operator's zone that ``challenge_name(domain)`` must be a CNAME to (absolute)."""
    label = hashlib.sha256(domain.lower().rstrip(".").encode()).hexdigest()[:TARGET_LABEL_HEX]
    return f"{label}.{zone.lower().strip('.')}."


class DelegatedProvider:
    name = "delegated"

    def __init__(self, operator: DnsProvider, zone: str, lookup: DnsLookup) -> None:
        self.operator = operator
        self.zone = zone
        self.lookup = lookup

    def record_name(self, fqdn: str) -> str:
        return delegation_target(_domain_of(fqdn), self.zone)

    async def present(self, fqdn: str, value: str) -> None:
        target = self.record_name(fqdn)
        found = await self._cname_of(fqdn)
        if found != target:
            seen = f"it points to {found}" if found else "there is none"
            raise DnsProviderError(
                self.name, f"add the record {fqdn} CNAME {target} to the domain's zone ({seen})"
            )
        await self.operator.present(target, value)

    async def cleanup(self, fqdn: str, value: str) -> None:
        await self.operator.cleanup(self.record_name(fqdn), value)

    async def _cname_of(self, fqdn: str) -> str | None:
        try:
            answer = await self.lookup.resolver().resolve(fqdn, dns.rdatatype.CNAME)
        except (dns.asyncresolver.NXDOMAIN, dns.asyncresolver.NoAnswer):
            return None
        except dns.exception.DNSException as exc:
            raise DnsProviderError(self.name, f"the CNAME at {fqdn} could not be looked up: {exc}") from None
        return str(answer[0].target).lower()


def _domain_of(fqdn: str) -> str:
    name = fqdn.lower().rstrip(".")
    return name[len(CHALLENGE_LABEL) :] if name.startswith(CHALLENGE_LABEL) else name
