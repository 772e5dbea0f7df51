"""Browser instances end to end: the Instances API, a real headless Chromium in a VM (both drivers), and
its DevTools protocol driven through the instance's access_url on the edge, over HTTP and WebSocket.

Every name resolves to loopback in these tests (``LoopbackResolver``), so clients use the access_url as
the API returns it, Host header and all, while no packet leaves the machine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from gateway.config import ImageConfig
from tests.conftest import GatewayUnderTest, free_port
from tests.integration.test_edge import ECHO_APP

ORG_A = str(uuid.uuid4())
ORG_B = str(uuid.uuid4())
INSTANCES = "/orgs/{org}/api/instances"
ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")
CDP_TIMEOUT_S = 20.0
WAIT_S = 10.0


class LoopbackResolver(AbstractResolver):
    """Every host name is 127.0.0.1: the test's gateway is the only server these clients can reach."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


@asynccontextmanager
async def loopback_client(**kwargs: Any) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=LoopbackResolver()), **kwargs
    ) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def org_key(gw: GatewayUnderTest, org: str, name: str = "org key") -> str:
    key, _ = await gw.services.key_store.create(name, org=org)
    return key


async def create_instance(gw: GatewayUnderTest, token: str, org: str = ORG_A, **body: str) -> tuple[int, Any]:
    payload = {"image": "debian-12", "size": "small"} | body
    return await gw.request("POST", INSTANCES.format(org=org), headers=bearer(token), json=payload)


