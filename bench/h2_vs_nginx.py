"""HTTP/2 at the edge vs nginx's HTTP/2: requests/s with 100 streams on each of 8 TLS connections, on
loopback, both proxies in front of the same app (HTTP/1.1 to it, kept alive), same certificate.

    .venv/bin/python bench/h2_vs_nginx.py [--workers 1] [--seconds 5] [--rounds 2]

Needs ``nginx`` and ``h2load`` (``apt-get install -y nginx nghttp2-client``). What it does:

1. Starts ``gateway serve`` with a TLS listener and one VM running ``bench/upstream_app.py``, as
   ``tls_vs_nginx.py`` does (the gateway's self-signed default certificate for ``localhost``).
2. Starts nginx (Debian 12's 1.22: ``listen ... ssl http2``, what 1.25 writes ``http2 on``) with the same
   certificate and ciphers, proxying to the same VM address and port.
3. Runs ``h2load -c 8 -m 100`` (8 connections, 100 concurrent streams each) against each, ``--rounds``
   times in ABBA order, after a warm-up; the proxy's CPU per request from /proc as the other benches.
4. Prints the best round of each and the ratio, with failed requests.

Every load loop is bounded in time (h2load's --duration and a timeout around it); nginx, the VM and the
gateway are stopped by PID afterwards.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_vs_nginx import (
    CLOCK_TICKS_PER_S,
    SMALL_PATH,
    START_TIMEOUT_S,
    App,
    Proxy,
    app_in_vm,
    cpu_ticks,
    edge_processes,
    free_port,
    run_bounded,
    running_nginx,
    served_gateway,
    wait_accepting,
)
from tls_vs_nginx import HOST, NGINX_TLS

from gateway.tls.context import INTERMEDIATE_CIPHERS
from gateway.tls.local import DEFAULT_CERT_FILE, DEFAULT_KEY_FILE

CONNECTIONS = 8
STREAMS = 100  # concurrent streams per connection (h2load -m)
WARMUP_S = 1.0
GRACE_S = 15.0


@asynccontextmanager
async def h2_nginx(app: App, workers: int, cert: Path, key: Path) -> AsyncIterator[Proxy]:
    tls = NGINX_TLS.format(cert=cert, key=key, ciphers=INTERMEDIATE_CIPHERS)
    async with running_nginx(app, workers, tls, http2=True) as (plain, _):
        _, port = plain.host_port
        yield Proxy("nginx", f"https://{HOST}:{port}", plain.pids)


def parse_h2load(out: str) -> tuple[float, int, int]:
    """(requests/s, requests that succeeded, requests that did not) from h2load's summary."""
    rate = re.search(r"finished in [^,]+, ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    if rate is None or counts is None:
        raise RuntimeError(f"h2load's output did not parse:\n{out}")
    total, succeeded = int(counts.group(1)), int(counts.group(3))
    return float(rate.group(1)), succeeded, total - succeeded


async def h2load_run(proxy: Proxy, seconds: float) -> tuple[float, float, int]:
    """(requests/s, proxy CPU microseconds per request, failed requests) over ``seconds``."""
    url = proxy.base_url + SMALL_PATH
    argv = ["h2load", f"-c{CONNECTIONS}", f"-m{STREAMS}", "-t1"]
    await run_bounded([*argv, f"--duration={WARMUP_S:g}", url], WARMUP_S + GRACE_S)
    pids = proxy.pids()
    before = cpu_ticks(pids)
    code, out, err = await run_bounded([*argv, f"--duration={seconds:g}", url], seconds + GRACE_S)
    if code != 0:
        raise RuntimeError(f"h2load exited with {code}: {err.strip() or out.strip()}")
    used_s = (cpu_ticks(pids) - before) / CLOCK_TICKS_PER_S
    rps, succeeded, failed = parse_h2load(out)
    return rps, used_s * 1e6 / max(succeeded, 1), failed


async def bench(args: argparse.Namespace) -> None:
    tls_port = free_port()
    env = {
        "GATEWAY_TLS_LISTEN": f"127.0.0.1:{tls_port}",
        "GATEWAY_TLS_CERTS_DIR": "{data_dir}/certs",
        "GATEWAY_TLS_REDIRECT_HTTP": "false",
    }
    if args.edge:
        env["GATEWAY_EDGE_IMPLEMENTATION"] = args.edge
    async with served_gateway(args.workers, env) as gw, app_in_vm(gw) as app:
        certs = gw.log_path.parent / "certs"
        path = app.edge_url.split("/", 3)[3]
        await wait_accepting("127.0.0.1", tls_port, START_TIMEOUT_S)
        edge = Proxy("edge", f"https://{HOST}:{tls_port}/{path}", lambda: edge_processes(gw.pid))
        async with h2_nginx(app, args.workers, certs / DEFAULT_CERT_FILE, certs / DEFAULT_KEY_FILE) as nginx:
            best: dict[str, tuple[float, float, int]] = {}
            for round_no in range(args.rounds):
                for proxy in [edge, nginx] if round_no % 2 == 0 else [nginx, edge]:
                    result = await h2load_run(proxy, args.seconds)
                    if proxy.name not in best or result[0] > best[proxy.name][0]:
                        best[proxy.name] = result
    print(
        f"HTTP/2 over TLS, workers={args.workers}, best of {args.rounds} ({args.seconds:g} s each, "
        f"{CONNECTIONS} connections x {STREAMS} streams)"
    )
    e, n = best["edge"], best["nginx"]
    print(f"{'':28} {'edge':>10} {'nginx':>10} {'edge/nginx':>11}")
    print(f"{'requests/s':28} {e[0]:>10.0f} {n[0]:>10.0f} {e[0] / n[0]:>10.2f}x")
    print(f"{'CPU us per request':28} {e[1]:>10.0f} {n[1]:>10.0f} {e[1] / n[1]:>10.2f}x")
    print(f"{'failed requests':28} {e[2]:>10} {n[2]:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--edge", choices=("compiled", "pure"), default="")
    uvloop.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
