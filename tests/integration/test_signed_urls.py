"""Signed, expiring, revocable URLs (issue 23.3) through a real gateway (both edges): a private share's
signed URL over HTTP and a WebSocket upgrade, in both address forms, before and after its expiry and a
key rotation; the cookie a browser navigation (an iframe) trades it for; the app-url call's signed URLs;
tampering; the API's checks. The echo app runs in a process-driver VM, started through the official SDK.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from yarl import URL

from tests.conftest import GatewayUnderTest
from tests.integration.test_edge import APP_PORT
from tests.integration.test_sdk import poll
from tests.integration.test_sdk_shares import serving

NAVIGATE = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps no cookies: each test says which it sends."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def at(url: str, path: str) -> str:
    """``path`` under a signed URL's app, with the URL's query (its signature and expiry)."""
    base, _, query = url.partition("?")
    return base + path + ("&" if "?" in path else "?") + query


def host_form(gw: GatewayUnderTest, direct_url: str, path: str) -> tuple[str, dict[str, str]]:
    """A direct (host-form) URL sent to the gateway's listener, with its host name as the Host header."""
    parts = urlsplit(direct_url)
    listener = f"http://{gw.config.server.host}:{gw.config.server.port}"
    return listener + path + ("&" if "?" in path else "?") + parts.query, {"Host": parts.netloc}


async def status_of(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str | None]:
    async with http.get(url, headers=headers, allow_redirects=False) as resp:
        await resp.read()
        return resp.status, resp.headers.get("X-Gateway-Error")


async def path_seen(http: aiohttp.ClientSession, url: str) -> str | None:
    """The target the app got for ``url`` (sent as written), or None when the edge did not let it in."""
    async with http.get(URL(url, encoded=True), allow_redirects=False) as resp:
        return str(json.loads(await resp.read())["path"]) if resp.status == 200 else None


# A change the API made reaches the edge's route cache through Redis pub/sub, a moment after the API
# answered (a request sent at once may still meet the old route): the checks after one are polled.
SETTLED_WITHIN_S = 5.0


async def echoed(http: aiohttp.ClientSession, url: str, **headers: str) -> dict[str, Any]:
    # Sent as written (the client would otherwise normalise the query's escapes).
    async with http.get(URL(url, encoded=True), headers=headers, allow_redirects=False) as resp:
        assert resp.status == 200, (resp.status, await resp.text())
        answer: dict[str, Any] = json.loads(await resp.read())
        return answer


async def websocket_echo(http: aiohttp.ClientSession, url: str, **headers: str) -> str:
    """Open a WebSocket, echo one message; the request target the app got."""
    async with http.ws_connect(url.replace("http://", "ws://", 1), headers=headers) as ws:
        await ws.send_str("hello")
        message = await asyncio.wait_for(ws.receive(), 10)
        assert message.data == "hello"
        return ws._response.headers["X-Echo-Path"]


async def websocket_refused(http: aiohttp.ClientSession, url: str, **headers: str) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url.replace("http://", "ws://", 1), headers=headers)
    return refused.value.status


async def sign(gw: GatewayUnderTest, share_id: str, expires_in: int) -> dict[str, Any]:
    status, signed = await gw.request(
        "POST", f"/v1/shares/{share_id}/signed-url", json={"expires_in": expires_in}
    )
    assert status == 201, signed
    assert isinstance(signed, dict)
    return signed


async def until(deadline: float) -> None:
    """Wait for the wall clock (what expiry is measured on) to pass ``deadline``: a wait on a known time,
    with a margin for the monotonic clock asyncio sleeps on."""
    await asyncio.sleep(max(0.0, deadline - time.time()) + 0.05)
    assert time.time() >= deadline


