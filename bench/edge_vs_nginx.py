"""Edge vs nginx: the gateway's edge and Debian's nginx side by side, on loopback, against the same app.

    .venv/bin/python bench/edge_vs_nginx.py [--workers 1] [--seconds 5] [--rounds 2] [--skip ws,idle]
                                            [--edge compiled|pure]
                                            [--no-direct] [--nginx-buffer 256k]

--skip takes a comma-separated list of: rps, cpu, download, upload, ws, idle. The default run takes
about a minute on 2 CPUs.

Needs ``nginx`` and ``wrk`` (``apt-get install -y nginx wrk``) and ``curl``; run as root or as a user that
may raise its open-files limit to about 6,000 (the gateway inherits the raised limit).

What it does:

1. Starts ``gateway serve`` as a user would (its own process, embedded Redis in a temporary data folder,
   process VM driver on the bench's own range 127.79.0.0/22, loopback only) and creates an API key.
2. Creates one VM and starts ``bench/upstream_app.py`` inside it with ``POST /execute`` (two
   SO_REUSEPORT processes of uvloop + httptools, so the app is not the bottleneck); ``app-url`` exposes
   the port and gives the edge URL and the VM's address.
3. Starts nginx (``daemon off``, ``master_process on``, ``worker_processes --workers``) with its own
   configuration in a temporary folder, proxying to the same VM address and port.
4. Measures, on each proxy:

   - requests/s and p50/p99 latency of a 100-byte response (wrk, keep-alive, 64 connections);
   - proxy CPU microseconds per request during that wrk run (utime+stime from /proc/<pid>/stat: the
     gateway process for the edge, master + workers for nginx);
   - MiB/s of sequential 100 MiB downloads and uploads (curl; the app discards uploads and answers
     the byte count, which is checked);
   - WebSocket echo round trips/s (a few aiohttp clients, one small binary message in flight each);
   - RSS growth of the proxy per idle keep-alive connection (5,000 connections that each made one
     request; VmRSS from /proc/<pid>/status before and after; measured once, in the first round).

   ``--rounds`` rounds in ABBA order (edge, nginx, then nginx, edge, ...); the table shows the best
   round (highest throughput, lowest CPU; latencies from the fastest wrk run; error counts summed).
   Then the same load once against the app directly (no proxy), printed as the ceiling.
5. Prints one table (edge | nginx | edge/nginx) with wrk's non-2xx and socket-error counts for both, a
   pass/miss line per target of the issue, the direct ceiling, and notes: failed requests or metrics,
   warnings and errors the gateway or nginx logged.

``--workers N`` runs nginx with ``worker_processes N`` and the gateway with ``serve --workers N`` (the
serving process plus N - 1 ``gateway edge`` children on the same port; the edge's CPU and RSS are
summed over those processes, not over the VM's app or the embedded Redis); ``--workers`` sets nginx's
``worker_processes``. Client, proxies and app share this machine's CPUs, so compare ratios, not
absolute numbers. Every load loop is bounded in time; the VM, nginx and the gateway are stopped and the
temporary folders removed also on failure, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from gateway.edge.impl import CHOICES

REPO = Path(__file__).resolve().parent.parent
UPSTREAM_APP = REPO / "bench" / "upstream_app.py"

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
BENCH_ENV = {
    "GATEWAY_VMS_DRIVER": "process",
    "GATEWAY_PROCESS_CIDR": "127.79.0.0/22",
    # Benchmarks run as root; the process driver refuses root unless told (it isolates nothing).
    "GATEWAY_PROCESS_ALLOW_ROOT": "true",
}
VM_LIFETIME_S = 3600
APP_PORT = 8000
APP_PROCESSES = 2
EXECUTE_TIMEOUT_S = 30

SMALL_PATH = "/small"
SMALL_BODY_BYTES = 100
WRK_THREADS = 2
WRK_CONNECTIONS = 64
WRK_WARMUP_S = 1
WRK_GRACE_S = 20.0  # beyond -d, before wrk is killed

MIB = 1024 * 1024
TRANSFER_BYTES = 100 * MIB
# Sequential downloads (and uploads) per proxy and round: each takes 50-70 ms here, so three were a
# sample shorter than the machine's own swings (the rows moved 10-40 % between runs).
TRANSFERS = 12
CURL_MAX_TIME_S = 60

WS_CLIENTS = 4
WS_MESSAGE = b"m" * 32
WS_GRACE_S = 10.0

IDLE_CONNECTIONS = 5000
IDLE_OPEN_CONCURRENCY = 100
IDLE_OPEN_TIMEOUT_S = 60.0
IDLE_SETTLE_S = 1.0
NOFILE_NEEDED = IDLE_CONNECTIONS + 1000  # this process and the gateway (which inherits the limit)

# nginx reads an unbuffered response (and an unbuffered request body) in one buffer of this size; its
# default, one memory page, caps a download at ~400 MiB/s here. 256k is what the edge reads at once on
# its plain path (uvloop's receive buffer is 256,000 bytes); its body pump grows its buffer from 64 KiB
# to 1 MiB with a fast sender (--nginx-buffer 1m gives nginx that too; measured the same as 256k here,
# and proxy_buffer_size is also each small request's response-head buffer).
NGINX_STREAM_BUFFER = "256k"
NGINX_WORKER_CONNECTIONS = 4 * IDLE_CONNECTIONS  # nginx counts client and upstream connections
NGINX_WORKER_NOFILE = 4 * IDLE_CONNECTIONS

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")

# Targets from the issue: (metric, how edge/nginx must compare).
# Issue 22's targets (the idle one is issue 10's, in RSS: issue 22's 2 KiB is of Python's heap after a
# browser-like request, measured by bench/edge_idle_memory.py).
TARGET_RPS_MIN_RATIO = 1.0
TARGET_CPU_MAX_RATIO = 1.2
TARGET_P99_MAX_RATIO = 1.0
TARGET_TRANSFER_MIN_RATIO = 1.0
TARGET_WS_MIN_RATIO = 1.0
TARGET_IDLE_MAX_KIB = 4.0

METRICS = ("rps", "cpu", "download", "upload", "ws", "idle")

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {worker_nofile};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections {worker_connections};
}}

http {{
    # Access logging stays ON (to a file, unbuffered, nginx's default "combined" format): the edge
    # will log every request too, so switching it off here would flatter nginx.
    access_log {dir}/access.log;

    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    # The edge has no per-connection request cap; nginx's default (1000) would make wrk and the
    # upstream pool reconnect every 1000 requests.
    keepalive_requests 1000000;
    keepalive_timeout 75s;       # the edge's client-side keep-alive
    client_max_body_size 0;      # the edge has no request body limit on app traffic

    upstream app {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{port}{listen_tls} backlog=4096;{tls}

        # Streaming both ways, like the edge: nothing is spooled to memory or disk.
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_buffer_size {stream_buffer};
        proxy_buffers 4 {stream_buffer};
        proxy_busy_buffers_size {stream_buffer};
        client_body_buffer_size {stream_buffer};
        proxy_http_version 1.1;

        # The same forwarding headers the edge sends (Host is kept as received).
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $http_host;
        proxy_set_header Forwarded "for=$remote_addr;proto=$scheme;host=$http_host";

        location / {{
            proxy_set_header Connection "";
            proxy_pass http://app;
        }}

        location /ws {{
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            proxy_pass http://app;
        }}
    }}
}}
"""


