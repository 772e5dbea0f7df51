"""TLS at the edge: real handshakes against the gateway's TLS listener, certificates from a test CA."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import ssl
import stat
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.fernet import Fernet

from gateway.app import running_gateway
from gateway.errors import ListenFailed
from gateway.tls.bundle import BadCertificate, dns_names, parse_bundle
from tests.acme_env import TSIG_KEY_NAME, AcmeTestEnv
from tests.conftest import GatewayUnderTest, free_port, make_config
from tests.integration.test_edge import APP_PORT, start_app

# Every test here runs on each edge (the compiled one and the pure-Python one).
pytestmark = pytest.mark.both_edges

API_HOST = "api.example.test"
SANDBOX = "sandbox.example.test"
BROWSER = "browser.example.test"


def tls_sections(tmp_path: Path, **tls: object) -> dict[str, dict[str, object]]:
    return {
        "tls": {
            "listen": f"127.0.0.1:{free_port()}",
            "storage_key": Fernet.generate_key().decode(),
            "certs_dir": str(tmp_path / "certs"),
            "handshake_timeout_s": 1.0,
            "redirect_http": False,
            **tls,
        },
        "edge": {"api_hosts": f"{API_HOST},127.0.0.1"},  # the tests' API calls use 127.0.0.1
        "api": {"sandbox_domain": SANDBOX},
        "instances": {"domain": BROWSER},
    }


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def bundle_of(cert: trustme.LeafCert) -> tuple[bytes, bytes]:
    return b"".join(blob.bytes() for blob in cert.cert_chain_pems), cert.private_key_pem.bytes()


async def store_cert(gw: GatewayUnderTest, cert: trustme.LeafCert) -> str:
    """Store a certificate as an operator or the issuer would, and wait until this edge serves it."""
    assert gw.services.tls is not None
    chain, key = bundle_of(cert)
    bundle = parse_bundle(chain, key)
    cert_id = await gw.services.tls.store.put(bundle, source="import")
    await served(gw, cert_id, bundle.chain_pem)
    return cert_id


async def served(gw: GatewayUnderTest, cert_id: str, chain_pem: bytes) -> None:
    tls = gw.services.tls
    assert tls is not None
    name = parse_bundle_names(chain_pem)[0].replace("*", "x")
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    async with asyncio.timeout(5):
        while True:
            waiting = asyncio.ensure_future(tls.follower.next_refresh())
            if (
                cert_id in tls.table.cert_ids()
                and (await peer_cert(gw, name)).serial_number == leaf.serial_number
            ):
                waiting.cancel()
                return
            await waiting


def parse_bundle_names(chain_pem: bytes) -> tuple[str, ...]:
    return dns_names(x509.load_pem_x509_certificates(chain_pem)[0])


def client_context(ca: trustme.CA | None) -> ssl.SSLContext:
    if ca is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def tls_address(gw: GatewayUnderTest) -> tuple[str, int]:
    host, _, port = gw.config.tls.listen.rpartition(":")
    return host, int(port)


async def open_tls(
    gw: GatewayUnderTest, server_name: str | None, ca: trustme.CA | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = tls_address(gw)
    return await asyncio.open_connection(
        host, port, ssl=client_context(ca), server_hostname=server_name or ""
    )


async def peer_cert(gw: GatewayUnderTest, server_name: str | None) -> x509.Certificate:
    _, writer = await open_tls(gw, server_name)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)
    finally:
        writer.close()


async def http_over(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str, *, close: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """One request on an open connection; returns status, headers (lower-case names) and body."""
    connection = "close" if close else "keep-alive"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return status, headers, body


async def test_sni_serves_the_exact_name_then_the_wildcard_then_the_default(
    gateway_factory: object, tmp_path: Path, ca: trustme.CA
) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", **tls_sections(tmp_path))  # type: ignore[operator]
    await store_cert(gw, ca.issue_cert(API_HOST))
    await store_cert(gw, ca.issue_cert(f"*.{SANDBOX}"))

    assert dns_names(await peer_cert(gw, API_HOST)) == (API_HOST,)
    assert dns_names(await peer_cert(gw, f"vmid-abc-3000.{SANDBOX}")) == (f"*.{SANDBOX}",)
    default = await peer_cert(gw, "unknown.customer.test")
    assert default.issuer == default.subject  # the self-signed default, naming only the operator's names
    assert set(dns_names(default)) == {API_HOST, f"*.{SANDBOX}", f"*.{BROWSER}"}
    assert dns_names(await peer_cert(gw, None)) == dns_names(default)  # no SNI at all

    # The chain verifies against the CA, and a request goes through to the control plane over TLS 1.3.
    reader, writer = await open_tls(gw, API_HOST, ca)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == "http/1.1"
        assert ssl_object.version() == "TLSv1.3"
        status, headers, body = await http_over(reader, writer, API_HOST, "/openapi.json")
        assert status == 200 and json.loads(body)["openapi"]
        # The platform's own host is HTTPS only, and says so; it does not name its software.
        assert headers["strict-transport-security"] == "max-age=31536000"
        assert headers["server"] == "gateway"
    finally:
        writer.close()


async def test_an_app_over_tls_sees_https_and_a_host_other_than_the_sni_name_gets_421(
    gateway_factory: object, tmp_path: Path, ca: trustme.CA
) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", **tls_sections(tmp_path))  # type: ignore[operator]
    await store_cert(gw, ca.issue_cert(f"*.{SANDBOX}", API_HOST))
    _, vm_id, _ = await start_app(gw)
    app_host = f"{vm_id}-{APP_PORT}.{SANDBOX}"

    reader, writer = await open_tls(gw, app_host, ca)
    try:
        status, headers, body = await http_over(reader, writer, app_host, "/echo")
        assert status == 200
        assert "strict-transport-security" not in headers  # a sandbox host's HTTPS policy is its app's
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert seen["x-forwarded-proto"] == "https"
        assert "proto=https" in seen["forwarded"]
        # The same name written with a trailing dot is the same host (as routing reads it): no 421.
        assert (await http_over(reader, writer, app_host + ".", "/echo"))[0] == 200
        # A long body is pumped to a TLS client too (gateway/edge/pump.py): whole, then the next answer.
        status, _, big = await http_over(reader, writer, app_host, "/pattern?mib=8")
        assert status == 200 and big == b"".join(bytes([i % 251]) * (256 * 1024) for i in range(32))
        assert (await http_over(reader, writer, app_host, "/echo"))[0] == 200
        # Same connection, another name the certificate also covers: still refused (RFC 9110 421).
        status, headers, _ = await http_over(reader, writer, API_HOST, "/openapi.json")
        assert status == 421 and headers["x-gateway-error"] == "misdirected_request"
        assert headers["connection"] == "close"
    finally:
        writer.close()


async def test_plain_http_redirects_to_https_except_the_configured_paths(
    gateway_factory: object, tmp_path: Path
) -> None:
    sections = tls_sections(tmp_path, redirect_http=True, public_port=443)
    gw: GatewayUnderTest = await gateway_factory("process", **sections)  # type: ignore[operator]
    reader, writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    try:
        status, headers, _ = await http_over(reader, writer, f"{API_HOST}:8080", "/v1/vms?limit=1")
        assert status == 308
        assert headers["location"] == f"https://{API_HOST}/v1/vms?limit=1"
        status, headers, _ = await http_over(reader, writer, API_HOST, "/.well-known/acme-challenge/x")
        assert status != 308 and "location" not in headers
    finally:
        writer.close()


async def test_a_renewed_certificate_is_served_without_restart_and_open_connections_keep_going(
    gateway_factory: object, tmp_path: Path, ca: trustme.CA
) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", **tls_sections(tmp_path))  # type: ignore[operator]
    first = ca.issue_cert(API_HOST)
    await store_cert(gw, first)
    reader, writer = await open_tls(gw, API_HOST, ca)
    try:
        assert (await http_over(reader, writer, API_HOST, "/openapi.json"))[0] == 200
        second = ca.issue_cert(API_HOST)
        await store_cert(gw, second)  # returns once new handshakes get the new certificate
        # The connection opened with the old certificate is still served.
        assert (await http_over(reader, writer, API_HOST, "/openapi.json"))[0] == 200
    finally:
        writer.close()

    # The periodic comparison reloads only what changed: nothing here (it reads versions alone).
    tls = gw.services.tls
    assert tls is not None
    loads = 0
    load = tls.store.get

    async def counted_load(cert_id: str) -> object:
        nonlocal loads
        loads += 1
        return await load(cert_id)

    tls.store.get = counted_load  # type: ignore[method-assign]
    await tls.follower.resync()
    assert loads == 0


async def test_a_bad_certificate_is_refused_and_the_old_one_keeps_serving(
    gateway_factory: object, tmp_path: Path, ca: trustme.CA
) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", **tls_sections(tmp_path))  # type: ignore[operator]
    tls = gw.services.tls
    assert tls is not None
    good = ca.issue_cert(API_HOST)
    cert_id = await store_cert(gw, good)
    serving = (await peer_cert(gw, API_HOST)).serial_number

    # Refused before it is stored: a key that belongs to another certificate.
    other_chain, _ = bundle_of(ca.issue_cert(API_HOST))
    stored_before = await tls.store.get(cert_id)
    mismatched = dataclasses.replace(stored_before.bundle, chain_pem=other_chain)  # type: ignore[union-attr]
    with pytest.raises(BadCertificate, match="does not belong"):
        await tls.store.put(mismatched, source="import")
    assert await tls.store.get(cert_id) == stored_before

    # Corrupted in Redis behind the store's back (another writer, a bad restore): refused on load.
    client, keys = gw.services.client, tls.store.keys
    await client.hset(keys.cert(cert_id), "chain_pem", other_chain.decode())
    refused = tls.follower.refused
    waiting = asyncio.ensure_future(tls.follower.next_refresh())
    await client.publish(keys.events(), json.dumps({"type": "cert", "cert_id": cert_id}))
    await asyncio.wait_for(waiting, 5)
    assert tls.follower.refused == refused + 1
    assert (await peer_cert(gw, API_HOST)).serial_number == serving


async def test_the_default_certificate_is_made_once_and_slow_handshakes_are_cut(
    gateway_factory: object, tmp_path: Path
) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", **tls_sections(tmp_path))  # type: ignore[operator]
    certs = tmp_path / "certs"
    key_file = certs / "default.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    made = (certs / "default.pem").read_bytes()
    await gw.stop()
    gw2: GatewayUnderTest = await gateway_factory("process", **tls_sections(tmp_path))  # type: ignore[operator]
    assert (certs / "default.pem").read_bytes() == made  # reused on the next start

    # A client that connects and never sends a ClientHello is cut at the handshake deadline (1 s here).
    host, port = tls_address(gw2)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_operator_certificates_are_issued_at_start_over_acme(
    gateway_factory: object, tmp_path: Path, acme_env: AcmeTestEnv
) -> None:
    sections = tls_sections(tmp_path)
    sections["acme"] = {
        "directory_url": acme_env.directory_url,
        "ca_bundle": str(acme_env.ca_pem_path),
        "dns_resolvers": "127.0.0.1",
        "dns_port": acme_env.dns_port,
        "authoritative_port": acme_env.dns_port,
        "rfc2136_server": f"127.0.0.1:{acme_env.dns_port}",
        "rfc2136_key_name": TSIG_KEY_NAME,
        "rfc2136_key_secret": acme_env.tsig_secret,
    }
    gw: GatewayUnderTest = await gateway_factory("process", **sections)  # type: ignore[operator]
    keeper, tls = gw.services.cert_keeper, gw.services.tls
    assert keeper is not None and tls is not None
    if keeper.rounds == 0:
        await asyncio.wait_for(keeper.next_round(), 30)
    for cert_id in (API_HOST, f"*.{SANDBOX}"):
        assert (await keeper.renewer.state(cert_id)).status == "issued", await keeper.renewer.state(cert_id)
        stored = await tls.store.get(cert_id)
        assert stored is not None
        await served(gw, cert_id, stored.bundle.chain_pem)

    # A client that trusts only pebble's root accepts both names.
    root = acme_env.root_pem()
    for name in (API_HOST, f"vmid-abc-3000.{SANDBOX}"):
        ctx = ssl.create_default_context(cadata=root.decode())
        host, port = tls_address(gw)
        _, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=name)
        writer.close()


async def test_a_tls_port_in_use_fails_the_start_cleanly_and_leaves_nothing_running(
    tmp_path: Path, redis_url: str
) -> None:
    """Regression: the plain listener and the route follower started before the TLS bind failed were left
    running (the test run then hung at exit on the follower)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sections = tls_sections(tmp_path, listen=f"127.0.0.1:{taken.getsockname()[1]}")
        config = make_config(tmp_path, redis_url, "process", **sections)
        before = asyncio.all_tasks()
        in_use = r"cannot listen on .* \(tls\.listen\): address already in use"
        with pytest.raises(ListenFailed, match=in_use):
            async with running_gateway(config):
                pytest.fail("started on a port in use")
    assert asyncio.all_tasks() == before  # no follower, keeper or server task left behind
    with socket.socket() as plain:  # and the plain listener was closed again
        plain.bind((config.server.host, config.server.port))


async def handshake_with_groups(gw: GatewayUnderTest, groups: str, version: str) -> bool:
    """Whether ``openssl s_client`` offering only ``groups`` completes a handshake with the listener."""
    host, port = tls_address(gw)
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"{host}:{port}", "-servername", API_HOST,
        "-groups", groups, version, "-brief",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(10):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return b"CONNECTION ESTABLISHED" in out


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
async def test_only_the_intermediate_profiles_groups_are_offered(
    gateway_factory: object, tmp_path: Path, version: str
) -> None:
    """X25519, P-256 and P-384, as Mozilla's intermediate profile lists; not P-521 or X448, which
    OpenSSL would otherwise accept (issue 17, point 12)."""
    gw: GatewayUnderTest = await gateway_factory("process", **tls_sections(tmp_path))  # type: ignore[operator]
    # An RSA certificate: in TLS 1.2 a client's groups also bound the curves of an ECDSA certificate.
    await store_cert(gw, trustme.CA().issue_cert(API_HOST, key_type=trustme.KeyType.RSA))
    for group in ("X25519", "P-256", "P-384"):
        assert await handshake_with_groups(gw, group, version), group
    for group in ("P-521", "X448"):
        assert not await handshake_with_groups(gw, group, version), group