async def test_a_private_shares_signed_url_works_over_http_and_websocket_until_the_key_rotates(
    gw: GatewayUnderTest, browser: aiohttp.ClientSession
) -> None:
    client = await serving(gw)
    share = await asyncio.to_thread(client.shares.create, APP_PORT)  # private
    signed = await sign(gw, share["share_id"], 3600)
    query = parse_qs(urlsplit(signed["url"]).query)
    assert set(query) == {"signature", "expires"} and int(query["expires"][0]) == signed["expires"]
    assert signed["expires"] - 3601 <= time.time() <= signed["expires"] - 3598  # (whole seconds, rounded up)
    assert (signed["share_id"], signed["port"], signed["key_version"]) == (share["share_id"], APP_PORT, 1)
    assert signed["url"].startswith(share["url"]) and signed["expires_at"]

    # Before expiry: the app gets the request without either parameter (the rest byte for byte).
    got = await echoed(browser, at(signed["url"], "echo/a%20b?x=1&y=%2F&z"))
    assert got["path"] == "/echo/a%20b?x=1&y=%2F&z"
    url, host = host_form(gw, signed["direct_url"], "/echo?x=1")
    assert (await echoed(browser, url, **host))["path"] == "/echo?x=1"
    # A WebSocket upgrade, in both forms.
    assert await websocket_echo(browser, at(signed["url"], "ws?x=1")) == "/ws?x=1"
    url, host = host_form(gw, signed["direct_url"], "/ws")
    assert await websocket_echo(browser, url, **host) == "/ws"
    # Without it: the private app is no app (no oracle).
    assert await status_of(browser, share["url"] + "echo") == (404, "no_route")

    # Tampered with: its expiry, its port, its VM.
    later = signed["url"].replace(f"expires={signed['expires']}", f"expires={signed['expires'] + 86400}")
    assert await status_of(browser, at(later, "echo")) == (403, "signature_invalid")
    other_port = at(signed["url"], "echo").replace(f"/{APP_PORT}/", f"/{APP_PORT + 1}/")
    assert await status_of(browser, other_port) == (403, "signature_invalid")
    status, vm2 = await gw.request("POST", "/v1/vms", json={})
    assert status == 200, vm2
    other_vm = await sign_app_url(gw, vm2["session_id"], APP_PORT, 3600)  # (VM 2 signs URLs too)
    stolen = other_vm["url"].partition("?")[0] + "echo?" + signed["url"].partition("?")[2]
    assert await status_of(browser, stolen) == (403, "signature_invalid")

    # The key rotates: every URL signed before is refused, over HTTP and WebSocket; a new one works.
    status, rotated = await gw.request("POST", f"/v1/vms/{share['vm_id']}/url-key/rotate")
    assert status == 200 and rotated["key_version"] == 2 and rotated["vm_id"] == share["vm_id"], rotated

    async def refused() -> bool | None:
        return await status_of(browser, at(signed["url"], "echo")) == (403, "signature_invalid") or None

    await poll(refused, SETTLED_WITHIN_S)
    assert await websocket_refused(browser, at(signed["url"], "ws")) == 403
    url, host = host_form(gw, signed["direct_url"], "/ws")
    assert await websocket_refused(browser, url, **host) == 403
    fresh = await sign(gw, share["share_id"], 3600)
    assert fresh["key_version"] == 2
    assert (await echoed(browser, at(fresh["url"], "echo")))["path"] == "/echo"
    assert await websocket_echo(browser, at(fresh["url"], "ws")) == "/ws"

    # Revoking the share ends its signed URLs too.
    await asyncio.to_thread(client.shares.update, share["share_id"], None, True)
    assert await status_of(browser, at(fresh["url"], "echo")) == (403, "signature_invalid")


async def sign_app_url(gw: GatewayUnderTest, session_id: str, port: int, expires_in: int) -> dict[str, Any]:
    status, app = await gw.request(
        "GET", f"/v1/sessions/app-url/{session_id}?port={port}&expires_in={expires_in}"
    )
    assert status == 200, app
    assert isinstance(app, dict)
    return app


async def test_a_signed_url_past_its_expiry_is_refused_and_so_is_its_cookie(
    gw: GatewayUnderTest, browser: aiohttp.ClientSession
) -> None:
    client = await serving(gw)
    share = await asyncio.to_thread(client.shares.create, APP_PORT)
    signed = await sign(gw, share["share_id"], 2)
    async with browser.get(at(signed["url"], "echo"), headers=NAVIGATE, allow_redirects=False) as resp:
        assert resp.status == 303
        cookie = resp.cookies["gw_signed"]
    await until(signed["expires"])
    assert await status_of(browser, at(signed["url"], "echo")) == (403, "signature_expired")
    assert await websocket_refused(browser, at(signed["url"], "ws")) == 403
    url, host = host_form(gw, signed["direct_url"], "/echo")
    assert await status_of(browser, url, **host) == (403, "signature_expired")
    assert await status_of(browser, share["url"] + "echo", Cookie=f"gw_signed={cookie.value}") == (
        404,
        "no_route",
    )


