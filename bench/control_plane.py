"""Control-plane bench: VM create-to-ready latency per driver, and status calls per second.

Runs ``gateway serve`` as a user would (its own process, embedded Redis in a temporary data folder,
loopback only) once per driver, then:

- creates VMs one after another with ``POST /v1/vms?wait=true`` (returns when the VM answers) and
  prints the median and p90 of the create-to-ready time; each VM is killed right after;
- hammers ``GET /v1/sessions/status/{id}`` from N concurrent clients for a bounded time and prints
  requests per second and latency percentiles.

    .venv/bin/python bench/control_plane.py [--drivers netns,process] [--vms 30] [--seconds 5]

The VM ranges and name prefixes are the bench's own, so a running development gateway is not touched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

# (A first qemu run builds the guest image before the gateway listens.)
START_TIMEOUT_S = 120.0
BENCH_ENV = {
    "GATEWAY_NETNS_CIDR": "172.31.248.0/22",
    "GATEWAY_NETNS_NAME_PREFIX": "gwb",
    "GATEWAY_NETNS_CGROUP_NAME": "gateway-bench",
    "GATEWAY_PROCESS_CIDR": "127.79.0.0/22",
    # Benchmarks run as root; the process driver refuses root unless told (it isolates nothing).
    "GATEWAY_PROCESS_ALLOW_ROOT": "true",
    "GATEWAY_QEMU_CIDR": "172.31.244.0/23",
    "GATEWAY_QEMU_NAME_PREFIX": "gwbq",
    "GATEWAY_QEMU_CGROUP_NAME": "gateway-qbench",
    # Built on the first qemu run (as `gateway serve` does when it finds none) and kept for the next.
    "GATEWAY_QEMU_IMAGE_DIR": "/var/tmp/gateway-bench-qemu-image",
    # The netns driver's images: built on the first run (about a minute), kept for the next.
    "GATEWAY_IMAGES_DIR": "/var/tmp/gateway-bench-rootfs",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@asynccontextmanager
async def served_gateway(
    driver: str, *key_args: str, settings: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, str]]:
    """Start ``gateway serve`` on the driver; yield (base URL, API key made with ``gateway keys create
    --name bench *key_args``); stop it by PID afterwards."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as data_dir:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(BENCH_ENV, GATEWAY_VMS_DRIVER=driver, GATEWAY_ADMIN_LISTEN="", **(settings or {}))
        gateway = [sys.executable, "-m", "gateway", "--data-dir", data_dir]
        proc = await asyncio.create_subprocess_exec(
            *gateway, "serve", "--listen", f"127.0.0.1:{port}",
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(START_TIMEOUT_S):
                while b"gateway listening" not in (line := await proc.stdout.readline()):
                    if not line:
                        raise RuntimeError(f"gateway serve exited with {await proc.wait()}")
            keys = await asyncio.create_subprocess_exec(
                *gateway, "keys", "create", "--name", "bench", *key_args, env=env, stdout=subprocess.PIPE
            )
            out, _ = await keys.communicate()
            if keys.returncode != 0:
                raise RuntimeError("gateway keys create failed")
            yield f"http://127.0.0.1:{port}", out.decode().strip().splitlines()[-1]
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


async def create_to_ready(http: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    spec = {"vm_lifetime_seconds": 60, "memory_mb": 128, "vcpu_count": 1}
    times: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        async with http.post(f"{url}/v1/vms?wait=true", json=spec) as resp:
            vm = await resp.json()
            if resp.status != 200 or vm["status"] != "active":
                raise RuntimeError(f"create failed: {resp.status} {vm}")
        times.append(time.perf_counter() - started)
        async with http.delete(f"{url}/v1/vms/{vm['vm_id']}") as resp:
            resp.raise_for_status()
    return times


async def execute_latency(http: aiohttp.ClientSession, url: str, key: str, count: int) -> list[float]:
    """``POST /execute`` of a trivial command in one session's VM, one after another (the VM is booted by
    the first call, which is not counted)."""
    async with http.post(f"{url}/v1/sessions/session", json={"api_key": key}) as resp:
        session_id = (await resp.json())["session_id"]
    body = {"command": "echo ok", "language": "bash", "session_id": session_id}
    times: list[float] = []
    for _ in range(count + 1):
        started = time.perf_counter()
        async with http.post(f"{url}/execute", json=body) as resp:
            result = await resp.json()
            if resp.status != 200 or "ok" not in str(result):
                raise RuntimeError(f"execute failed: {resp.status} {result}")
        times.append(time.perf_counter() - started)
    # VMs outlive the gateway on purpose: end this one before the bench stops it.
    async with http.get(f"{url}/v1/sessions/status/{session_id}") as resp:
        vm_id = (await resp.json()).get("vm_id")
    if vm_id:
        async with http.delete(f"{url}/v1/vms/{vm_id}") as resp:
            await resp.read()
    return times[1:]


async def status_calls(
    http: aiohttp.ClientSession, url: str, key: str, seconds: float, concurrency: int
) -> tuple[int, list[float]]:
    async with http.post(f"{url}/v1/sessions/session", json={"api_key": key}) as resp:
        session_id = (await resp.json())["session_id"]
    status_url = f"{url}/v1/sessions/status/{session_id}"
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while (started := time.perf_counter()) < deadline:
            async with http.get(status_url) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"status call failed: {resp.status}")
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), latencies