# --- small helpers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime (clock ticks) summed over pids; a vanished process counts 0."""
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[int, int]:
    """(utime, stime) in clock ticks, summed over pids; a vanished process counts 0."""
    user = system = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
        user += int(fields[11])  # field 14: utime
        system += int(fields[12])  # field 15: stime
    return user, system


def rss_kib(pids: list[int]) -> int:
    """VmRSS (KiB) summed over pids."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; a process that already exited is left alone."""
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


def edge_processes(gateway_pid: int) -> list[int]:
    """The serving gateway and its ``gateway edge`` children (not its VMs or its embedded Redis)."""
    pids = [gateway_pid]
    for child in children_of(gateway_pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"gateway" in argv and b"edge" in argv:
                pids.append(child)
    return pids


def children_of(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent:
                    found.append(int(entry))
    return found


def raise_nofile_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        hard = needed  # only root may raise the hard limit; setrlimit says so otherwise
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def wait_accepting(
    host: str, port: int, timeout_s: float, proc: asyncio.subprocess.Process | None = None
) -> None:
    """Until host:port accepts a connection; fails early when proc (the server) has exited."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                if proc is not None and proc.returncode is not None:
                    raise RuntimeError(f"{proc.pid} exited with {proc.returncode}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


async def run_bounded(argv: list[str], timeout_s: float) -> tuple[int, str, str]:
    """Run a command; kill it (by its PID) when it outlives timeout_s."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def versions(workers: int, rounds: int) -> str:
    nginx = "no nginx"
    if shutil.which("nginx"):
        nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
        nginx = nginx.removeprefix("nginx version: ")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--", "gateway"], capture_output=True, text=True, cwd=REPO
    ).stdout.splitlines()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    wrk_version = (wrk.stdout + wrk.stderr).split()[1] if (wrk.stdout + wrk.stderr).split() else "?"
    return (
        f"edge vs nginx on {os.cpu_count()} CPUs (client, proxies and app share them); "
        f"nginx worker_processes={workers}, edge --workers {workers}; {nginx}; "
        f"gateway {commit}{f' + {len(changed)} uncommitted file(s) in gateway/' if changed else ''}; "
        f"Python {sys.version.split()[0]}, uvloop {uvloop.__version__}; wrk {wrk_version}; "
        f"best of {rounds} round(s)"
    )


# --- the proxies -------------------------------------------------------------------------------------


@dataclass
class Proxy:
    name: str
    base_url: str  # the app's root through this proxy, without the trailing slash
    pids: Callable[[], list[int]]  # the proxy's processes (for CPU and RSS)

    @property
    def host_port(self) -> tuple[str, int]:
        hostport = self.base_url.split("://", 1)[1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        return host, int(port)

    @property
    def path_prefix(self) -> str:
        rest = self.base_url.split("://", 1)[1]
        return "/" + rest.split("/", 1)[1] if "/" in rest else ""


@dataclass
class Gateway:
    url: str
    key: str
    pid: int
    log_path: Path
    admin_url: str  # /metrics, /healthz, /readyz


async def edge_requests_counted(gw: Gateway) -> float:
    """The sum of gateway_edge_requests_total over every route and status, from the admin listener."""
    async with aiohttp.ClientSession() as http, http.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("gateway_edge_requests_total{")
    )


def edge_env(args: argparse.Namespace) -> dict[str, str]:
    """The edge the gateway runs (--edge): edge.implementation."""
    return {"GATEWAY_EDGE_IMPLEMENTATION": args.edge}


@asynccontextmanager
async def served_gateway(workers: int, extra_env: dict[str, str] | None = None) -> AsyncIterator[Gateway]:
    """Start ``gateway serve`` (process driver); yield it with an API key; stop it by PID afterwards.

    ``extra_env`` adds GATEWAY_* settings; "{data_dir}" in a value is replaced by the data folder."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as data_dir:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(BENCH_ENV)
        admin = f"127.0.0.1:{free_port()}"
        env["GATEWAY_ADMIN_LISTEN"] = admin
        env.update({k: v.replace("{data_dir}", data_dir) for k, v in (extra_env or {}).items()})
        gateway = [sys.executable, "-m", "gateway", "--data-dir", data_dir]
        log_path = Path(data_dir) / "gateway.log"
        # The gateway's stdout and stderr go to one file (read at the end for errors), not to a pipe
        # that nobody drains.
        with open(log_path, "wb") as log_file:  # noqa: ASYNC230 - a local file, opened once
            proc = await asyncio.create_subprocess_exec(
                *gateway, "serve", "--listen", f"127.0.0.1:{port}", "--workers", str(workers),
                env=env, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while b"gateway listening" not in log_path.read_bytes():
                    if proc.returncode is not None:
                        raise RuntimeError(f"gateway serve exited with {proc.returncode}")
                    await asyncio.sleep(0.1)
            started = log_path.read_bytes().decode(errors="replace")
            print(next(line for line in started.splitlines() if "gateway listening" in line), flush=True)
            code, out, _ = await run_bounded([*gateway, "keys", "create", "--name", "bench"], START_TIMEOUT_S)
            if code != 0:
                raise RuntimeError("gateway keys create failed")
            key = out.strip().splitlines()[-1]
            yield Gateway(f"http://127.0.0.1:{port}", key, proc.pid, log_path, f"http://{admin}")
        finally:
            await stop_process(proc)


@dataclass
class App:
    edge_url: str  # path-form app URL through the edge, without the trailing slash
    vm_ip: str
    port: int


@asynccontextmanager
async def app_in_vm(gw: Gateway) -> AsyncIterator[App]:
    """One VM running bench/upstream_app.py; the VM is deleted (and the app's processes gone) afterwards."""
    async with aiohttp.ClientSession(gw.url, headers={"X-API-Key": gw.key}) as http:
        async with http.post("/v1/vms", json={"vm_lifetime_seconds": VM_LIFETIME_S}) as resp:
            vm = await resp.json()
            if resp.status != 200 or vm.get("status") != "active":
                raise RuntimeError(f"VM create failed: {resp.status} {vm}")
        app_pids: list[int] = []
        try:
            command = f"{sys.executable} {UPSTREAM_APP} {APP_PORT} --processes {APP_PROCESSES}"
            body = {
                "session_id": vm["session_id"],
                "language": "bash",
                "command": command,
                "timeout": EXECUTE_TIMEOUT_S,
            }
            async with http.post("/execute", json=body) as resp:
                result = await resp.json()
                if resp.status != 200 or result.get("exit_code") != 0:
                    raise RuntimeError(f"starting the app failed: {resp.status} {result}")
            app_pids = [int(p) for p in re.findall(r"pid (\d+)", result["stdout"])]
            async with http.get(
                f"/v1/sessions/app-url/{vm['session_id']}", params={"port": APP_PORT}
            ) as resp:
                info = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"app-url failed: {resp.status} {info}")
            await wait_accepting(info["vm_ip"], APP_PORT, START_TIMEOUT_S)
            yield App(info["url"].rstrip("/"), info["vm_ip"], APP_PORT)
        finally:
            try:
                async with http.delete(f"/v1/vms/{vm['vm_id']}") as resp:
                    resp.raise_for_status()
            finally:
                for pid in app_pids:  # normally gone with the VM already
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


@asynccontextmanager
async def running_nginx(
    app: App, workers: int, tls: str = "", *, http2: bool = False, stream_buffer: str = NGINX_STREAM_BUFFER
) -> AsyncIterator[tuple[Proxy, Path]]:
    """nginx in the foreground with its own config and logs in a temporary folder; stopped by PID.

    ``tls``: ssl_* directives; the listener then speaks TLS (``bench/tls_vs_nginx.py``), and with
    ``http2`` HTTP/2 too (Debian 12's nginx 1.22 takes it on the listen line; ``http2 on`` is 1.25's)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="nginx-bench-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)  # noqa: ASYNC240 - workers run as nginx's unprivileged user
        conf = folder / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                listen_tls=(" ssl http2" if http2 else " ssl") if tls else "",
                tls=tls,
                workers=workers,
                worker_nofile=NGINX_WORKER_NOFILE,
                worker_connections=NGINX_WORKER_CONNECTIONS,
                dir=folder,
                upstream=f"{app.vm_ip}:{app.port}",
                port=port,
                stream_buffer=stream_buffer,
            )
        )
        proc = await asyncio.create_subprocess_exec(
            "nginx", "-c", str(conf), "-p", str(folder), "-e", str(folder / "error.log"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            try:
                await wait_accepting("127.0.0.1", port, START_TIMEOUT_S, proc)
            except (RuntimeError, TimeoutError) as exc:
                log = (folder / "error.log").read_text(errors="replace").strip()
                raise RuntimeError(f"nginx did not start ({exc!r}): {log}") from None
            master = proc.pid
            yield Proxy("nginx", f"http://127.0.0.1:{port}", lambda: [master, *children_of(master)]), folder
        finally:
            if proc.returncode is None:
                workers_left = children_of(proc.pid)
                await stop_process(proc)  # SIGTERM: fast shutdown of master and workers
                for pid in workers_left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


# --- metrics -----------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    cpu_us_per_request: float
    system_us_per_request: float  # the kernel's share of cpu_us_per_request


_LATENCY_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(output: str) -> tuple[float, float, float, int, int, int]:
    """(requests/s, p50 ms, p99 ms, requests, non-2xx/3xx, socket errors) from `wrk --latency` output."""

    def latency(pct: str) -> float:
        found = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
        if found is None:
            raise ValueError(f"no {pct}% latency in wrk output:\n{output}")
        return float(found[1]) * _LATENCY_UNITS_MS[found[2]]

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if rps is None or total is None:
        raise ValueError(f"unexpected wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return (
        float(rps[1]),
        latency("50"),
        latency("99"),
        int(total[1]),
        int(non_2xx[1]) if non_2xx else 0,
        sum(int(n) for n in errors.groups()) if errors else 0,
    )


async def wrk(url: str, seconds: float) -> str:
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds:g}s", "--latency", url]
    code, out, err = await run_bounded(argv, seconds + WRK_GRACE_S)
    if code != 0:
        raise RuntimeError(f"wrk exited with {code}: {err.strip()}")
    return out


async def measure_small_requests(proxy: Proxy, seconds: float) -> WrkResult:
    """wrk on the 100-byte response; the proxy's CPU time over the measured run, per request."""
    url = proxy.base_url + SMALL_PATH
    await wrk(url, WRK_WARMUP_S)  # pools, caches, lazily built paths
    pids = proxy.pids()
    user_before, system_before = cpu_split(pids)
    output = await wrk(url, seconds)
    user_after, system_after = cpu_split(pids)
    rps, p50, p99, requests, non_2xx, socket_errors = parse_wrk(output)
    us_per_tick_request = 1e6 / CLOCK_TICKS_PER_S / max(requests, 1)
    used = (user_after - user_before + system_after - system_before) * us_per_tick_request
    system = (system_after - system_before) * us_per_tick_request
    return WrkResult(rps, p50, p99, requests, non_2xx, socket_errors, used, system)


def curl_transfer_argv(url: str, *extra: str) -> list[str]:
    return ["curl", "-sS", "--max-time", str(CURL_MAX_TIME_S), *extra, url]


async def measure_download(proxy: Proxy) -> float:
    """MiB/s over TRANSFERS sequential 100 MiB downloads (curl, body to /dev/null)."""
    argv = curl_transfer_argv(
        f"{proxy.base_url}/big", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}"
    )
    total_bytes, total_s = 0, 0.0
    for _ in range(TRANSFERS):
        code, out, err = await run_bounded(argv, CURL_MAX_TIME_S + 5)
        status, size, took = out.split() if code == 0 else ("?", "0", "0")
        if code != 0 or status != "200" or int(size) != TRANSFER_BYTES:
            raise RuntimeError(f"download: curl exit {code}, HTTP {status}, {size} bytes; {err.strip()}")
        total_bytes += int(size)
        total_s += float(took)
    return total_bytes / MIB / total_s


