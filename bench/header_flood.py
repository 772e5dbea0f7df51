"""An endless request head against the edge: its memory, and what other clients see meanwhile.

    .venv/bin/python bench/header_flood.py [--flooders 1] [--seconds 8]

Starts ``gateway serve`` as a user would (process driver, embedded Redis, loopback only; see
edge_vs_nginx.py), one VM with bench/upstream_app.py, then:

1. ``--flooders`` connections each send a request line and then one header line that never ends, as
   fast as the edge reads it, for ``--seconds`` (bounded: each stops at the deadline or when the edge
   closes it);
2. meanwhile one client sends small requests to the app one after another and records their latency;
3. prints the gateway's RSS before, at its peak during and after the flood, how many bytes each
   flooder got in before the edge closed it and what it answered, and the other client's latency
   (median, p99, max) beside the same client's figures with no flood.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_vs_nginx import app_in_vm, edge_processes, rss_kib, served_gateway

CHUNK = b"a" * 65536


async def flood(host: str, port: int, path: str, deadline: float) -> tuple[int, bytes]:
    """Bytes sent until the edge answered (or the deadline), and the first line it answered."""
    reader, writer = await asyncio.open_connection(host, port)
    sent = 0
    answer = asyncio.ensure_future(reader.readline())
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Flood: ".encode())
        while time.monotonic() < deadline and not answer.done():
            writer.write(CHUNK)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await writer.drain()
            except (TimeoutError, ConnectionError):
                break
            sent += len(CHUNK)
        try:
            async with asyncio.timeout(1):
                return sent, (await answer).strip()
        except (TimeoutError, ConnectionError):
            return sent, b""
    finally:
        answer.cancel()
        writer.close()


async def probe(host: str, port: int, path: str, deadline: float) -> list[float]:
    """Sequential small requests on fresh connections until the deadline; their latencies in ms."""
    latencies = []
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        try:
            async with asyncio.timeout(30):
                await reader.read()
        finally:
            writer.close()
        latencies.append((time.monotonic() - started) * 1000)
    return latencies


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    median = statistics.median(ordered)
    return f"median {median:.1f} ms, p99 {p99:.1f} ms, max {ordered[-1]:.1f} ms ({len(ordered)} requests)"


async def bench(args: argparse.Namespace) -> None:
    async with served_gateway(1) as gw, app_in_vm(gw) as app:
        host, port = gw.url.split("://")[1].rsplit(":", 1)
        path = app.edge_url.split(str(port), 1)[1] + "/"
        pids = edge_processes(gw.pid)
        quiet = await probe(host, int(port), path, time.monotonic() + 2)
        before = rss_kib(pids)
        peak = before
        deadline = time.monotonic() + args.seconds
        tasks = [asyncio.ensure_future(flood(host, int(port), path, deadline)) for _ in range(args.flooders)]
        probing = asyncio.ensure_future(probe(host, int(port), path, deadline))
        while not all(t.done() for t in tasks):
            peak = max(peak, rss_kib(pids))
            await asyncio.sleep(0.05)
        results = [t.result() for t in tasks]
        during = await probing
        after = rss_kib(pids)
    print(f"flooders: {args.flooders}, {args.seconds:.0f} s")
    for sent, answer in results:
        print(f"  sent {sent / 2**20:.2f} MiB until the edge answered {answer!r}")
    mib = [round(kib / 1024) for kib in (before, peak, after)]
    print(f"gateway RSS: before {mib[0]} MiB, peak {mib[1]} MiB, after {mib[2]} MiB")
    print(f"other client, no flood:     {summary(quiet)}")
    print(f"other client, during flood: {summary(during)}")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--flooders", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8.0)
    uvloop.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
