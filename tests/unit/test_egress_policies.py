"""The egress plane's view of the VMs' policies (``egress.service.Policies``), with a plain source."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.egress.policy import DEFAULT_POLICY, EgressPolicy
from gateway.egress.service import MISS_REFRESH_S, Policies
from gateway.state.events import EgressPolicyChanged, VmChanged, VmReleased


class Source:
    def __init__(self) -> None:
        self.vms: dict[str, tuple[str, dict[str, Any]]] = {}
        self.reads = 0
        self.gate: asyncio.Event | None = None

        self._read = asyncio.Event()

    async def egress_policies(self) -> dict[str, tuple[str, dict[str, Any]]]:
        self.reads += 1
        answer = dict(self.vms)  # as the state is when the read begins
        if self.gate is not None:
            await self.gate.wait()
        self._read.set()
        return answer

    async def read_again(self) -> None:
        """Returns once the plane has read the state (again)."""
        self._read.clear()
        await self._read.wait()


async def test_a_vm_that_has_just_started_is_known_at_its_first_question() -> None:
    """Regression: a VM's first DNS question within the refresh interval after it started was dropped
    (its program then waited out a 5 s resolver timeout)."""
    source = Source()
    policies = Policies(source)
    await policies.refresh()
    source.vms["10.9.0.2"] = ("vm-new", {"allow_https": True})
    found = await policies.vm_at("10.9.0.2")
    assert found == ("vm-new", EgressPolicy(allow_https=True))


async def test_an_empty_stored_policy_is_the_default_and_unknown_addresses_are_none() -> None:
    source = Source()
    source.vms["10.9.0.3"] = ("vm-a", {})
    policies = Policies(source)
    assert await policies.vm_at("10.9.0.3") == ("vm-a", DEFAULT_POLICY)
    assert await policies.vm_at("10.9.0.99") is None


async def test_questions_from_unknown_addresses_share_the_reads_of_the_state() -> None:
    source = Source()
    policies = Policies(source)
    source.gate = asyncio.Event()
    asking = [asyncio.ensure_future(policies.vm_at(f"10.9.1.{i}")) for i in range(20)]
    await asyncio.sleep(0)  # the first began a read; the others wait for one begun after they asked
    source.gate.set()
    assert await asyncio.gather(*asking) == [None] * 20
    assert source.reads == 2  # not 20
    # Right after, an unknown address reads again, but waits for MISS_REFRESH_S since the last read.
    started = time.monotonic()
    assert await policies.vm_at("10.9.1.1") is None
    assert source.reads == 3 and time.monotonic() - started >= MISS_REFRESH_S * 0.9


async def test_an_ended_vm_is_forgotten_at_once_so_its_address_is_never_judged_as_its() -> None:
    """Regression: an address freed by one VM and given to the next kept the first VM's policy (and its
    id, for the log and the usage) until the next refresh."""
    source = Source()
    source.vms["10.9.0.5"] = ("vm-old", {"allowed_cidrs": ["0.0.0.0/0"]})
    policies = Policies(source)
    await policies.refresh()
    source.vms["10.9.0.5"] = ("vm-new", {})
    policies.handle(VmReleased("vm-old", "netns", 5))
    assert await policies.vm_at("10.9.0.5") == ("vm-new", DEFAULT_POLICY)


async def test_a_refresh_asked_after_a_change_is_not_answered_by_a_read_begun_before_it() -> None:
    source = Source()
    source.vms["10.9.0.6"] = ("vm-a", {})
    policies = Policies(source)
    source.gate = asyncio.Event()
    early = asyncio.ensure_future(policies.refresh())  # a read begins, with the old policy
    await asyncio.sleep(0)
    source.vms["10.9.0.6"] = ("vm-a", {"allow_https": True})  # the change, then the ask
    late = asyncio.ensure_future(policies.refresh())
    await asyncio.sleep(0)
    source.gate.set()
    await asyncio.gather(early, late)
    assert source.reads == 2
    assert await policies.vm_at("10.9.0.6") == ("vm-a", EgressPolicy(allow_https=True))


async def test_an_event_makes_the_plane_read_again_without_waiting_for_the_safety_net() -> None:
    source = Source()
    policies = Policies(source)
    following = asyncio.ensure_future(policies.follow())
    try:
        policies.connected()  # hearing events: the next safety-net read is FULL_REFRESH_S away
        await asyncio.wait_for(source.read_again(), 1.0)
        policies.handle(EgressPolicyChanged(vm_id="vm-a"))
        await asyncio.wait_for(source.read_again(), 1.0)
        policies.handle(VmChanged("vm-b", "session-b", "active"))  # e.g. resumed
        await asyncio.wait_for(source.read_again(), 1.0)
    finally:
        following.cancel()
