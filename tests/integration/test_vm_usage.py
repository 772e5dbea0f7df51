"""Per-VM usage and limits (issue 23.6): a VM's own cap on exchanges under the operator's ceiling, what
is open to a VM now in its session's usage (through the SDK), and the per-VM scrape /metrics/vms."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from tests.conftest import GatewayUnderTest
from tests.integration.test_edge import APP_PORT, echo_app_command
from tests.integration.test_edge_limits import status_within
from tests.integration.test_sdk import poll, sdk

# Every test here runs on each edge (the compiled one and the pure-Python one).
pytestmark = pytest.mark.both_edges


async def app_vm(gw: GatewayUnderTest, **fields: object) -> tuple[str, str, str]:
    """A VM made with ``fields``, running the echo app on APP_PORT: (session id, VM id, app URL)."""
    status, vm = await gw.request("POST", "/v1/vms", json=fields)
    assert status == 200, vm
    command = {"session_id": vm["session_id"], "language": "bash", "command": echo_app_command(APP_PORT)}
    status, out = await gw.request("POST", "/execute", json=command)
    assert (status, out["exit_code"]) == (200, 0), out
    status, app = await gw.request("GET", f"/v1/sessions/app-url/{vm['session_id']}?port={APP_PORT}")
    assert status == 200, app
    return vm["session_id"], vm["vm_id"], app["url"]


async def test_a_vms_own_cap_applies_under_the_operators_ceiling(gateway_factory: object) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", edge={"max_exchanges_per_vm": 3})  # type: ignore[operator]
    _, capped, capped_url = await app_vm(gw, max_exchanges=1)
    _, _, roomy_url = await app_vm(gw, max_exchanges=50)  # above the ceiling: the ceiling holds
    status, shown = await gw.request("GET", f"/v1/vms/{capped}")
    assert (status, shown["max_exchanges"]) == (200, 1)
    async with aiohttp.ClientSession() as client:
        stream = await client.get(capped_url + "sse")  # in flight until its client lets go
        try:
            async with client.get(capped_url + "echo") as resp:
                assert (resp.status, resp.headers["X-Gateway-Error"]) == (429, "too_many_vm_exchanges")
                assert resp.headers["Retry-After"] == "1"
            # Raised while the stream is open: every edge drops the VM's cached route at once.
            status, changed = await gw.request("PATCH", f"/v1/vms/{capped}", json={"max_exchanges": 2})
            assert (status, changed["max_exchanges"]) == (200, 2)
            assert await status_within(client, capped_url + "echo", 200)
        finally:
            stream.close()
        streams = [await client.get(roomy_url + "sse") for _ in range(3)]
        try:
            async with client.get(roomy_url + "echo") as resp:
                assert (resp.status, resp.headers["X-Gateway-Error"]) == (429, "too_many_vm_exchanges")
        finally:
            for held in streams:
                held.close()
    for bad in (-1, 100_001, "many"):
        status, body = await gw.request("POST", "/v1/vms", json={"max_exchanges": bad})
        assert status == 422 and body["detail"][0]["loc"] == ["body", "max_exchanges"], body
        status, body = await gw.request("PATCH", f"/v1/vms/{capped}", json={"max_exchanges": bad})
        assert status == 422, body


async def test_what_is_open_to_a_vm_shows_in_its_usage_and_in_the_per_vm_scrape(
    gateway_factory: object,
) -> None:
    """A WebSocket and a stream open to a VM: the session's usage (the SDK's get_usage) and
    /metrics/vms say 2 exchanges, 1 of them a tunnel, while they last, then 0; /metrics names no VM."""
    gw: GatewayUnderTest = await gateway_factory("process", edge={"traffic_flush_s": 0.1})  # type: ignore[operator]
    client = await asyncio.to_thread(sdk, gw)
    await asyncio.to_thread(client.execute, echo_app_command(APP_PORT), language="bash")
    app = await asyncio.to_thread(client.get_session_app_url, port=APP_PORT)
    url, vm_id = app["url"], app["vm_id"]
    admin = f"http://{gw.config.admin.listen}"

    async def usage_with(exchanges: int, tunnels: int, requests: int = 0) -> dict[str, object] | None:
        usage = await asyncio.to_thread(client.get_usage)
        opened = (usage["open_exchanges"], usage["open_tunnels"]) == (exchanges, tunnels)
        return usage if opened and usage["requests"] >= requests else None  # type: ignore[operator]

    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(url + "echo") as resp:
                assert resp.status == 200
        stream = await http.get(url + "sse")
        ws = await http.ws_connect(url + "ws")
        try:
            await poll(lambda: usage_with(2, 1))
            async with http.get(admin + "/metrics/vms") as resp:
                assert resp.status == 200
                per_vm = await resp.text()
            labels = f'session_id="{client.session_id}",vm_id="{vm_id}"'
            assert sample(per_vm, "gateway_vm_open_exchanges", labels) == 2
            assert sample(per_vm, "gateway_vm_open_tunnels", labels) == 1
            assert sample(per_vm, "gateway_vm_requests_total", labels) >= 3  # (flushed each 0.1 s)
            async with http.get(admin + "/metrics") as resp:
                assert "vm_id=" not in await resp.text()  # the bounded scrape stays bounded
        finally:
            stream.close()
            await ws.close()
        # Nothing open, and everything counted (an exchange's count lands with the flush after it ends).
        usage = await poll(lambda: usage_with(0, 0, requests=5))
        assert usage["requests"] == 5


def sample(text: str, name: str, labels: str) -> float:
    found = re.search(rf"^{name}{{{re.escape(labels)}}} (\S+)$", text, re.M)
    assert found is not None, (name, labels, text)
    return float(found.group(1))
