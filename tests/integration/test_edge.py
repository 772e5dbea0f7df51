"""The edge end to end: real VMs (both drivers) running a real app, real clients on the public listener."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import resource
from pathlib import Path

import aiohttp
import pytest

from gateway.background import STOP_TIMEOUT_S
from gateway.state.events import VmChanged
from tests.conftest import GatewayUnderTest, free_port
from tests.fakes import EventQueue

# Every test here runs on each edge (the compiled one and the pure-Python one).
pytestmark = pytest.mark.both_edges

ECHO_APP = Path(__file__).parent / "apps" / "echo_app.py"


def echo_app_command(port: int) -> str:
    """A shell command that starts the echo app in a VM: the app's source goes in with the command, since
    a VM sees none of the host's files."""
    return (
        f"cat > \"$HOME/echo_app.py\" <<'GATEWAY_APP_EOF'\n{ECHO_APP.read_text()}\nGATEWAY_APP_EOF\n"
        f'python3 "$HOME/echo_app.py" {port}'
    )


APP_PORT = 3000
RAW_READ_TIMEOUT_S = 2.0


async def start_app(gw: GatewayUnderTest) -> tuple[str, str, str]:
    """A VM running the echo app on APP_PORT, exposed through app-url; returns (session, vm id, url)."""
    status, vm = await gw.request("POST", "/v1/vms", json={})
    assert status == 200, vm
    status, out = await gw.request(
        "POST",
        "/execute",
        json={"session_id": vm["session_id"], "language": "bash", "command": echo_app_command(APP_PORT)},
    )
    assert (status, out["exit_code"]) == (200, 0), out
    status, app = await gw.request("GET", f"/v1/sessions/app-url/{vm['session_id']}?port={APP_PORT}")
    assert status == 200, app
    return vm["session_id"], vm["vm_id"], app["url"]


async def raw_exchange(gw: GatewayUnderTest, data: bytes) -> tuple[bytes, bool]:
    """Send raw bytes; return what came back and whether the edge closed the connection."""
    reader, writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    received = b""
    try:
        writer.write(data)
        await writer.drain()
        while True:
            try:
                part = await asyncio.wait_for(reader.read(65536), RAW_READ_TIMEOUT_S)
            except TimeoutError:
                return received, False  # still open: the edge waits for more
            if not part:
                return received, True
            received += part
    finally:
        writer.close()


async def test_path_form_forwards_path_query_and_headers(gateway: GatewayUnderTest) -> None:
    gw = gateway
    sid, _, url = await start_app(gw)
    async with aiohttp.ClientSession() as client:
        for _ in range(2):  # the second request reuses both keep-alive connections
            async with client.get(
                url + "echo/a%20b?x=1&y=2",
                headers={"X-Forwarded-For": "6.6.6.6", "Accept": "application/json"},
            ) as resp:
                assert resp.status == 200
                seen = await resp.json()
        assert seen["path"] == "/echo/a%20b?x=1&y=2"
        headers = {k.lower(): v for k, v in seen["headers"]}
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["x-forwarded-prefix"] == f"/v1/app/{sid}/{APP_PORT}"
        assert headers["x-forwarded-proto"] == "http"
        # Without the slash: a redirect to the slash form, query kept.
        async with client.get(f"{gw.url}/v1/app/{sid}/{APP_PORT}?q=1", allow_redirects=False) as resp:
            assert resp.status == 308
            assert resp.headers["Location"] == f"/v1/app/{sid}/{APP_PORT}/?q=1"


async def test_host_form_reaches_the_same_app(gateway: GatewayUnderTest) -> None:
    gw = gateway
    _, vm_id, _ = await start_app(gw)
    host = f"{vm_id}-{APP_PORT}.{gw.config.api.sandbox_domain}"
    async with aiohttp.ClientSession() as client:
        async with client.get(gw.url + "/echo", headers={"Host": host}) as resp:
            assert resp.status == 200
            seen = await resp.json()
    assert seen["path"] == "/echo"
    assert dict((k.lower(), v) for k, v in seen["headers"])["host"] == host


