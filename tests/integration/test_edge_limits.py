"""Edge limits with a real app in a VM: body size per route, stream and tunnel idleness, upload pacing,
and an app that answers before the request body ended."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import GatewayUnderTest
from tests.integration.test_edge import APP_PORT, raw_exchange, start_app

# Every test here runs on each edge (the compiled one and the pure-Python one).
pytestmark = pytest.mark.both_edges

SMALL_BODY_LIMIT = 1000


async def test_a_body_over_the_route_limit_is_413(gateway_factory: object) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", edge={"max_body_bytes": SMALL_BODY_LIMIT})  # type: ignore[operator]
    sid, _, url = await start_app(gw)
    path = f"/v1/app/{sid}/{APP_PORT}/echo".encode()
    # Known up front from Content-Length: refused before anything reaches the app.
    received, closed = await raw_exchange(
        gw,
        b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (path, SMALL_BODY_LIMIT + 1),
    )
    assert received.startswith(b"HTTP/1.1 413 ") and b"X-Gateway-Error: body_too_large" in received
    assert closed
    # Chunked: refused when the running total passes the limit, before the app answered.
    chunk = b"x" * 600
    body = b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n"
    received, closed = await raw_exchange(
        gw, b"POST %s HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n%s" % (path, body)
    )
    assert received.startswith(b"HTTP/1.1 413 ") and closed
    # At the limit: forwarded. The API's own limit is separate (api.max_body_bytes).
    async with aiohttp.ClientSession() as client:
        async with client.post(url + "echo", data=b"y" * SMALL_BODY_LIMIT) as resp:
            assert resp.status == 200 and (await resp.json())["body_length"] == SMALL_BODY_LIMIT
        async with client.post(gw.url + "/v1/sessions/session", json={"api_key": gw.api_key}) as resp:
            assert resp.status == 200


async def test_quiet_streams_and_tunnels_end_at_their_idle_limits(gateway_factory: object) -> None:
    limits = {"stream_idle_timeout_s": 0.5, "tunnel_idle_timeout_s": 0.5}
    gw: GatewayUnderTest = await gateway_factory("process", edge=limits)  # type: ignore[operator]
    _, _, url = await start_app(gw)
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(url + "ws") as ws:
            await ws.send_str("hello")
            assert (await ws.receive()).data == "hello"
            async with asyncio.timeout(5):
                msg = await ws.receive()  # nothing is sent: the edge ends the quiet tunnel
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        async with client.get(url + "sse") as resp:
            assert await resp.content.readuntil(b"\n\n") == b"data: one\n\n"
            async with asyncio.timeout(5):
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.content.read()  # the app stays quiet: the stream is cut


async def test_an_upload_slower_than_the_first_byte_timeout_completes_while_it_progresses(
    gateway_factory: object,
) -> None:
    # (1 s, not less: the timeout also covers the API call that starts the app, slow on a loaded machine.)
    gw: GatewayUnderTest = await gateway_factory("process", edge={"upstream_first_byte_timeout_s": 1.0})  # type: ignore[operator]
    _, _, url = await start_app(gw)
    part = b"z" * 65536
    parts = 10

    async def paced():
        for _ in range(parts):
            yield part
            await asyncio.sleep(0.15)  # pacing the upload is the point: 1.5 s in all, 0.15 s silences

    async with aiohttp.ClientSession() as client:
        async with client.post(
            url + "discard", data=paced(), headers={"Content-Length": str(len(part) * parts)}
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["body_length"] == len(part) * parts


@pytest.mark.parametrize(
    ("app_path", "length", "first", "pumped"),
    # (With a megabyte it never read, the plain /early app could close first, and its reset overtake its
    # answer: /early-drain answers, then reads on.)
    [("early", 100_000, 500, 0), ("early-drain", 8 * 2**20, 2**20, 1)],
    ids=["plain", "pumped"],
)
async def test_an_app_answering_mid_upload_never_gets_its_connection_pooled(
    gw: GatewayUnderTest, app_path: str, length: int, first: int, pumped: int
) -> None:
    """Also with a long body going up through a pump (gateway/edge/pump.py): the rest is read, dropped."""
    sid, _, url = await start_app(gw)
    edge = gw.services.edge
    assert edge is not None
    reader, writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    path = f"/v1/app/{sid}/{APP_PORT}/{app_path}".encode()
    try:
        # Part of a body: the app answers anyway; the edge's upstream connection is mid-request.
        writer.write(b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (path, length))
        writer.write(b"a" * first)
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"Connection: close" in head  # the rest of the body will not be read: the client knows
            assert edge.pumped == pumped
            writer.write(b"b" * first)  # more of the body
            await reader.read()  # and the edge closes the client connection after the answer
    finally:
        writer.close()
    pooled = [c for cs in edge.pool.idle.values() for c in cs if c.address.port == APP_PORT]
    assert not pooled, "a mid-request connection was pooled"
    async with aiohttp.ClientSession() as client:
        async with client.get(url + "echo") as resp:
            assert resp.status == 200 and (await resp.json())["path"] == "/echo"


async def test_a_101_without_a_valid_handshake_opens_no_tunnel(gw: GatewayUnderTest) -> None:
    _, _, url = await start_app(gw)
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(url + "ws-bad")
        assert refused.value.status == 502
        assert refused.value.headers is not None
        assert refused.value.headers["X-Gateway-Error"] == "upstream_bad_upgrade"
        async with client.ws_connect(url + "ws") as ws:  # the same app's valid handshake still works
            await ws.send_str("ok")
            assert (await ws.receive()).data == "ok"


async def status_within(client: aiohttp.ClientSession, url: str, wanted: int, limit_s: float = 5.0) -> bool:
    """Whether a GET of url answers ``wanted`` within limit_s, asking again after each other answer (as
    a client told Retry-After would, only sooner)."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        async with client.get(url) as resp:
            if resp.status == wanted:
                return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)


