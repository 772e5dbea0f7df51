"""The access log of a real gateway process: SIGTERM loses no line, even to a reader that is behind.

The gateway's stderr is a pipe this test does not read until after SIGTERM, so it fills (64 KiB) and the
edge keeps the rest waiting (``MAX_PENDING_BYTES``); once stopping, the log waits (a bounded time) for
the reader to take them rather than exiting with lines unwritten.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port

# Every test here runs on each edge (the compiled one and the pure-Python one).
pytestmark = pytest.mark.both_edges

START_TIMEOUT_S = 30.0
REQUESTS = 800  # about 250 bytes a line: several times what a pipe holds
CLIENTS = 8


def read_slowly(fd: int) -> bytes:
    """Everything until EOF, a pipe's page at a time with a pause between (a log shipper behind)."""
    parts = []
    while chunk := os.read(fd, 4096):
        parts.append(chunk)
        time.sleep(0.005)
    return b"".join(parts)


async def test_sigterm_loses_no_access_log_line(tmp_path: Path, edge_implementation: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_VMS_DRIVER="process",
        GATEWAY_PROCESS_ALLOW_ROOT="true",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{free_port()}",
        GATEWAY_PROCESS_CIDR="127.74.0.0/24",
        GATEWAY_LOG_FORMAT="json",
        GATEWAY_EDGE_IMPLEMENTATION=edge_implementation,
        GATEWAY_SERVER_SHUTDOWN_GRACE_S="3",
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - a fork and exec; its output is read in threads
        [sys.executable, "-m", "gateway", "--data-dir", str(tmp_path / "data"), "serve", "--listen",
         f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), START_TIMEOUT_S)
        assert line.startswith(b"gateway listening on"), line
        assert b", %s edge)" % edge_implementation.encode() in line, line  # the edge that runs
        base = f"http://127.0.0.1:{port}"
        paths = [f"/sigterm-test/{i}" for i in range(REQUESTS)]
        async with aiohttp.ClientSession() as client:

            async def send(mine: list[str]) -> None:
                for path in mine:
                    async with client.get(base + path) as resp:
                        await resp.read()

            async with asyncio.timeout(60):
                await asyncio.gather(*(send(paths[i::CLIENTS]) for i in range(CLIENTS)))
        proc.send_signal(signal.SIGTERM)
        # Only now is stderr read, and slowly: until then the gateway found the pipe full, and while it
        # stops the reader is still behind.
        err = await asyncio.wait_for(asyncio.to_thread(read_slowly, proc.stderr.fileno()), 30)
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    logged = set()
    for raw in err.splitlines():
        if raw.startswith(b'{"ts"'):
            entry = json.loads(raw)
            if entry.get("type") == "access":
                logged.add(entry["path"])
    missing = set(paths) - logged
    assert not missing, f"{len(missing)} of {REQUESTS} lines lost, e.g. {sorted(missing)[:3]}"
