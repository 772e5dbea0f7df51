"""Every metric the gateway exports, in one place, rendered in Prometheus's text format when scraped.

Nothing on the request path calls the metrics library: the edge, the Redis wrapper, the ACME issuer and
the embedded Redis's supervisor count into plain numbers (``EdgeStats``, ``REDIS_STATS``,
``ORDER_OUTCOMES``, ``embedded_redis.RESTARTS``), and ``render`` reads them, plus what lives in Redis
(VMs by state, certificate expiries), into metric families at scrape time.

Edge worker processes (``gateway serve --workers N``) write their counters to a file in
``<data_dir>/run/metrics`` every ``SNAPSHOT_INTERVAL_S``; the serving process adds them in, so one scrape
covers every process on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from gateway import embedded_redis
from gateway.edge.observe import UPSTREAM_BUCKETS_S, EdgeStats
from gateway.edge.protocol import Edge
from gateway.egress.proxy import EgressProxy, EgressStats
from gateway.state.connection import REDIS_STATS, RedisCallStats
from gateway.state.records import VmRecord
from gateway.state.store import RedisStore
from gateway.tls import acme
from gateway.tls.store import CertStore

SNAPSHOT_INTERVAL_S = 1.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def process_snapshot(edge: Edge | None) -> dict[str, Any]:
    """This process's counters, JSON-able: what a worker writes and what the serving process merges."""
    snap: dict[str, Any] = {"redis": REDIS_STATS.snapshot()}
    if edge is not None:
        stats = edge.stats.snapshot()
        resolver = edge.resolver
        stats.update(
            open_connections=len(edge.connections),
            cache_hits=resolver.hits,
            cache_misses=resolver.misses,
            cache_invalidations=resolver.invalidations,
            cache_stale_hits=resolver.stale_hits,
            implementation=edge.implementation,
        )
        snap["edge"] = stats
    return snap


async def write_snapshots(edge: Edge, folder: Path) -> None:
    """A worker's loop: its counters to ``folder/edge-<pid>.json``, replaced atomically each time."""
    path = folder / f"edge-{os.getpid()}.json"
    try:
        while True:
            await asyncio.to_thread(_write_atomically, path, json.dumps(process_snapshot(edge)))
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_worker_snapshots(folder: Path) -> list[dict[str, Any]]:
    """Snapshots of the workers that still run; a dead worker's file is removed."""
    snaps = []
    for path in folder.glob("edge-*.json"):
        try:
            pid = int(path.stem.removeprefix("edge-"))
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        except PermissionError:
            pass  # alive, someone else's
        with contextlib.suppress(OSError, ValueError):
            snaps.append(json.loads(path.read_text()))
    return snaps


@dataclass
class ScrapeData:
    edge: dict[str, Any] | None  # EdgeStats snapshots merged, plus connection and cache counts
    redis: list[dict[str, Any]]
    vms: Counter[tuple[str, str]]  # (state, driver) -> live VMs
    cert_expiries: dict[str, float]
    acme_orders: dict[str, int]
    embedded_redis_restarts: dict[str, int] = field(default_factory=dict)
    egress: EgressStats | None = None
    egress_open: int = 0


class _Snapshot(Collector):
    def __init__(self, data: ScrapeData) -> None:
        self.data = data

    def collect(self) -> Iterator[Metric]:
        yield from _edge_metrics(self.data.edge)
        yield from _redis_metrics(self.data.redis)
        vms = GaugeMetricFamily("gateway_vms", "Live VMs by state and driver", labels=["state", "driver"])
        for (state, driver), n in sorted(self.data.vms.items()):
            vms.add_metric([state, driver], n)
        yield vms
        certs = GaugeMetricFamily(
            "gateway_certificate_expiry_timestamp_seconds",
            "When each stored certificate expires (unix time), by certificate id (its first name)",
            labels=["name"],
        )
        for name, not_after in sorted(self.data.cert_expiries.items()):
            certs.add_metric([name], not_after)
        yield certs
        orders = CounterMetricFamily("gateway_acme_orders", "ACME orders by outcome", labels=["outcome"])
        for outcome in ("issued", "failed"):
            orders.add_metric([outcome], self.data.acme_orders.get(outcome, 0))
        yield orders
        restarts = CounterMetricFamily(
            "gateway_embedded_redis_restarts",
            "Restarts of the embedded redis-server after it exited, by outcome (failed: tried again later)",
            labels=["outcome"],
        )
        for outcome in ("restarted", "failed"):
            restarts.add_metric([outcome], self.data.embedded_redis_restarts.get(outcome, 0))
        yield restarts
        if self.data.egress is not None:
            yield from _egress_metrics(self.data.egress, self.data.egress_open)


