"""The planes apart, as separate processes on one Redis: ``gateway api`` and two ``gateway edge``.

A VM created through either edge's API (forwarded to the control plane over TCP) is reachable through
both edges; killed, both refuse it within a second (the route events reach each edge's cache).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.config import load_config, override
from gateway.orchestrator.drivers.registry import make_driver
from tests.conftest import free_port
from tests.integration.test_edge import APP_PORT, ECHO_APP
from tests.integration.test_edge_hardening import endless_header, socket_buffers_bound

# Every test here runs on each edge (the compiled one and the pure-Python one).
pytestmark = pytest.mark.both_edges

START_TIMEOUT_S = 30.0
VM_CIDR = "127.75.0.0/24"
REFUSED_WITHIN_S = 1.0


def plane_env(redis_url: str, edge_implementation: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_REDIS_URL=redis_url,
        GATEWAY_VMS_DRIVER="process",
        GATEWAY_PROCESS_ALLOW_ROOT="true",  # (it refuses root otherwise: it isolates nothing)
        GATEWAY_PROCESS_CIDR=VM_CIDR,
        GATEWAY_ADMIN_LISTEN="",
        GATEWAY_SERVER_SHUTDOWN_GRACE_S="2",
        GATEWAY_EDGE_IMPLEMENTATION=edge_implementation,
    )
    return env


async def start(argv: list[str], env: dict[str, str], ready: bytes) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *argv, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    async with asyncio.timeout(START_TIMEOUT_S):
        line = await proc.stdout.readline()
    assert ready in line, line
    return proc


@pytest.fixture
async def planes(
    tmp_path: Path, redis_url: str, edge_implementation: str
) -> AsyncIterator[tuple[str, list[str]]]:
    """(the control plane's address, the two edges' base URLs)."""
    env = plane_env(redis_url, edge_implementation)
    api_addr = f"127.0.0.1:{free_port()}"
    edge_ports = [free_port(), free_port()]
    env["GATEWAY_SERVER_PUBLIC_URL"] = f"http://127.0.0.1:{edge_ports[0]}"
    procs: list[asyncio.subprocess.Process] = []
    try:
        procs.append(
            await start(
                ["--data-dir", str(tmp_path / "api"), "api", "--listen", api_addr],
                env,
                b"control plane listening",
            )
        )
        for i, port in enumerate(edge_ports):
            argv = ["--data-dir", str(tmp_path / f"edge{i}"), "edge", "--listen", f"127.0.0.1:{port}"]
            # The start-up line says which edge runs.
            ready = b"%s edge)" % edge_implementation.encode()
            procs.append(await start([*argv, "--api-upstream", api_addr], env, ready))
        yield api_addr, [f"http://127.0.0.1:{port}" for port in edge_ports]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await proc.wait()
        config = override(
            load_config(None),
            server={"data_dir": str(tmp_path / "api")},
            vms={"driver": "process"},
            process={"cidr": VM_CIDR},
        )
        await make_driver(config).sweep(set())  # VMs outlive their gateway on purpose; not this test's


async def test_two_edges_and_a_control_plane_share_routes(
    planes: tuple[str, list[str]], tmp_path: Path, redis_url: str, edge_implementation: str
) -> None:
    api_addr, edges = planes
    keys = [sys.executable, "-m", "gateway", "--data-dir", str(tmp_path / "keys"), "keys"]
    created = await asyncio.create_subprocess_exec(
        *keys,
        "create",
        "--name",
        "split",
        env=plane_env(redis_url, edge_implementation),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await created.communicate()
    key = out.decode().split()[-1]
    async with aiohttp.ClientSession(headers={"X-API-Key": key}) as client:
        async with client.post(edges[1] + "/v1/vms", json={}) as resp:  # the API through the second edge
            assert resp.status == 200
            vm = await resp.json()
        command = {
            "session_id": vm["session_id"],
            "language": "bash",
            "command": f"python3 {ECHO_APP} {APP_PORT}",
        }
        async with client.post(edges[0] + "/execute", json=command) as resp:
            assert (await resp.json())["exit_code"] == 0
        path = f"/v1/app/{vm['session_id']}/{APP_PORT}/echo"
        async with client.get(edges[0] + f"/v1/sessions/app-url/{vm['session_id']}?port={APP_PORT}") as resp:
            assert resp.status == 200
        for edge in edges:
            async with client.get(edge + path) as resp:
                assert resp.status == 200, edge

        async with client.delete(edges[0] + f"/v1/vms/{vm['vm_id']}") as resp:
            assert resp.status == 200
        killed_at = time.monotonic()
        for edge in edges:
            while True:
                async with client.get(edge + path) as resp:
                    if resp.status == 404:
                        break
                assert time.monotonic() - killed_at < REFUSED_WITHIN_S, f"{edge} still routes the VM"
                await asyncio.sleep(0.02)

    # The control plane's own listener, reachable by edges on other machines, cuts an endless header
    # line as well (aiohttp counts a line as it grows; issue 17, point 1) and carries on.
    host, _, port = api_addr.rpartition(":")
    bound = socket_buffers_bound()
    sent, answer = await endless_header((host, int(port)), b"a" * 65536, bound + 32 * 2**20)
    # (aiohttp closes without lingering: its 400 can be lost in the reset of a client still sending.)
    assert answer == b"" or (answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0])
    assert sent <= bound, "the control plane kept reading an endless header line"
    async with aiohttp.ClientSession() as client, client.get(f"http://{api_addr}/v1/templates") as resp:
        assert resp.status == 200