async def measure_upload(proxy: Proxy, source: Path) -> float:
    """MiB/s over TRANSFERS sequential 100 MiB uploads (curl -T: streamed with Content-Length).

    ``Expect: 100-continue`` is switched off: the app does not answer it, and curl would wait 1 s.
    """
    argv = curl_transfer_argv(
        f"{proxy.base_url}/upload",
        *("-X", "POST", "-T", str(source), "-H", "Expect:"),
        *("-w", "\n%{http_code} %{size_upload} %{time_total}"),
    )
    total_bytes, total_s = 0, 0.0
    for _ in range(TRANSFERS):
        code, out, err = await run_bounded(argv, CURL_MAX_TIME_S + 5)
        body, _, stats = out.rpartition("\n")
        status, size, took = stats.split() if code == 0 else ("?", "0", "0")
        if code != 0 or status != "200" or body.strip() != str(TRANSFER_BYTES):
            raise RuntimeError(
                f"upload: curl exit {code}, HTTP {status}, app counted {body.strip()!r}; {err.strip()}"
            )
        total_bytes += int(size)
        total_s += float(took)
    return total_bytes / MIB / total_s


async def measure_ws(proxy: Proxy, seconds: float) -> float:
    """Echo round trips/s summed over WS_CLIENTS clients, each sending one message at a time."""
    counts = [0] * WS_CLIENTS
    deadline = time.perf_counter() + seconds

    async def client(index: int, http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(proxy.base_url + "/ws", autoping=False) as ws:
            while time.perf_counter() < deadline:
                await ws.send_bytes(WS_MESSAGE)
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.BINARY or msg.data != WS_MESSAGE:
                    raise RuntimeError(f"WebSocket echo: got {msg.type} {msg.data!r:.80}")
                counts[index] += 1

    started = time.perf_counter()
    async with aiohttp.ClientSession() as http, asyncio.timeout(seconds + WS_GRACE_S):
        await asyncio.gather(*(client(i, http) for i in range(WS_CLIENTS)))
    return sum(counts) / (time.perf_counter() - started)


async def measure_idle(proxy: Proxy) -> IdleResult:
    """RSS growth (KiB) per idle keep-alive connection, and the errors of the connections that failed."""
    host, port = proxy.host_port
    request = f"GET {proxy.path_prefix}{SMALL_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(IDLE_OPEN_CONCURRENCY)

    async def open_one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(host, port)
            writers.append(writer)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"idle connection: {head[:40]!r}")
            await reader.readexactly(SMALL_BODY_BYTES)

    pids = proxy.pids()
    await asyncio.sleep(IDLE_SETTLE_S)
    before = rss_kib(pids)
    try:
        async with asyncio.timeout(IDLE_OPEN_TIMEOUT_S):
            results = await asyncio.gather(
                *(open_one() for _ in range(IDLE_CONNECTIONS)), return_exceptions=True
            )
        await asyncio.sleep(IDLE_SETTLE_S)
        after = rss_kib(pids)
    finally:
        for writer in writers:
            writer.close()
    failed = [r for r in results if isinstance(r, BaseException)]
    return IdleResult((after - before) / max(IDLE_CONNECTIONS - len(failed), 1), failed)