async def test_header_routing_serves_several_vms_over_one_connection(gateway: GatewayUnderTest) -> None:
    """X-Sandbox-Id (a session or a VM id) and X-Sandbox-Port on the API host: one client connection
    for many VMs, HTTP and WebSocket; the app sees neither header, and the API is still the API."""
    gw = gateway
    apps = []
    for _ in range(2):
        sid, vm_id, _ = await start_app(gw)
        status, app = await gw.request("GET", f"/v1/sessions/app-url/{sid}?port={APP_PORT}")
        assert status == 200, app
        apps.append((sid, vm_id, app["vm_ip"]))
    connector = aiohttp.TCPConnector(limit=1)  # every request below on one connection to the API host
    async with aiohttp.ClientSession(connector=connector) as client:
        for round_ in range(2):
            for sid, vm_id, vm_ip in apps:
                sandbox = sid if round_ == 0 else vm_id
                routing = {"X-Sandbox-Id": sandbox, "X-Sandbox-Port": str(APP_PORT)}
                async with client.get(gw.url + "/echo/a?x=1", headers=routing) as resp:
                    assert resp.status == 200, await resp.text()
                    seen = await resp.json()
                assert (seen["path"], seen["local_address"]) == ("/echo/a?x=1", vm_ip)
                names = {name.lower() for name, _ in seen["headers"]}
                assert not names & {"x-sandbox-id", "x-sandbox-port"}, names
        sid, vm_id, _ = apps[1]
        routing = {"X-Sandbox-Id": vm_id, "X-Sandbox-Port": str(APP_PORT)}
        async with client.ws_connect(gw.url + "/ws", headers=routing) as ws:
            await ws.send_str("over one host")
            assert (await ws.receive(timeout=5)).data == "over one host"
        async with client.get(gw.url + "/v1/vms", headers=gw.auth) as resp:
            assert resp.status == 200  # no X-Sandbox-Id: the API
        # The same grammar and the same answer for what is not there as the other forms.
        bad = {"X-Sandbox-Id": sid.upper(), "X-Sandbox-Port": str(APP_PORT)}
        async with client.get(gw.url + "/echo", headers=bad) as resp:
            assert (resp.status, resp.headers["X-Gateway-Error"]) == (400, "invalid_target")
        for routing in (
            {"X-Sandbox-Id": sid, "X-Sandbox-Port": "3001"},  # not exposed
            {"X-Sandbox-Id": "00000000-0000-4000-8000-000000000000", "X-Sandbox-Port": str(APP_PORT)},
        ):
            async with client.get(gw.url + "/echo", headers=routing) as resp:
                assert (resp.status, resp.headers["X-Gateway-Error"]) == (404, "no_route")


async def upgrade_head(gw: GatewayUnderTest, target: str, host: str) -> dict[str, str]:
    """A WebSocket upgrade's response head (lower-case names), read off a raw connection."""
    reader, writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_READ_TIMEOUT_S)
    finally:
        writer.close()
    status, *lines = head.decode().split("\r\n")
    assert status.startswith("HTTP/1.1 101 "), head
    return {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines if line)}


