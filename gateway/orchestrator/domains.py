"""Custom domains: a customer's own name routed to one of their VMs and served with its own certificate.

The control plane claims, shows, retries and releases domains here; the certificate itself is issued by
the domain keeper (``gateway.tls.domains``) in whichever gateway process runs ACME. Tenancy as elsewhere:
a domain another key holds answers 409 on create (the name is public, its existence is no secret) and
404 on every other call, like a domain that does not exist.

``dns_credentials`` are sealed with the storage key before they reach Redis and are never shown again.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config import Config
from gateway.errors import Conflict, NotFound
from gateway.state.cert_state import CertStates
from gateway.state.events import DomainChanged
from gateway.state.records import DOMAIN_PENDING, DomainRecord
from gateway.state.store import RedisStore
from gateway.tls.providers.registry import ProviderSettings, credential_problems, provider_name
from gateway.tls.store import Sealer

_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
MAX_DOMAIN_LENGTH = 253


@dataclass(frozen=True)
class DomainRequest:
    domain: str
    dns_provider: str | None = None
    dns_credentials: Mapping[str, str] | None = None


def normalise_domain(text: str) -> str:
    return text.strip().lower().removesuffix(".")


def domain_problem(domain: str, config: Config) -> str | None:
    """Why ``domain`` (normalised) cannot be a custom domain here, or None."""
    if not domain.isascii():
        return "use the domain's ASCII (punycode, xn--) form"
    labels = domain.split(".")
    if len(domain) > MAX_DOMAIN_LENGTH or len(labels) < 2 or not all(_LABEL_RE.match(x) for x in labels):
        return "not a valid DNS name (letters, digits and dashes in at least two dot-separated labels)"
    if labels[-1].isdigit():
        return "an IP address cannot be a custom domain"
    reserved = [*config.edge.api_host_names, *config.sandbox_domains, config.instances.domain]
    if config.acme.delegation_zone:
        reserved.append(normalise_domain(config.acme.delegation_zone))
    for name in reserved:
        if domain == name or domain.endswith("." + name):
            return f"{domain} belongs to this gateway"
    return None


class DomainService:
    def __init__(
        self, store: RedisStore, config: Config, sealer: Sealer | None, providers: ProviderSettings | None
    ) -> None:
        self.store = store
        self.cert_states = CertStates(store.client, store.keys)
        self.config = config
        self.sealer = sealer
        self.providers = providers

    def problems(self, request: DomainRequest) -> list[tuple[str, str]]:
        """What is wrong with a requested custom domain: (field, message) pairs for a 422."""
        if self.sealer is None or self.providers is None or not self.config.acme.directory_url:
            return [
                ("custom_domain", "custom domains need ACME configured on this gateway (acme.directory_url)")
            ]
        if not self.config.edge.api_host_names:
            return [
                ("custom_domain", "custom domains need edge.api_hosts set (to tell them from the API host)")
            ]
        found = []
        problem = domain_problem(normalise_domain(request.domain), self.config)
        if problem:
            found.append(("domain", problem))
        name = provider_name(request.dns_provider)
        found += [
            ("dns_credentials", p)
            for p in credential_problems(name, request.dns_credentials or {}, self.providers)
        ]
        return found

    async def claim(self, owner: str, vm_id: str, request: DomainRequest) -> DomainRecord:
        """Hold the domain for this VM (call ``problems`` first); Conflict when another key holds it."""
        assert self.sealer is not None
        credentials = dict(request.dns_credentials or {})
        now = time.time()
        rec = DomainRecord(
            domain=normalise_domain(request.domain), owner=owner, vm_id=vm_id,
            dns_provider=provider_name(request.dns_provider), state=DOMAIN_PENDING, created_at=now,
            updated_at=now,
            credentials_sealed=self.sealer.seal(json.dumps(credentials).encode()) if credentials else "",
        )  # fmt: skip
        if not await self.store.claim_domain(rec):
            raise Conflict(f"{rec.domain} is already in use by another account", code="domain_taken")
        return rec

    async def get(self, owner: str, domain: str) -> DomainRecord:
        rec = await self.store.get_domain(normalise_domain(domain))
        if rec is None or rec.owner != owner:
            raise NotFound("custom domain not found", code="domain_not_found")
        return rec

    async def of_vm(self, vm_id: str, domain: str | None) -> DomainRecord | None:
        """The VM's custom domain, while it is still held for this VM."""
        rec = await self.store.get_domain(domain) if domain else None
        return rec if rec is not None and rec.vm_id == vm_id else None

    async def list(self, owner: str) -> list[DomainRecord]:
        records = await self.store.get_domains(await self.store.owner_domain_names(owner))
        return sorted((r for r in records if r.owner == owner), key=lambda r: r.created_at)

    async def retry(self, owner: str, domain: str) -> DomainRecord:
        """Try issuing again now, whatever the back-off says (the customer fixed their DNS)."""
        rec = await self.get(owner, domain)
        await self.cert_states.retry_now(rec.domain)
        await self.store.update_domain(rec.domain, rec.vm_id, state=DOMAIN_PENDING, updated_at=time.time())
        await self.store.publish(DomainChanged(rec.domain))
        return await self.get(owner, domain)

    async def delete(self, owner: str, domain: str) -> None:
        """Stop routing the domain at once; its certificate goes after ``acme.domain_grace_s``."""
        rec = await self.get(owner, domain)
        await self.store.release_domain(rec.domain, owner, rec.vm_id)