def _egress_metrics(stats: EgressStats, open_connections: int) -> Iterator[Metric]:
    decisions = CounterMetricFamily(
        "gateway_egress_decisions",
        "VM connections and DNS questions judged by the egress plane, by outcome and rule",
        labels=["outcome", "rule"],
    )
    for (rule, allowed), n in sorted(stats.decisions.items()):
        decisions.add_metric(["allowed" if allowed else "denied", rule], n)
    yield decisions
    yield CounterMetricFamily(
        "gateway_egress_sent_bytes", "Bytes VMs sent out through the egress proxy", value=stats.bytes_out
    )
    yield CounterMetricFamily(
        "gateway_egress_received_bytes", "Bytes destinations sent back to VMs", value=stats.bytes_in
    )
    yield GaugeMetricFamily(
        "gateway_egress_open_connections", "Connections open through the egress proxy", value=open_connections
    )


def _edge_metrics(snap: dict[str, Any] | None) -> Iterator[Metric]:
    stats = EdgeStats.merge([snap]) if snap is not None else EdgeStats()
    requests = CounterMetricFamily(
        "gateway_edge_requests",
        "Requests through the edge by route kind and status",
        labels=["route", "status"],
    )
    for (kind, status), n in sorted(stats.requests.items()):
        requests.add_metric([kind, str(status)], n)
    yield requests
    for name, values, text in (
        ("gateway_edge_received_bytes", stats.bytes_in, "Request body (and tunnel) bytes from clients"),
        ("gateway_edge_sent_bytes", stats.bytes_out, "Response body (and tunnel) bytes to clients"),
    ):
        family = CounterMetricFamily(name, text, labels=["route"])
        for kind, n in sorted(values.items()):
            family.add_metric([kind], n)
        yield family
    failures = CounterMetricFamily(
        "gateway_edge_upstream_connect_failures", "Failed connections to apps in VMs", labels=["reason"]
    )
    for reason in ("refused", "timeout"):
        failures.add_metric([reason], stats.connect_failures.get(reason, 0))
    yield failures
    yield _histogram(
        "gateway_edge_upstream_response_seconds",
        "From the request sent to an app to its response head",
        UPSTREAM_BUCKETS_S,
        stats.upstream_buckets,
        stats.upstream_sum,
    )
    extra = snap or {}
    yield GaugeMetricFamily(
        "gateway_edge_open_connections", "Open client connections", value=extra.get("open_connections", 0)
    )
    yield GaugeMetricFamily("gateway_edge_open_tunnels", "Open WebSocket and other upgraded tunnels",
                            value=stats.tunnels_open)  # fmt: skip
    yield CounterMetricFamily("gateway_edge_tunnels", "Tunnels opened", value=stats.tunnels_opened)
    processes = GaugeMetricFamily(
        "gateway_edge_processes", "Edge processes by which edge they run (compiled or pure)",
        labels=["implementation"],
    )  # fmt: skip
    for implementation in ("compiled", "pure"):
        processes.add_metric([implementation], int(extra.get("implementations", {}).get(implementation, 0)))
    yield processes
    for name, key, text in (
        ("gateway_route_cache_hits", "cache_hits", "Route lookups answered from the edge's cache"),
        ("gateway_route_cache_misses", "cache_misses", "Route lookups that went to Redis"),
        ("gateway_route_cache_invalidations", "cache_invalidations", "Cached routes dropped by events"),
        (
            "gateway_route_cache_stale_hits",
            "cache_stale_hits",
            "Routes served from the cache while Redis failed",
        ),
    ):
        yield CounterMetricFamily(name, text, value=extra.get(key, 0))


def _redis_metrics(snaps: list[dict[str, Any]]) -> Iterator[Metric]:
    buckets = [0] * (len(RedisCallStats.BUCKETS_S) + 1)
    total = 0.0
    errors = 0
    for snap in snaps:
        for i, n in enumerate(snap.get("buckets", [])[: len(buckets)]):
            buckets[i] += int(n)
        total += float(snap.get("sum", 0.0))
        errors += int(snap.get("errors", 0))
    yield _histogram("gateway_redis_call_seconds", "Redis calls, by duration", RedisCallStats.BUCKETS_S,
                     buckets, total)  # fmt: skip
    yield CounterMetricFamily("gateway_redis_errors", "Redis calls that failed", value=errors)