@pytest.mark.parametrize("policy", ["preserve", "localhost"])
async def test_the_hosts_policy_holds_for_requests_and_upgrades_alike(
    gw: GatewayUnderTest, policy: str
) -> None:
    """A share's host policy: the public Host (preserve), or localhost:<port> with the public host in
    X-Forwarded-Host, the same for a plain request and a WebSocket upgrade (dev servers' HMR compares
    them), by path, host and header routing; a change applies at the next request."""
    share = {"port": APP_PORT, "is_public": True, "host": policy}
    status, vm = await gw.request("POST", "/v1/vms", json={"share": share})
    assert status == 200, vm
    run = {"session_id": vm["session_id"], "language": "bash", "command": echo_app_command(APP_PORT)}
    status, out = await gw.request("POST", "/execute", json=run)
    assert (status, out["exit_code"]) == (200, 0), out
    api_host = f"{gw.config.server.host}:{gw.config.server.port}"
    sandbox_host = f"{vm['vm_id']}-{APP_PORT}.{gw.config.api.sandbox_domain}"
    routes = [  # (target, Host, extra headers)
        (f"/v1/app/{vm['session_id']}/{APP_PORT}/", api_host, {}),
        ("/", sandbox_host, {}),
        ("/", api_host, {"X-Sandbox-Id": vm["vm_id"], "X-Sandbox-Port": str(APP_PORT)}),
    ]

    def expected(public: str, now: str) -> tuple[str, str]:
        return (public, public) if now == "preserve" else (f"localhost:{APP_PORT}", public)

    async with aiohttp.ClientSession() as client:
        for now in (policy, "localhost" if policy == "preserve" else "preserve"):
            for target, host, extra in routes:
                async with client.get(gw.url + target + "echo", headers={"Host": host, **extra}) as resp:
                    seen = {k.lower(): v for k, v in (await resp.json())["headers"]}
                assert (seen["host"], seen["x-forwarded-host"]) == expected(host, now), (target, seen)
                if not extra:  # (a raw upgrade: the header form is checked over HTTP)
                    upgraded = await upgrade_head(gw, target + "ws", host)
                    assert (upgraded["x-echo-host"], upgraded["x-echo-forwarded-host"]) == expected(host, now)
            # Changed on the share: the next request sees it (the edge hears of the change).
            other = "localhost" if now == "preserve" else "preserve"
            status, changed = await gw.request(
                "PATCH", f"/v1/shares/{vm['share']['share_id']}", json={"host": other}
            )
            assert status == 200 and changed["host"] == other, changed
    status, refused = await gw.request("PATCH", f"/v1/shares/{vm['share']['share_id']}", json={"host": "vm"})
    assert status == 422 and refused["detail"][0]["loc"] == ["body", "host"], refused


async def test_unknown_unexposed_and_killed_targets_answer_alike(gw: GatewayUnderTest) -> None:
    sid, vm_id, url = await start_app(gw)
    async with aiohttp.ClientSession() as client:
        answers = []
        for target in (
            f"{gw.url}/v1/app/{sid}/4000/",  # port not exposed
            f"{gw.url}/v1/app/00000000-0000-4000-8000-000000000000/{APP_PORT}/",  # no such session
        ):
            async with client.get(target) as resp:
                answers.append((resp.status, resp.headers.get("X-Gateway-Error"), await resp.json()))
        assert answers[0] == answers[1]
        assert answers[0][:2] == (404, "no_route")
        heard = EventQueue()
        gw.services.events.add(heard)  # after the edge's resolver: it has handled what this hears
        try:
            status, _ = await gw.request("DELETE", f"/v1/vms/{vm_id}")
            assert status == 200
            async with asyncio.timeout(5):
                while not isinstance(event := await heard.get(), VmChanged) or event.vm_id != vm_id:
                    pass
        finally:
            gw.services.events.remove(heard)
        async with client.get(url + "echo") as resp:
            assert (resp.status, resp.headers.get("X-Gateway-Error")) == (404, "no_route")


async def test_streamed_upload_and_chunked_download(gw: GatewayUnderTest) -> None:
    _, _, url = await start_app(gw)
    blob = bytes(range(256)) * 4096  # 1 MiB

    async def chunks():
        for i in range(0, len(blob), 65536):
            yield blob[i : i + 65536]

    async with aiohttp.ClientSession() as client:
        async with client.post(url + "echo", data=chunks()) as resp:
            seen = await resp.json()
        assert (seen["body_length"], seen["body_sha256"]) == (len(blob), hashlib.sha256(blob).hexdigest())
        async with client.post(url + "echo", data=blob) as resp:
            assert (await resp.json())["body_length"] == len(blob)
        async with client.get(url + "stream?n=64") as resp:
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            assert await resp.read() == b"x" * 64 * 1024
        async with client.head(url + "echo") as resp:
            assert (resp.status, resp.headers["Content-Length"], await resp.read()) == (200, "1234", b"")
        # The connection stays usable after a HEAD answer (no body was expected from the app).
        async with client.get(url + "echo") as resp:
            assert resp.status == 200