async def test_a_vm_at_its_exchange_cap_gets_429_others_are_served_and_ended_ones_free_their_place(
    gateway_factory: object,
) -> None:
    """edge.max_exchanges_per_vm: requests in flight and open tunnels to one VM count; beyond the cap a
    request gets 429 with Retry-After (the VM's next requests pass again once some end), and another
    VM is not affected."""
    gw: GatewayUnderTest = await gateway_factory("process", edge={"max_exchanges_per_vm": 2})  # type: ignore[operator]
    _, _, busy = await start_app(gw)
    _, _, other = await start_app(gw)
    async with aiohttp.ClientSession() as client:
        stream = await client.get(busy + "sse")  # its head came: in flight until its client lets go
        ws = await client.ws_connect(busy + "ws")  # an open tunnel
        try:
            async with client.get(busy + "echo") as resp:
                assert (resp.status, resp.headers["X-Gateway-Error"]) == (429, "too_many_vm_exchanges")
                assert resp.headers["Retry-After"] == "1"
            async with client.get(other + "echo") as resp:
                assert resp.status == 200
            await ws.close()  # one place is free again, once the edge sees the tunnel end
            assert await status_within(client, busy + "echo", 200)
        finally:
            stream.close()
            await ws.close()
        # The stream's client went: its place is free too (with a tunnel open, a request fits).
        async with client.ws_connect(busy + "ws") as first:
            assert await status_within(client, busy + "echo", 200)
            async with client.ws_connect(busy + "ws") as second:
                await first.send_str("a")
                await second.send_str("b")
                assert (await first.receive(timeout=5)).data == "a"
                assert (await second.receive(timeout=5)).data == "b"


async def test_api_requests_over_a_keys_rate_get_429_before_the_control_plane(
    gateway_factory: object,
) -> None:
    """edge.api_rate_per_key: a key's burst passes, then 429 with Retry-After; another key and requests
    without a key are not counted against it, and the refused request never reached the API."""
    edge = {"api_rate_per_key": 0.5, "api_burst_per_key": 2}
    gw: GatewayUnderTest = await gateway_factory("process", edge=edge)  # type: ignore[operator]
    other = await gw.new_key()
    async with aiohttp.ClientSession() as client:
        for _ in range(2):
            async with client.get(gw.url + "/v1/vms", headers=gw.auth) as resp:
                assert resp.status == 200
        async with client.post(gw.url + "/v1/vms", headers=gw.auth, json={}) as resp:
            assert (resp.status, resp.headers["X-Gateway-Error"]) == (429, "too_many_requests")
            assert resp.headers["Retry-After"] == "2"  # a token every 2 s
        async with client.get(gw.url + "/v1/vms", headers={"Authorization": f"Bearer {other}"}) as resp:
            assert resp.status == 200
        async with client.get(gw.url + "/v1/vms") as resp:
            assert resp.status == 401  # no key: the API's own answer
    assert not await gw.services.store.live_vm_ids()  # the refused create made no VM
