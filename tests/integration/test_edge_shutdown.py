"""SIGTERM with traffic in flight, as an operator sends it: ``gateway serve --workers 2`` drains.

Uploads in flight finish (and are told ``Connection: close``), WebSockets get a close frame (1001, going
away) from whichever edge process holds them, and every process exits within the grace.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.config import load_config, override
from gateway.orchestrator.drivers.registry import make_driver
from tests.conftest import SLOT, free_port
from tests.integration.test_edge import APP_PORT, echo_app_command

# Every test here runs on each edge (the compiled one and the pure-Python one).
pytestmark = pytest.mark.both_edges

GRACE_S = 5.0
START_TIMEOUT_S = 30.0
VM_CIDR = f"127.76.{SLOT}.0/24"  # (each test worker its own)
CLIENTS = 4  # of each kind: with two edge processes, both are very likely to hold some
PART = b"u" * 65536


def serve_env(edge_implementation: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_VMS_DRIVER="process",
        GATEWAY_PROCESS_ALLOW_ROOT="true",  # (it refuses root otherwise: it isolates nothing)
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{free_port()}",
        GATEWAY_PROCESS_CIDR=VM_CIDR,
        GATEWAY_SERVER_SHUTDOWN_GRACE_S=str(GRACE_S),
        GATEWAY_EDGE_IMPLEMENTATION=edge_implementation,
    )
    return env


@pytest.fixture
async def served(
    tmp_path: Path, edge_implementation: str
) -> AsyncIterator[tuple[subprocess.Popen[str], str, str]]:
    """``gateway serve --workers 2`` on a free port; yields (process, base URL, API key)."""
    data_dir = str(tmp_path / "data")
    port = free_port()
    gateway = [sys.executable, "-m", "gateway", "--data-dir", data_dir]
    proc = subprocess.Popen(  # noqa: ASYNC220 - a fork and exec; the output is read in a thread
        [*gateway, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "2"],
        env=serve_env(edge_implementation),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), START_TIMEOUT_S)
        assert line.startswith("gateway listening on") and "2 edge processes" in line, line
        assert f", {edge_implementation} edge)" in line, line
        created = await asyncio.to_thread(
            subprocess.run,
            [*gateway, "keys", "create", "--name", "drain"],
            env=serve_env(edge_implementation),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        assert created.returncode == 0, created.stderr
        yield proc, f"http://127.0.0.1:{port}", created.stdout.split()[-1]
    finally:
        if proc.poll() is None:
            proc.kill()  # the workers follow (PDEATHSIG)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        # VMs outlive a gateway on purpose; this test's VM does not.
        config = override(
            load_config(None),
            server={"data_dir": data_dir},
            vms={"driver": "process"},
            process={"cidr": VM_CIDR},
        )
        await make_driver(config).sweep(set())


async def refused_by_every_edge(base: str) -> None:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    while True:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except ConnectionRefusedError:
            return
        writer.close()
        await asyncio.sleep(0.02)  # still accepting: the signal has not reached every process yet


async def test_sigterm_drains_uploads_and_closes_websockets_cleanly(
    served: tuple[subprocess.Popen[str], str, str],
) -> None:
    proc, base, key = served
    async with aiohttp.ClientSession(base, headers={"X-API-Key": key}) as api:
        async with api.post("/v1/vms", json={}) as resp:
            vm = await resp.json()
            assert resp.status == 200, vm
        command = echo_app_command(APP_PORT)
        async with api.post(
            "/execute", json={"session_id": vm["session_id"], "language": "bash", "command": command}
        ) as resp:
            assert (await resp.json())["exit_code"] == 0
        async with api.get(f"/v1/sessions/app-url/{vm['session_id']}?port={APP_PORT}") as resp:
            url = (await resp.json())["url"]

    go = asyncio.Event()
    sent = [asyncio.Event() for _ in range(CLIENTS)]

    async def half_now_half_later(started: asyncio.Event) -> AsyncIterator[bytes]:
        yield PART
        started.set()
        await go.wait()  # the second half is sent only once the gateway is shutting down
        yield PART

    async def upload(client: aiohttp.ClientSession, started: asyncio.Event) -> tuple[int, dict, str]:
        headers = {"Content-Length": str(2 * len(PART))}
        # Expect: 100-continue: the body starts (and ``started`` is set) only once the app has the
        # request, so the gateway is surely mid-request when SIGTERM comes. Without it, under load the
        # request head could still be in flight then, and a request that arrives while the gateway is
        # stopping rightly gets 503.
        body = half_now_half_later(started)
        async with client.post(url + "discard", data=body, headers=headers, expect100=True) as resp:
            return resp.status, await resp.json(), resp.headers.get("Connection", "")

    async with aiohttp.ClientSession() as client:
        sockets = [await client.ws_connect(url + "ws") for _ in range(CLIENTS)]
        for ws in sockets:
            await ws.send_str("before")
            assert (await ws.receive()).data == "before"
        uploads = [asyncio.create_task(upload(client, started)) for started in sent]
        async with asyncio.timeout(10):
            for started in sent:
                await started.wait()

        stopping_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(GRACE_S):
            for ws in sockets:
                msg = await ws.receive()
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001), msg
                await ws.close()
            # Every edge process is draining once none accepts: only then may the uploads finish
            # (an edge that had not heard the signal yet would rightly answer without Connection: close).
            await refused_by_every_edge(base)
        go.set()
        for task in uploads:
            status, body, connection = await asyncio.wait_for(task, GRACE_S)
            assert (status, body.get("body_length")) == (200, 2 * len(PART)), body
            assert connection.lower() == "close"
    code = await asyncio.wait_for(asyncio.to_thread(proc.wait), GRACE_S + 5)
    assert code == 0
    assert time.monotonic() - stopping_at < GRACE_S + 2, "the drain outlasted its grace"