# --- rounds and the table ----------------------------------------------------------------------------


@dataclass
class IdleResult:
    kib_per_connection: float
    failed: list[BaseException]


Measured = dict[str, Any]  # metric -> WrkResult | float | IdleResult, for one proxy in one round


async def run_metrics(
    proxy: Proxy, wanted: set[str], args: argparse.Namespace, upload_source: Path, notes: list[str]
) -> Measured:
    """The wanted metrics on one proxy; a failing metric is noted and the others still run."""
    measured: Measured = {}

    async def attempt(metric: str, measure: Callable[[], Awaitable[Any]]) -> None:
        try:
            measured[metric] = await measure()
        except Exception as exc:  # reported; the other metrics still run
            notes.append(f"{proxy.name}: {metric} failed: {type(exc).__name__}: {exc}")

    if wanted & {"rps", "cpu"}:
        await attempt("wrk", lambda: measure_small_requests(proxy, args.seconds))
    if "download" in wanted:
        await attempt("download", lambda: measure_download(proxy))
    if "upload" in wanted:
        await attempt("upload", lambda: measure_upload(proxy, upload_source))
    if "ws" in wanted:
        await attempt("ws", lambda: measure_ws(proxy, args.seconds))
    if "idle" in wanted:
        await attempt("idle", lambda: measure_idle(proxy))
    return measured


