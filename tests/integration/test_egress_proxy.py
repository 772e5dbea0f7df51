"""The egress proxy over real loopback sockets: decisions by HTTP Host, TLS SNI and address, a lying SNI,
servers that speak first, half-close, the dial allow-list, and the VM's denial list. (The redirect by
nftables and the VM's resolver come with the drivers; here the original destination is handed in.)"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from gateway.egress.policy import EgressPolicy, OperatorRules
from gateway.egress.proxy import EgressProxy, ProxySettings
from gateway.egress.resolved import ResolvedNames

VM_ID = "vmid-egress000000000001"
API, OTHER, RAW = "127.0.0.2", "127.0.0.3", "127.0.0.4"
POLICY = EgressPolicy(
    allow_http=True, allow_https=True, allowed_domains=("api.example.test",), allowed_cidrs=(f"{RAW}/32",)
)
# Loopback stands in for the internet here: the built-in closed networks are lifted for the test only.
RULES = OperatorRules(always_closed=())


def client_hello(server_name: str) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


@dataclass
class Destination:
    """A server at ``address``: records what each connection sent; answers what ``reply`` says."""

    address: str
    banner: bytes = b""
    received: list[bytes] = field(default_factory=list)
    accepted: int = 0
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.banner:
            writer.write(self.banner)
        data = await reader.read()  # to the client's half-close
        self.received.append(data)
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()


@dataclass
class Rig:
    proxy: EgressProxy
    port: int
    destinations: dict[str, Destination]
    target: list[tuple[str, int]]

    async def connect(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.target[:] = [(address, self.destinations[address].port)]
        return await asyncio.open_connection("127.0.0.1", self.port)


class Policies:
    def __init__(self, policy: EgressPolicy = POLICY) -> None:
        self.policy = policy

    async def vm_at(self, address: str) -> tuple[str, EgressPolicy] | None:
        return (VM_ID, self.policy) if address == "127.0.0.1" else None


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    destinations = {a: Destination(a) for a in (API, OTHER, RAW)}
    destinations[RAW].banner = b"SSH-2.0-test\r\n"
    servers = []
    for dest in destinations.values():
        server = await asyncio.start_server(dest.serve, dest.address, 0)
        dest.port = server.sockets[0].getsockname()[1]
        servers.append(server)
    resolved = ResolvedNames()
    now = time.monotonic()  # (the proxy's clock)
    resolved.record(VM_ID, "api.example.test", [API], ttl_s=300, now=now)
    resolved.record(VM_ID, "other.example.test", [OTHER], ttl_s=300, now=now)
    target: list[tuple[str, int]] = []
    settings = ProxySettings(
        rules=RULES,
        dial_networks=(ipaddress.ip_network("127.0.0.0/29"),),
        hello_timeout_s=0.3,
        idle_timeout_s=5,
        host_address_check=lambda _address: False,  # its destinations are on this host's loopback
    )
    proxy = EgressProxy(settings, Policies(), resolved, destination=lambda _sock: target[0])
    listener = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    try:
        yield Rig(proxy, listener.sockets[0].getsockname()[1], destinations, target)
    finally:
        listener.close()
        await proxy.close()
        for server in [listener, *servers]:
            server.close()
            await server.wait_closed()


async def exchange(rig: Rig, address: str, data: bytes) -> bytes:
    reader, writer = await rig.connect(address)
    writer.write(data)
    writer.write_eof()  # a half-close: the answer still comes back
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_http_is_judged_by_its_host(rig: Rig) -> None:
    request = b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n"
    assert await exchange(rig, API, request) == b"echo:" + request
    denied = await exchange(rig, OTHER, b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n")
    assert denied.startswith(b"HTTP/1.1 403 Forbidden") and b"not_allowed" in denied
    assert rig.destinations[OTHER].accepted == 0  # a refused destination is never dialled
    assert [(d.name, d.rule) for d in rig.proxy.denials(VM_ID)] == [("other.example.test", "not_allowed")]
    report = rig.proxy.take_report()  # what the state gets: the VM's bytes both ways, its denials
    assert report.counts == {VM_ID: (len(request), len(b"echo:" + request))}
    assert [json.loads(d)["rule"] for d in report.denials[VM_ID]] == ["not_allowed"]
    assert not rig.proxy.take_report()  # each reported once


async def test_tls_is_judged_by_its_sni_and_a_lying_sni_is_refused(rig: Rig) -> None:
    hello = client_hello("api.example.test")
    assert await exchange(rig, API, hello) == b"echo:" + hello  # passed through untouched
    lying = await exchange(rig, OTHER, client_hello("api.example.test"))  # a name that resolved elsewhere
    assert lying == b"" and rig.destinations[OTHER].accepted == 0
    assert rig.proxy.denials(VM_ID)[-1].rule == "name_not_resolved_to_address"


async def test_raw_tcp_by_cidr_and_a_server_that_speaks_first(rig: Rig) -> None:
    reader, writer = await rig.connect(RAW)
    try:
        banner = await asyncio.wait_for(reader.readline(), 10)  # the client says nothing first
        assert banner == b"SSH-2.0-test\r\n"
        writer.write(b"client-hello")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"echo:client-hello"
    finally:
        writer.close()


async def test_the_dial_allow_list_bounds_even_an_allowing_policy(rig: Rig) -> None:
    outside = await asyncio.start_server(Destination("127.0.0.9").serve, "127.0.0.9", 0)
    try:
        rig.destinations["127.0.0.9"] = Destination("127.0.0.9", port=outside.sockets[0].getsockname()[1])
        rig.proxy.policies = Policies(EgressPolicy(allowed_cidrs=("127.0.0.0/8",)))
        assert await exchange(rig, "127.0.0.9", b"x") == b""
        assert rig.proxy.denials(VM_ID)[-1].rule == "dial_not_permitted"
    finally:
        outside.close()
        await outside.wait_closed()


async def test_a_stranger_gets_nothing(rig: Rig) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.7", 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", rig.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    rig.target[:] = [(API, rig.destinations[API].port)]
    writer.write(b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert rig.destinations[API].accepted == 0
