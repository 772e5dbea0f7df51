"""Composition root: builds the stores, the driver, the orchestrator and the servers; starts and stops them.

Start order: data-folder lock -> Redis (embedded unless a URL is configured) -> driver + recovery ->
reaper -> listener. Stop is the reverse, the listener first, so no request arrives at a half-stopped
gateway; VMs keep running across a restart (their state is in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis
from aiohttp import web

from gateway.api.app import make_api_app
from gateway.config import Config
from gateway.datadir import DataDirBusy, DataDirLock
from gateway.edge.protocol import Edge
from gateway.edge.server import running_edge
from gateway.embedded_redis import EmbeddedRedis
from gateway.errors import StoreUnavailable
from gateway.keys import ApiKeyStore
from gateway.orchestrator.drivers.registry import make_driver
from gateway.orchestrator.reaper import Reaper
from gateway.orchestrator.service import Orchestrator
from gateway.routes.model import Keys
from gateway.routes.store import RedisStore, connect, guarded

log = logging.getLogger(__name__)

EMBEDDED_REDIS_FOLDER = "redis"
API_SOCKET = "api.sock"


def vm_networks(config: Config, svc: Services) -> list[str]:
    """The only addresses the edge may dial: the running driver's VM range."""
    return [config.netns.cidr if svc.orchestrator.driver.name == "netns" else config.process.cidr]


def embedded_redis_for(config: Config) -> EmbeddedRedis:
    return EmbeddedRedis(config.data_path / EMBEDDED_REDIS_FOLDER, config.redis.server_binary)


@dataclass
class Services:
    """What a running gateway is made of; tests build it too."""

    client: aioredis.Redis
    store: RedisStore
    key_store: ApiKeyStore
    orchestrator: Orchestrator
    reaper: Reaper
    app: web.Application
    edge: Edge | None = None


@asynccontextmanager
async def redis_client(config: Config, lock: DataDirLock | None) -> AsyncIterator[aioredis.Redis]:
    """The configured Redis, or an embedded one in the data folder (which needs the folder's lock)."""
    embedded = None
    url = config.redis.url
    if not url:
        if lock is None:
            raise RuntimeError("an embedded Redis needs the data-folder lock")
        embedded = embedded_redis_for(config)
        # On the loop's own thread, not a worker: PDEATHSIG fires when the *thread* that spawned the
        # child exits. Blocking here is fine: nothing else runs before Redis answers.
        embedded.start()
        url = embedded.url
    client = connect(url, config.redis.call_timeout_s)
    try:
        try:
            await guarded(client.ping())
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"cannot reach Redis at {url}: {exc.__cause__}") from exc
        yield client
    finally:
        await client.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


@asynccontextmanager
async def services(config: Config, client: aioredis.Redis) -> AsyncIterator[Services]:
    keys = Keys(config.redis.key_prefix)
    store = RedisStore(client, keys, config.vms.retention_s)
    key_store = ApiKeyStore(client, keys)
    driver = make_driver(config)
    orchestrator = Orchestrator(store, driver, config)
    await orchestrator.start()
    reaper = Reaper(orchestrator, config.vms.reaper_interval_s)
    reaper.start()
    try:
        yield Services(
            client, store, key_store, orchestrator, reaper, make_api_app(config, orchestrator, key_store)
        )
    finally:
        await reaper.stop()
        await orchestrator.close()
        await driver.close()


@asynccontextmanager
async def running_gateway(config: Config) -> AsyncIterator[Services]:
    """The whole gateway, listening on config.server.listen until the context exits."""
    lock = DataDirLock(config.data_path)
    lock.acquire()
    try:
        async with redis_client(config, lock) as client, services(config, client) as svc:
            # The control plane listens on a private unix socket; the edge owns the public listener and
            # hands it every request that is not an app URL.
            api_socket = config.data_path / API_SOCKET
            api_socket.unlink(missing_ok=True)
            runner = web.AppRunner(svc.app, shutdown_timeout=config.server.shutdown_grace_s, access_log=None)
            await runner.setup()
            site = web.UnixSite(runner, str(api_socket))
            await site.start()
            try:
                async with running_edge(config, svc.store, vm_networks(config, svc), str(api_socket)) as edge:
                    svc.edge = edge
                    yield svc
            finally:
                await runner.cleanup()
                api_socket.unlink(missing_ok=True)
    finally:
        lock.release()


@asynccontextmanager
async def admin_client(config: Config) -> AsyncIterator[aioredis.Redis]:
    """Redis for admin commands: the configured URL, a running gateway's embedded Redis, or a fresh one."""
    if config.redis.url:
        async with redis_client(config, None) as client:
            yield client
        return
    lock = DataDirLock(config.data_path)
    try:
        lock.acquire()
    except DataDirBusy:
        # A gateway runs on this folder: talk to its Redis instead of starting a second one.
        client = connect(embedded_redis_for(config).url, config.redis.call_timeout_s)
        try:
            yield client
        finally:
            await client.aclose()
        return
    try:
        async with redis_client(config, lock) as client:
            yield client
    finally:
        with contextlib.suppress(Exception):
            lock.release()