@dataclass
class Row:
    label: str
    fmt: str = "{:,.0f}"
    show_ratio: bool = True
    cells: dict[str, float | str] = field(default_factory=dict)  # proxy name -> value

    def cell(self, side: str) -> str:
        value = self.cells.get(side, "error")  # a row exists only for a metric that ran
        return value if isinstance(value, str) else self.fmt.format(value)

    @property
    def ratio(self) -> float | None:
        edge, nginx = self.cells.get("edge"), self.cells.get("nginx")
        if isinstance(edge, float | int) and isinstance(nginx, float | int) and nginx:
            return edge / nginx
        return None


def table_rows(metrics: set[str]) -> dict[str, Row]:
    """Rows in table order, for the metrics that run."""
    rows: dict[str, Row] = {}
    if "rps" in metrics:
        rows["rps"] = Row(f"requests/s ({SMALL_BODY_BYTES} B, wrk -c{WRK_CONNECTIONS})")
        rows["p50"] = Row("  p50 latency (ms)", "{:.2f}")
        rows["p99"] = Row("  p99 latency (ms)", "{:.2f}")
    if "cpu" in metrics:
        rows["cpu"] = Row("proxy CPU per request (us)", "{:.1f}")
        rows["cpu_system"] = Row("  of which system (us)", "{:.1f}")
    if metrics & {"rps", "cpu"}:
        rows["wrk_errors"] = Row("  wrk non-2xx / socket errors", show_ratio=False)
    if "download" in metrics:
        rows["download"] = Row(f"download {TRANSFER_BYTES // MIB} MiB (MiB/s)")
    if "upload" in metrics:
        rows["upload"] = Row(f"upload {TRANSFER_BYTES // MIB} MiB (MiB/s)")
    if "ws" in metrics:
        rows["ws"] = Row(f"WebSocket echo round trips/s ({WS_CLIENTS} clients)")
    if "idle" in metrics:
        rows["idle"] = Row(f"RSS per idle keep-alive conn (KiB, {IDLE_CONNECTIONS:,})", "{:.2f}")
    return rows


