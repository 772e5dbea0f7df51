"""The official InstaVM SDK (``pip install instavm``) against a real gateway and a real VM (issue 19).

The SDK is synchronous (``requests``): its calls run in a thread, so the gateway keeps serving on the
test's loop. What it covers here is what works today; issue 19 adds the rest point by point.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import requests
from instavm import InstaVM
from instavm.exceptions import InstaVMError, SessionError

from tests.conftest import GatewayUnderTest
from tests.integration.test_edge import APP_PORT, ECHO_APP

T = TypeVar("T")


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


def http_error(exc: BaseException) -> requests.HTTPError:
    """The HTTP error under an SDK exception (the SDK raises its own from inside the handler)."""
    cause = exc if isinstance(exc, requests.HTTPError) else exc.__context__
    assert isinstance(cause, requests.HTTPError), exc
    return cause


async def poll(check: Callable[[], Awaitable[T | None]], limit_s: float = 15.0) -> T:
    """The first non-None answer of ``check``, asked again every 0.1 s up to ``limit_s``."""
    async with asyncio.timeout(limit_s):
        while True:
            answer = await check()
            if answer is not None:
                return answer
            await asyncio.sleep(0.1)


async def test_sessions_identity_and_lists_as_the_sdk_reads_them(gateway_factory: object) -> None:
    gw: GatewayUnderTest = await gateway_factory("process")  # type: ignore[operator]
    base_url = f"http://{gw.config.server.host}:{gw.config.server.port}"
    client = await asyncio.to_thread(
        InstaVM, gw.api_key, base_url=base_url, timeout=120, metadata={"team": "red"}
    )

    # execute() without a language runs Python, as the SDK's first example expects.
    result = await asyncio.to_thread(client.execute, "import sys; print(sys.version_info[0] * 14)")
    assert result["stdout"].strip() == "42", result
    info = await asyncio.to_thread(client.get_session_info)
    assert (info["session_id"], info["status"], info["metadata"]) == (
        client.session_id,
        "active",
        {"team": "red"},
    )
    vm_id = info["vm_id"]

    me = await asyncio.to_thread(client.get_current_user)
    assert (me["key_id"], me["name"]) == (gw.key_id, "test") and me["created_at"]

    # The lists are bare arrays: the SDK reads anything else as "nothing".
    assert [v["vm_id"] for v in await asyncio.to_thread(client.vms.list)] == [vm_id]
    assert [v["vm_id"] for v in await asyncio.to_thread(client.list_sandboxes, {"team": "red"})] == [vm_id]
    assert await asyncio.to_thread(client.list_sandboxes, {"team": "blue"}) == []
    assert await asyncio.to_thread(client.snapshots.list) == []
    assert await asyncio.to_thread(client.custom_domains.list) == []
    with pytest.raises(SessionError) as refused:
        await asyncio.to_thread(client.list_sandboxes, None, 1001)
    answer = http_error(refused.value).response
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["query", "limit"]

    # Traffic through the edge counts in the session's usage, with the commands run.
    await asyncio.to_thread(client.execute, f"python3 {ECHO_APP} {APP_PORT}", language="bash")
    app = await asyncio.to_thread(client.get_session_app_url, port=APP_PORT)
    code, body = await asyncio.to_thread(fetch, app["url"] + "echo")
    assert code == 200

    async def counted() -> dict[str, object] | None:
        usage = await asyncio.to_thread(client.get_usage)
        return usage if usage["bytes_out"] >= len(body) else None  # type: ignore[operator]

    usage = await poll(counted)
    assert usage["session_id"] == client.session_id and usage["executions"] == 2
    assert usage["requests"] == 1  # the app's one request (API calls are not the VM's traffic)
    assert usage["vm_count"] == 1 and usage["vm_seconds"] > 0  # type: ignore[operator]
    assert usage["cpu_seconds"] is None  # the process driver has no cgroups: unknown, not zero

    # Another key sees none of it.
    other = InstaVM(await gw.new_key(), base_url=base_url, auto_start_session=False)
    for call in (other.get_session_info, other.kill):
        with pytest.raises(InstaVMError) as hidden:
            await asyncio.to_thread(call, client.session_id)
        assert http_error(hidden.value).response.status_code == 404
    other.session_id = client.session_id
    with pytest.raises(requests.HTTPError) as hidden_usage:
        await asyncio.to_thread(other.get_usage)
    assert hidden_usage.value.response.status_code == 404
    assert await asyncio.to_thread(other.vms.list_all_records) == []

    killed = await asyncio.to_thread(client.kill, client.session_id)
    assert (killed["killed"], killed["vm_id"], killed["status"]) == (True, vm_id, "killed")
    assert await asyncio.to_thread(client.vms.list) == []
    records = await asyncio.to_thread(client.vms.list_all_records)
    assert [(v["vm_id"], v["status"]) for v in records] == [(vm_id, "killed")]
    info = await asyncio.to_thread(client.get_session_info)
    assert (info["status"], info["executions"]) == ("ended", 2)
    again = await asyncio.to_thread(client.kill, client.session_id)
    assert again["killed"] is False


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the netns driver needs root")
async def test_session_usage_reads_the_vms_cgroup(gateway_factory: object) -> None:
    gw: GatewayUnderTest = await gateway_factory("netns")  # type: ignore[operator]
    client = await asyncio.to_thread(sdk, gw)
    burn = (
        "import time\nblock = bytearray(96 << 20)\n"
        "end = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    )
    await asyncio.to_thread(client.execute, burn)
    live = await asyncio.to_thread(client.get_usage)
    assert live["cpu_seconds"] >= 0.5 and live["peak_memory_bytes"] >= 96 << 20, live
    session_id = client.session_id
    await asyncio.to_thread(client.kill)  # (the SDK forgets its session id here)
    client.session_id = session_id
    # Read from the cgroup just before the driver removed it, and kept on the record.
    ended = await asyncio.to_thread(client.get_usage)
    assert (
        ended["cpu_seconds"] >= live["cpu_seconds"]
        and ended["peak_memory_bytes"] >= live["peak_memory_bytes"]
    )


async def test_what_the_gateway_does_not_offer_answers_501_saying_why(gw: GatewayUnderTest) -> None:
    client = await asyncio.to_thread(sdk, gw)
    calls: list[tuple[Callable[..., object], tuple[object, ...]]] = [
        (client.tapes.list, ()),
        (client.recordings.list, ()),
        (client.credits.allocation, ()),
        (client.webhooks.list_endpoints, ()),
        (client.api_keys.list, ()),
        (client.audit.catalog, ()),
        (client.computer_use.get, ("some-session", "api/screen")),
        (client.list_ssh_keys, ()),
        (client.get_usage_breakdown, ()),
    ]
    for call, args in calls:
        with pytest.raises(InstaVMError) as refused:
            await asyncio.to_thread(call, *args)
        assert "501" in str(refused.value) and "not supported by this gateway" in str(refused.value), call
    status, body = await gw.request("GET", "/v1/tapes")
    assert status == 501 and body["code"] == "not_supported" and body["feature"] == "tapes"
    status, body = await gw.request("GET", "/v1/tapes", anonymous=True)
    assert status == 401
    status, doc = await gw.request("GET", "/openapi.json")
    assert "501" in doc["paths"]["/v1/tapes"]["get"]["responses"]