async def test_a_browser_navigation_trades_the_url_for_a_cookie_that_a_rotation_ends(
    gw: GatewayUnderTest, browser: aiohttp.ClientSession
) -> None:
    client = await serving(gw)
    share = await asyncio.to_thread(client.shares.create, APP_PORT)
    signed = await sign(gw, share["share_id"], 600)
    async with browser.get(at(signed["url"], "page?tab=2"), headers=NAVIGATE, allow_redirects=False) as resp:
        assert resp.status == 303
        location = resp.headers["Location"]
        set_cookie = resp.headers["Set-Cookie"]
    prefix = urlsplit(share["url"]).path
    assert location == prefix + "page?tab=2"  # the same URL without the signature: not in history or logs
    assert f"Path={prefix};" in set_cookie and "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    assert 590 <= int(set_cookie.split("Max-Age=")[1].split(";")[0]) <= 600
    value = set_cookie.split(";")[0].partition("=")[2]
    assert value.startswith(f"{signed['expires']}.") and signed["signature"] not in value

    # The iframe's page, its other requests and its WebSocket: the cookie opens them; the app never sees it.
    cookie = f"theme=dark; gw_signed={value}"
    got = await echoed(browser, share["url"] + "echo?x=1", Cookie=cookie, **NAVIGATE)
    assert got["path"] == "/echo?x=1" and dict(got["headers"]).get("Cookie") == "theme=dark"
    async with browser.ws_connect(
        share["url"].replace("http://", "ws://") + "ws", headers={"Cookie": cookie}
    ) as ws:
        assert ws._response.headers["X-Echo-Cookie"] == "theme=dark"
        await ws.send_str("in the iframe")
        assert (await asyncio.wait_for(ws.receive(), 10)).data == "in the iframe"
    # The cookie is this app's only: another port of the VM is not opened by it.
    assert await status_of(
        browser, share["url"].replace(f"/{APP_PORT}/", f"/{APP_PORT + 1}/"), Cookie=cookie
    ) == (
        404,
        "no_route",
    )

    status, _ = await gw.request("POST", f"/v1/vms/{share['vm_id']}/url-key/rotate")
    assert status == 200

    async def cookie_refused() -> bool | None:
        return await status_of(browser, share["url"] + "echo", Cookie=cookie) == (404, "no_route") or None

    await poll(cookie_refused, SETTLED_WITHIN_S)
    assert await websocket_refused(browser, share["url"] + "ws", Cookie=cookie) == 404


async def test_the_app_url_call_signs_a_port_without_making_it_public(
    gw: GatewayUnderTest, browser: aiohttp.ClientSession
) -> None:
    client = await serving(gw)
    app = await sign_app_url(gw, client.session_id, APP_PORT, 600)
    assert app["expires_at"] and app["key_version"] == 1 and "signature=" in app["url"]
    plain = app["url"].partition("?")[0]
    assert await status_of(browser, plain + "echo") == (404, "no_route")  # not exposed by asking
    status, vm = await gw.request("GET", f"/v1/vms/{app['vm_id']}")
    assert status == 200 and vm["exposed_ports"] == []
    assert not any("key" in name for name in vm)  # the URL key never leaves the gateway
    assert (await echoed(browser, at(app["url"], "echo?q=1")))["path"] == "/echo?q=1"
    assert await websocket_echo(browser, at(app["url"], "ws")) == "/ws"
    url, host = host_form(gw, app["direct_url"], "/ws")
    assert await websocket_echo(browser, url, **host) == "/ws"

    # Once the port is public, an authentic signature is still taken out; the app's own goes through.
    status, public = await gw.request("GET", f"/v1/sessions/app-url/{client.session_id}?port={APP_PORT}")
    assert status == 200 and "signature=" not in public["url"] and public["expires_at"] is None
    own = plain + "echo?signature=mine&expires=never"

    async def public_now() -> bool | None:  # the app's own signature goes through, once the port is public
        return await path_seen(browser, own) == "/echo?signature=mine&expires=never" or None

    await poll(public_now, SETTLED_WITHIN_S)
    assert (await echoed(browser, at(app["url"], "echo")))["path"] == "/echo"

    # The rotation revokes these too (a public port stays public: its URL needs no signature).
    status, _ = await gw.request("POST", f"/v1/vms/{app['vm_id']}/url-key/rotate")
    assert status == 200

    async def revoked() -> bool | None:
        # The old signature is no longer this VM's: it reaches the app as it came.
        path = await path_seen(browser, at(app["url"], "echo"))
        return (path is not None and path.startswith("/echo?signature=")) or None

    await poll(revoked, SETTLED_WITHIN_S)


