"""The egress proxy: every outbound TCP connection of a VM, redirected here by the host's nftables, is
judged by name and address and, if its policy allows it, dialled by the gateway and spliced.

Per connection: who the VM is (by its source address), where it was going (``SO_ORIGINAL_DST``), what
name it asks for (the TLS ClientHello's SNI or the HTTP Host, read without terminating anything), the
decision (``resolved.judge``), then the dial (only into ``dial_networks`` when set: tests confine it to
their own test hosts) and the splice. Every decision is logged and kept in a short per-VM list of
denials, so a user can see why ``pip install`` failed. An HTTP request that is refused gets a 403 that
says why; anything else is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.egress.ca import LeafMinter
from gateway.egress.policy import Decision, EgressPolicy, IpNetwork, OperatorRules
from gateway.egress.policy import Protocol as WireProtocol
from gateway.egress.resolved import ResolvedNames, judge
from gateway.egress.sni import MAX_HELLO_BYTES, NEED_MORE, read_http_host, read_tls_name
from gateway.egress.splice import splice

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
DENIALS_KEPT = 100
HTTP_METHODS = (
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"PATCH ",
    b"OPTIONS ",
    b"CONNECT ",
    b"TRACE ",
)


class VmPolicies(Protocol):
    def vm_at(self, address: str) -> tuple[str, EgressPolicy] | None:
        """The VM whose address this is and its current policy (None: not a VM of this gateway)."""
        ...


@dataclass(frozen=True)
class ProxySettings:
    rules: OperatorRules
    # Where the proxy may dial at all (empty: anywhere the policy allows); tests set their test range.
    dial_networks: tuple[IpNetwork, ...] = ()
    connect_timeout_s: float = 10.0
    # How long a connection may stay silent before it is judged by address alone (servers that speak
    # first: SSH, SMTP).
    hello_timeout_s: float = 2.0
    idle_timeout_s: float = 600.0


@dataclass(frozen=True)
class Seen:
    """One decision, as the log and the VM's denial list show it."""

    at: float
    vm_id: str
    protocol: str
    address: str
    port: int
    name: str | None
    allowed: bool
    rule: str


@dataclass
class EgressStats:
    decisions: dict[tuple[str, bool], int] = field(default_factory=dict)  # (rule kind, allowed) -> count
    bytes_out: dict[str, int] = field(default_factory=dict)  # VM id -> bytes to destinations
    bytes_in: dict[str, int] = field(default_factory=dict)  # VM id -> bytes back


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected IPv4 connection was going (a sockaddr_in: family, port, address)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")


class EgressProxy:
    def __init__(
        self,
        settings: ProxySettings,
        policies: VmPolicies,
        resolved: ResolvedNames,
        destination: Callable[[socket.socket], tuple[str, int]] = original_destination,
        *,
        minter: LeafMinter | None = None,
    ) -> None:
        self.settings = settings
        self.policies = policies
        self.resolved = resolved
        self.destination = destination
        # Server contexts signed by the deployment's egress CA, for the hosts whose TLS is terminated
        # here (vault hosts; not used yet).
        self.minter = minter
        self.stats = EgressStats()
        self._denials: dict[str, deque[Seen]] = {}
        self._active: set[asyncio.Task[object]] = set()

    def denials(self, vm_id: str) -> list[Seen]:
        """The VM's recent refused connections, newest last."""
        return list(self._denials.get(vm_id, ()))

    def forget(self, vm_id: str) -> None:
        self._denials.pop(vm_id, None)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, OSError, TimeoutError) as exc:
            log.debug("egress connection ended: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            if task is not None:
                self._active.discard(task)

    async def close(self) -> None:
        """End every connection in flight (the gateway stops; the listener is closed first)."""
        for task in list(self._active):
            task.cancel()
        await asyncio.gather(*self._active, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        found = self.policies.vm_at(peer[0]) if peer else None
        if found is None:
            return  # not one of our VMs: nothing to say to it
        vm_id, policy = found
        address, port = self.destination(writer.get_extra_info("socket"))
        first, protocol, name = await self._hello(reader)
        decision = judge(
            policy, self.settings.rules, self.resolved, vm_id, protocol, address, port, name, time.monotonic()
        )
        if decision.allowed and not self._dialable(address):
            decision = Decision(False, "dial_not_permitted")
        self._record(Seen(time.time(), vm_id, protocol, address, port, name, decision.allowed, decision.rule))
        if not decision.allowed:
            if protocol == "http":
                writer.write(_refusal(decision, name or address))
                await writer.drain()
            return
        async with asyncio.timeout(self.settings.connect_timeout_s):
            dest_reader, dest_writer = await asyncio.open_connection(address, port)
        carried = await splice(
            reader, writer, dest_reader, dest_writer, idle_timeout_s=self.settings.idle_timeout_s, first=first
        )
        self.stats.bytes_out[vm_id] = self.stats.bytes_out.get(vm_id, 0) + carried.to_destination
        self.stats.bytes_in[vm_id] = self.stats.bytes_in.get(vm_id, 0) + carried.to_vm
        log.info(
            "egress %s %s %s:%d name=%s rule=%s out=%d in=%d",
            vm_id, protocol, address, port, name, decision.rule, carried.to_destination, carried.to_vm,
        )  # fmt: skip

    async def _hello(self, reader: asyncio.StreamReader) -> tuple[bytes, WireProtocol, str | None]:
        """What the VM sent first, the protocol it speaks and the name it asks for."""
        data = b""
        deadline = asyncio.get_running_loop().time() + self.settings.hello_timeout_s
        while len(data) < MAX_HELLO_BYTES:
            left = deadline - asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(max(left, 0.0)):
                    chunk = await reader.read(MAX_HELLO_BYTES - len(data))
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            if data[:1] == b"\x16":
                name = read_tls_name(data)
                if name != NEED_MORE:
                    return data, "tls", name
            elif data.startswith(HTTP_METHODS) or any(m.startswith(data) for m in HTTP_METHODS):
                host = read_http_host(data)
                if host != NEED_MORE:
                    return data, "http", host
            else:
                return data, "tcp", None
        if data[:1] == b"\x16":
            return data, "tls", None
        return data, ("http" if data.startswith(HTTP_METHODS) else "tcp"), None

    def _dialable(self, address: str) -> bool:
        if not self.settings.dial_networks:
            return True
        ip = ipaddress.ip_address(address)
        return any(ip.version == n.version and ip in n for n in self.settings.dial_networks)

    def _record(self, seen: Seen) -> None:
        kind = seen.rule.split(":", 1)[0]
        key = (kind, seen.allowed)
        self.stats.decisions[key] = self.stats.decisions.get(key, 0) + 1
        if not seen.allowed:
            self._denials.setdefault(seen.vm_id, deque(maxlen=DENIALS_KEPT)).append(seen)
            log.info(
                "egress denied %s %s %s:%d name=%s rule=%s",
                seen.vm_id, seen.protocol, seen.address, seen.port, seen.name, seen.rule,
            )  # fmt: skip


def _refusal(decision: Decision, target: str) -> bytes:
    body = (
        f"egress to {target} is not allowed by this sandbox's policy ({decision.rule}); "
        "see GET /v1/egress/vm/{id} and its denials\n"
    ).encode()
    head = (
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"X-Gateway-Error: egress_denied\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body
