"""The official InstaVM SDK (``pip install instavm``) against a real gateway and a real VM (issue 19).

The SDK is synchronous (``requests``): its calls run in a thread, so the gateway keeps serving on the
test's loop. What it covers here is what works today; issue 19 adds the rest point by point.
"""

from __future__ import annotations

import asyncio
import urllib.request

from instavm import InstaVM

from tests.conftest import GatewayUnderTest
from tests.integration.test_edge import APP_PORT, ECHO_APP


def sdk(gw: GatewayUnderTest) -> InstaVM:
    base_url = f"http://{gw.config.server.host}:{gw.config.server.port}"
    # timeout: the VM's lifetime, and the SDK's default request timeout.
    return InstaVM(gw.api_key, base_url=base_url, timeout=120)


def fetch(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, resp.read()


async def test_a_session_runs_code_serves_an_app_and_ends(gateway_factory: object) -> None:
    gw: GatewayUnderTest = await gateway_factory("process")  # type: ignore[operator]
    client = await asyncio.to_thread(sdk, gw)  # starts its session at once, as users see it
    assert client.session_id

    result = await asyncio.to_thread(client.execute, "echo from-the-sdk", language="bash")
    assert result["exit_code"] == 0 and "from-the-sdk" in result["stdout"]
    result = await asyncio.to_thread(client.execute, "print(6 * 7)", language="python")
    assert result["stdout"].strip() == "42"

    status = await asyncio.to_thread(client.get_session_status)
    assert status["session_id"] == client.session_id

    started = await asyncio.to_thread(client.execute, f"python3 {ECHO_APP} {APP_PORT}", language="bash")
    assert started["exit_code"] == 0
    app = await asyncio.to_thread(client.get_session_app_url, port=APP_PORT)
    code, body = await asyncio.to_thread(fetch, app["url"] + "echo")
    assert code == 200 and body

    vm_id = app["vm_id"]
    record = await asyncio.to_thread(client.vms.get, vm_id)
    assert record["vm_id"] == vm_id and record["status"] == "active"
    await asyncio.to_thread(client.vms.delete, vm_id)
    record = await asyncio.to_thread(client.vms.get, vm_id)
    assert record["status"] != "active"
