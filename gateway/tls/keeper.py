"""Keeps the operator's certificates (the API hosts, each sandbox domain's wildcard) issued and renewed.

Runs in ``gateway serve`` (not in the edge workers): a first round at start, then one every
``acme.check_interval_s``. Each round calls ``Renewer.ensure`` per certificate, which does nothing unless
a certificate is missing or due, so several gateways on one Redis may all run it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway.background import stop_loop
from gateway.config import Config, split_host_port
from gateway.errors import GatewayError
from gateway.state.keyspace import Keys
from gateway.tls.acme import AcmeIssuer, AcmeSettings
from gateway.tls.dns01 import DnsLookup, DnsProvider
from gateway.tls.providers.registry import ProviderSettings
from gateway.tls.providers.rfc2136 import Rfc2136Provider, Rfc2136Settings
from gateway.tls.renewal import Renewer
from gateway.tls.serving import operator_names
from gateway.tls.store import CertStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WantedCert:
    cert_id: str
    names: list[str]
    provider: DnsProvider


def dns_lookup(config: Config) -> DnsLookup:
    acme = config.acme
    return DnsLookup(
        nameservers=acme.dns_resolver_list, port=acme.dns_port,
        authoritative_port=acme.authoritative_port,
    )  # fmt: skip


def operator_provider(config: Config, lookup: DnsLookup) -> Rfc2136Provider:
    acme = config.acme
    host, port = split_host_port(acme.rfc2136_server)
    settings = Rfc2136Settings(
        server=host, port=port, key_name=acme.rfc2136_key_name, key_secret=acme.rfc2136_key_secret,
        key_algorithm=acme.rfc2136_key_algorithm,
    )  # fmt: skip
    return Rfc2136Provider(settings, lookup)


def provider_settings(config: Config) -> ProviderSettings:
    """What customers' DNS providers are made with (``acme.directory_url`` set: the operator's too)."""
    lookup = dns_lookup(config)
    acme = config.acme
    return ProviderSettings(
        lookup=lookup, operator=operator_provider(config, lookup) if acme.directory_url else None,
        delegation_zone=acme.delegation_zone, lexicon_api_endpoints=acme.lexicon_endpoints(),
        customer_dns_private_ok=acme.customer_dns_private_ok,
    )  # fmt: skip


def acme_renewer(config: Config, store: CertStore, client: aioredis.Redis) -> Renewer:
    acme = config.acme
    settings = AcmeSettings(acme.directory_url, acme.email, acme.ca_bundle, acme.propagation_timeout_s)
    issuer = AcmeIssuer(settings, store, dns_lookup(config))
    return Renewer(store, issuer, client, Keys(config.redis.key_prefix))


class CertKeeper:
    def __init__(self, renewer: Renewer, wanted: list[WantedCert], interval_s: float) -> None:
        self.renewer = renewer
        self.wanted = wanted
        self.interval_s = interval_s
        self.rounds = 0
        self._round_done = asyncio.Event()  # replaced after each round: see next_round
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def check_all(self) -> None:
        for cert in self.wanted:
            try:
                await self.renewer.ensure(cert.cert_id, cert.names, cert.provider)
            except GatewayError as exc:  # Redis unavailable: the next round tries again
                log.warning("certificate %s not checked: %s", cert.cert_id, exc)
        self.rounds += 1
        done, self._round_done = self._round_done, asyncio.Event()
        done.set()

    async def next_round(self) -> None:
        await self._round_done.wait()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cert-keeper")

    async def stop(self) -> None:
        self._stopping = True
        await stop_loop(self._task)
        self._task = None

    async def _run(self) -> None:
        while not self._stopping:
            await self.check_all()
            await asyncio.sleep(self.interval_s)


@asynccontextmanager
async def keeping_operator_certs(
    config: Config, store: CertStore | None, client: aioredis.Redis
) -> AsyncIterator[CertKeeper | None]:
    """A running CertKeeper when acme.directory_url is set and TLS serves (else None)."""
    acme = config.acme
    if not acme.directory_url or store is None:
        yield None
        return
    provider = operator_provider(config, dns_lookup(config))
    wanted = [WantedCert(name, [name], provider) for name in operator_names(config)]
    renewer = acme_renewer(config, store, client)
    keeper = CertKeeper(renewer, wanted, acme.check_interval_s)
    keeper.start()
    try:
        yield keeper
    finally:
        await keeper.stop()