def fill_rows(rows: dict[str, Row], side: str, rounds: list[Measured], notes: list[str]) -> None:
    """Best of the rounds: highest throughput, lowest CPU; latencies come from the fastest wrk run and
    error counts are summed over all of them."""

    def put(key: str, value: float | str) -> None:
        if key in rows:
            rows[key].cells[side] = value

    wrk_runs: list[WrkResult] = [r["wrk"] for r in rounds if "wrk" in r]
    if wrk_runs:
        fastest = max(wrk_runs, key=lambda w: w.requests_per_s)
        put("rps", fastest.requests_per_s)
        put("p50", fastest.p50_ms)
        put("p99", fastest.p99_ms)
        leanest = min(wrk_runs, key=lambda w: w.cpu_us_per_request)
        put("cpu", leanest.cpu_us_per_request)
        put("cpu_system", leanest.system_us_per_request)
        non_2xx = sum(w.non_2xx for w in wrk_runs)
        socket_errors = sum(w.socket_errors for w in wrk_runs)
        put("wrk_errors", f"{non_2xx:,} / {socket_errors:,}")
        if non_2xx or socket_errors:
            requests = sum(w.requests for w in wrk_runs)
            notes.append(
                f"{side}: wrk saw {non_2xx} non-2xx/3xx responses and {socket_errors} socket errors "
                f"in {requests} requests"
            )
    for metric in ("download", "upload", "ws"):
        values = [r[metric] for r in rounds if metric in r]
        if values:
            put(metric, max(values))
    for idle in (r["idle"] for r in rounds if "idle" in r):
        put("idle", idle.kib_per_connection)
        if idle.failed:
            kinds = "; ".join(sorted({f"{type(e).__name__}: {e}" for e in idle.failed})[:3])
            notes.append(
                f"{side}: {len(idle.failed)} of {IDLE_CONNECTIONS} idle connections failed ({kinds})"
            )


def print_table(rows: dict[str, Row]) -> None:
    width = max(len(r.label) for r in rows.values())
    print(f"{'metric':<{width}} | {'edge':>14} | {'nginx':>14} | {'edge/nginx':>10}")
    print(f"{'-' * width}-+-{'-' * 14}-+-{'-' * 14}-+-{'-' * 10}")
    for r in rows.values():
        ratio = f"{r.ratio:.2f}" if r.show_ratio and r.ratio is not None else ""
        print(f"{r.label:<{width}} | {r.cell('edge'):>14} | {r.cell('nginx'):>14} | {ratio:>10}")


