"""The VMs' DNS resolver: answers only names a VM's policy allows, and remembers what it told whom.

A VM's only resolver is this one, served on the host side of its veth (port 53, UDP). A query from an
address that is no VM of this gateway is dropped; a name the VM's policy does not allow gets NXDOMAIN
(nothing is asked upstream, so a VM cannot use DNS itself to carry data out); an allowed one is asked
of the upstream resolvers and the answer's addresses are remembered for the VM (``ResolvedNames``), so
the egress proxy can tell which names an address came from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

from gateway.egress.policy import OperatorRules, name_allowed
from gateway.egress.proxy import Seen, VmPolicies
from gateway.egress.resolved import ResolvedNames

log = logging.getLogger(__name__)

UPSTREAM_TIMEOUT_S = 3.0
MAX_QUERY_BYTES = 512  # a plain DNS query over UDP; anything bigger is not one


class VmResolver:
    def __init__(
        self,
        policies: VmPolicies,
        rules: OperatorRules,
        resolved: ResolvedNames,
        upstreams: Sequence[tuple[str, int]],
        record: Callable[[Seen], None] = lambda seen: None,
    ) -> None:
        self.policies = policies
        self.rules = rules
        self.resolved = resolved
        self.upstreams = list(upstreams)
        # Where decisions go (the proxy's: one count, one log and one denial list for both).
        self.record = record
        self.denied = 0
        self.answered = 0

    async def answer(self, wire: bytes, source: str) -> bytes | None:
        """The reply to one query from ``source`` (None: dropped)."""
        found = await self.policies.vm_at(source)
        if found is None or len(wire) > MAX_QUERY_BYTES:
            return None
        vm_id, policy = found
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            return _reply(query, dns.rcode.FORMERR)
        name = query.question[0].name.to_text(omit_final_dot=True)
        decision = name_allowed(policy, self.rules, name)
        self.record(Seen(time.time(), vm_id, "dns", "", 53, name, decision.allowed, decision.rule))
        if not decision.allowed:
            self.denied += 1
            return _reply(query, dns.rcode.NXDOMAIN)
        response = await self._ask(query)
        if response is None:
            return _reply(query, dns.rcode.SERVFAIL)
        addresses = self._remember(vm_id, response)
        self.answered += 1
        log.info("egress dns %s %s rule=%s answer=%s", vm_id, name, decision.rule, ",".join(addresses) or "-")
        response.id = query.id
        return response.to_wire()

    async def _ask(self, query: dns.message.Message) -> dns.message.Message | None:
        upstream_query = dns.message.make_query(query.question[0].name, query.question[0].rdtype)
        for host, port in self.upstreams:
            try:
                return await dns.asyncquery.udp(upstream_query, host, port=port, timeout=UPSTREAM_TIMEOUT_S)
            except (dns.exception.DNSException, OSError) as exc:
                log.warning("egress dns upstream %s:%d failed: %s", host, port, exc)
        return None

    def _remember(self, vm_id: str, response: dns.message.Message) -> list[str]:
        """The answer's addresses, remembered as what this VM was told (returned for the log)."""
        told: list[str] = []
        now = time.monotonic()
        for rrset in response.answer:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                # The name asked (CNAME chains end in another name; the VM asked for the first).
                asked = response.question[0].name.to_text(omit_final_dot=True)
                addresses = [rdata.address for rdata in rrset]
                told += addresses
                self.resolved.record(vm_id, asked, addresses, rrset.ttl, now)
                owner = rrset.name.to_text(omit_final_dot=True)
                if owner != asked:
                    self.resolved.record(vm_id, owner, addresses, rrset.ttl, now)
        return told


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire()


class ResolverProtocol(asyncio.DatagramProtocol):
    """UDP around ``VmResolver.answer``: one task per query, replies sent back to the asking address."""

    def __init__(self, resolver: VmResolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self.resolver.answer(data, addr[0])
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