class DevTools:
    """A minimal Chrome DevTools protocol client: commands by id, events into a queue."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self.events.put_nowait(data)

    async def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        message_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[message_id] = future
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send_str(json.dumps(message))
        async with asyncio.timeout(CDP_TIMEOUT_S):
            answer = await future
        assert "error" not in answer, answer
        return answer["result"]

    async def event(self, method: str) -> dict[str, Any]:
        async with asyncio.timeout(CDP_TIMEOUT_S):
            while True:
                event = await self.events.get()
                if event["method"] == method:
                    return event

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


async def page_title(
    client: aiohttp.ClientSession, ws_url: str, headers: dict[str, str], page_url: str
) -> str:
    """Open a tab, load ``page_url`` in it and read document.title back, all over the DevTools protocol."""
    async with client.ws_connect(ws_url, headers=headers, max_msg_size=0) as ws:
        devtools = DevTools(ws)
        try:
            target = await devtools.call("Target.createTarget", url="about:blank")
            attached = await devtools.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
            session = attached["sessionId"]
            await devtools.call("Page.enable", session)
            await devtools.call("Page.navigate", session, url=page_url)
            await devtools.event("Page.loadEventFired")
            evaluated = await devtools.call("Runtime.evaluate", session, expression="document.title")
            return evaluated["result"]["value"]
        finally:
            await devtools.close()


async def wait_for(condition, what: str) -> None:
    """Poll an async condition until it holds (bounded): for state changes no event announces."""
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_an_instance_is_created_driven_over_devtools_listed_and_destroyed(
    gateway: GatewayUnderTest,
) -> None:
    gw = gateway
    token = await org_key(gw, ORG_A)
    status, created = await create_instance(gw, token)
    assert status == 201, created
    instance_id = created["instance_uuid"]
    assert str(uuid.UUID(instance_id)) == instance_id
    assert created["status"] == "running"
    assert (created["image"], created["size"]) == ("debian-12", "small")
    assert ISO_Z.match(created["created_at"]), created["created_at"]
    port = gw.config.server.port
    assert created["access_url"] == f"http://instance-{instance_id}.browser.localhost:{port}/"

    async with loopback_client() as client:
        # HTTP: Chromium's own discovery endpoint, its URLs pointing at the public host.
        async with client.get(created["access_url"] + "json/version", headers=bearer(token)) as resp:
            assert resp.status == 200
            version = await resp.json()
        assert "Chrome/" in version["Browser"]
        ws_url = version["webSocketDebuggerUrl"]
        assert ws_url.startswith(f"ws://instance-{instance_id}.browser.localhost:{port}/devtools/browser/")
        # WebSocket: drive the browser to a page and read its title back.
        page = "data:text/html,<title>Hello from an instance</title><p>hi</p>"
        assert await page_title(client, ws_url, bearer(token), page) == "Hello from an instance"

    status, listed = await gw.request("GET", INSTANCES.format(org=ORG_A), headers=bearer(token))
    assert status == 200
    assert listed == {"instances": [created], "total": 1}

    # The instance is a VM underneath, owned by the organisation, invisible to the sandbox API.
    assert await gw.request("GET", "/v1/vms/") == (200, [])

    path = INSTANCES.format(org=ORG_A) + f"/{instance_id}"
    status, _ = await gw.request("DELETE", path, headers=bearer(token))
    assert status == 204
    async with loopback_client() as client:
        async with client.get(created["access_url"] + "json/version", headers=bearer(token)) as resp:
            assert resp.status == 404
            assert resp.headers["X-Gateway-Error"] == "no_route"
    status, listed = await gw.request("GET", INSTANCES.format(org=ORG_A), headers=bearer(token))
    assert listed == {"instances": [], "total": 0}
    status, again = await gw.request("DELETE", path, headers=bearer(token))
    assert (status, again["code"]) == (404, "instance_not_found")
    assert await gw.services.store.live_vm_ids() == []  # its VM ended with it


async def test_the_api_takes_only_the_organisations_own_bearer_tokens(gw: GatewayUnderTest) -> None:
    token_a, token_b = await org_key(gw, ORG_A), await org_key(gw, ORG_B)
    path = INSTANCES.format(org=ORG_A)
    for headers in ({}, bearer("gk_not-a-real-key"), {"Authorization": "Basic Zm9vOmJhcg=="}):
        status, body = await gw.request("GET", path, headers=headers, anonymous=True)
        assert status == 401, headers
        assert body["code"] == "unauthorized"
    async with gw.http.get(gw.url + path) as resp:
        assert resp.headers["WWW-Authenticate"] == "Bearer"

    # Another organisation's token, a sandbox key, a missing organisation: one and the same answer.
    answers = [
        await gw.request("GET", path, headers=bearer(token_b)),
        await gw.request("GET", path, headers=bearer(gw.api_key)),
        await gw.request("GET", INSTANCES.format(org=str(uuid.uuid4())), headers=bearer(token_b)),
        await gw.request("GET", INSTANCES.format(org="not-a-uuid"), headers=bearer(token_b)),
        await gw.request("POST", path, headers=bearer(token_b), json={"image": "debian-12", "size": "small"}),
    ]
    assert all(
        answer == (404, {"detail": "Organization not found", "code": "org_not_found"}) for answer in answers
    )
    status, body = await gw.request("GET", INSTANCES.format(org=ORG_A), headers=bearer(token_a))
    assert (status, body) == (200, {"instances": [], "total": 0})


async def test_an_instance_is_private_to_its_organisation_at_the_edge(gw: GatewayUnderTest) -> None:
    token_a, token_b = await org_key(gw, ORG_A), await org_key(gw, ORG_B)
    status, created = await create_instance(gw, token_a)
    assert status == 201, created
    url = created["access_url"] + "json/version"
    unknown = f"http://instance-{uuid.uuid4()}.browser.localhost:{gw.config.server.port}/json/version"

    async with loopback_client() as client:
        async with client.get(unknown) as resp:
            not_found = (resp.status, resp.headers["X-Gateway-Error"], await resp.read())
        assert not_found[:2] == (404, "no_route")
        # No token, another organisation's, a sandbox key: exactly what an unknown instance answers.
        for headers in ({}, bearer(token_b), bearer(gw.api_key), {"X-Access-Token": token_b}):
            async with client.get(url, headers=headers) as resp:
                assert (resp.status, resp.headers["X-Gateway-Error"], await resp.read()) == not_found
        # The organisation's key as X-Access-Token works like the Bearer form.
        async with client.get(url, headers={"X-Access-Token": token_a}) as resp:
            assert resp.status == 200

        # Organisation B sees nothing of A's instance.
        other = INSTANCES.format(org=ORG_B) + f"/{created['instance_uuid']}"
        assert (await gw.request("DELETE", other, headers=bearer(token_b)))[0] == 404
        assert (await gw.request("GET", other, headers=bearer(token_b)))[0] == 404
        status, listed = await gw.request("GET", INSTANCES.format(org=ORG_B), headers=bearer(token_b))
        assert listed["total"] == 0

    # A browser: the token once in the query becomes a host-only HttpOnly cookie, then a clean URL.
    async with loopback_client(cookie_jar=aiohttp.CookieJar()) as browser:
        async with browser.get(url + f"?gw_access_token={token_a}", allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/json/version"
            cookie = resp.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "Domain" not in cookie
            assert token_a not in cookie  # the cookie opens this instance only: it is no API key
            browser_cookie = {"Cookie": f"gw_access={resp.cookies['gw_access'].value}"}
        async with browser.get(url) as resp:
            assert resp.status == 200
            assert "webSocketDebuggerUrl" in await resp.json()

    # Revoking the key closes the instance to it at once (edges drop the cached key set), and to the
    # cookie it was traded for.
    await gw.services.key_store.revoke("org key")
    async with loopback_client() as client:

        async def refused() -> bool:
            async with client.get(url, headers=bearer(token_a)) as resp:
                return resp.status == 404

        await wait_for(refused, "the revoked key to be refused")
        async with client.get(url, headers=browser_cookie) as resp:
            assert resp.status == 404


async def test_images_and_sizes_come_from_the_catalog(gw: GatewayUnderTest) -> None:
    token = await org_key(gw, ORG_A)

    async def refused(body: dict[str, Any]) -> list[dict[str, Any]]:
        status, answer = await gw.request(
            "POST", INSTANCES.format(org=ORG_A), headers=bearer(token), json=body
        )
        assert status == 422, answer
        return answer["detail"]

    [problem] = await refused({"image": "ubuntu-99", "size": "small"})
    assert problem["loc"] == ["body", "image"]
    assert "unknown image 'ubuntu-99'" in problem["msg"] and "debian-12" in problem["msg"]
    [problem] = await refused({"image": "debian-12", "size": "huge"})
    assert problem["loc"] == ["body", "size"]
    assert "small, medium, large" in problem["msg"]
    [problem] = await refused({"image": "windows-10", "size": "small"})
    assert problem["loc"] == ["body", "image"]
    assert "cannot run on this gateway" in problem["msg"] and "Windows" in problem["msg"]
    problems = await refused({"image": "nope", "size": "nope"})
    assert [p["loc"] for p in problems] == [["body", "image"], ["body", "size"]]
    problems = await refused({})
    assert sorted((p["loc"][1], p["type"]) for p in problems) == [("image", "missing"), ("size", "missing")]
    assert (await refused({"image": 12, "size": "small"}))[0]["type"] == "string_type"
    assert await gw.services.store.live_vm_ids() == []  # nothing was started for a refused request


async def test_the_status_follows_the_browser_and_the_lifetime(gateway_factory: object) -> None:
    gw: GatewayUnderTest = await gateway_factory(  # type: ignore[operator]
        "process", vms={"min_lifetime_s": 1}, instances={"default_lifetime_s": 4}
    )
    token = await org_key(gw, ORG_A)
    listing = INSTANCES.format(org=ORG_A)
    status, created = await create_instance(gw, token)
    assert status == 201, created

    async def status_is(expected: str) -> bool:
        _, listed = await gw.request("GET", listing, headers=bearer(token))
        return [i["status"] for i in listed["instances"]] == [expected]

    # The browser closed through DevTools: the VM is still there, its browser is not.
    async with loopback_client() as client:
        async with client.get(created["access_url"] + "json/version", headers=bearer(token)) as resp:
            ws_url = (await resp.json())["webSocketDebuggerUrl"]
        async with client.ws_connect(ws_url, headers=bearer(token)) as ws:
            devtools = DevTools(ws)
            await devtools.call("Browser.close")
            await devtools.close()
    await wait_for(lambda: status_is("stopped"), "the instance to show stopped")
    # Its lifetime over, the reaper ends the VM: terminated, until destroyed.
    await wait_for(lambda: status_is("terminated"), "the instance to show terminated")
    path = f"{listing}/{created['instance_uuid']}"
    status, shown = await gw.request("GET", path, headers=bearer(token))
    assert (status, shown["status"]) == (200, "terminated")
    assert (await gw.request("DELETE", path, headers=bearer(token)))[0] == 204
    assert (await gw.request("GET", path, headers=bearer(token)))[0] == 404


async def test_an_image_that_fails_to_start_leaves_nothing_behind(gateway_factory: object) -> None:
    # Starts, then exits without ever listening (a program that exits at once can also fail the
    # driver's own start, a different message).
    program = ("sh", "-c", "echo 'no display: giving up' >&2; sleep 0.3")
    broken = ImageConfig(description="never listens", command=program, port=9222, drivers=("process",))
    gw: GatewayUnderTest = await gateway_factory(  # type: ignore[operator]
        "process", instances={"images": {"broken": broken}}
    )
    token = await org_key(gw, ORG_A)
    status, answer = await create_instance(gw, token, image="broken")
    assert status == 503, answer
    assert answer["code"] == "instance_failed"
    # What the program said is part of the answer: the operator sees why without a shell on the host.
    assert "exited before port 9222 accepted connections: no display: giving up" in answer["detail"]
    status, listed = await gw.request("GET", INSTANCES.format(org=ORG_A), headers=bearer(token))
    assert listed == {"instances": [], "total": 0}
    assert await gw.services.store.live_vm_ids() == []


@pytest.mark.parametrize("org", ["", "ORG", "00000000-0000-0000-0000-00000000000G"])
async def test_keys_are_made_only_for_organisation_uuids(gw: GatewayUnderTest, org: str) -> None:
    with pytest.raises(ValueError, match="lower-case UUIDs"):
        await gw.services.key_store.create("bad", org=org)


async def test_the_edge_keeps_the_organisations_credentials_from_the_instance(
    gateway_factory: object,
) -> None:
    # An image that runs the echo app instead of a browser, so the test sees what reaches the VM.
    port = free_port()
    echo = ImageConfig(command=("{python}", str(ECHO_APP), str(port)), port=port, drivers=("process",))
    gw: GatewayUnderTest = await gateway_factory(  # type: ignore[operator]
        "process", instances={"images": {"echo": echo}}
    )
    token = await org_key(gw, ORG_A)
    status, created = await create_instance(gw, token, image="echo")
    assert status == 201, created
    headers = bearer(token) | {"X-Access-Token": token, "Cookie": f"theme=dark; gw_access={token}"}
    async with loopback_client() as client:
        async with client.get(created["access_url"] + "echo/x?y=1", headers=headers) as resp:
            assert resp.status == 200
            seen = await resp.json()
    forwarded = {name.lower(): value for name, value in seen["headers"]}
    assert token not in json.dumps(seen)
    assert "authorization" not in forwarded and "x-access-token" not in forwarded
    assert forwarded["cookie"] == "theme=dark"
    assert forwarded["x-forwarded-host"] == created["access_url"].split("/")[2]
    assert seen["path"] == "/echo/x?y=1"
