"""Composition root: builds the stores, the driver, the orchestrator and the servers; starts and stops them.

Start order: data-folder lock -> Redis (embedded unless a URL is configured) -> the default image (drivers
that run VMs on images; built when missing) -> driver + recovery -> reaper -> listener. Stop is the
reverse, the listener first, so no request arrives at a half-stopped gateway; VMs keep running across a
restart (their state is in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from aiohttp import web

from gateway.admin import AdminView, running_admin
from gateway.api.app import make_api_app
from gateway.background import stop_loop
from gateway.config import Config, ConfigError
from gateway.datadir import DataDirBusy, DataDirLock
from gateway.edge.protocol import Edge
from gateway.edge.server import running_edge
from gateway.egress.proxy import EgressProxy
from gateway.egress.service import running_egress
from gateway.embedded_redis import EmbeddedRedis, RedisSupervisor
from gateway.errors import ListenFailed, StoreUnavailable
from gateway.images.store import ROOTFS_DRIVERS, ensure_default_image
from gateway.keys import ApiKeyStore
from gateway.metrics import write_snapshots
from gateway.orchestrator.domains import DomainService
from gateway.orchestrator.drivers.qemu_net import guest_half
from gateway.orchestrator.drivers.registry import choose_driver, make_driver
from gateway.orchestrator.lifecycle import Lifecycle
from gateway.orchestrator.reaper import Reaper
from gateway.orchestrator.service import Orchestrator
from gateway.orchestrator.vaults import vault_service
from gateway.orchestrator.vm_volumes import sweep_holders
from gateway.orchestrator.volumes import start_if_present, volume_service
from gateway.state.bus import RedisEventFeed, following_events
from gateway.state.connection import connect, guarded
from gateway.state.keyspace import Keys
from gateway.state.ports import EventFeed, RouteSource, TrafficSink, Waker
from gateway.state.redis_url import url_hosts
from gateway.state.store import RedisStore
from gateway.state.volume_store import RedisVolumeStore
from gateway.tls.domains import DomainKeeper, keeping_domain_certs
from gateway.tls.egress_ca import deployment_ca
from gateway.tls.keeper import CertKeeper, keeping_operator_certs, provider_settings
from gateway.tls.serving import TlsServing, cert_store, serving_tls
from gateway.workers import EdgeWorkers

log = logging.getLogger(__name__)

EMBEDDED_REDIS_FOLDER = "redis"
API_SOCKET = "api.sock"


def vm_networks(config: Config) -> list[str]:
    """The only addresses the edge may dial: the configured driver's VM range.

    For qemu only the guest half: the other half holds the host's own side of each VM's veth.
    """
    driver = choose_driver(config.vms.driver)
    if driver == "qemu":
        return [str(guest_half(config.qemu.cidr))]
    return [config.netns.cidr if driver == "netns" else config.process.cidr]


def egress_enabled(config: Config) -> bool:
    """Whether VMs have egress: configured, and a driver that redirects their traffic (netns, qemu)."""
    return config.egress.enabled and choose_driver(config.vms.driver) in ("netns", "qemu")


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
    events: RedisEventFeed  # this process's one subscription to the events channel
    edge: Edge | None = None
    tls: TlsServing | None = None
    cert_keeper: CertKeeper | None = None
    domain_keeper: DomainKeeper | None = None
    egress: EgressProxy | None = None  # where VMs have egress (egress.enabled)


@asynccontextmanager
async def redis_client(
    config: Config, lock: DataDirLock | None, stopping: asyncio.Event | None = None
) -> AsyncIterator[aioredis.Redis]:
    """The configured Redis, or an embedded one in the data folder (which needs the folder's lock),
    restarted if it dies until ``stopping`` is set or the context exits (``RedisSupervisor``)."""
    embedded = supervisor = None
    url = config.redis.url
    if not url:
        if lock is None:
            raise RuntimeError("an embedded Redis needs the data-folder lock")
        embedded = embedded_redis_for(config)
        # On the loop's own thread, not a worker: PDEATHSIG fires when the *thread* that spawned the
        # child exits. Blocking here is fine: nothing else runs before Redis answers.
        embedded.start()
        url = embedded.url
        supervisor = RedisSupervisor(embedded, stopping)
        supervisor.start()
    client = connect(url, config.redis.call_timeout_s)
    try:
        try:
            await guarded(client.ping())
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"cannot reach Redis at {url}: {exc.__cause__}") from exc
        yield client
    finally:
        await client.aclose()
        if supervisor is not None:
            await supervisor.stop()  # first: the stop below is ours, not a crash to repair
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


@asynccontextmanager
async def services(config: Config, client: aioredis.Redis) -> AsyncIterator[Services]:
    keys = Keys(config.redis.key_prefix)
    store = RedisStore(client, keys, config.vms.retention_s)
    key_store = ApiKeyStore(client, keys)
    # Where VMs have egress: the deployment's egress CA (made by the first gateway, sealed in Redis).
    # VMs trust it (the driver puts it in their roots); the proxy signs vault hosts' leaves with it.
    ca = await deployment_ca(config, client) if egress_enabled(config) else None
    driver = make_driver(config, egress_ca=ca.cert_pem if ca else None)
    orchestrator = Orchestrator(
        store,
        driver,
        config,
        domains=await domain_service(config, store),
        vaults=await vault_service(config, store),
        volumes=volume_service(RedisVolumeStore(client, keys), config.data_path),
    )
    if driver.name in ROOTFS_DRIVERS:
        # Before the first VM: its root is the default image (built on a first start, about a minute).
        await ensure_default_image(orchestrator.images, say=lambda line: log.info("image: %s", line))
    await orchestrator.start()
    # Volumes a previous run left attached (VMs still hold them) are found again before anything runs.
    await start_if_present(orchestrator.volumes, config.data_path)
    await sweep_holders(orchestrator.volumes, store)  # (those of VMs that ended while no gateway ran)
    reaper = Reaper(orchestrator, config.vms.reaper_interval_s)
    reaper.start()
    events = RedisEventFeed(client, keys)
    lifecycle = Lifecycle(orchestrator)
    events.add(lifecycle)  # edges ask, through events, to wake suspended VMs
    events.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            egress = None
            if ca is not None:
                # Closed to VMs whatever a policy says: every VM range, and Redis (the host's own
                # addresses are refused by the proxy itself).
                closed = [config.netns.cidr, config.qemu.cidr, config.process.cidr]
                closed += await asyncio.to_thread(redis_networks, config.redis.url)
                egress = await stack.enter_async_context(
                    running_egress(
                        config.egress,
                        store,
                        closed,
                        minter=ca.minter,
                        vaults=orchestrator.vaults,
                        events=events,
                    )
                )
            yield Services(
                client,
                store,
                key_store,
                orchestrator,
                reaper,
                make_api_app(config, orchestrator, key_store, lifecycle),
                events,
                egress=egress,
            )
    finally:
        await events.stop()
        await lifecycle.close()
        await reaper.stop()
        await orchestrator.close()
        await driver.close()


def redis_networks(url: str) -> list[str]:
    """Every address the Redis URL's hosts resolve to (an embedded Redis: none, it is on the host)."""
    found = []
    for host in url_hosts(url) if url else []:
        with contextlib.suppress(OSError):
            found += [str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
    return sorted(set(found))


async def domain_service(config: Config, store: RedisStore) -> DomainService:
    """Custom domains; without ACME it only explains (422) that they need it."""
    if not config.acme.directory_url:
        return DomainService(store, config, None, None)
    certs = await asyncio.to_thread(cert_store, config, store.client)
    return DomainService(store, config, certs.sealer, provider_settings(config))


@asynccontextmanager
async def running_gateway(
    config: Config, config_file: str | None = None, stopping: asyncio.Event | None = None
) -> AsyncIterator[Services]:
    """The whole gateway, listening on config.server.listen until the context exits.

    With ``server.workers`` > 1, that many - 1 ``gateway edge`` children share the listener; they are
    started with ``config_file`` and the environment, plus what only this process knows (the Redis URL).
    ``stopping`` is set when the gateway begins to stop (its signal handler): from then on an embedded
    Redis that exits is not restarted.
    """
    lock = DataDirLock(config.data_path)
    lock.acquire()
    try:
        async with redis_client(config, lock, stopping) as client, services(config, client) as svc:
            # The control plane listens on a private unix socket; the edge owns the public listener and
            # hands it every request that is not an app URL.
            api_socket = config.data_path / API_SOCKET
            api_socket.unlink(missing_ok=True)
            runner = web.AppRunner(svc.app, shutdown_timeout=config.server.shutdown_grace_s, access_log=None)
            await runner.setup()
            site = web.UnixSite(runner, str(api_socket))
            await site.start()
            workers = edge_workers(config, config_file, str(api_socket))
            workers_stopped: asyncio.Future[None] | None = None
            try:
                async with (
                    running_public_edge(
                        config,
                        svc.client,
                        svc.store,
                        svc.events,
                        str(api_socket),
                        reuse_port=workers is not None,
                        traffic=svc.store,
                        waker=svc.store,
                    ) as (edge, tls),
                    keeping_operator_certs(config, tls.store if tls else None, client) as keeper,
                    keeping_domain_certs(
                        config, tls.store if tls else None, svc.store, svc.events
                    ) as domains,
                    running_admin(
                        config,
                        AdminView(
                            client,
                            edge,
                            svc.store,
                            tls,
                            worker_stats_dir(config) if workers else None,
                            svc.egress,
                        ),
                    ),
                ):
                    svc.edge, svc.tls, svc.cert_keeper, svc.domain_keeper = edge, tls, keeper, domains
                    if workers is not None:
                        await workers.start()
                    try:
                        yield svc
                    finally:
                        if workers is not None:
                            # Workers drain alongside this process's edge; the control plane they
                            # forward API requests to stays up until they are done.
                            workers_stopped = asyncio.ensure_future(
                                workers.stop(config.server.shutdown_grace_s)
                            )
            finally:
                if workers_stopped is not None:
                    await workers_stopped
                await runner.cleanup()
                api_socket.unlink(missing_ok=True)
    finally:
        lock.release()


@asynccontextmanager
async def running_public_edge(
    config: Config,
    client: aioredis.Redis,
    routes: RouteSource,
    events: EventFeed,
    api_socket: str,
    *,
    reuse_port: bool,
    traffic: TrafficSink | None = None,
    waker: Waker | None = None,
) -> AsyncIterator[tuple[Edge, TlsServing | None]]:
    """The edge, with TLS (certificates from the store, kept in step) when tls.listen is set."""
    async with contextlib.AsyncExitStack() as stack:
        tls = (
            await stack.enter_async_context(serving_tls(config, client, events))
            if config.tls.listen
            else None
        )
        async with running_edge(
            config, routes, events, vm_networks(config), api_socket, reuse_port=reuse_port,
            sni=tls.table if tls is not None else None, traffic=traffic, waker=waker,
        ) as edge:  # fmt: skip
            yield edge, tls


@asynccontextmanager
async def running_control_plane(
    config: Config, stopping: asyncio.Event | None = None
) -> AsyncIterator[Services]:
    """Only the control plane (``gateway api``): the API on server.listen for edges to forward to, the
    orchestrator and its reaper, and the certificate keepers; no edge. Edges (``gateway edge``) on any
    machine share its Redis and set edge.api_upstream to its address. ``stopping``: as for
    ``running_gateway``."""
    lock = DataDirLock(config.data_path)
    lock.acquire()
    try:
        async with redis_client(config, lock, stopping) as client, services(config, client) as svc:
            certs = await asyncio.to_thread(cert_store, config, client) if config.tls.listen else None
            runner = web.AppRunner(svc.app, shutdown_timeout=config.server.shutdown_grace_s, access_log=None)
            await runner.setup()
            try:
                site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
                try:
                    await site.start()
                except OSError as exc:
                    raise ListenFailed("server.listen", config.server.listen, exc) from exc
                async with (
                    keeping_operator_certs(config, certs, client) as keeper,
                    keeping_domain_certs(config, certs, svc.store, svc.events) as domains,
                    running_admin(config, AdminView(client, None, svc.store, egress=svc.egress)),
                ):
                    svc.cert_keeper, svc.domain_keeper = keeper, domains
                    yield svc
            finally:
                await runner.cleanup()
    finally:
        lock.release()


def worker_stats_dir(config: Config) -> Path:
    """Where edge workers leave their counters for the serving process's /metrics."""
    return config.data_path / "run" / "metrics"


def edge_workers(config: Config, config_file: str | None, api_socket: str) -> EdgeWorkers | None:
    if config.server.workers <= 1:
        return None
    args = ["--config", config_file] if config_file else []
    args += ["--data-dir", str(config.data_path), "edge", "--listen", config.server.listen]
    args += ["--api-upstream", api_socket, "--stats-dir", str(worker_stats_dir(config))]
    env = {
        **os.environ,
        "GATEWAY_REDIS_URL": config.redis.url or embedded_redis_for(config).url,
        "GATEWAY_SERVER_PUBLIC_URL": config.server.public_url,
        "GATEWAY_SERVER_WORKERS": "1",
        "GATEWAY_ADMIN_LISTEN": "",  # the serving process's /metrics covers its workers
    }
    return EdgeWorkers(config.server.workers - 1, args, env)


@asynccontextmanager
async def running_edge_only(
    config: Config, api_socket: str, stats_dir: Path | None = None
) -> AsyncIterator[Edge]:
    """Only the data plane, on a running control plane's Redis (``gateway edge``). A worker of
    ``gateway serve`` leaves its counters in ``stats_dir``; a standalone edge has its own admin listener."""
    if not config.redis.url:
        raise ConfigError("gateway edge needs the control plane's Redis: set GATEWAY_REDIS_URL")
    async with redis_client(config, None) as client:
        keys = Keys(config.redis.key_prefix)
        store = RedisStore(client, keys, config.vms.retention_s)
        async with (
            following_events(client, keys) as events,
            running_public_edge(
                config, client, store, events, api_socket, reuse_port=True, traffic=store, waker=store
            ) as (edge, tls),
            running_admin(config, AdminView(client, edge, None, tls)),
        ):
            snapshots = asyncio.create_task(write_snapshots(edge, stats_dir)) if stats_dir else None
            try:
                yield edge
            finally:
                await stop_loop(snapshots)


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