async def test_sse_events_arrive_as_the_app_flushes_them(gw: GatewayUnderTest) -> None:
    _, _, url = await start_app(gw)
    async with aiohttp.ClientSession() as client:
        async with client.get(url + "sse") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            async with asyncio.timeout(5):
                assert await resp.content.readuntil(b"\n\n") == b"data: one\n\n"
            # The app sends the second event only after this request: the first was not buffered.
            async with client.get(url + "sse-next") as nxt:
                assert nxt.status == 200
            async with asyncio.timeout(5):
                assert await resp.content.readuntil(b"\n\n") == b"data: two\n\n"


async def test_websocket_echo_through_the_edge(gateway: GatewayUnderTest) -> None:
    _, _, url = await start_app(gateway)
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(url + "ws") as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
            big = b"z" * 200_000
            await ws.send_bytes(big)
            assert (await ws.receive(timeout=5)).data == big
            await ws.close()
        # An h2c upgrade is never forwarded: the request is served as a plain one.
        async with client.get(url + "echo", headers={"Connection": "Upgrade", "Upgrade": "h2c"}) as resp:
            seen = await resp.json()
        assert "upgrade" not in {k.lower() for k, _ in seen["headers"]}


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /x HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
    ],
    ids=["cl-and-te", "two-cl", "negative-cl", "bad-chunk-size", "bare-lf", "bare-cr"],
)
async def test_malformed_requests_are_400_and_closed(gw: GatewayUnderTest, request_bytes: bytes) -> None:
    received, closed = await raw_exchange(gw, request_bytes)
    assert received.startswith(b"HTTP/1.1 400 "), received
    assert closed


async def test_api_requests_still_reach_the_control_plane(gw: GatewayUnderTest) -> None:
    received, _ = await raw_exchange(
        gw, b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body.startswith(b"{") or json.loads(body or b"{}") is not None


SHORT_EDGE = {"edge": {"header_timeout_s": 0.5, "upstream_first_byte_timeout_s": 1.0}}


async def test_slow_headers_are_cut_and_big_headers_refused(gateway_factory: object) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", **SHORT_EDGE)  # type: ignore[operator]
    reader, writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed by the header deadline, not by us
    writer.close()
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(gw.config.edge.max_header_count + 1))
    received, closed = await raw_exchange(gw, b"GET / HTTP/1.1\r\nHost: localhost\r\n" + many + b"\r\n")
    assert received.startswith(b"HTTP/1.1 431 ") and closed


async def test_upstream_failures_are_502_and_504(gateway_factory: object) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", **SHORT_EDGE)  # type: ignore[operator]
    sid, _, url = await start_app(gw)
    status, _ = await gw.request("GET", f"/v1/sessions/app-url/{sid}?port=4001")  # exposed, nothing listens
    assert status == 200
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{gw.url}/v1/app/{sid}/4001/") as resp:
            assert (resp.status, resp.headers["X-Gateway-Error"]) == (502, "upstream_refused")
        async with client.get(url + "hang", headers={"Accept": "text/html"}) as resp:
            assert (resp.status, resp.headers["X-Gateway-Error"]) == (504, "upstream_timeout")
            assert resp.headers["Content-Type"].startswith("text/html")
        # An SSE stream may stay idle longer than the first-byte timeout: only the head is timed.
        async with client.get(url + "sse") as resp:
            assert await resp.content.readuntil(b"\n\n") == b"data: one\n\n"
            await asyncio.sleep(gw.config.edge.upstream_first_byte_timeout_s * 1.5)  # idle on purpose
            async with client.get(url + "sse-next") as nxt:
                assert nxt.status == 200
            assert await resp.content.readuntil(b"\n\n") == b"data: two\n\n"


async def test_vm_killed_mid_stream_ends_the_client_stream(gateway: GatewayUnderTest) -> None:
    gw = gateway
    _, vm_id, url = await start_app(gw)
    async with aiohttp.ClientSession() as client:
        async with client.get(url + "sse") as resp:
            assert await resp.content.readuntil(b"\n\n") == b"data: one\n\n"
            status, _ = await gw.request("DELETE", f"/v1/vms/{vm_id}")
            assert status == 200
            async with asyncio.timeout(5):
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.content.read()


