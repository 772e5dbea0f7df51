"""HTTP/2 at the edge: ALPN h2 over TLS and h2c with prior knowledge, many streams on one connection to
several VMs (header routing), flow control both ways, gRPC to an app in a VM over h2c; real clients
(the h2 library driven by hand, curl --http2, grpcio)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
import trustme

from gateway.edge.http2 import RESET_FLOOD
from tests.conftest import GatewayUnderTest
from tests.integration.test_edge import APP_PORT, start_app
from tests.integration.test_tls import API_HOST, SANDBOX, store_cert, tls_address, tls_sections

# Every test here runs on each edge (the compiled one and the pure-Python one).
pytestmark = pytest.mark.both_edges

GRPC_APP = Path(__file__).parent / "apps" / "grpc_app.py"
GRPC_PORT = 50051
TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@dataclass
class Answer:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    head_in: asyncio.Event = field(default_factory=asyncio.Event)


class H2Client:
    """An HTTP/2 client on the h2 state machine: concurrent requests on one connection. ``read_pause``
    (an Event, cleared) stops it taking response data, to fill the edge's windows."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int) -> None:
        self.reader, self.writer = reader, writer
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.conn.initiate_connection()
        self.answers: dict[int, Answer] = {}
        self.window_opened = asyncio.Event()
        self.reading = asyncio.Event()
        self.reading.set()
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.flush()
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None, server_name: str = "",
        window: int = 65535,
    ) -> H2Client:  # fmt: skip
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl_context, server_hostname=server_name if ssl_context else None
        )
        return cls(reader, writer, window)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    async def _read(self) -> None:
        try:
            while True:
                await self.reading.wait()
                data = await self.reader.read(65536)
                if not data:
                    break
                for event in self.conn.receive_data(data):
                    self._handle(event)
                self.flush()
        finally:
            for answer in self.answers.values():
                if not answer.done.done():
                    answer.done.set_exception(ConnectionError("the connection closed"))
            if not self.closed.done():
                self.closed.set_result(None)

    def _handle(self, event: h2.events.Event) -> None:
        answer = self.answers.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and answer is not None:
            answer.headers = dict(event.headers or [])
            answer.status = int(answer.headers[b":status"])
            answer.head_in.set()
        elif isinstance(event, h2.events.DataReceived) and answer is not None:
            answer.body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and answer is not None:
            answer.trailers = dict(event.headers or [])
        elif isinstance(event, h2.events.StreamEnded) and answer is not None:
            answer.done.set_result(None)
        elif isinstance(event, h2.events.StreamReset) and answer is not None:
            answer.done.set_exception(ConnectionResetError(f"stream reset: {event.error_code!r}"))
        elif isinstance(event, h2.events.WindowUpdated):
            self.window_opened.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event

    def start(
        self, path: str, authority: str, *, method: str = "GET", headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
        body: bytes | None = None, scheme: str = "https",
    ) -> tuple[int, Answer]:  # fmt: skip
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":scheme", scheme), (":authority", authority), (":path", path)]
        fields += headers
        self.conn.send_headers(
            stream_id, [(n.encode(), v.encode()) for n, v in fields], end_stream=body is None
        )
        answer = self.answers[stream_id] = Answer()
        self.flush()
        return stream_id, answer

    async def send_body(self, stream_id: int, body: bytes) -> None:
        """The body as the windows allow, then the stream's end."""
        while body:
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.window_opened.clear()
                await asyncio.wait_for(self.window_opened.wait(), TIMEOUT_S)
                continue
            self.conn.send_data(stream_id, body[:window])
            body = body[window:]
            self.flush()
        self.conn.end_stream(stream_id)
        self.flush()

    async def request(self, path: str, authority: str, **kwargs: object) -> Answer:
        body = kwargs.get("body")
        stream_id, answer = self.start(path, authority, **kwargs)  # type: ignore[arg-type]
        if isinstance(body, bytes):
            await self.send_body(stream_id, body)
        await asyncio.wait_for(answer.done, TIMEOUT_S)
        return answer

    async def close(self) -> None:
        self.writer.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def h2_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


