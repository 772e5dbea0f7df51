"""The VMs' resolver against a real authoritative server (the bind9 fixture): allowed names are
answered and remembered for the VM, denied ones get NXDOMAIN without asking upstream, strangers and
garbage get nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from gateway.egress.policy import EgressPolicy, OperatorRules
from gateway.egress.resolved import ResolvedNames
from gateway.egress.resolver import ResolverProtocol, VmResolver
from tests.acme_env import AcmeTestEnv

VM_ID = "vmid-resolver0000000001"
POLICY = EgressPolicy(allow_https=True, allowed_domains=("app.example.test",))


class Policies:
    async def vm_at(self, address: str) -> tuple[str, EgressPolicy] | None:
        return (VM_ID, POLICY) if address == "127.0.0.1" else None


@pytest.fixture
async def served(acme_env: AcmeTestEnv) -> AsyncIterator[tuple[VmResolver, int]]:
    resolver = VmResolver(Policies(), OperatorRules(), ResolvedNames(), [("127.0.0.1", acme_env.dns_port)])
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: ResolverProtocol(resolver), local_addr=("127.0.0.1", 0)
    )
    try:
        yield resolver, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


async def ask(port: int, name: str, source: str = "127.0.0.1") -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, source=source, timeout=5)


async def test_allowed_names_are_answered_and_remembered(served: tuple[VmResolver, int]) -> None:
    resolver, port = served
    reply = await ask(port, "app.example.test")
    assert reply.rcode() == dns.rcode.NOERROR
    assert [r.address for rrset in reply.answer for r in rrset] == ["127.0.0.1"]
    assert resolver.resolved.names_for(VM_ID, "127.0.0.1", time.monotonic()) == {"app.example.test"}


async def test_denied_names_get_nxdomain_and_are_not_asked_upstream(served: tuple[VmResolver, int]) -> None:
    resolver, port = served
    reply = await ask(port, "example.test")  # it exists upstream, but the policy does not allow it
    assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
    assert (resolver.denied, resolver.answered) == (1, 0)
    assert resolver.resolved.names_for(VM_ID, "127.0.0.1", time.monotonic()) == set()


async def test_strangers_and_garbage_get_nothing(served: tuple[VmResolver, int]) -> None:
    resolver, port = served
    with pytest.raises(dns.exception.Timeout):
        await dns.asyncquery.udp(
            dns.message.make_query("app.example.test", "A"),
            "127.0.0.1",
            port=port,
            source="127.0.0.9",
            timeout=1,
        )
    assert await resolver.answer(b"\x00\x01garbage", "127.0.0.1") is None
    assert await resolver.answer(b"x" * 600, "127.0.0.1") is None
