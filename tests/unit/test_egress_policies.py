"""The egress plane's view of the VMs' policies (``egress.service.Policies``), with a plain source."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.egress.policy import DEFAULT_POLICY, EgressPolicy
from gateway.egress.service import MISS_REFRESH_S, Policies


class Source:
    def __init__(self) -> None:
        self.vms: dict[str, tuple[str, dict[str, Any]]] = {}
        self.reads = 0
        self.gate: asyncio.Event | None = None

    async def egress_policies(self) -> dict[str, tuple[str, dict[str, Any]]]:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        return dict(self.vms)


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


async def test_questions_from_unknown_addresses_share_one_read_of_the_state() -> None:
    source = Source()
    policies = Policies(source)
    source.gate = asyncio.Event()
    asking = [asyncio.ensure_future(policies.vm_at(f"10.9.1.{i}")) for i in range(20)]
    await asyncio.sleep(0)  # every question is waiting on the one read
    source.gate.set()
    assert await asyncio.gather(*asking) == [None] * 20
    assert source.reads == 1
    # Right after, an unknown address reads again, but waits for MISS_REFRESH_S since the last read.
    started = time.monotonic()
    assert await policies.vm_at("10.9.1.1") is None
    assert source.reads == 2 and time.monotonic() - started >= MISS_REFRESH_S * 0.9