async def test_the_api_validates_and_keeps_tenants_apart(gw: GatewayUnderTest) -> None:
    client = await serving(gw)
    share = await asyncio.to_thread(client.shares.create, APP_PORT)
    path = f"/v1/shares/{share['share_id']}/signed-url"
    for body in (
        {},
        {"expires_in": 0},
        {"expires_in": 7 * 86400 + 1},
        {"expires_in": "soon"},
        {"expires_in": -5},
    ):
        status, answer = await gw.request("POST", path, json=body)
        assert status == 422 and answer["detail"][0]["loc"] == ["body", "expires_in"], (body, answer)
    for value in ("0", "604801", "x"):
        status, answer = await gw.request(
            "GET", f"/v1/sessions/app-url/{client.session_id}?expires_in={value}"
        )
        assert status == 422 and answer["detail"][0]["loc"] == ["query", "expires_in"], (value, answer)

    other = await gw.new_key()
    assert (await gw.request("POST", path, key=other, json={"expires_in": 60}))[0] == 404
    assert (await gw.request("POST", f"/v1/vms/{share['vm_id']}/url-key/rotate", key=other))[0] == 404
    assert (await gw.request("POST", "/v1/shares/share-nope/signed-url", json={"expires_in": 60}))[0] == 404
    assert (await gw.request("POST", "/v1/vms/vmid-nope/url-key/rotate"))[0] == 404
    assert (await gw.request("POST", path, anonymous=True, json={"expires_in": 60}))[0] == 401

    await asyncio.to_thread(client.shares.update, share["share_id"], None, True)
    status, answer = await gw.request("POST", path, json={"expires_in": 60})
    assert status == 409 and answer["code"] == "share_revoked"
    status, doc = await gw.request("GET", "/openapi.json")
    assert status == 200
    assert "post" in doc["paths"]["/v1/shares/{share_id}/signed-url"]
    assert "post" in doc["paths"]["/v1/vms/{vm_id}/url-key/rotate"]


async def test_a_rotation_ends_what_old_signed_urls_let_in(
    gw: GatewayUnderTest, browser: aiohttp.ClientSession
) -> None:
    """A WebSocket opened with a signed URL closes when the VM's key rotates (the URL is revoked, and so
    is what it opened); one opened with the share's token goes on."""
    client = await serving(gw)
    share = await asyncio.to_thread(client.shares.create, APP_PORT)  # private
    signed = await sign(gw, share["share_id"], 3600)
    by_signature = await browser.ws_connect(at(signed["url"], "ws").replace("http://", "ws://", 1))
    token = {"X-Access-Token": share["access_token"]}
    by_token = await browser.ws_connect(share["url"].replace("http://", "ws://", 1) + "ws", headers=token)
    try:
        for ws in (by_signature, by_token):
            await ws.send_str("before")
            assert (await asyncio.wait_for(ws.receive(), 10)).data == "before"
        status, _ = await gw.request("POST", f"/v1/vms/{share['vm_id']}/url-key/rotate")
        assert status == 200
        ended = await asyncio.wait_for(by_signature.receive(), 10)
        assert ended.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        await by_token.send_str("after")
        assert (await asyncio.wait_for(by_token.receive(), 10)).data == "after"
    finally:
        await by_signature.close()
        await by_token.close()