async def test_vm_killed_mid_websocket_closes_the_client_tunnel(gateway: GatewayUnderTest) -> None:
    _, vm_id, url = await start_app(gateway)
    async with aiohttp.ClientSession() as client, client.ws_connect(url + "ws") as ws:
        await ws.send_str("before")
        assert (await ws.receive(timeout=5)).data == "before"
        status, _ = await gateway.request("DELETE", f"/v1/vms/{vm_id}")
        assert status == 200
        # The tunnel ends promptly (the VM's side may vanish without a FIN): the client sees its
        # connection close instead of waiting on a dead peer.
        message = await ws.receive(timeout=5)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)


@pytest.mark.parametrize(
    ("request_line", "host", "status"),
    [
        (b"GET http://169.254.169.254/latest HTTP/1.1", b"localhost", 400),
        (b"CONNECT 10.0.0.1:22 HTTP/1.1", b"localhost", 405),
        (b"GET /v1/app/{sid}/3000%2f..%2f/ HTTP/1.1", b"localhost", 400),
        (b"GET /v1/app/{sid}/03000/ HTTP/1.1", b"localhost", 400),
        (b"GET /v1/app/{sid}/3000/../../admin HTTP/1.1", b"localhost", 400),
        (b"GET /v1/app/{sid}/3000/%2e%2e/x HTTP/1.1", b"localhost", 400),
        (b"GET /v1/app/{sid}/22/ HTTP/1.1", b"localhost", 404),
        (b"GET / HTTP/1.1", b"{vm}-22.sandbox.localhost", 404),
        (b"GET / HTTP/1.1", b"{vm}-3000.sandbox.localhost@evil", 400),
        (b"GET / HTTP/1.1", b"169.254.169.254:3000/x", 400),
    ],
)
async def test_ssrf_attempts_are_refused(
    gw: GatewayUnderTest, request_line: bytes, host: bytes, status: int
) -> None:
    sid, vm_id, _ = await start_app(gw)
    head = (
        request_line.replace(b"{sid}", sid.encode()) + b"\r\nHost: " + host.replace(b"{vm}", vm_id.encode())
    )
    received, _ = await raw_exchange(gw, head + b"\r\nConnection: close\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 %d " % status), received[:200]


