"""TLS at the edge vs nginx: new handshakes per second and requests/s over kept-alive TLS, on loopback,
both proxies serving the same certificate in front of the same app.

    .venv/bin/python bench/tls_vs_nginx.py [--workers 1] [--seconds 5] [--rounds 2]

Needs ``nginx`` and ``wrk`` (``apt-get install -y nginx wrk``). What it does:

1. Starts ``gateway serve`` with a TLS listener (``GATEWAY_TLS_LISTEN``) and one VM running
   ``bench/upstream_app.py``, as ``edge_vs_nginx.py`` does. The gateway makes its self-signed default
   certificate (EC P-256, for ``localhost``) in its certs folder on start.
2. Starts nginx with ``ssl_certificate`` pointing at those same files, TLS 1.2 and 1.3 with the same
   cipher list as the edge (Mozilla intermediate), proxying to the same VM address and port.
3. Measures on each, ``--rounds`` times in ABBA order, with wrk over ``https://localhost``:
   - new handshakes/s: every request on a new connection (``Connection: close``; wrk keeps no TLS
     session, so each is a full handshake) - this is the cost of a client that does not keep alive;
   - kept-alive requests/s of the 100-byte response, and the proxy's CPU microseconds per request.
4. Prints the best round of each side by side with the ratio.

Every load loop is bounded in time; nginx, the VM and the gateway are stopped by PID afterwards.
"""

from __future__ import annotations

import argparse
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
    WRK_CONNECTIONS,
    WRK_GRACE_S,
    WRK_THREADS,
    WRK_WARMUP_S,
    App,
    Proxy,
    app_in_vm,
    cpu_ticks,
    edge_processes,
    free_port,
    parse_wrk,
    run_bounded,
    running_nginx,
    served_gateway,
    wait_accepting,
)

from gateway.tls.context import INTERMEDIATE_CIPHERS
from gateway.tls.local import DEFAULT_CERT_FILE, DEFAULT_KEY_FILE

HOST = "localhost"  # the name the default certificate carries, and wrk's SNI and Host

NGINX_TLS = """
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {ciphers};
        ssl_prefer_server_ciphers off;"""


@asynccontextmanager
async def tls_nginx(app: App, workers: int, cert: Path, key: Path) -> AsyncIterator[Proxy]:
    """``edge_vs_nginx``'s nginx, its listener speaking TLS with the given certificate."""
    tls = NGINX_TLS.format(cert=cert, key=key, ciphers=INTERMEDIATE_CIPHERS)
    async with running_nginx(app, workers, tls) as (plain, _):
        _, port = plain.host_port
        # nginx proxies its root to the app (the edge strips its /v1/app/... prefix the same way).
        yield Proxy("nginx", f"https://{HOST}:{port}", plain.pids)


async def wrk_run(proxy: Proxy, seconds: float, *, new_connections: bool) -> tuple[float, float, int]:
    """(requests/s, proxy CPU microseconds per request, failed requests) over ``seconds``."""
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", "--latency"]
    if new_connections:
        argv += ["-H", "Connection: close"]
    url = proxy.base_url + SMALL_PATH
    await run_bounded([*argv, f"-d{WRK_WARMUP_S}s", url], WRK_WARMUP_S + WRK_GRACE_S)
    pids = proxy.pids()
    before = cpu_ticks(pids)
    code, out, err = await run_bounded([*argv, f"-d{seconds:g}s", url], seconds + WRK_GRACE_S)
    if code != 0:
        raise RuntimeError(f"wrk exited with {code}: {err.strip()}")
    used_s = (cpu_ticks(pids) - before) / CLOCK_TICKS_PER_S
    rps, _, _, requests, non_2xx, socket_errors = parse_wrk(out)
    return rps, used_s * 1e6 / max(requests, 1), non_2xx + socket_errors


async def bench(args: argparse.Namespace) -> None:
    tls_port = free_port()
    env = {
        "GATEWAY_TLS_LISTEN": f"127.0.0.1:{tls_port}",
        "GATEWAY_TLS_CERTS_DIR": "{data_dir}/certs",
        "GATEWAY_TLS_REDIRECT_HTTP": "false",
    }
    async with served_gateway(args.workers, env) as gw, app_in_vm(gw) as app:
        certs = gw.log_path.parent / "certs"
        path = app.edge_url.split("/", 3)[3]
        await wait_accepting("127.0.0.1", tls_port, START_TIMEOUT_S)
        edge = Proxy("edge", f"https://{HOST}:{tls_port}/{path}", lambda: edge_processes(gw.pid))
        async with tls_nginx(app, args.workers, certs / DEFAULT_CERT_FILE, certs / DEFAULT_KEY_FILE) as nginx:
            best: dict[tuple[str, str], tuple[float, float, int]] = {}
            for round_no in range(args.rounds):
                order = [edge, nginx] if round_no % 2 == 0 else [nginx, edge]
                for proxy in order:
                    for kind, fresh in (("handshakes", True), ("keep-alive", False)):
                        result = await wrk_run(proxy, args.seconds, new_connections=fresh)
                        key = (proxy.name, kind)
                        if key not in best or result[0] > best[key][0]:
                            best[key] = result
    print(
        f"TLS, workers={args.workers}, best of {args.rounds} "
        f"({args.seconds:g} s each, {WRK_CONNECTIONS} connections)"
    )
    print(f"{'':34} {'edge':>10} {'nginx':>10} {'edge/nginx':>11}")
    for kind, label in (("handshakes", "new TLS handshakes/s"), ("keep-alive", "kept-alive TLS requests/s")):
        e, n = best[("edge", kind)], best[("nginx", kind)]
        print(f"{label:34} {e[0]:>10.0f} {n[0]:>10.0f} {e[0] / n[0]:>10.2f}x")
        print(f"{'  CPU us per request':34} {e[1]:>10.0f} {n[1]:>10.0f} {e[1] / n[1]:>10.2f}x")
        if e[2] or n[2]:
            print(f"{'  failed requests':34} {e[2]:>10} {n[2]:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    uvloop.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
