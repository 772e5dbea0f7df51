"""Traffic-driven idle (issue 23.5): a VM with an ``idle_timeout_s`` is suspended (netns) or killed
(process) after that long without client activity, and only client activity counts: requests and data
frames from real clients through the real gateway keep it up; WebSocket pings, an open tunnel or a
response stream that the client sends nothing on do not. The keep-alive call resets the idle clock.
Every test runs on both edges (the compiled twin and the pure-Python one)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from instavm import InstaVM

from tests.conftest import DRIVERS, GatewayUnderTest
from tests.integration.test_edge import APP_PORT, echo_app_command
from tests.integration.test_sdk import poll, sdk

IDLE_S = 2
# Short enough that activity every STEP_S keeps a VM up, and a test sees the reaper act within moments.
STEP_S = 0.3
FAST = {"vms": {"min_lifetime_s": 1, "min_idle_timeout_s": 1, "reaper_interval_s": 0.1}}
# What ends an idle VM on each driver (netns can suspend, the process driver cannot).
ENDS_AS = {"process": "killed", "netns": "suspended"}
# The reaper acts at most a flush and a tick late (0.1 s each here); a VM's boot, the echo app's start
# and a loaded machine get the rest.
ACT_WITHIN_S = IDLE_S + 10


async def start(gateway_factory: Any, driver: str = "process") -> GatewayUnderTest:
    return await gateway_factory(driver, vms=FAST["vms"], edge={"traffic_flush_s": 0.1})  # type: ignore[no-any-return]


async def serving_vm(gw: GatewayUnderTest, **create: Any) -> tuple[dict[str, Any], str]:
    """A VM with the echo app shared publicly on APP_PORT, made with ``create``; its record and app URL."""
    status, vm = await gw.request(
        "POST", "/v1/vms", json={"share": {"port": APP_PORT, "is_public": True}, **create}
    )
    assert status == 200, vm
    assert isinstance(vm, dict)
    status, out = await gw.request(
        "POST",
        "/execute",
        json={"session_id": vm["session_id"], "language": "bash", "command": echo_app_command(APP_PORT)},
    )
    assert (status, out["exit_code"]) == (200, 0), out  # type: ignore[index]
    return vm, vm["share"]["url"]


async def vm_view(gw: GatewayUnderTest, vm_id: str) -> dict[str, Any]:
    status, view = await gw.request("GET", f"/v1/vms/{vm_id}")
    assert status == 200, view
    assert isinstance(view, dict)
    return view


async def until_not_active(gw: GatewayUnderTest, vm_id: str) -> dict[str, Any]:
    """The VM's view once it is no longer active (bounded: ACT_WITHIN_S)."""

    async def ended() -> dict[str, Any] | None:
        view = await vm_view(gw, vm_id)
        return view if view["status"] != "active" else None

    return await poll(ended, limit_s=ACT_WITHIN_S)


async def until_source(gw: GatewayUnderTest, vm_id: str, source: str) -> dict[str, Any]:
    """The VM's view once its last activity's source is ``source`` (edges flush every 0.1 s here)."""

    async def shown() -> dict[str, Any] | None:
        view = await vm_view(gw, vm_id)
        activity = view["last_activity"]
        return view if activity is not None and activity["source"] == source else None

    return await poll(shown, limit_s=5)


async def keep_doing(
    work: Callable[[], Awaitable[object]], gw: GatewayUnderTest, vm_id: str, for_s: float
) -> None:
    """Do ``work`` every STEP_S for ``for_s`` seconds, checking all along that the VM stays active."""
    end = time.monotonic() + for_s
    while time.monotonic() < end:
        await work()
        assert (await vm_view(gw, vm_id))["status"] == "active"
        await asyncio.sleep(STEP_S)