GIB = 1024 * 1024 * 1024


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def test_one_gib_each_way_streams_with_flat_memory(gw: GatewayUnderTest) -> None:
    """The edge runs in this process: its peak memory must not grow with the bodies it relays."""
    _, _, url = await start_app(gw)
    piece = b"u" * (256 * 1024)

    async def upload():
        for _ in range(GIB // len(piece)):
            yield piece

    before = max_rss_bytes()
    async with aiohttp.ClientSession() as client:
        headers = {"Content-Length": str(GIB)}
        async with client.post(url + "discard", data=upload(), headers=headers) as resp:
            assert (await resp.json())["body_length"] == GIB
        received = 0
        async with client.get(url + f"big?mib={GIB // 1024 // 1024}") as resp:
            async for chunk in resp.content.iter_chunked(256 * 1024):
                received += len(chunk)
        assert received == GIB
    assert max_rss_bytes() - before < 64 * 1024 * 1024


async def test_a_long_download_arrives_whole_through_the_pump_and_the_connection_serves_again(
    gw: GatewayUnderTest,
) -> None:
    """A long Content-Length body is pumped (gateway/edge/pump.py): to a client reading slowly at first,
    so the edge's buffer is held and must not be written over, then at full speed."""
    _, _, url = await start_app(gw)
    edge = gw.services.edge
    assert edge is not None
    mib, piece = 8, 256 * 1024
    expected = hashlib.sha256(b"".join(bytes([i % 251]) * piece for i in range(mib * 4))).hexdigest()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as client:
        async with client.get(url + f"pattern?mib={mib}") as resp:
            digest, received = hashlib.sha256(), 0
            async for chunk in resp.content.iter_chunked(65536):
                digest.update(chunk)
                received += len(chunk)
                if received < 2 * 2**20:
                    await asyncio.sleep(0.002)  # a slow reader: the edge's writes to it wait
        assert (received, digest.hexdigest()) == (mib * 2**20, expected)
        assert edge.pool.pumped == 1
        async with client.get(url + "echo") as resp:  # the same client connection, after the pump
            assert resp.status == 200 and (await resp.json())["path"] == "/echo"
        async with client.get(url + "short?mib=4") as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()  # the app stopped halfway: the client sees the cut, not a whole body


async def test_a_long_upload_arrives_whole_through_the_pump_and_the_connection_serves_again(
    gw: GatewayUnderTest,
) -> None:
    """A long Content-Length request body is pumped up: to an app that reads its first half slowly, so
    the edge's writes to it wait and the buffer they hold must not be written over."""
    _, _, url = await start_app(gw)
    edge = gw.services.edge
    assert edge is not None
    piece = 256 * 1024
    body = b"".join(bytes([i % 251]) * piece for i in range(96))  # 24 MiB, each piece its own byte
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as client:
        headers = {"Content-Length": str(len(body))}
        async with client.post(url + "slow-echo", data=io.BytesIO(body), headers=headers) as resp:
            seen = await resp.json()
        assert (seen["body_length"], seen["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
        assert edge.pumped == 1
        async with client.get(url + "echo") as resp:  # the same client connection, after the pump
            assert resp.status == 200 and (await resp.json())["method"] == "GET"


async def test_expect_continue_trailers_and_pool_closed_with_its_vm(gw: GatewayUnderTest) -> None:
    sid, vm_id, url = await start_app(gw)
    async with aiohttp.ClientSession() as client:
        async with client.post(url + "echo", data=b"abc", expect100=True) as resp:
            assert (await resp.json())["body_length"] == 3
    path = f"/v1/app/{sid}/{APP_PORT}/stream?n=2".encode()
    received, _ = await raw_exchange(
        gw, b"GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % path
    )
    assert received.endswith(b"0\r\nX-Checksum: 2\r\n\r\n"), received[-100:]
    edge = gw.services.edge
    assert edge is not None and any(c.address.vm_id == vm_id for cs in edge.pool.idle.values() for c in cs)
    status, _ = await gw.request("DELETE", f"/v1/vms/{vm_id}")
    assert status == 200
    # The kill reaches every edge through pub/sub; within a second its pooled connections are closed.
    deadline = asyncio.get_running_loop().time() + 1.0
    while any(c.address.vm_id == vm_id for cs in edge.pool.idle.values() for c in cs):
        assert asyncio.get_running_loop().time() < deadline, "pooled connections outlived their VM"
        await asyncio.sleep(0.01)


async def test_private_share_needs_its_token_which_never_reaches_the_vm(gw: GatewayUnderTest) -> None:
    status, vm = await gw.request("POST", "/v1/vms", json={"share": {"port": APP_PORT}})
    assert status == 200, vm
    share = vm["share"]
    token, url = share["access_token"], share["url"]
    assert (share["port"], share["is_public"]) == (APP_PORT, False)
    status, out = await gw.request(
        "POST",
        "/execute",
        json={"session_id": vm["session_id"], "language": "bash", "command": echo_app_command(APP_PORT)},
    )
    assert (status, out["exit_code"]) == (200, 0)
    status, shown = await gw.request("GET", f"/v1/vms/{vm['vm_id']}")
    assert "access_token" not in shown["share"] and "token_sha256" not in json.dumps(shown)
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP host, as a browser keeps them
    async with aiohttp.ClientSession(cookie_jar=jar) as client:
        for headers in ({}, {"X-Access-Token": "wrong"}):
            async with client.get(url + "echo", headers=headers) as resp:
                assert (resp.status, resp.headers["X-Gateway-Error"]) == (404, "no_route")
        async with client.get(url + "echo", headers={"X-Access-Token": token}) as resp:
            seen = await resp.json()
        assert "x-access-token" not in {k.lower() for k, _ in seen["headers"]}
        # Once in the query: traded for a cookie scoped to this app, and a redirect to the clean URL.
        async with client.get(url + f"echo?x=1&gw_access_token={token}", allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == f"/v1/app/{vm['session_id']}/{APP_PORT}/echo?x=1"
            cookie = resp.headers["Set-Cookie"]
            assert f"Path=/v1/app/{vm['session_id']}/{APP_PORT}/" in cookie and "HttpOnly" in cookie
            assert token not in cookie  # the cookie opens this app only; it is not the share's token
            value = resp.cookies["gw_access"].value
        async with client.get(url + "echo?x=1", headers={"Cookie": f"mine=1; gw_access={value}"}) as resp:
            seen = await resp.json()
        assert seen["path"] == "/echo?x=1"
        assert [v for k, v in seen["headers"] if k.lower() == "cookie"] == ["mine=1"]
    async with aiohttp.ClientSession() as fresh:  # no jar: the token itself in the cookie is no credential
        async with fresh.get(url + "echo", headers={"Cookie": f"gw_access={token}"}) as resp:
            assert (resp.status, resp.headers["X-Gateway-Error"]) == (404, "no_route")
        # Header routing on the API host: the same rule.
        routing = {"X-Sandbox-Id": vm["vm_id"], "X-Sandbox-Port": str(APP_PORT)}
        async with fresh.get(gw.url + "/echo", headers=routing) as resp:
            assert (resp.status, resp.headers["X-Gateway-Error"]) == (404, "no_route")
        async with fresh.get(gw.url + "/echo", headers=routing | {"X-Access-Token": token}) as resp:
            seen = await resp.json()
        assert seen["path"] == "/echo" and "x-access-token" not in {k.lower() for k, _ in seen["headers"]}


async def test_connections_beyond_the_limit_are_refused_cleanly(gateway_factory: object) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", edge={"max_connections": 2})  # type: ignore[operator]
    held = [await asyncio.open_connection(gw.config.server.host, gw.config.server.port) for _ in range(2)]
    try:
        # Accepted connections register on the loop; a request on each proves both are in.
        for reader, writer in held:
            writer.write(b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
        received, closed = await raw_exchange(gw, b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert received.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in received and closed
    finally:
        for _, writer in held:
            writer.close()


async def test_event_feed_stops_promptly(gw: GatewayUnderTest) -> None:
    """redis-py's get_message swallows a cancellation; stopping must still end the feed's task."""
    feed = gw.services.events
    async with asyncio.timeout(5):
        await feed.following.wait()
        await gw.services.edge.resolver.following.wait()  # type: ignore[union-attr]
    task = feed._task
    assert task is not None
    async with asyncio.timeout(2 * STOP_TIMEOUT_S):
        await feed.stop()
    assert task.done() and not feed.following.is_set()
    assert not gw.services.edge.resolver.following.is_set()  # type: ignore[union-attr]


async def test_a_trusted_proxy_forwarded_headers_are_extended(gateway_factory: object) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", edge={"trusted_proxies": "127.0.0.1"})  # type: ignore[operator]
    _, _, url = await start_app(gw)
    sent = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    async with aiohttp.ClientSession() as client, client.get(url + "echo", headers=sent) as resp:
        seen = {k.lower(): v for k, v in (await resp.json())["headers"]}
    assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"


async def test_two_edges_on_one_redis_both_route_and_both_refuse_a_killed_vm(
    gateway_factory: object, tmp_path: Path
) -> None:
    first: GatewayUnderTest = await gateway_factory("process")  # type: ignore[operator]
    port = free_port()
    second: GatewayUnderTest = await gateway_factory(  # type: ignore[operator]
        "process",
        server={
            "data_dir": str(tmp_path / "second"),
            "listen": f"127.0.0.1:{port}",
            "public_url": f"http://127.0.0.1:{port}",
        },
    )
    sid, vm_id, _ = await start_app(first)
    paths = [f"{gw.url}/v1/app/{sid}/{APP_PORT}/echo" for gw in (first, second)]
    async with aiohttp.ClientSession() as client:
        for url in paths:
            async with client.get(url) as resp:
                assert resp.status == 200
        status, _ = await first.request("DELETE", f"/v1/vms/{vm_id}")
        assert status == 200
        # Within a second of the kill, neither edge routes to it any more.
        deadline = asyncio.get_running_loop().time() + 1.0
        for url in paths:
            while True:
                async with client.get(url) as resp:
                    if resp.status == 404:
                        break
                assert asyncio.get_running_loop().time() < deadline, f"{url} still routed"
                await asyncio.sleep(0.02)