def _histogram(
    name: str, text: str, bounds: tuple[float, ...], counts: list[int], total: float
) -> HistogramMetricFamily:
    cumulative = []
    running = 0
    for bound, n in zip((*map(str, bounds), "+Inf"), counts, strict=True):
        running += n
        cumulative.append((bound, running))
    return HistogramMetricFamily(name, text, buckets=cumulative, sum_value=total)


async def gather(
    edge: Edge | None,
    store: RedisStore | None,
    certs: CertStore | None,
    worker_dir: Path | None,
    egress: EgressProxy | None = None,
) -> ScrapeData:
    own = process_snapshot(edge)
    workers = await asyncio.to_thread(read_worker_snapshots, worker_dir) if worker_dir is not None else []
    edges = [s["edge"] for s in (own, *workers) if "edge" in s]
    merged: dict[str, Any] | None = None
    if edges:
        merged = EdgeStats.merge(edges).snapshot()
        for key in (
            "open_connections",
            "cache_hits",
            "cache_misses",
            "cache_invalidations",
            "cache_stale_hits",
        ):
            merged[key] = sum(int(s.get(key, 0)) for s in edges)
        merged["implementations"] = dict(Counter(str(s.get("implementation", "pure")) for s in edges))
    vms: Counter[tuple[str, str]] = Counter()
    if store is not None:
        for vm in await store.get_vms(await store.live_vm_ids()):
            vms[(vm.status, vm.driver)] += 1
    expiries = await certs.expiries() if certs is not None else {}
    return ScrapeData(
        merged,
        [s["redis"] for s in (own, *workers)],
        vms,
        expiries,
        dict(acme.ORDER_OUTCOMES),
        dict(embedded_redis.RESTARTS),
        egress.stats if egress is not None else None,
        egress.open_connections if egress is not None else 0,
    )


def render(data: ScrapeData) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(data))
    return generate_latest(registry)


# /metrics/vms: one series per live VM, kept out of /metrics so that its label set stays bounded there
# (a Prometheus scraping /metrics never sees a VM id); from Redis, so any gateway process where the
# control plane runs serves the same figures for the whole deployment (every edge's counts).
class _PerVm(Collector):
    def __init__(self, vms: list[VmRecord], open_counts: dict[str, tuple[int, int]]) -> None:
        self.vms = vms
        self.open_counts = open_counts

    def collect(self) -> Iterator[Metric]:
        labels = ["vm_id", "session_id"]
        requests = CounterMetricFamily(
            "gateway_vm_requests", "Requests and upgrades the edges carried to the VM", labels=labels
        )
        received = CounterMetricFamily(
            "gateway_vm_received_bytes", "Request and upstream tunnel bytes carried to the VM", labels=labels
        )
        sent = CounterMetricFamily(
            "gateway_vm_sent_bytes", "Response and downstream tunnel bytes carried from the VM", labels=labels
        )
        exchanges = GaugeMetricFamily(
            "gateway_vm_open_exchanges", "Requests in flight plus tunnels open to the VM now", labels=labels
        )
        tunnels = GaugeMetricFamily(
            "gateway_vm_open_tunnels", "WebSockets and other tunnels open to the VM now", labels=labels
        )
        for vm in self.vms:
            values = [vm.vm_id, vm.session_id]
            open_exchanges, open_tunnels = self.open_counts.get(vm.vm_id, (0, 0))
            requests.add_metric(values, vm.requests)
            received.add_metric(values, vm.bytes_in)
            sent.add_metric(values, vm.bytes_out)
            exchanges.add_metric(values, open_exchanges)
            tunnels.add_metric(values, open_tunnels)
        yield from (requests, received, sent, exchanges, tunnels)


async def render_vms(store: RedisStore) -> bytes:
    """The per-VM figures of every live VM (Prometheus text format)."""
    vms = await store.get_vms(await store.live_vm_ids())
    open_counts = await store.open_counts([vm.vm_id for vm in vms])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_PerVm(vms, open_counts))
    return generate_latest(registry)
