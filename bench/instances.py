"""Browser-instance bench: how long until an organisation's new Chromium answers over DevTools.

Runs ``gateway serve`` as a user would (control_plane.py's ``served_gateway``: its own process, embedded
Redis, loopback only) once per driver, makes an organisation key, then for each of N instances, one
after another:

- create: ``POST /orgs/<org>/api/instances`` until its 201 (the browser accepts connections);
- first command: ``GET <access_url>json/version`` and a DevTools WebSocket round trip
  (``Browser.getVersion``) through the edge;
- destroy: ``DELETE`` until its 204 (the VM and its browser are gone).

and prints the median and p90 of each.

    .venv/bin/python bench/instances.py [--drivers netns,process] [--instances 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time
import uuid
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from control_plane import percentile, remove_bench_host_state, served_gateway


class LoopbackResolver(AbstractResolver):
    """instance-<uuid>.browser.localhost and every other name: 127.0.0.1 (loopback only)."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


async def one_instance(http: aiohttp.ClientSession, url: str, org: str) -> tuple[float, float, float]:
    instances = f"{url}/orgs/{org}/api/instances"
    started = time.perf_counter()
    async with http.post(instances, json={"image": "debian-12", "size": "small"}) as resp:
        created = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"create failed: {resp.status} {created}")
    ready = time.perf_counter()
    async with http.get(created["access_url"] + "json/version") as resp:
        ws_url = (await resp.json())["webSocketDebuggerUrl"]
    async with http.ws_connect(ws_url) as ws:
        await ws.send_json({"id": 1, "method": "Browser.getVersion"})
        answer = await ws.receive_json()
        if answer.get("id") != 1 or "result" not in answer:
            raise RuntimeError(f"DevTools answered {answer}")
    answered = time.perf_counter()
    async with http.delete(f"{instances}/{created['instance_uuid']}") as resp:
        if resp.status != 204:
            raise RuntimeError(f"destroy failed: {resp.status}")
    return ready - started, answered - ready, time.perf_counter() - answered


def line(driver: str, what: str, values: list[float]) -> str:
    return (
        f"{driver:8} {what:22} n={len(values):<3} median={statistics.median(values) * 1000:7.1f} ms"
        f"  p90={percentile(values, 0.9) * 1000:7.1f} ms"
    )


async def bench_driver(driver: str, count: int) -> None:
    org = str(uuid.uuid4())
    async with served_gateway(driver, "--org", org) as (url, key):
        connector = aiohttp.TCPConnector(resolver=LoopbackResolver())
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
            await one_instance(http, url, org)  # warm-up: Chromium's first start reads its files from disk
            results = [await one_instance(http, url, org) for _ in range(count)]
    creates, firsts, destroys = (list(column) for column in zip(*results, strict=True))
    print(line(driver, "create (201)", creates))
    print(line(driver, "first DevTools answer", firsts))
    print(line(driver, "destroy (204)", destroys))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_drivers = "netns,process" if os.geteuid() == 0 else "process"
    parser.add_argument("--drivers", default=default_drivers, help="comma-separated (default: %(default)s)")
    parser.add_argument("--instances", type=int, default=10, help="per driver (default: %(default)s)")
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)
    print(f"browser-instance bench on {os.cpu_count()} CPUs, client, gateway and Chromium on this machine")
    try:
        for driver in args.drivers.split(","):
            asyncio.run(bench_driver(driver, args.instances))
    finally:
        remove_bench_host_state()


if __name__ == "__main__":
    main()
