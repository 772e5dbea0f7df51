"""The browser image's program, run inside the instance's VM: headless Chromium behind a DevTools proxy.

``python -m gateway.guest.browser --port 9222`` starts Debian's ``chromium`` with its DevTools server on
loopback (Chromium ignores ``--remote-debugging-address`` since headless became the only mode, and it
answers only requests whose Host is an IP address or ``localhost``, its guard against DNS rebinding).
So this program serves the VM's address and relays to it:

- HTTP (``/json/version``, ``/json/list``, ``PUT /json/new``...) with Host set to Chromium's own address,
  and the URLs in the answer (``webSocketDebuggerUrl``, ``devtoolsFrontendUrl``) rewritten to the public
  host the edge reports in ``X-Forwarded-Host`` / ``X-Forwarded-Proto``, so clients can follow them;
- WebSocket (the DevTools protocol itself) message by message, both ways, with no size limit (screenshots
  are large); a cross-origin handshake is refused (Chromium's own origin check cannot see the client).

The VM runs while this program does: it exits when Chromium exits, and stops Chromium when it is stopped.
Its log (and Chromium's) is ``browser.log`` in the VM's home folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
from aiohttp import web

log = logging.getLogger("gateway.guest.browser")

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DEVTOOLS_PORT_FILE = "DevToolsActivePort"
DEVTOOLS_START_TIMEOUT_S = 30.0
# How long a stopping proxy lets in-flight requests finish.
SHUTDOWN_TIMEOUT_S = 1.0
POLL_S = 0.05
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer", "proxy-connection"}
)
CHROMIUM_FLAGS = (
    "--headless",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-breakpad",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort
)


def chromium_argv(binary: str, profile: Path) -> list[str]:
    argv = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    if os.geteuid() == 0:
        # Chromium's own sandbox refuses to run as root; the VM (namespaces, cgroups) is the boundary.
        argv.append("--no-sandbox")
    return [*argv, "about:blank"]


async def wait_devtools_port(profile: Path, chromium: asyncio.subprocess.Process) -> int:
    port_file = profile / DEVTOOLS_PORT_FILE
    async with asyncio.timeout(DEVTOOLS_START_TIMEOUT_S):
        while True:
            if chromium.returncode is not None:
                raise RuntimeError(
                    f"chromium exited with status {chromium.returncode} before DevTools started"
                )
            with contextlib.suppress(OSError):
                port = devtools_port(port_file.read_text())
                if port is not None:
                    return port
            await asyncio.sleep(POLL_S)


def devtools_port(text: str) -> int | None:
    """The port in a DevToolsActivePort file, or None while Chromium is still writing it.

    Chromium writes "<port>\n<browser path>" in place, not atomically: the file can be read empty or
    cut inside the port ("92"), so only a first line ended by its newline counts.
    """
    first, newline, _rest = text.partition("\n")
    if not newline or not first.isascii() or not first.isdigit():
        return None
    port = int(first)
    return port if 0 < port < 65536 else None


def public_urls(body: bytes, internal: str, host: str, secure: bool) -> bytes:
    """Chromium's URLs name its loopback address: make them the public host's (wss:// behind TLS)."""
    loopback = internal.encode()
    if secure:
        body = body.replace(b"ws://" + loopback, b"wss://" + loopback)
        body = body.replace(b"ws=" + loopback, b"wss=" + loopback)  # devtoolsFrontendUrl's parameter
    return body.replace(loopback, host.encode())


def aiohttp_version() -> tuple[int, int]:
    major, minor = aiohttp.__version__.split(".")[:2]
    return int(major), int(minor)


class DevToolsProxy:
    """Relays HTTP and WebSocket requests from the VM's address to Chromium's loopback DevTools server."""

    def __init__(self, devtools_port: int) -> None:
        self.internal = f"127.0.0.1:{devtools_port}"
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        # No total timeout: a DevTools WebSocket lives as long as the client keeps it.
        # Bodies pass through as Chromium encoded them. (A session-wide setting: the images' aiohttp is
        # Debian 12's 3.8, whose request() takes no auto_decompress.)
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=10), auto_decompress=False
        )

    async def _close(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    @staticmethod
    def public_host(request: web.Request) -> tuple[str, bool]:
        host = request.headers.get("X-Forwarded-Host") or request.host
        return host, request.headers.get("X-Forwarded-Proto", "http") == "https"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.relay_websocket(request)
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = self.internal
        async with self.session.request(
            request.method,
            f"http://{self.internal}{request.rel_url}",
            headers=headers,
            data=await request.read() if request.body_exists else None,
            allow_redirects=False,
        ) as upstream:
            body = await upstream.read()
            if upstream.content_type == "application/json":
                body = public_urls(body, self.internal, *self.public_host(request))
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            out.pop("Content-Length", None)
            return web.Response(status=upstream.status, body=body, headers=out)

    async def relay_websocket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        host, secure = self.public_host(request)
        if origin is not None and origin != f"{'https' if secure else 'http'}://{host}":
            return web.Response(status=403, text="cross-origin DevTools connections are refused\n")
        assert self.session is not None
        try:
            upstream = await self.session.ws_connect(
                f"ws://{self.internal}{request.rel_url}", max_msg_size=0, autoping=True
            )
        except aiohttp.ClientError as exc:
            return web.Response(status=502, text=f"chromium refused the DevTools connection: {exc}\n")
        client = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await client.prepare(request)

        async def pump(
            source: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
            sink: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
        ) -> None:
            async for msg in source:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await sink.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await sink.send_bytes(msg.data)
            await sink.close()

        # (try/finally, not ``async with upstream``: aiohttp 3.8's client WebSocket is no context manager)
        tasks = [asyncio.create_task(pump(client, upstream)), asyncio.create_task(pump(upstream, client))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await upstream.close()
        await client.close()
        return client


async def run(port: int, host: str, home: Path, chromium_log: BinaryIO) -> int:
    binary = next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)
    if binary is None:
        log.error("no chromium binary (install Debian's chromium package)")
        return 127
    profile = home / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    chromium = await asyncio.create_subprocess_exec(
        *chromium_argv(binary, profile),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=chromium_log,
        stderr=chromium_log,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner: web.AppRunner | None = None
    try:
        devtools_port = await wait_devtools_port(profile, chromium)
        # The drain deadline moved from the site to the runner in aiohttp 3.9; the netns driver's browser
        # image has Debian 12's 3.8, whose runner hands unknown arguments to every connection's handler
        # (a TypeError that closed each connection before its request was read).
        drain: dict[str, Any] = {"shutdown_timeout": SHUTDOWN_TIMEOUT_S}
        new_aiohttp = aiohttp_version() >= (3, 9)
        runner = web.AppRunner(
            DevToolsProxy(devtools_port).app(), access_log=None, **(drain if new_aiohttp else {})
        )
        await runner.setup()
        await web.TCPSite(runner, host, port, **({} if new_aiohttp else drain)).start()
        log.info("DevTools of chromium (pid %d) served on %s:%d", chromium.pid, host, port)
        exited = asyncio.create_task(chromium.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([exited, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if exited.done():
            log.info("chromium exited with status %s", chromium.returncode)
        return 0 if stop.is_set() else 1
    finally:
        if chromium.returncode is None:
            chromium.terminate()
            try:
                await asyncio.wait_for(chromium.wait(), 5)
            except TimeoutError:
                chromium.kill()
                await chromium.wait()
        if runner is not None:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9222, help="port to serve DevTools on (the VM's address)")
    parser.add_argument(
        "--host", default=os.environ.get("VM_IP", "127.0.0.1"), help="address (default $VM_IP)"
    )
    args = parser.parse_args(argv)
    home = Path(os.environ.get("HOME") or Path.cwd())
    logging.basicConfig(
        filename=home / "browser.log", level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    # Chromium's own output and this program's errors go to stderr, the VM init's log, whose end the
    # gateway shows when the browser fails to start.
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    logging.getLogger().addHandler(errors)
    try:
        return asyncio.run(run(args.port, args.host, home, sys.stderr.buffer))
    except RuntimeError as exc:
        log.error("the browser image failed: %s", exc)
        return 1
    except Exception:
        log.exception("the browser image failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
