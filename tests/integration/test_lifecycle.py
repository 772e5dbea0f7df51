"""Lifetimes and restarts: VMs die at expiry, also when it passed while the gateway was down."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.state.events import Event, VmChanged
from gateway.state.records import VM_KILLED, VmRecord
from tests.conftest import DRIVERS, IS_ROOT, GatewayUnderTest
from tests.fakes import EventQueue

EVENT_TIMEOUT_S = 10.0
SHORT = {"vms": {"min_lifetime_s": 1}}


@contextlib.asynccontextmanager
async def hearing(gw: GatewayUnderTest) -> AsyncIterator[Callable[[float], Awaitable[Event | None]]]:
    """A function that waits up to N seconds for the next event the gateway's feed hears."""
    heard = EventQueue()
    gw.services.events.add(heard)

    async def next_event(timeout_s: float) -> Event | None:
        try:
            return await asyncio.wait_for(heard.get(), timeout_s)
        except TimeoutError:
            return None

    try:
        yield next_event
    finally:
        gw.services.events.remove(heard)


async def wait_for_end(gw: GatewayUnderTest, vm_id: str) -> dict:
    """Wait for the pub/sub event that announces the VM's end (what every edge listens to)."""
    async with asyncio.timeout(EVENT_TIMEOUT_S), hearing(gw) as next_event:
        rec = await gw.services.store.get_vm(vm_id)
        while rec is not None and rec.status not in ("killed", "failed"):
            event = await next_event(1.0)
            if isinstance(event, VmChanged) and event.vm_id == vm_id:
                return {"vm_id": vm_id, "status": event.status}
            rec = await gw.services.store.get_vm(vm_id)
        return {"vm_id": vm_id, "status": rec.status if rec else None}


async def wait_for_release(gw: GatewayUnderTest, rec: VmRecord) -> None:
    """Wait until the VM's slot is free again (announced by a ``VmReleased`` event)."""
    async with asyncio.timeout(EVENT_TIMEOUT_S), hearing(gw) as next_event:
        while (await gw.services.store.held_slots(rec.driver)).get(rec.slot) == rec.vm_id:
            await next_event(1.0)


async def test_vm_is_killed_at_expiry(gateway_factory: object) -> None:
    for driver in ("process", "netns") if IS_ROOT else ("process",):
        gw: GatewayUnderTest = await gateway_factory(driver, **SHORT)  # type: ignore[operator]
        status, vm = await gw.request("POST", "/v1/vms", json={"vm_lifetime_seconds": 1})
        assert (status, vm["status"]) == (200, "active")
        event = await wait_for_end(gw, vm["vm_id"])
        assert event["status"] == VM_KILLED
        status, body = await gw.request("GET", f"/v1/sessions/status/{vm['session_id']}")
        assert (body["vm_status"], body["vm_alive"], body["expires_in_seconds"]) == ("killed", False, 0)
        rec = await gw.services.store.get_vm(vm["vm_id"])
        assert rec.error == "lifetime expired"
        await wait_for_release(gw, rec)
        info = await gw.services.orchestrator.driver.inspect(rec.vm_id, rec.handle)
        assert not info.running
        await gw.stop()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_restart_keeps_vms_and_reaps_what_expired_meanwhile(
    gateway_factory: object, driver: str
) -> None:
    first: GatewayUnderTest = await gateway_factory(driver, **SHORT)  # type: ignore[operator]
    status, keeper = await first.request("POST", "/v1/vms", json={"vm_lifetime_seconds": 120})
    status, short = await first.request("POST", "/v1/vms", json={"vm_lifetime_seconds": 2})
    status, lost = await first.request("POST", "/v1/vms", json={"vm_lifetime_seconds": 120})
    await first.request(
        "POST",
        "/execute",
        json={"session_id": keeper["session_id"], "language": "bash", "command": "echo 1 > mark"},
    )
    lost_rec = await first.services.store.get_vm(lost["vm_id"])
    short_rec = await first.services.store.get_vm(short["vm_id"])
    await first.stop()
    # While the gateway is down: one VM dies on the host, one passes its expiry (no event announces
    # that, so this waits for the clock).
    await first.services.orchestrator.driver.destroy(lost_rec.vm_id, lost_rec.handle)
    await asyncio.sleep(max(0.0, short_rec.expires_at - time.time()))

    second: GatewayUnderTest = await gateway_factory(driver, **SHORT)  # type: ignore[operator]
    second.api_key, second.key_id = first.api_key, first.key_id
    lost_now = await second.services.store.get_vm(lost["vm_id"])
    assert (lost_now.status, lost_now.error) == ("killed", "VM stopped unexpectedly")
    assert (await wait_for_end(second, short["vm_id"]))["status"] == VM_KILLED
    status, out = await second.request(
        "POST",
        "/execute",
        json={"session_id": keeper["session_id"], "language": "bash", "command": "cat mark"},
    )
    assert (status, out["stdout"], out["vm_id"]) == (200, "1\n", keeper["vm_id"])
