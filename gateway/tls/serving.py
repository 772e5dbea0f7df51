"""TLS for one edge process: the SNI table, filled from the certificate store and kept in step with it."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from gateway.config import Config, ConfigError
from gateway.state.keyspace import Keys
from gateway.state.ports import EventFeed
from gateway.tls.context import server_context
from gateway.tls.follower import CertFollower, following
from gateway.tls.local import StorageKeyError, default_certificate, storage_key
from gateway.tls.sni import SniTable
from gateway.tls.store import CertStore


@dataclass
class TlsServing:
    table: SniTable
    store: CertStore
    follower: CertFollower


def operator_names(config: Config) -> list[str]:
    """The names the default certificate covers: the API hosts and each sandbox domain's wildcard."""
    api_hosts = [h.lower() for h in config.edge.api_host_names if not _is_ip(h)]
    domains = (*config.sandbox_domains, config.instances.domain)
    return [*(api_hosts or ["localhost"]), *(f"*.{domain}" for domain in domains)]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def cert_store(config: Config, client: aioredis.Redis) -> CertStore:
    """The certificate store with this deployment's storage key (blocking: may make the key file)."""
    try:
        key = storage_key(config.tls.storage_key, config.tls.storage_key_file, config.data_path)
    except StorageKeyError as exc:
        raise ConfigError(f"tls storage key: {exc}") from None
    return CertStore(client, Keys(config.redis.key_prefix), key)


@asynccontextmanager
async def serving_tls(config: Config, client: aioredis.Redis, events: EventFeed) -> AsyncIterator[TlsServing]:
    store = await asyncio.to_thread(cert_store, config, client)
    default = await asyncio.to_thread(default_certificate, Path(config.tls.certs_dir), operator_names(config))
    alpn = ("h2", "http/1.1") if config.edge.http2 else ("http/1.1",)
    table = SniTable(await asyncio.to_thread(server_context, default), alpn)
    async with following(store, table, events) as follower:
        yield TlsServing(table, store, follower)