async def tunnel_ended(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Wait (bounded) for the WebSocket to end: the edge closed it. Pings the app echoed before are
    skipped (answering one may find the connection closing already)."""
    ends = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    async with asyncio.timeout(5):
        while True:
            try:
                message = await ws.receive()
            except aiohttp.ClientConnectionResetError:
                return
            if message.type in ends or message.type == aiohttp.WSMsgType.ERROR:
                return


def assert_ended_as_idle(view: dict[str, Any], driver: str, timeout_s: int = IDLE_S) -> None:
    assert view["status"] == ENDS_AS[driver], view
    if driver == "netns":
        assert view["suspend_reason"] == "idle", view
    else:
        assert view["error"].startswith(f"idle: no client activity for {timeout_s} s"), view


@pytest.mark.parametrize("driver", DRIVERS)
async def test_websocket_pings_alone_do_not_keep_a_vm_up(gateway_factory: Any, driver: str) -> None:
    gw = await start(gateway_factory, driver)
    vm, url = await serving_vm(gw, idle_timeout_s=IDLE_S)
    assert vm["status"] == "active"
    async with aiohttp.ClientSession() as client, client.ws_connect(url + "ws", autoping=True) as ws:
        opened = time.monotonic()
        await ws.send_str("hello")  # one data frame: then only pings (the app pings back, the client pongs)
        assert (await ws.receive_str(timeout=5)) == "hello"
        await until_source(gw, vm["vm_id"], "websocket")
        sent_last = time.monotonic()

        async def ping_all_along() -> None:
            while not ws.closed:
                await ws.ping(b"heartbeat")
                await asyncio.sleep(STEP_S / 3)

        pinger = asyncio.create_task(ping_all_along())
        try:
            view = await until_not_active(gw, vm["vm_id"])
            ended = time.monotonic()
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
        assert_ended_as_idle(view, driver)
        # Not before its time: the idle clock ran from the data frame, through every ping.
        assert ended - sent_last >= IDLE_S - 0.2, (ended - sent_last, view)
        assert ended - opened < ACT_WITHIN_S
        assert view["last_activity"]["source"] == "websocket", view
        # Its tunnel ends with it (a suspended VM's connections end too; a new request would wake it).
        await tunnel_ended(ws)


async def test_a_silent_tunnel_and_a_response_stream_do_not_keep_a_vm_up(gateway_factory: Any) -> None:
    gw = await start(gateway_factory)
    vm, url = await serving_vm(gw, idle_timeout_s=IDLE_S)
    async with aiohttp.ClientSession() as client:
        # A WebSocket the client never sends on (no heartbeat), and an event stream the VM answers on.
        async with client.ws_connect(url + "ws", autoping=False) as ws, client.get(url + "sse") as events:
            assert events.status == 200
            assert b"one" in await asyncio.wait_for(events.content.readuntil(b"\n\n"), 5)
            view = await until_not_active(gw, vm["vm_id"])
            assert_ended_as_idle(view, "process")
            assert view["last_activity"]["source"] == "http"  # the two requests that opened them
            await tunnel_ended(ws)


async def test_client_data_frames_and_requests_keep_a_vm_up_past_its_timeout(gateway_factory: Any) -> None:
    gw = await start(gateway_factory)
    vm, url = await serving_vm(gw, idle_timeout_s=IDLE_S)
    vm_id = vm["vm_id"]
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(url + "ws", autoping=False) as ws:

            async def data_frame() -> None:
                await ws.send_bytes(b"still here")
                assert (await ws.receive_bytes(timeout=5)) == b"still here"

            await keep_doing(data_frame, gw, vm_id, 2.5 * IDLE_S)
            assert (await vm_view(gw, vm_id))["last_activity"]["source"] == "websocket"

        async def request() -> None:
            async with client.post(url + "echo", data=b"x" * 1000) as resp:
                assert resp.status == 200

        await keep_doing(request, gw, vm_id, 2.5 * IDLE_S)
        view = await vm_view(gw, vm_id)
        assert view["last_activity"]["source"] == "http"
    # Left alone, it goes (what kept it up was the traffic).
    assert_ended_as_idle(await until_not_active(gw, vm_id), "process")


async def test_a_slow_upload_keeps_a_vm_up_while_its_body_arrives(gateway_factory: Any) -> None:
    gw = await start(gateway_factory)
    vm, url = await serving_vm(gw, idle_timeout_s=IDLE_S)
    active_all_along = True

    async def slow_body() -> AsyncIterator[bytes]:
        nonlocal active_all_along
        end = time.monotonic() + 2.5 * IDLE_S
        while time.monotonic() < end:
            yield b"y" * 100
            active_all_along &= (await vm_view(gw, vm["vm_id"]))["status"] == "active"
            await asyncio.sleep(STEP_S)

    # One request whose body takes longer than the timeout: its bytes are the activity.
    async with gw.http.post(url + "echo", data=slow_body()) as resp:
        assert resp.status == 200
        assert (await resp.json())["body_length"] > 0
    assert active_all_along
    assert (await vm_view(gw, vm["vm_id"]))["last_activity"]["source"] == "http"
    assert_ended_as_idle(await until_not_active(gw, vm["vm_id"]), "process")


async def test_keepalive_resets_the_idle_clock_and_settings_change_through_the_sdk(
    gateway_factory: Any,
) -> None:
    gw = await start(gateway_factory)
    client: InstaVM = await asyncio.to_thread(sdk, gw)
    vm = await asyncio.to_thread(
        client.vms.create, True, None, session_id=client.session_id, idle_timeout_s=600
    )
    vm_id = vm["vm_id"]
    record = await asyncio.to_thread(client.vms.get, vm_id)
    assert record["idle_timeout_s"] == 600
    assert record["last_activity"]["source"] == "started"
    await asyncio.to_thread(client.execute, "echo hi", language="bash")
    assert (await asyncio.to_thread(client.vms.get, vm_id))["last_activity"]["source"] == "api"

    updated = await asyncio.to_thread(client.vms.update, vm_id, idle_timeout_s=IDLE_S)
    assert updated["idle_timeout_s"] == IDLE_S  # (the process driver cannot suspend, and may still idle)
    expires_at = updated["expires_at"]

    async def keepalive() -> None:
        status, view = await gw.request("POST", f"/v1/vms/{vm_id}/keepalive")
        assert status == 200, view

    await keep_doing(keepalive, gw, vm_id, 2.5 * IDLE_S)
    view = await vm_view(gw, vm_id)
    assert view["last_activity"]["source"] == "keepalive"
    assert view["expires_at"] == expires_at  # the idle clock only: its lifetime is its own
    status, _ = await gw.request("POST", f"/v1/vms/{vm_id}/keepalive", key=await gw.new_key())
    assert status == 404  # another key's VM is one that does not exist

    assert_ended_as_idle(await until_not_active(gw, vm_id), "process")
    status, body = await gw.request("POST", f"/v1/vms/{vm_id}/keepalive")
    assert status == 410, body


async def test_typing_in_a_terminal_keeps_a_vm_up(gateway_factory: Any) -> None:
    gw = await start(gateway_factory)
    client: InstaVM = await asyncio.to_thread(sdk, gw)
    vm = await asyncio.to_thread(
        client.vms.create, True, None, session_id=client.session_id, idle_timeout_s=IDLE_S
    )
    vm_id = vm["vm_id"]
    await asyncio.to_thread(client.pty.create_for_vm, vm_id, 80, 24, None, "typing", None)
    async with gw.http.ws_connect(client.pty.ws_url_for_vm(vm_id, "typing")) as ws:

        async def type_something() -> None:
            await ws.send_bytes(b"true\n")

        await keep_doing(type_something, gw, vm_id, 2.5 * IDLE_S)
        assert (await vm_view(gw, vm_id))["last_activity"]["source"] == "api"
        assert_ended_as_idle(await until_not_active(gw, vm_id), "process")  # the terminal open, no typing


async def test_an_idle_timeout_removed_with_patch_keeps_the_vm(gateway_factory: Any) -> None:
    gw = await start(gateway_factory)
    vm, _ = await serving_vm(gw, idle_timeout_s=600)
    status, view = await gw.request("PATCH", f"/v1/vms/{vm['vm_id']}", json={"idle_timeout_s": 0})
    assert (status, view["idle_timeout_s"]) == (200, None), view  # type: ignore[index]
    # The reaper, asked about a time long past any timeout, finds nothing to do: the VM left the queue.
    assert await gw.services.reaper.reap_idle(time.time() + 3600) == 0
    assert (await vm_view(gw, vm["vm_id"]))["status"] == "active"
    status, view = await gw.request("PATCH", f"/v1/vms/{vm['vm_id']}", json={"idle_timeout_s": 600})
    assert (status, view["idle_timeout_s"]) == (200, 600), view  # type: ignore[index]
    assert await gw.services.reaper.reap_idle(time.time() + 3600) == 1  # (and back in it)
    assert_ended_as_idle(await vm_view(gw, vm["vm_id"]), "process", 600)


@pytest.mark.parametrize("driver", [p for p in DRIVERS if p.id == "netns"])
async def test_a_vm_suspended_as_idle_wakes_for_the_next_request(gateway_factory: Any, driver: str) -> None:
    gw = await start(gateway_factory, driver)
    vm, url = await serving_vm(gw, idle_timeout_s=IDLE_S, auto_resume=True)
    view = await until_not_active(gw, vm["vm_id"])
    assert (view["status"], view["suspend_reason"]) == ("suspended", "idle")
    async with gw.http.get(url + "echo") as resp:  # held while the VM resumes (issue 11's wake)
        assert resp.status == 200
    view = await until_source(gw, vm["vm_id"], "http")
    assert (view["status"], view["suspend_reason"]) == ("active", None)
    # Its idle clock runs again from that request.
    assert (await until_not_active(gw, vm["vm_id"]))["suspend_reason"] == "idle"


BAD_TIMEOUTS = [
    (-1, "idle_timeout"),
    (30, "idle_timeout"),  # under vms.min_idle_timeout_s (60 by default)
    (86401, "less_than_equal"),  # over vms.max_lifetime_s
    ("soon", "int_parsing"),
    (1.5, "int_from_float"),
]


@pytest.mark.parametrize(("value", "error"), BAD_TIMEOUTS)
async def test_bad_idle_timeouts_are_refused_naming_the_field(
    gw: GatewayUnderTest, value: object, error: str
) -> None:
    status, body = await gw.request("POST", "/v1/vms", json={"idle_timeout_s": value})
    assert status == 422, body
    assert body["detail"][0]["loc"] == ["body", "idle_timeout_s"], body  # type: ignore[index]
    assert body["detail"][0]["type"] == error, body  # type: ignore[index]
    status, vm = await gw.request("POST", "/v1/vms", json={"idle_timeout_s": 0})  # 0: none
    assert (status, vm["status"]) == (200, "active"), vm  # type: ignore[index]
    status, body = await gw.request("PATCH", f"/v1/vms/{vm['vm_id']}", json={"idle_timeout_s": value})  # type: ignore[index]
    assert status == 422 and body["detail"][0]["loc"] == ["body", "idle_timeout_s"], body  # type: ignore[index]
    view = await vm_view(gw, vm["vm_id"])  # type: ignore[index]
    assert view["idle_timeout_s"] is None
