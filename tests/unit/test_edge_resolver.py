"""The route cache's own logic, against an in-memory store (Redis itself is covered by test_edge.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.edge.resolver import Resolver
from gateway.edge.target import route_key
from gateway.state.events import VmChanged
from gateway.state.records import VmRecord
from tests.fakes import FakeEventFeed, NoRoutes

# Every test here runs on each edge (the compiled one and the pure-Python one): tests/conftest.py.
pytestmark = pytest.mark.both_edges

VM_ID = "vmid-0123456789abcdef0123"
SESSION_ID = "6f1c1c52-7c1a-4d55-9a7e-3d6c2f0a9b11"


def vm_record(ip: str = "172.30.0.2", status: str = "active", lifetime_s: float = 300) -> VmRecord:
    now = time.time()
    return VmRecord(
        vm_id=VM_ID, session_id=SESSION_ID, owner="o", driver="netns", slot=0, ip=ip, status=status,
        created_at=now, vm_lifetime_seconds=300, memory_mb=128, vcpu_count=1, expires_at=now + lifetime_s,
    )  # fmt: skip


class SlowStore(NoRoutes):
    """A RouteSource that knows one VM by its id. Counts lookups; each waits for `release`, so tests
    decide when Redis 'answers'."""

    def __init__(self, vm: VmRecord) -> None:
        self.vm = vm
        self.calls = 0
        self.release = asyncio.Event()

    async def vm_and_port(self, vm_id: str, port: int) -> tuple[VmRecord | None, bool]:
        self.calls += 1
        await self.release.wait()
        return (self.vm if vm_id == self.vm.vm_id else None), port == 3000


def resolver(store: SlowStore) -> Resolver:
    res = Resolver(store, ["172.30.0.0/16"])
    FakeEventFeed().add(res)  # as if following the events channel
    return res


async def test_concurrent_misses_share_one_lookup() -> None:
    store = SlowStore(vm_record())
    res = resolver(store)
    lookups = [asyncio.ensure_future(res.by_vm(VM_ID, 3000)) for _ in range(50)]
    await asyncio.sleep(0)
    store.release.set()
    routes = await asyncio.gather(*lookups)
    assert store.calls == 1
    assert {r.ip for r in routes if r is not None} == {"172.30.0.2"} and None not in routes
    assert await res.by_vm(VM_ID, 3000) is not None and store.calls == 1  # now a cache hit


async def test_an_answer_older_than_an_invalidation_is_not_cached() -> None:
    store = SlowStore(vm_record())
    res = resolver(store)
    lookup = asyncio.ensure_future(res.by_vm(VM_ID, 3000))
    await asyncio.sleep(0)
    res.handle(VmChanged(VM_ID, SESSION_ID, "killed"))
    store.release.set()
    assert await lookup is not None  # what Redis said when asked
    store.vm = vm_record(status="killed")
    assert await res.by_vm(VM_ID, 3000) is None  # asked again, not served from the cache
    assert store.calls == 2


async def test_addresses_outside_the_vm_networks_are_never_returned() -> None:
    store = SlowStore(vm_record(ip="169.254.169.254"))
    store.release.set()
    assert await resolver(store).by_vm(VM_ID, 3000) is None


async def test_a_cached_route_ends_with_its_vms_lifetime_within_the_cache_ttl() -> None:
    store = SlowStore(vm_record(lifetime_s=0.3))
    store.release.set()
    res = resolver(store)
    route = await res.by_vm(VM_ID, 3000)
    assert route is not None and res.peek(route_key("v", VM_ID, 3000)) is route  # cached (the TTL is 2 s)
    assert route.expires_at is not None
    await asyncio.sleep(max(0.0, route.expires_at - time.time()) + 0.01)  # the VM's lifetime ends
    assert res.peek(route_key("v", VM_ID, 3000)) is not route
    assert await res.by_vm(VM_ID, 3000) is None and store.calls == 2  # asked again: it is over
