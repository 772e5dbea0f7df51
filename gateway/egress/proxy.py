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
import json
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.egress.ca import LeafMinter
from gateway.egress.inject import VmVault
from gateway.egress.intercept import Target, intercept
from gateway.egress.policy import Decision, EgressPolicy, IpNetwork, OperatorRules
from gateway.egress.policy import Protocol as WireProtocol
from gateway.egress.resolved import ResolvedNames, judge
from gateway.egress.sni import MAX_HELLO_BYTES, NEED_MORE, read_http_host, read_tls_name
from gateway.egress.splice import splice
from gateway.errors import GatewayError
from gateway.state.ports import VaultSource

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
RECENT_DENIALS_KEPT = 1000  # in this process, across VMs (the state keeps each VM's own)
# Denials waiting for the state while it cannot be written: the oldest go first beyond this.
UNREPORTED_DENIALS_KEPT = 10_000
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
    async def vm_at(self, address: str) -> tuple[str, EgressPolicy] | None:
        """The VM whose address this is and its current policy (None: not a VM of this gateway). May
        look in the state for an address it does not know yet (a VM that has just started)."""
        ...


def is_host_address(address: str) -> bool:
    """Whether ``address`` is one of this host's own, now (the kernel lets a socket bind only to those):
    closed to VMs whatever a policy says, so no VM reaches the gateway's listeners or anything else of
    the host through the proxy, on any of its addresses, one added a moment ago included. (Where the host
    allows binding to foreign addresses, ``ip_nonlocal_bind``, every address looks local: all closed.)"""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


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
    # Which destinations are the host's own (tests whose destinations are on the loopback say none).
    host_address_check: Callable[[str], bool] = is_host_address


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

    def as_json(self) -> str:
        return json.dumps(
            {
                "at": round(self.at, 3),
                "protocol": self.protocol,
                "address": self.address,
                "port": self.port,
                "name": self.name,
                "rule": self.rule,
            },
            separators=(",", ":"),
        )


@dataclass
class EgressStats:
    """The process's totals, for metrics (bounded: no per-VM labels)."""

    decisions: dict[tuple[str, bool], int] = field(default_factory=dict)  # (rule kind, allowed) -> count
    bytes_out: int = 0  # to destinations
    bytes_in: int = 0  # back to VMs


@dataclass
class Report:
    """What the proxy saw since the last report, per VM: (bytes out, bytes in) and denials (JSON)."""

    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    denials: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.counts or self.denials)


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
        vaults: VaultSource | None = None,
        upstream_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.policies = policies
        self.resolved = resolved
        self.destination = destination
        # Server contexts signed by the deployment's egress CA, for the hosts whose TLS is terminated
        # here: vault services' hosts (``intercept``), for VMs made with vault_ids.
        self.minter = minter
        self.vaults = vaults
        # How the proxy checks those hosts when it opens TLS to them itself (default: the system's roots).
        self.upstream_tls = upstream_tls or ssl.create_default_context()
        self.stats = EgressStats()
        self._recent_denials: deque[Seen] = deque(maxlen=RECENT_DENIALS_KEPT)
        self._unreported_denials: deque[Seen] = deque(maxlen=UNREPORTED_DENIALS_KEPT)
        self._unreported_bytes: dict[str, tuple[int, int]] = {}
        self._active: set[asyncio.Task[object]] = set()

    @property
    def open_connections(self) -> int:
        return len(self._active)

    def denials(self, vm_id: str) -> list[Seen]:
        """The VM's refused connections this process still remembers, newest last."""
        return [seen for seen in self._recent_denials if seen.vm_id == vm_id]

    def take_report(self) -> Report:
        """What was seen since the last call (for the state: usage and the API's denial lists)."""
        report = Report(counts=self._unreported_bytes)
        for seen in self._unreported_denials:
            report.denials.setdefault(seen.vm_id, []).append(seen.as_json())
        self._unreported_bytes = {}
        self._unreported_denials.clear()
        return report

    def put_back(self, report: Report) -> None:
        """A report the state could not take: counted again with the next one (denials are dropped
        rather than reordered; the log has them)."""
        for vm_id, (out, back) in report.counts.items():
            self._count(vm_id, out, back)

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
        found = await self.policies.vm_at(peer[0]) if peer else None
        if found is None:
            return  # not one of our VMs: nothing to say to it
        vm_id, policy = found
        address, port = self.destination(writer.get_extra_info("socket"))
        first, protocol, name = await self._hello(reader)
        decision = judge(
            policy, self.settings.rules, self.resolved, vm_id, protocol, address, port, name, time.monotonic()
        )
        if decision.allowed and self.settings.host_address_check(address):
            decision = Decision(False, "denied_network:host")  # whatever a CIDR says
        if decision.allowed and not self._dialable(address):
            decision = Decision(False, "dial_not_permitted")
        self.record(Seen(time.time(), vm_id, protocol, address, port, name, decision.allowed, decision.rule))
        if not decision.allowed:
            if protocol == "http":
                writer.write(_refusal(decision, name or address))
                await writer.drain()
            return
        vault = await self._vault_for(vm_id, name) if protocol == "tls" and name else None
        if vault is not None and self.minter is not None and name is not None:
            carried = await intercept(
                reader,
                writer,
                first,
                Target(vm_id, name, address, port),
                vault,
                self.minter.context_for(name),
                self.upstream_tls,
                self.vaults.log_vault_request if self.vaults else _no_log,
                connect_timeout_s=self.settings.connect_timeout_s,
                idle_timeout_s=self.settings.idle_timeout_s,
            )
        else:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                dest_reader, dest_writer = await asyncio.open_connection(address, port)
            carried = await splice(
                reader,
                writer,
                dest_reader,
                dest_writer,
                idle_timeout_s=self.settings.idle_timeout_s,
                first=first,
            )
        self._count(vm_id, carried.to_destination, carried.to_vm)
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

    async def _vault_for(self, vm_id: str, name: str) -> VmVault | None:
        """The VM's vaults when one of their services binds ``name`` (then this connection is opened)."""
        if self.vaults is None or self.minter is None:
            return None
        try:
            vault = await self.vaults.vm_vault(vm_id)
        except GatewayError as exc:
            # Passed through untouched: the host then gets the placeholder, never a secret.
            log.warning("egress: cannot read the vaults of %s (%s); %s not intercepted", vm_id, exc, name)
            return None
        return vault if vault is not None and vault.intercepts(name) else None

    def _dialable(self, address: str) -> bool:
        if not self.settings.dial_networks:
            return True
        ip = ipaddress.ip_address(address)
        return any(ip.version == n.version and ip in n for n in self.settings.dial_networks)

    def _count(self, vm_id: str, out: int, back: int) -> None:
        self.stats.bytes_out += out
        self.stats.bytes_in += back
        was_out, was_in = self._unreported_bytes.get(vm_id, (0, 0))
        self._unreported_bytes[vm_id] = (was_out + out, was_in + back)

    def record(self, seen: Seen) -> None:
        """One decision: counted; a denial also logged and kept for the VM's denial list."""
        kind = seen.rule.split(":", 1)[0]
        key = (kind, seen.allowed)
        self.stats.decisions[key] = self.stats.decisions.get(key, 0) + 1
        if not seen.allowed:
            self._recent_denials.append(seen)
            self._unreported_denials.append(seen)
            log.info(
                "egress denied %s %s %s:%d name=%s rule=%s",
                seen.vm_id, seen.protocol, seen.address, seen.port, seen.name, seen.rule,
            )  # fmt: skip


async def _no_log(vault_id: str, entry: Mapping[str, Any]) -> None:
    return None


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