def print_targets(rows: dict[str, Row]) -> None:
    """One pass/miss line per target of the issue (n/a when the metric failed)."""
    ratio_targets = [  # (row, wording, lowest or highest allowed edge/nginx)
        ("rps", f"requests/s >= {TARGET_RPS_MIN_RATIO}x nginx", TARGET_RPS_MIN_RATIO, None),
        ("cpu", f"CPU per request <= {TARGET_CPU_MAX_RATIO}x nginx", None, TARGET_CPU_MAX_RATIO),
        ("p99", f"p99 latency <= {TARGET_P99_MAX_RATIO}x nginx", None, TARGET_P99_MAX_RATIO),
        (
            "download",
            f"download MiB/s >= {TARGET_TRANSFER_MIN_RATIO}x nginx",
            TARGET_TRANSFER_MIN_RATIO,
            None,
        ),
        ("upload", f"upload MiB/s >= {TARGET_TRANSFER_MIN_RATIO}x nginx", TARGET_TRANSFER_MIN_RATIO, None),
        ("ws", f"WS round trips/s >= {TARGET_WS_MIN_RATIO}x nginx", TARGET_WS_MIN_RATIO, None),
    ]
    print("targets:")
    for key, wording, lowest, highest in ratio_targets:
        if key not in rows:
            continue
        ratio = rows[key].ratio
        if ratio is None:
            print(f"  n/a   {wording}")
            continue
        ok = (lowest is None or ratio >= lowest) and (highest is None or ratio <= highest)
        print(f"  {'pass' if ok else 'MISS'}  {wording:<42} edge/nginx = {ratio:.2f}")
    if "idle" in rows:
        wording = f"<= {TARGET_IDLE_MAX_KIB:g} KiB RSS per idle connection (edge)"
        edge = rows["idle"].cells.get("edge")
        if isinstance(edge, float):
            ok = edge <= TARGET_IDLE_MAX_KIB
            print(f"  {'pass' if ok else 'MISS'}  {wording:<42} edge = {edge:.2f} KiB")
        else:
            print(f"  n/a   {wording}")


def direct_line(measured: Measured) -> str | None:
    """The app without a proxy: the ceiling both proxies are measured against."""
    parts = []
    if "wrk" in measured:
        parts.append(f"{measured['wrk'].requests_per_s:,.0f} requests/s")
    if "download" in measured:
        parts.append(f"download {measured['download']:,.0f} MiB/s")
    if "upload" in measured:
        parts.append(f"upload {measured['upload']:,.0f} MiB/s")
    if "ws" in measured:
        parts.append(f"{measured['ws']:,.0f} WS round trips/s")
    return "app direct, no proxy (the ceiling): " + ", ".join(parts) if parts else None


def log_problems(gateway_log: Path, nginx_error_log: Path) -> list[str]:
    """Warnings and errors the proxies logged during the run (first few lines of each)."""
    notes = []
    with contextlib.suppress(OSError):
        lines = gateway_log.read_text(errors="replace").splitlines()
        levels = (" WARNING ", " ERROR ", " CRITICAL ")
        bad = [ln for ln in lines if any(level in ln for level in levels) or ln.startswith("Traceback")]
        if bad:
            notes.append(f"gateway log: {len(bad)} warning/error lines, first: " + " | ".join(bad[:3]))
    with contextlib.suppress(OSError):
        lines = nginx_error_log.read_text(errors="replace").splitlines()
        bad = [ln for ln in lines if re.search(r"\[(warn|error|crit|alert|emerg)\]", ln)]
        if bad:
            notes.append(f"nginx error.log: {len(bad)} warn/error lines, first: " + " | ".join(bad[:3]))
    return notes


