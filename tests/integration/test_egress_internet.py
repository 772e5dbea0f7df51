"""The egress resolver and proxy against a test internet (hosts in network namespaces on 198.18/15, named
in bind9): a name the policy allows is resolved and reached; a denied name gets NXDOMAIN; a connection
to an address no allowed name gave, or with a Host that did not resolve there, is refused and the test
host never sees a packet; the dial allow-list keeps even a bug from dialling anywhere else. (The nftables
redirect from a VM comes with the drivers; here the proxy is handed the original destination.)"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from gateway.egress.policy import EgressPolicy, OperatorRules
from gateway.egress.proxy import EgressProxy, ProxySettings
from gateway.egress.resolved import ResolvedNames
from gateway.egress.resolver import ResolverProtocol, VmResolver
from tests.acme_env import AcmeTestEnv
from tests.internet_env import INTERNET, InternetHost, internet_hosts

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None, reason="namespaces need root and iproute2"
    ),
]

VM_ID = "vmid-internet000000001"
ALLOWED, DENIED = "web.example.test", "other.example.test"
POLICY = EgressPolicy(allow_http=True, allowed_domains=(ALLOWED,))


class Policies:
    async def vm_at(self, address: str) -> tuple[str, EgressPolicy] | None:
        return (VM_ID, POLICY) if address == "127.0.0.1" else None


@dataclass
class Plane:
    hosts: list[InternetHost]
    resolver_port: int
    proxy: EgressProxy
    proxy_port: int
    target: list[tuple[str, int]]


@pytest.fixture
async def plane(acme_env: AcmeTestEnv) -> AsyncIterator[Plane]:
    with internet_hosts(2) as hosts:
        await acme_env.set_record(ALLOWED, "A", hosts[0].address)
        await acme_env.set_record(DENIED, "A", hosts[1].address)
        resolved = ResolvedNames()
        rules = OperatorRules()
        resolver = VmResolver(Policies(), rules, resolved, [("127.0.0.1", acme_env.dns_port)])
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: ResolverProtocol(resolver), local_addr=("127.0.0.1", 0)
        )
        target: list[tuple[str, int]] = []
        settings = ProxySettings(rules=rules, dial_networks=(INTERNET,), hello_timeout_s=0.5)
        proxy = EgressProxy(settings, Policies(), resolved, destination=lambda _sock: target[0])
        listener = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        try:
            yield Plane(
                hosts,
                transport.get_extra_info("sockname")[1],
                proxy,
                listener.sockets[0].getsockname()[1],
                target,
            )
        finally:
            listener.close()
            await proxy.close()
            await listener.wait_closed()
            transport.close()


async def resolve(plane: Plane, name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.udp(query, "127.0.0.1", port=plane.resolver_port, timeout=5)


async def fetch(plane: Plane, address: str, host: str) -> bytes:
    plane.target[:] = [(address, 80)]
    reader, writer = await asyncio.open_connection("127.0.0.1", plane.proxy_port)
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_an_allowed_name_is_resolved_and_reached(plane: Plane) -> None:
    answer = await resolve(plane, ALLOWED)
    addresses = [r.address for rrset in answer.answer for r in rrset]
    assert addresses == [plane.hosts[0].address]
    reply = await fetch(plane, addresses[0], ALLOWED)
    assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(f"hello from tnet-0 {ALLOWED}".encode())


async def test_denied_names_and_unresolved_addresses_never_reach_the_host(plane: Plane) -> None:
    denied = await resolve(plane, DENIED)
    assert denied.rcode() == dns.rcode.NXDOMAIN  # though bind9 has it
    before = plane.hosts[1].packets_received()
    # By address, claiming the allowed name: it never resolved there (a lying Host).
    lying = await fetch(plane, plane.hosts[1].address, ALLOWED)
    assert lying.startswith(b"HTTP/1.1 403") and b"name_not_resolved_to_address" in lying
    # By address, claiming the denied name.
    refused = await fetch(plane, plane.hosts[1].address, DENIED)
    assert refused.startswith(b"HTTP/1.1 403")
    assert plane.hosts[1].packets_received() == before  # not one packet, not even a SYN
    assert [d.rule for d in plane.proxy.denials(VM_ID)] == ["name_not_resolved_to_address"] * 2
