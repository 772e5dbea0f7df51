"""The one place the egress proxy opens a VM's TLS: requests to a host a vault service binds, where the
VM's placeholder in the service's header is replaced by the secret (``inject``). Every other connection
stays end-to-end TLS, never read.

The VM's side is served with a leaf for the host from the deployment's CA (its images trust it); the
ClientHello the proxy already read and judged is fed in first, so this runs over the same stream. The
request head is read, checked (``http_head``), given its secrets and ``Connection: close`` (one request
per connection: each one passes here and is logged), and sent over a new TLS connection to the host,
verified against the system's roots (or ``upstream_tls``'s); then bytes go both ways. What the vault's
request log keeps: time, VM, host, method, path without its query, status; never headers or bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.egress.http_head import (
    MAX_HEAD_BYTES,
    BadHead,
    RequestHead,
    one_request,
    parse_request_head,
    render_request_head,
    response_status,
)
from gateway.egress.inject import VmVault, inject
from gateway.egress.policy import name_matches
from gateway.egress.splice import READ_BYTES, Carried
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 30.0
LogRequest = Callable[[str, Mapping[str, Any]], Awaitable[None]]


class TlsSide:
    """TLS served to the VM over the proxy's stream (``ssl.SSLObject`` over memory buffers)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        context: ssl.SSLContext,
        first: bytes,
    ) -> None:
        self.reader, self.writer = reader, writer
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)
        self._in.write(first)

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionResetError("the VM closed during the TLS handshake") from None
        await self._flush()

    async def read(self) -> bytes:
        """Some plaintext; b"" at the end (close_notify, or the VM's connection ended)."""
        while True:
            try:
                return self._tls.read(READ_BYTES)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def write(self, data: bytes) -> None:
        self._tls.write(data)  # into memory: never wants to wait
        await self._flush()

    async def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, ConnectionError, OSError):
            self._tls.unwrap()  # our close_notify (the VM's answer is not waited for)
        with contextlib.suppress(ConnectionError, OSError):
            await self._flush()

    async def _fill(self) -> bool:
        chunk = await self.reader.read(READ_BYTES)
        if not chunk:
            self._in.write_eof()
            return False
        self._in.write(chunk)
        return True

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()


@dataclass(frozen=True)
class Target:
    vm_id: str
    name: str
    address: str
    port: int


async def read_head(side: TlsSide) -> tuple[RequestHead, bytes]:
    """The request head and what came after it (the body's start)."""
    buffer = b""
    async with asyncio.timeout(HEAD_TIMEOUT_S):
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > MAX_HEAD_BYTES:
                raise BadHead("head too large")
            chunk = await side.read()
            if not chunk:
                raise BadHead("the connection ended before a request head")
            buffer += chunk
    head, rest = buffer.split(b"\r\n\r\n", 1)
    return parse_request_head(head), rest


async def intercept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    first: bytes,
    target: Target,
    vault: VmVault,
    server_context: ssl.SSLContext,
    upstream_tls: ssl.SSLContext,
    log_request: LogRequest,
    *,
    connect_timeout_s: float,
    idle_timeout_s: float,
) -> Carried:
    carried = Carried()
    side = TlsSide(reader, writer, server_context, first)
    await side.handshake()
    try:
        head, rest = await read_head(side)
    except (BadHead, TimeoutError) as exc:
        await side.write(_plain(400, f"egress: not a request this proxy forwards ({exc})"))
        await side.close()
        return carried
    injection = inject(head.headers, target.name, vault.services, vault.placeholders, vault.secrets)
    outgoing = one_request(RequestHead(head.method, head.target, head.version, injection.headers))
    try:
        async with asyncio.timeout(connect_timeout_s):
            up_reader, up_writer = await asyncio.open_connection(
                target.address, target.port, ssl=upstream_tls, server_hostname=target.name
            )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        log.info("egress vault %s %s: cannot reach it: %s", target.vm_id, target.name, exc)
        await side.write(_plain(502, f"egress: cannot reach {target.name} ({type(exc).__name__})"))
        await side.close()
        await _log(log_request, vault, injection.used, target, head, 502)
        return carried
    status: list[int | None] = [None]
    try:
        upstream_head = render_request_head(outgoing)
        up_writer.write(upstream_head + rest)
        carried.to_destination += len(upstream_head) + len(rest)
        await _carry(side, up_reader, up_writer, carried, status, idle_timeout_s)
    finally:
        up_writer.close()
        await side.close()
        await _log(log_request, vault, injection.used, target, head, status[0])
    return carried


async def _carry(
    side: TlsSide,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    carried: Carried,
    status: list[int | None],
    idle_timeout_s: float,
) -> None:
    """Bytes both ways until the destination ends its answer (its ``Connection: close``), the VM goes,
    or both are quiet for ``idle_timeout_s``."""

    async def up() -> None:
        while chunk := await side.read():
            up_writer.write(chunk)
            await up_writer.drain()
            carried.to_destination += len(chunk)

    async def down() -> None:
        while chunk := await up_reader.read(READ_BYTES):
            if status[0] is None:
                status[0] = response_status(chunk)
            await side.write(chunk)
            carried.to_vm += len(chunk)

    ups, downs = asyncio.ensure_future(up()), asyncio.ensure_future(down())
    try:
        async with asyncio.timeout(idle_timeout_s) as deadline:
            pending = {ups, downs}
            while downs in pending:  # the answer's end is what ends the exchange
                before = carried.to_destination + carried.to_vm
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED, timeout=1.0)
                if carried.to_destination + carried.to_vm != before:
                    deadline.reschedule(asyncio.get_running_loop().time() + idle_timeout_s)
    except (TimeoutError, ConnectionError, OSError, ssl.SSLError):
        pass
    finally:
        for task in (ups, downs):
            task.cancel()
        await asyncio.gather(ups, downs, return_exceptions=True)


async def _log(
    log_request: LogRequest,
    vault: VmVault,
    used: tuple[str, ...],
    target: Target,
    head: RequestHead,
    status: int | None,
) -> None:
    """One entry per vault whose service binds the host (with the credential put in, if one was)."""
    entry: dict[str, object] = {
        "at": time.time(),
        "vm_id": target.vm_id,
        "host": target.name,
        "method": head.method.decode("latin-1"),
        "path": head.path,
        "status": status,
    }
    by_vault: dict[str, str | None] = {}
    credential_id: str | None
    for credential_id in used:
        by_vault[vault.vault_of.get(credential_id, "")] = credential_id
    for service in vault.services:
        vault_id = vault.vault_of.get(service.credential_id, "")
        if vault_id and vault_id not in by_vault and name_matches(target.name, service.host):
            by_vault[vault_id] = None
    for vault_id, credential_id in by_vault.items():
        if not vault_id:
            continue
        with contextlib.suppress(GatewayError):  # a log the state cannot take loses a line, not the request
            await log_request(vault_id, {**entry, "credential_id": credential_id})
    log.info(
        "egress vault %s %s %s %s -> %s injected=%d",
        target.vm_id, target.name, entry["method"], entry["path"], status, len(used),
    )  # fmt: skip


def _plain(status: int, text: str) -> bytes:
    body = (text + "\n").encode()
    reason = {400: "Bad Request", 502: "Bad Gateway"}[status]
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"X-Gateway-Error: egress\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
