"""Terminals through the official SDK (``client.pty``) and the WebSocket framing of the ``instavm`` CLI:
a real shell on a real pty in the VM on every driver: typing, output, Ctrl-C, resize, the exit code
(issue 19.5)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest
from instavm import InstaVM

from gateway.orchestrator.pty import MAX_PER_VM
from tests.conftest import GatewayUnderTest
from tests.integration.test_sdk import http_error, sdk
from tests.integration.test_sdk_files import DRIVERS, start

READ_LIMIT_S = 30.0


class Screen:
    """What a terminal WebSocket shows, read until a pattern appears."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.text = ""
        self.controls: list[dict[str, Any]] = []

    async def until(self, pattern: str) -> re.Match[str]:
        try:
            return await asyncio.wait_for(self._until(pattern), READ_LIMIT_S)
        except TimeoutError:
            raise AssertionError(
                f"no {pattern!r} in {READ_LIMIT_S} s; the terminal showed {self.text!r}"
            ) from None

    async def _until(self, pattern: str) -> re.Match[str]:
        if True:
            while (found := re.search(pattern, self.text)) is None:
                message = await self.ws.receive()
                if message.type == aiohttp.WSMsgType.BINARY:
                    self.text += message.data.decode(errors="replace")
                elif message.type == aiohttp.WSMsgType.TEXT:
                    self.controls.append(json.loads(message.data))
                else:
                    raise AssertionError(
                        f"socket ended ({message.type}) before {pattern!r}; saw {self.text!r}"
                    )
        self.text = self.text[found.end() :]
        return found

    async def type(self, keys: str) -> None:
        await self.ws.send_bytes(keys.encode())


@pytest.fixture(params=DRIVERS)
async def vm_client(request: pytest.FixtureRequest, gateway_factory: Any) -> tuple[GatewayUnderTest, InstaVM]:
    gw = await start(gateway_factory, request.param)
    client = await asyncio.to_thread(sdk, gw)
    await asyncio.to_thread(client.execute, "print('booted')")
    return gw, client


async def test_a_shell_on_a_real_pty_types_resizes_interrupts_and_exits(
    vm_client: tuple[GatewayUnderTest, InstaVM], capfd: pytest.CaptureFixture[str]
) -> None:
    gw, client = vm_client
    sid = client.session_id
    created = await asyncio.to_thread(client.pty.create, sid, 80, 24)
    pty_id = created["session_id"]
    assert created["alive"] and created["cols"] == 80
    assert [t["session_id"] for t in await asyncio.to_thread(client.pty.list, sid)] == [pty_id]

    async with gw.http.ws_connect(client.pty.ws_url(sid, pty_id)) as ws:
        screen = Screen(ws)
        await screen.type("stty size; echo typed-$((6*7))\n")
        await screen.until(r"24 80\s+typed-42")

        await asyncio.to_thread(client.pty.resize, sid, pty_id, 120, 40)  # REST
        await screen.type("stty size\n")
        await screen.until(r"\b40 120\b")
        await ws.send_str(json.dumps({"type": "resize", "cols": 100, "rows": 30}))  # the CLI's control
        await screen.type("stty size\n")
        await screen.until(r"\b30 100\b")

        # Ctrl-C reaches the foreground job through the terminal's line discipline.
        # (Once the program itself says it sleeps, it is the terminal's foreground job.)
        # A prompt of its own, told apart from its echo: bash expands $((6*7)) in PS1 only when it prompts.
        await screen.type("PS1='p$((6*7))> '\n")
        await screen.until(r"p42> ")
        await screen.type(
            "python3 -c \"import time; print('sleep' + 'ing', flush=True); time.sleep(60)\"; echo slept\n"
        )
        await screen.until(r"[\r\n]sleeping\r\n")
        await screen.type("\x03")
        # Typed only once the shell is back at its prompt: typeahead sent while the job was dying can be
        # discarded when bash sets the terminal up again (this test once lost its next line so).
        await screen.until(r"p42> ")
        await screen.type("echo after-$((1+1))\n")
        await screen.until(r"after-2")
        assert "slept" not in screen.text

        await screen.type(f"env | grep -c -F '{gw.api_key}' ; exit 7\n")
        await screen.until(r"\b0\b")  # the key in the URL is nowhere in the VM
        async with asyncio.timeout(READ_LIMIT_S):
            while not screen.controls:
                message = await ws.receive()
                if message.type == aiohttp.WSMsgType.TEXT:
                    screen.controls.append(json.loads(message.data))
                elif message.type != aiohttp.WSMsgType.BINARY:
                    break
        assert screen.controls == [{"type": "exit", "exit_code": 7}]
        assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1000

    ended = await asyncio.to_thread(client.pty.get, sid, pty_id)
    assert (ended["alive"], ended["exit_code"]) == (False, 7)
    captured = capfd.readouterr()
    assert gw.api_key not in captured.out + captured.err  # nor in any log line


