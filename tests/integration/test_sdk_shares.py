"""Shares as a resource through the official SDK (``client.shares``), and custom domains pointed at a
share (``client.custom_domains``) over a real ACME server and DNS (issue 19.4)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from instavm import InstaVM

from tests.acme_env import AcmeTestEnv
from tests.conftest import GatewayUnderTest
from tests.integration.test_custom_domains import acme_sections, https_get, rfc2136_credentials
from tests.integration.test_edge import APP_PORT, ECHO_APP
from tests.integration.test_sdk import http_error, sdk

REVOKE_LIMIT_S = 1.0


async def serving(gw: GatewayUnderTest) -> InstaVM:
    client = await asyncio.to_thread(sdk, gw)
    started = await asyncio.to_thread(client.execute, f"python3 {ECHO_APP} {APP_PORT}", language="bash")
    assert started["exit_code"] == 0, started
    return client


async def get(gw: GatewayUnderTest, url: str, **headers: str) -> int:
    async with gw.http.get(url, headers=headers, allow_redirects=False) as resp:
        await resp.read()
        return resp.status


async def test_a_share_is_made_changed_and_revoked_and_revoking_cuts_its_connections(
    gw: GatewayUnderTest,
) -> None:
    client = await serving(gw)
    share = await asyncio.to_thread(client.shares.create, APP_PORT)  # private by default, as the SDK sends
    assert (share["port"], share["is_public"], share["status"]) == (APP_PORT, False, "active")
    token = share["access_token"]
    url = share["url"] + "echo"
    assert await get(gw, url) == 404  # a private app without its token: the same as no app (no oracle)
    assert await get(gw, url, **{"X-Access-Token": token}) == 200

    public = await asyncio.to_thread(client.shares.update, share["share_id"], True)
    assert public["is_public"] and public["access_token"] is None
    assert await get(gw, url) == 200
    private = await asyncio.to_thread(client.shares.update, share["share_id"], False)
    assert private["access_token"] and private["access_token"] != token  # a new token, shown once
    assert await get(gw, url, **{"X-Access-Token": token}) == 404  # the old one opens nothing
    assert await get(gw, url, **{"X-Access-Token": private["access_token"]}) == 200
    await asyncio.to_thread(client.shares.update, share["share_id"], True)

    # Revoking closes what is open through the share (a WebSocket here) within a second.
    ws = await gw.http.ws_connect(share["url"].replace("http://", "ws://") + "ws")
    await ws.send_str("before")
    assert (await ws.receive()).data == "before"
    revoked_at = time.monotonic()
    revoked = await asyncio.to_thread(client.shares.update, share["share_id"], None, True)
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    message = await asyncio.wait_for(ws.receive(), 10)
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    assert time.monotonic() - revoked_at < REVOKE_LIMIT_S
    await ws.close()
    assert await get(gw, url) == 404
    with pytest.raises(Exception) as gone:
        await asyncio.to_thread(client.shares.update, share["share_id"], True)
    assert http_error(gone.value).response.status_code == 409


async def test_shares_keep_tenants_apart_and_validate(gw: GatewayUnderTest) -> None:
    client = await serving(gw)
    share = await asyncio.to_thread(client.shares.create, APP_PORT, None, None, True)
    vm_id = share["vm_id"]
    by_vm = await asyncio.to_thread(client.shares.create, APP_PORT + 1, None, vm_id, False)
    assert by_vm["vm_id"] == vm_id and by_vm["port"] == APP_PORT + 1
    other = InstaVM(await gw.new_key(), base_url=client.base_url, auto_start_session=False)
    for call, args in (
        (other.shares.update, (share["share_id"], None, True)),
        (other.shares.create, (APP_PORT, client.session_id)),
        (other.shares.create, (APP_PORT, None, vm_id)),
    ):
        with pytest.raises(Exception) as hidden:
            await asyncio.to_thread(call, *args)
        assert http_error(hidden.value).response.status_code == 404, call
    assert await get(gw, share["url"] + "echo") == 200  # untouched by the attempts
    for body, loc in (
        ({"port": 0, "session_id": client.session_id}, ["body", "port"]),
        ({"port": 80}, ["body", "session_id"]),
    ):
        status, answer = await gw.request("POST", "/v1/shares", json=body)
        assert status == 422 and answer["detail"][0]["loc"] == loc, answer
    status, answer = await gw.request("PATCH", f"/v1/shares/{share['share_id']}", json={})
    assert status == 422


async def test_a_custom_domain_is_pointed_at_a_share_issued_and_healthy(
    gateway_factory: Any, tmp_path: Path, acme_env: AcmeTestEnv
) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", **acme_sections(tmp_path, acme_env))
    client = await serving(gw)
    share = await asyncio.to_thread(client.shares.create, APP_PORT, None, None, True)
    domain = "sdk.example.org.test"
    made = await asyncio.to_thread(
        client.custom_domains.create, domain, share["share_id"], "rfc2136", rfc2136_credentials(acme_env)
    )
    assert (made["id"], made["vm_id"], made["status"]) == (domain, share["vm_id"], "pending")
    issued = await asyncio.to_thread(
        client.custom_domains.wait_until_issued, domain, timeout=60, poll_interval=0.5
    )
    assert issued["status"] == "issued"
    status, body = await https_get(gw, acme_env, domain, "/echo")
    assert status == 200 and b'"path": "/echo"' in body
    health = await asyncio.to_thread(client.custom_domains.health, domain)
    assert (health["healthy"], health["port"], health["problems"]) == (True, APP_PORT, [])
    verified = await asyncio.to_thread(client.custom_domains.verify, domain)
    assert verified["id"] == domain
    assert [d["id"] for d in await asyncio.to_thread(client.custom_domains.list)] == [domain]

    other = InstaVM(await gw.new_key(), base_url=client.base_url, auto_start_session=False)
    with pytest.raises(Exception) as hidden:
        await asyncio.to_thread(
            other.custom_domains.create,
            "other.example.org.test",
            share["share_id"],
            "rfc2136",
            rfc2136_credentials(acme_env),
        )
    assert http_error(hidden.value).response.status_code == 404
    with pytest.raises(Exception) as unhealthy:
        await asyncio.to_thread(other.custom_domains.health, domain)
    assert http_error(unhealthy.value).response.status_code == 404
