"""Files bench: a large upload and download through the gateway, with the gateway's memory alongside.

Runs ``gateway serve`` (its own process, embedded Redis, loopback only) per driver, then moves one file
of ``--mib`` MiB into a session's VM with ``POST /upload`` (multipart, as the official SDK sends it) and
back out with the raw ``GET /v1/sessions/{id}/files`` and the SDK's ``POST /download`` (JSON, base64).
It prints MiB/s for each and the gateway's resident memory (VmRSS of the serving process, sampled every
50 ms): before, the peak during each transfer, and after. Streaming means the peak stays flat, whatever
the file's size.

    .venv/bin/python bench/files.py [--drivers process,netns] [--mib 1024]

The netns driver's VM keeps the file on its own disk (GATEWAY_NETNS_DISK_MB is set to fit it here); a
qemu VM's root is in its memory, so there the file must fit the VM's memory (--mib 200).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from control_plane import served_gateway

CHUNK = 1 << 20
SAMPLE_S = 0.05


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssWatch:
    """Samples a process's resident memory while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mib(self.pid))
            await asyncio.sleep(SAMPLE_S)

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        self.peak = rss_mib(self.pid)
        self._task = asyncio.create_task(self._sample())
        try:
            yield
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self.peak = max(self.peak, rss_mib(self.pid))


def gateway_pid(port: int) -> int:
    """The PID listening on the gateway's port (the ``gateway serve`` process)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            inode = fields[9]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
    raise RuntimeError("cannot find the gateway's PID")


async def drain(resp: aiohttp.ClientResponse) -> int:
    total = 0
    async for chunk in resp.content.iter_chunked(CHUNK):
        total += len(chunk)
    return total


async def bench_driver(driver: str, mib: int, source: Path) -> None:
    # The VM keeps the file on its own disk (the default is 2048 MiB).
    settings = {"GATEWAY_NETNS_DISK_MB": str(max(2048, mib + 1024))} if driver == "netns" else {}
    async with served_gateway(driver, settings=settings) as (url, key):
        port = int(url.rsplit(":", 1)[1])
        watch = RssWatch(gateway_pid(port))
        headers = {"X-API-Key": key}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
            async with http.post(f"{url}/v1/sessions/session", json={"api_key": key}) as resp:
                session_id = (await resp.json())["session_id"]
            async with http.post(
                f"{url}/execute", json={"session_id": session_id, "command": "print(1)"}
            ) as resp:
                assert resp.status == 200, await resp.text()
            before = rss_mib(watch.pid)
            print(f"{driver}: {mib} MiB file; gateway RSS before: {before:.0f} MiB")

            form = aiohttp.FormData()
            form.add_field("session_id", session_id)
            form.add_field("remote_path", "big.bin")
            with source.open("rb") as fh:
                form.add_field("file", fh, filename="big.bin")
                async with watch.watching():
                    started = time.perf_counter()
                    async with http.post(f"{url}/upload", data=form) as resp:
                        answer = await resp.json()
                    elapsed = time.perf_counter() - started
            assert resp.status == 200 and answer["size"] == mib * CHUNK, answer
            print(f"  upload (multipart):   {mib / elapsed:7.1f} MiB/s, RSS peak {watch.peak:.0f} MiB")

            async with watch.watching():
                started = time.perf_counter()
                async with http.get(
                    f"{url}/v1/sessions/{session_id}/files", params={"path": "big.bin"}
                ) as resp:
                    got = await drain(resp)
                elapsed = time.perf_counter() - started
            assert got == mib * CHUNK, got
            print(f"  download (raw):       {mib / elapsed:7.1f} MiB/s, RSS peak {watch.peak:.0f} MiB")

            async with watch.watching():
                started = time.perf_counter()
                form_data = {"session_id": session_id, "filename": "big.bin"}
                async with http.post(f"{url}/download", data=form_data) as resp:
                    got = await drain(resp)
                elapsed = time.perf_counter() - started
            assert got > mib * CHUNK * 4 // 3, got
            print(f"  download (JSON, b64): {mib / elapsed:7.1f} MiB/s, RSS peak {watch.peak:.0f} MiB")
            print(f"  gateway RSS after: {rss_mib(watch.pid):.0f} MiB")
            async with http.post(f"{url}/kill", json={"session_id": session_id}) as resp:
                await resp.read()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--drivers", default="process")
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gateway-files-bench-") as folder:
        source = Path(folder) / "big.bin"
        with source.open("wb") as fh:
            block = os.urandom(CHUNK)
            for _ in range(args.mib):
                fh.write(block)
        for driver in args.drivers.split(","):
            await bench_driver(driver, args.mib, source)


if __name__ == "__main__":
    asyncio.run(main())