async def tls_gateway(
    gateway_factory: object, tmp_path: Path, ca: trustme.CA, **edge: object
) -> GatewayUnderTest:
    sections = tls_sections(tmp_path)
    sections["edge"] = {**sections["edge"], **edge}
    gw: GatewayUnderTest = await gateway_factory("process", **sections)  # type: ignore[operator]
    await store_cert(gw, ca.issue_cert(f"*.{SANDBOX}", API_HOST))
    return gw


def seen_by_app(answer: Answer) -> dict[str, object]:
    assert answer.status == 200, (answer.status, bytes(answer.body))
    return json.loads(bytes(answer.body))


async def test_many_streams_on_one_tls_connection_reach_several_vms_by_header_routing(
    gateway_factory: object, tmp_path: Path, ca: trustme.CA
) -> None:
    gw = await tls_gateway(gateway_factory, tmp_path, ca)
    vms = []
    for _ in range(3):
        sid, vm_id, _ = await start_app(gw)
        status, app = await gw.request("GET", f"/v1/sessions/app-url/{sid}?port={APP_PORT}")
        assert status == 200, app
        vms.append((vm_id, app["vm_ip"]))
    host, port = tls_address(gw)
    client = await H2Client.open(host, port, ssl_context=h2_context(ca), server_name=API_HOST)
    try:
        assert client.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        # 60 streams at once, 20 per VM, interleaved, on the one connection.
        started = []
        for i in range(60):
            vm_id, vm_ip = vms[i % 3]
            routing = [
                ("x-sandbox-id", vm_id),
                ("x-sandbox-port", str(APP_PORT)),
                ("cookie", "a=1"),
                ("cookie", "b=2"),
            ]
            started.append((vm_ip, i, client.start(f"/echo/{i}?q={i}", API_HOST, headers=routing)[1]))
        for vm_ip, i, answer in started:
            await asyncio.wait_for(answer.done, TIMEOUT_S)
            seen = seen_by_app(answer)
            assert (seen["path"], seen["local_address"]) == (f"/echo/{i}?q={i}", vm_ip)
            headers = {k.lower(): v for k, v in seen["headers"]}
            assert "x-sandbox-id" not in headers and "x-sandbox-port" not in headers
            assert headers["x-forwarded-proto"] == "https"
            # HTTP/2's split cookie fields, joined (RFC 9113 8.2.3)
            assert headers["cookie"] == "a=1; b=2"
            assert b"connection" not in answer.headers and b"transfer-encoding" not in answer.headers
        # A body up, larger than the windows: it flows as the edge acknowledges it.
        vm_id, vm_ip = vms[0]
        body = bytes(range(256)) * 4096  # 1 MiB: more than the initial windows
        answer = await client.request(
            "/echo", API_HOST, method="POST", body=body,
            headers=[("x-sandbox-id", vm_id), ("x-sandbox-port", str(APP_PORT))],
        )  # fmt: skip
        seen = seen_by_app(answer)
        assert (seen["body_length"], seen["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
        # The API on the same connection; an unknown VM gets the edge's own answer on its stream.
        auth = [(name.lower(), value) for name, value in gw.auth.items()]
        answer = await client.request("/v1/vms", API_HOST, headers=auth)
        assert answer.status == 200, bytes(answer.body)
        answer = await client.request(
            "/echo", API_HOST, headers=[("x-sandbox-id", "vm-" + "0" * 32), ("x-sandbox-port", "3000")]
        )
        assert answer.status in (400, 404) and answer.headers[b"x-gateway-error"]
        await no_streams_left(gw)
    finally:
        await client.close()


async def test_curl_http2_over_tls_and_h2c_with_prior_knowledge(
    gateway_factory: object, tmp_path: Path, ca: trustme.CA
) -> None:
    gw = await tls_gateway(gateway_factory, tmp_path, ca)
    _, vm_id, _ = await start_app(gw)
    app_host = f"{vm_id}-{APP_PORT}.{SANDBOX}"
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    host, port = tls_address(gw)
    out = await curl(
        "--http2", "--cacert", str(ca_file), "--resolve", f"{app_host}:{port}:{host}",
        f"https://{app_host}:{port}/echo/tls",
    )  # fmt: skip
    version, seen = out
    assert version == "2" and seen["path"] == "/echo/tls"
    # h2c on the plain listener, for clients that know (no Upgrade: h2c dance).
    plain = f"{gw.config.server.host}:{gw.config.server.port}"
    version, seen = await curl(
        "--http2-prior-knowledge", "-H", f"Host: {app_host}", f"http://{plain}/echo/h2c"
    )
    assert version == "2" and seen["path"] == "/echo/h2c"
    assert {k.lower(): v for k, v in seen["headers"]}["x-forwarded-proto"] == "http"
    # Still HTTP/1.1 for everyone else on both listeners.
    version, _ = await curl("--http1.1", "-H", f"Host: {app_host}", f"http://{plain}/echo/h1")
    assert version == "1.1"


async def curl(*args: str) -> tuple[str, dict[str, object]]:
    """curl's HTTP version and the JSON body it got."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "-w", "\n%{http_version}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err
    body, _, version = out.decode().rpartition("\n")
    return version, json.loads(body)


async def test_flow_control_holds_a_large_download_for_a_slow_reader(gateway_factory: object) -> None:
    """A client with a small window that stops reading: the edge holds the stream (and the VM) rather
    than buffering it all, and every byte arrives once it reads again; other streams go on meanwhile."""
    gw: GatewayUnderTest = await gateway_factory("process")  # type: ignore[operator]
    _, vm_id, _ = await start_app(gw)
    app_host = f"{vm_id}-{APP_PORT}.{gw.config.api.sandbox_domain}"
    client = await H2Client.open(gw.config.server.host, gw.config.server.port, window=16384)
    try:
        _, big = client.start("/big?mib=8", app_host, scheme="http")
        # Each stream gets at most its window until the client acknowledges: 16 KiB, then it waits.
        small = await client.request("/echo/meanwhile", app_host, scheme="http")
        assert seen_by_app(small)["path"] == "/echo/meanwhile"
        await asyncio.wait_for(big.done, TIMEOUT_S * 3)
        assert big.status == 200 and len(big.body) == 8 * 2**20
        # A streamed (chunked) answer with trailers keeps them.
        answer = await client.request("/stream?n=5", app_host, scheme="http")
        assert len(answer.body) == 5 * 1024 and answer.trailers.get(b"x-checksum") == b"5"
    finally:
        await client.close()


async def test_malformed_http2_is_refused_without_reaching_an_app(gateway_factory: object) -> None:
    """A header value with CR LF (an HTTP/1.1 header smuggled through HTTP/2) ends the connection with
    a PROTOCOL_ERROR; a CONNECT (not offered) is a stream error; the app sees neither."""
    gw: GatewayUnderTest = await gateway_factory("process")  # type: ignore[operator]
    _, vm_id, _ = await start_app(gw)
    app_host = f"{vm_id}-{APP_PORT}.{gw.config.api.sandbox_domain}"
    client = await H2Client.open(gw.config.server.host, gw.config.server.port)
    try:
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            stream_id, [(b":method", b"CONNECT"), (b":authority", app_host.encode())], end_stream=False
        )
        client.answers[stream_id] = answer = Answer()
        client.flush()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(answer.done, TIMEOUT_S)
        # The connection still serves.
        ok = await client.request("/echo/ok", app_host, scheme="http")
        assert seen_by_app(ok)["path"] == "/echo/ok"
    finally:
        await client.close()
    client = await H2Client.open(gw.config.server.host, gw.config.server.port)
    try:
        client.conn.config.validate_outbound_headers = False
        client.conn.config.normalize_outbound_headers = False
        _, answer = client.start(
            "/echo/evil", app_host, scheme="http", headers=[("x-a", "1\r\nx-smuggled: yes")]
        )
        await asyncio.wait_for(client.closed, TIMEOUT_S)
        assert (
            client.terminated is not None
            and client.terminated.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
        )
        assert answer.done.done() and answer.status == 0
    finally:
        await client.close()


async def start_grpc_app(gw: GatewayUnderTest) -> tuple[str, str]:
    """A VM running the gRPC app (with the test virtualenv's Python: it needs grpcio); (vm id, its ip)."""
    status, vm = await gw.request("POST", "/v1/vms", json={})
    assert status == 200, vm
    command = f"{sys.executable} {GRPC_APP} {GRPC_PORT}"
    status, out = await gw.request(
        "POST", "/execute", json={"session_id": vm["session_id"], "language": "bash", "command": command}
    )
    assert (status, out["exit_code"]) == (200, 0), out
    status, app = await gw.request("GET", f"/v1/sessions/app-url/{vm['session_id']}?port={GRPC_PORT}")
    assert status == 200, app
    return vm["vm_id"], app["vm_ip"]


async def test_grpc_calls_through_the_edge_with_trailers_and_streams(
    gateway_factory: object, tmp_path: Path, ca: trustme.CA
) -> None:
    """A real gRPC client (grpcio) over TLS to a gRPC server in a VM: the edge speaks h2c to the app;
    unary with trailing metadata, an error status (trailers only), server and client streaming; by host
    form and by header routing on the API host."""
    gw = await tls_gateway(gateway_factory, tmp_path, ca)
    vm_id, vm_ip = await start_grpc_app(gw)
    app_host = f"{vm_id}-{GRPC_PORT}.{SANDBOX}"
    host, port = tls_address(gw)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    options = [("grpc.ssl_target_name_override", app_host), ("grpc.default_authority", app_host)]
    async with grpc.aio.secure_channel(f"{host}:{port}", credentials, options=options) as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        call = unary(b"hello", timeout=TIMEOUT_S)
        assert await call == b"olleh"
        trailing = dict(await call.trailing_metadata())
        assert trailing["x-app-host"] == vm_ip
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary_unary("/test.Echo/Fail")(b"", timeout=TIMEOUT_S)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        assert failed.value.details() == "no such thing"
        count = channel.unary_stream("/test.Echo/Count")
        assert [m async for m in count(b"50", timeout=TIMEOUT_S)] == [str(i).encode() for i in range(50)]

        async def numbers():  # type: ignore[no-untyped-def]
            for i in range(100):
                yield str(i).encode()

        total = channel.stream_unary("/test.Echo/Sum")
        assert await total(numbers(), timeout=TIMEOUT_S) == str(sum(range(100))).encode()
    # Header routing on the API host: X-Sandbox-Id / X-Sandbox-Port as gRPC metadata.
    options = [("grpc.ssl_target_name_override", API_HOST), ("grpc.default_authority", API_HOST)]
    routing = (("x-sandbox-id", vm_id), ("x-sandbox-port", str(GRPC_PORT)))
    async with grpc.aio.secure_channel(f"{host}:{port}", credentials, options=options) as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        assert await unary(b"abc", metadata=routing, timeout=TIMEOUT_S) == b"cba"
    await no_streams_left(gw)


async def no_streams_left(gw: GatewayUnderTest) -> None:
    """Every stream's exchange ended in the edge (its EdgeProtocol left the edge's connections)."""
    edge = gw.services.edge
    assert edge is not None
    empty = asyncio.get_running_loop().create_future()

    def streams() -> list[object]:
        return [conn for conn in edge.connections if conn.h2_stream]

    def ended(_: object) -> None:
        if not streams() and not empty.done():
            empty.set_result(None)

    edge.connection_ended.append(ended)
    try:
        if streams():
            await asyncio.wait_for(empty, TIMEOUT_S)
    finally:
        edge.connection_ended.remove(ended)


async def test_shutdown_sends_goaway_and_lets_the_open_stream_finish(gateway_factory: object) -> None:
    """curl downloads slowly over h2c; the gateway stops meanwhile: the stream finishes whole (the
    connection got a GOAWAY, which the h2 library as a client cannot take: it ends its connection)."""
    server = {"shutdown_grace_s": TIMEOUT_S}
    gw: GatewayUnderTest = await gateway_factory("process", server=server)  # type: ignore[operator]
    _, vm_id, _ = await start_app(gw)
    app_host = f"{vm_id}-{APP_PORT}.{gw.config.api.sandbox_domain}"
    plain = f"{gw.config.server.host}:{gw.config.server.port}"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "20", "--http2-prior-knowledge", "--limit-rate", "4M",
        "-H", f"Host: {app_host}", f"http://{plain}/big?mib=4",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.read(1), TIMEOUT_S)  # the answer is under way
        stopping = asyncio.create_task(gw.stop())
        rest, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err
        assert len(first + rest) == 4 * 2**20  # finished after the GOAWAY
        await asyncio.wait_for(stopping, TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_an_idle_http2_connection_is_closed_with_goaway(gateway_factory: object) -> None:
    edge = {"keepalive_timeout_s": 0.5}
    gw: GatewayUnderTest = await gateway_factory("process", edge=edge)  # type: ignore[operator]
    _, vm_id, _ = await start_app(gw)
    app_host = f"{vm_id}-{APP_PORT}.{gw.config.api.sandbox_domain}"
    client = await H2Client.open(gw.config.server.host, gw.config.server.port)
    try:
        assert seen_by_app(await client.request("/echo", app_host, scheme="http"))["path"] == "/echo"
        await asyncio.wait_for(client.closed, TIMEOUT_S)
        assert client.terminated is not None
        assert client.terminated.error_code == h2.errors.ErrorCodes.NO_ERROR
    finally:
        await client.close()


async def test_a_client_that_resets_most_streams_it_opens_is_cut_off(gateway_factory: object) -> None:
    """The "rapid reset" flood (CVE-2023-44487): each stream costs the edge a routed exchange and the
    client nothing; past RESET_FLOOD resets, most of its streams, the edge says ENHANCE_YOUR_CALM."""
    gw: GatewayUnderTest = await gateway_factory("process")  # type: ignore[operator]
    _, vm_id, _ = await start_app(gw)
    app_host = f"{vm_id}-{APP_PORT}.{gw.config.api.sandbox_domain}"
    client = await H2Client.open(gw.config.server.host, gw.config.server.port)
    try:
        for _ in range(RESET_FLOOD + 100):
            if client.closed.done():
                break
            stream_id, _ = client.start("/hang", app_host, scheme="http")
            client.conn.reset_stream(stream_id)
            client.flush()
            await client.writer.drain()
        await asyncio.wait_for(client.closed, TIMEOUT_S)
        assert client.terminated is not None
        assert client.terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        await no_streams_left(gw)
    finally:
        await client.close()


async def test_a_client_that_reads_nothing_is_not_read_either(gateway_factory: object) -> None:
    """PINGs (each answered) from a client that never reads: once its unread answers pass the
    transport's high-water mark the edge stops reading it, so the output held for it stays bounded."""
    gw: GatewayUnderTest = await gateway_factory("process")  # type: ignore[operator]
    edge = gw.services.edge
    assert edge is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (gw.config.server.host, gw.config.server.port))
    _, writer = await asyncio.open_connection(sock=sock)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"  # a PING frame, 17 bytes
        # 17 MB of PINGs: more answers than the kernel's send buffer holds (not drained: the edge is to
        # stop reading long before the end).
        writer.write(conn.data_to_send() + ping * 1_000_000)
        port = writer.get_extra_info("sockname")[1]
        transport = next(
            c.transport
            for c in edge.connections
            if c.transport and c.transport.get_extra_info("peername")[1] == port
        )
        for _ in range(int(TIMEOUT_S * 100)):
            if not transport.is_reading():
                break
            await asyncio.sleep(0.01)
        assert not transport.is_reading()
        assert transport.get_write_buffer_size() < 1024 * 1024
    finally:
        writer.close()