async def bench_driver(driver: str, args: argparse.Namespace) -> None:
    async with served_gateway(driver) as (url, key):
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(headers={"X-API-Key": key}, connector=connector) as http:
            await create_to_ready(http, url, 2)  # warm-up: first cgroup/namespace setup, imports
            times = await create_to_ready(http, url, args.vms)
            median_ms = statistics.median(times) * 1000
            print(
                f"{driver:8} create-to-ready  n={len(times):<4} median={median_ms:7.1f} ms"
                f"  p90={percentile(times, 0.9) * 1000:7.1f} ms  max={max(times) * 1000:7.1f} ms"
            )
            times = await execute_latency(http, url, key, args.vms)
            median_ms = statistics.median(times) * 1000
            print(
                f"{driver:8} /execute         n={len(times):<4} median={median_ms:7.1f} ms"
                f"  p90={percentile(times, 0.9) * 1000:7.1f} ms  max={max(times) * 1000:7.1f} ms"
            )
            count, latencies = await status_calls(http, url, key, args.seconds, args.concurrency)
            print(
                f"{driver:8} status calls     {count / args.seconds:8.0f} req/s  (c={args.concurrency}, "
                f"{args.seconds:.0f} s)  p50={percentile(latencies, 0.5) * 1000:.1f} ms"
                f"  p99={percentile(latencies, 0.99) * 1000:.1f} ms"
            )


def remove_bench_host_state() -> None:
    """The gateway keeps its blackhole route and parent cgroups on purpose; the bench leaves none behind."""
    if os.geteuid() != 0:
        return
    for driver in ("NETNS", "QEMU"):
        cidr, cgroup = BENCH_ENV[f"GATEWAY_{driver}_CIDR"], BENCH_ENV[f"GATEWAY_{driver}_CGROUP_NAME"]
        subprocess.run(["ip", "route", "del", "blackhole", cidr], capture_output=True)
        for controller in ("", "memory/", "cpu/"):
            with contextlib.suppress(OSError):
                Path(f"/sys/fs/cgroup/{controller}{cgroup}").rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_drivers = "netns,process" if os.geteuid() == 0 else "process"
    parser.add_argument("--drivers", default=default_drivers, help="comma-separated (default: %(default)s)")
    parser.add_argument("--vms", type=int, default=30, help="VMs created per driver (default: %(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="status-call duration (default: %(default)s)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="status-call clients (default: %(default)s)"
    )
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)
    print(f"gateway control-plane bench on {os.cpu_count()} CPUs, client and server on this machine")
    try:
        for driver in args.drivers.split(","):
            asyncio.run(bench_driver(driver, args))
    finally:
        remove_bench_host_state()


if __name__ == "__main__":
    main()
