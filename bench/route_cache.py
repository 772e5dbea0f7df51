"""What a route-cache miss costs: request latency through the edge with the route cached vs looked up.

    .venv/bin/python bench/route_cache.py [--samples 300]

Starts ``gateway serve`` and one VM running ``bench/upstream_app.py`` as ``bench/edge_vs_nginx.py``
does (process driver, loopback only), then, ``--samples`` times: publishes a route-change event for the
VM on the gateway's own events channel (what the control plane sends when a VM changes; the edge drops
its cached route), waits until the edge has seen it, sends one request (a miss: the route comes from
Redis) and then, after the same pause, another on the same connection (a hit). Prints the median and
p90 of both and their difference, against the issue's target (a miss at most 0.5 ms slower than a
hit). Sequential requests on one keep-alive connection, so the figures are latencies, not throughput.
Last, for scale, a Redis PING back to back and after the same pause: on a small VM a process woken from
idle answers slowly, and the miss's Redis round trip pays that.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
import uvloop

from gateway.state.events import VmChanged, encode
from gateway.state.keyspace import Keys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_vs_nginx import SMALL_PATH, app_in_vm, served_gateway

PAUSE_S = 0.005  # after each route-change event, and before each hit
EVENTS_CHANNEL = Keys("gw:").events()  # the default redis.key_prefix
TARGET_MISS_PENALTY_MS = 0.5
SETTLE_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 10.0


async def redis_round_trips(redis: aioredis.Redis, samples: int, *, pause_s: float) -> float:
    """Median PING time in ms, with a pause before each (or none)."""
    times = []
    for _ in range(samples):
        await asyncio.sleep(pause_s)
        start = time.perf_counter()
        await redis.ping()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def timed_get(client: aiohttp.ClientSession, url: str) -> float:
    start = time.perf_counter()
    async with client.get(url) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")
    return (time.perf_counter() - start) * 1000


async def measure(samples: int) -> None:
    async with served_gateway(1) as gw, app_in_vm(gw) as app:
        redis_socket = Path(gw.log_path).parent / "redis" / "redis.sock"
        async with aiohttp.ClientSession(gw.url, headers={"X-API-Key": gw.key}) as api:
            session_id = app.edge_url.split("/v1/app/")[1].split("/")[0]
            async with api.get(f"/v1/sessions/status/{session_id}") as resp:
                vm_id = (await resp.json())["vm_id"]
        url = app.edge_url + SMALL_PATH
        redis = aioredis.Redis(unix_socket_path=str(redis_socket))
        # What an ended VM announces, but "active": every edge drops its cached routes, the VM still serves.
        event = encode(VmChanged(vm_id, session_id, "active"))
        misses: list[float] = []
        hits: list[float] = []
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection: no connect in the figures
        try:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:
                for _ in range(20):
                    await timed_get(client, url)  # warm: pools, the connection, lazily built paths
                for _ in range(samples):
                    receivers = await redis.publish(EVENTS_CHANNEL, event)
                    if receivers < 1:
                        raise RuntimeError("the edge is not subscribed to its events channel")
                    # The edge handles the event on its loop; a short pause lets it land first.
                    await asyncio.sleep(PAUSE_S)
                    misses.append(await timed_get(client, url))
                    # The same pause before the hit: a request after an idle moment is slower by itself
                    # (every process on its way wakes up), which is not the cache's doing.
                    await asyncio.sleep(PAUSE_S)
                    hits.append(await timed_get(client, url))
            redis_busy = await redis_round_trips(redis, samples, pause_s=0.0)
            redis_idle = await redis_round_trips(redis, samples, pause_s=PAUSE_S)
        finally:
            await redis.aclose()
    miss_p50, hit_p50 = statistics.median(misses), statistics.median(hits)
    print(f"route cache, {samples} samples, one keep-alive connection, sequential requests")
    print(f"{'':<8}{'p50 (ms)':>10}{'p90 (ms)':>10}")
    print(f"{'hit':<8}{hit_p50:>10.3f}{percentile(hits, 0.9):>10.3f}")
    print(f"{'miss':<8}{miss_p50:>10.3f}{percentile(misses, 0.9):>10.3f}")
    penalty = miss_p50 - hit_p50
    verdict = "pass" if penalty <= TARGET_MISS_PENALTY_MS else "MISS"
    print(f"{verdict}  a miss costs {penalty:.3f} ms at the median (target <= {TARGET_MISS_PENALTY_MS} ms)")
    print(
        f"for scale: a Redis PING from this process takes {redis_busy:.3f} ms back to back and "
        f"{redis_idle:.3f} ms after a {PAUSE_S * 1000:.0f} ms pause (the miss's one Redis round trip "
        "finds Redis idle too)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300, help="miss/hit pairs (default: %(default)s)")
    args = parser.parse_args()
    if args.samples < 10:
        parser.error("--samples must be >= 10")
    uvloop.run(measure(args.samples))


if __name__ == "__main__":
    main()