async def bench(args: argparse.Namespace) -> None:
    # SIGTERM (and SIGINT, also when a shell started us with it ignored) cancel the run, so every
    # finally below still stops nginx, deletes the VM, stops the gateway and removes the folders.
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    metrics = set(METRICS) - args.skip
    notes: list[str] = []
    runs: dict[str, list[Measured]] = {"edge": [], "nginx": []}
    direct: Measured = {}
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        upload_source = Path(tmp) / "upload.bin"
        with open(upload_source, "wb") as fh:  # noqa: ASYNC230 - a local file, created once
            fh.truncate(TRANSFER_BYTES)  # sparse: reading it costs no disk I/O
        async with served_gateway(args.workers, edge_env(args)) as gw, app_in_vm(gw) as app:
            edge = Proxy("edge", app.edge_url, lambda: edge_processes(gw.pid))
            counted_before = await edge_requests_counted(gw)
            nginx_run = running_nginx(app, args.workers, stream_buffer=args.nginx_buffer)
            async with nginx_run as (nginx, nginx_dir):
                for round_index in range(args.rounds):
                    # ABBA order, so neither proxy always runs on a warmer (or busier) machine; the idle
                    # connections are measured once (a second time would only reuse freed memory).
                    order = (edge, nginx) if round_index % 2 == 0 else (nginx, edge)
                    wanted = metrics - ({"idle"} if round_index else set())
                    for proxy in order:
                        runs[proxy.name].append(await run_metrics(proxy, wanted, args, upload_source, notes))
                notes += log_problems(gw.log_path, nginx_dir / "error.log")
            counted = await edge_requests_counted(gw) - counted_before
            notes.append(f"the edge's /metrics counted {counted:,.0f} requests during the run")
            if not args.no_direct:
                app_direct = Proxy("direct", f"http://{app.vm_ip}:{app.port}", list)
                wanted = metrics & {"rps", "download", "upload", "ws"}
                direct = await run_metrics(app_direct, wanted, args, upload_source, notes)
    rows = table_rows(metrics)
    for side, rounds in runs.items():
        fill_rows(rows, side, rounds, notes)
    print_table(rows)
    print_targets(rows)
    if line := direct_line(direct):
        print(line)
    for note in notes:
        print(f"note: {note}")


async def access_log_ab(args: argparse.Namespace) -> None:
    """``--access-log-ab``: two gateways (access log on, access log off; each with its own VM app), wrk
    on each in turn, ``--rounds`` rounds in ABBA order; no nginx."""
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    off_env = {"GATEWAY_LOG_ACCESS_LOG": "false", "GATEWAY_PROCESS_CIDR": "127.78.0.0/22", **edge_env(args)}
    results: dict[str, list[WrkResult]] = {"log on": [], "log off": []}
    async with (
        served_gateway(args.workers, edge_env(args)) as gw_on,
        app_in_vm(gw_on) as app_on,
        served_gateway(args.workers, off_env) as gw_off,
        app_in_vm(gw_off) as app_off,
    ):
        proxies = {
            "log on": Proxy("edge", app_on.edge_url, lambda: edge_processes(gw_on.pid)),
            "log off": Proxy("edge", app_off.edge_url, lambda: edge_processes(gw_off.pid)),
        }
        for round_index in range(args.rounds):
            order = ("log on", "log off") if round_index % 2 == 0 else ("log off", "log on")
            for name in order:
                results[name].append(await measure_small_requests(proxies[name], args.seconds))
    for name, rounds in results.items():
        rps = ", ".join(f"{r.requests_per_s:,.0f}" for r in rounds)
        cpu = ", ".join(f"{r.cpu_us_per_request:.1f}" for r in rounds)
        print(f"edge, access log {name[4:]:3}: req/s {rps}; CPU us per request {cpu}")
    on = sorted(r.requests_per_s for r in results["log on"])
    off = sorted(r.requests_per_s for r in results["log off"])
    print(f"median req/s, log on / log off: {on[len(on) // 2] / off[len(off) // 2]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="nginx worker_processes and gateway serve --workers (default: %(default)s)",
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="wrk and WebSocket duration (default: %(default)s)"
    )
    parser.add_argument(
        "--skip", default="", help=f"comma-separated metrics to skip, of: {','.join(METRICS)}"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds per proxy, best one reported (default: %(default)s)"
    )
    parser.add_argument(
        "--edge",
        choices=CHOICES,
        default="compiled",
        help="the gateway's edge.implementation (default: %(default)s; ./dev builds the compiled one)",
    )
    parser.add_argument(
        "--nginx-buffer",
        default=NGINX_STREAM_BUFFER,
        help="nginx's stream buffers (proxy_buffer_size, client_body_buffer_size...; default: %(default)s)",
    )
    parser.add_argument(
        "--no-direct", action="store_true", help="skip the reference run against the app without a proxy"
    )
    parser.add_argument(
        "--access-log-ab",
        action="store_true",
        help="only requests/s of the edge with its access log on against off, interleaved (no nginx)",
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.workers < 1 or args.seconds <= 0:
        parser.error("--rounds and --workers must be >= 1, --seconds > 0")
    args.skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    if unknown := args.skip - set(METRICS):
        parser.error(f"unknown metric(s) in --skip: {', '.join(sorted(unknown))}")
    for tool in ("wrk",) if args.access_log_ab else ("nginx", "wrk", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install -y nginx wrk curl")
    raise_nofile_limit(NOFILE_NEEDED)
    print(versions(args.workers, args.rounds), flush=True)
    try:
        uvloop.run(access_log_ab(args) if args.access_log_ab else bench(args))
    except asyncio.CancelledError:
        sys.exit("interrupted; everything the bench started has been stopped")


if __name__ == "__main__":
    main()