async def test_vm_scoped_terminals_a_login_command_scrollback_and_kill(
    vm_client: tuple[GatewayUnderTest, InstaVM],
) -> None:
    gw, client = vm_client
    status = await asyncio.to_thread(client.get_session_status)
    vm_id = status["vm_id"]
    made = await asyncio.to_thread(
        client.pty.create_for_vm, vm_id, 80, 24, None, "mine-1", "echo from-login && exec bash --norc -i"
    )
    assert made["session_id"] == "mine-1" and made["command"][:2] == ["/bin/bash", "-lc"]
    # Output written before anyone attached is replayed (the scrollback).
    async with gw.http.ws_connect(client.pty.ws_url_for_vm(vm_id, "mine-1")) as ws:
        screen = Screen(ws)
        await screen.until("from-login")
        await screen.type("echo vm-scoped\n")
        await screen.until("vm-scoped")
        await asyncio.to_thread(client.pty.kill_for_vm, vm_id, "mine-1")
        async with asyncio.timeout(READ_LIMIT_S):
            while (await ws.receive()).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                pass
    with pytest.raises(Exception) as gone:
        await asyncio.to_thread(client.pty.get_for_vm, vm_id, "mine-1")
    assert http_error(gone.value).response.status_code == 404


async def test_terminals_keep_tenants_apart_and_validate(gw: GatewayUnderTest) -> None:
    client = await asyncio.to_thread(sdk, gw)
    sid = client.session_id
    pty_id = (await asyncio.to_thread(client.pty.create, sid))["session_id"]
    other = InstaVM(await gw.new_key(), base_url=client.base_url, auto_start_session=False)
    for call, args in (
        (other.pty.get, (sid, pty_id)),
        (other.pty.kill, (sid, pty_id)),
        (other.pty.resize, (sid, pty_id, 10, 10)),
        (other.pty.create, (sid,)),
    ):
        with pytest.raises(Exception) as hidden:
            await asyncio.to_thread(call, *args)
        assert http_error(hidden.value).response.status_code == 404, call
    assert await asyncio.to_thread(other.pty.list, sid) == []
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gw.http.ws_connect(other.pty.ws_url(sid, pty_id))
    assert refused.value.status == 404
    with pytest.raises(aiohttp.WSServerHandshakeError) as unauthenticated:
        await gw.http.ws_connect(client.pty.ws_url(sid, pty_id).split("?")[0])
    assert unauthenticated.value.status == 401

    headers = {"X-API-Key": gw.api_key}
    url = f"{gw.url}/v1/sessions/{sid}/pty/sessions"
    for body, loc in (({"cols": 0}, "cols"), ({"rows": 10_000}, "rows"), ({"id": "../x"}, "id")):
        async with gw.http.post(url, json=body, headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == 422 and answer["detail"][0]["loc"] == ["body", loc], answer
    async with gw.http.post(f"{url}/{pty_id}/resize", json={"cols": 5}, headers=headers) as resp:
        assert resp.status == 422
    # A VM's terminals are capped; the one too many is a 429 that says when to try again.
    more = [(await asyncio.to_thread(client.pty.create, sid))["session_id"] for _ in range(MAX_PER_VM - 1)]
    async with gw.http.post(url, json={}, headers=headers) as resp:
        answer = await resp.json()
        assert resp.status == 429 and answer["code"] == "too_many_terminals", answer
        assert int(resp.headers["Retry-After"]) > 0  # regression: it had none
    for one in [pty_id, *more]:
        await asyncio.to_thread(client.pty.kill, sid, one)
