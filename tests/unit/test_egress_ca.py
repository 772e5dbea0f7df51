"""The egress CA and its leaves: what the certificates say, that a chain verifies (cryptography's own
verifier) for exactly the name minted, and real TLS handshakes on the loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.egress.ca import (
    CA_VALIDITY,
    LEAF_REUSE_S,
    CaError,
    EgressCa,
    LeafMinter,
    load_ca,
    make_ca,
    normalized_name,
)

NOW = 1_800_000_000.0
CA = make_ca("test-deployment", now=NOW)
OTHER_CA = make_ca("someone-else", now=NOW)
# For handshakes, which check against the real clock.
LIVE_CA, LIVE_OTHER_CA = make_ca("live"), make_ca("live-other")
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
# DNS names: dotted digits read as an address (and get an IP SAN: test_an_address_gets_an_ip_san).
NAMES = st.lists(LABEL, min_size=2, max_size=4).map(".".join).filter(lambda n: not is_address(n))


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ca_cert(ca: EgressCa = CA) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.cert_pem)


def verify(leaf: x509.Certificate, name: str, ca: EgressCa = CA, at: float = NOW) -> None:
    when = dt.datetime.fromtimestamp(at, dt.UTC)
    policy = PolicyBuilder().store(Store([ca_cert(ca)])).time(when)
    policy.build_server_verifier(x509.DNSName(name)).verify(leaf, [])


def test_the_ca_is_a_ca_for_leaves_only_for_ten_years() -> None:
    cert = ca_cert()
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and not usage.digital_signature
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= CA_VALIDITY
    assert "Sandbox Gateway Egress CA test-deployment" in cert.subject.rfc4514_string()
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_two_cas_are_two_keys() -> None:
    assert ca_cert().public_key() != ca_cert(OTHER_CA).public_key()
    assert CA.cert_pem != OTHER_CA.cert_pem


@pytest.mark.parametrize(
    ("ca", "says"),
    [
        (EgressCa(CA.cert_pem, OTHER_CA.key_pem), "do not belong together"),
        (EgressCa(b"not a pem", CA.key_pem), "unreadable"),
        (EgressCa(CA.cert_pem, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), "unread"),
    ],
)
def test_an_unusable_ca_is_refused(ca: EgressCa, says: str) -> None:
    with pytest.raises(CaError, match=says):
        load_ca(ca)


def test_a_leaf_is_not_accepted_as_a_ca() -> None:
    minter = LeafMinter(CA, clock=Clock())
    leaf = minter.leaf("web.example.test")
    with pytest.raises(CaError, match="not a CA"):
        load_ca(EgressCa(leaf.public_bytes(serialization.Encoding.PEM), minter._leaf_key_pem))


def test_a_leaf_names_its_host_for_server_auth_backdated_for_a_day() -> None:
    leaf = LeafMinter(CA, clock=Clock()).leaf("Web.Example.Test.")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.example.test"]
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.not_valid_before_utc.timestamp() == NOW - 3600
    assert leaf.not_valid_after_utc.timestamp() == NOW + 86400
    assert leaf.issuer == ca_cert().subject


def test_an_address_gets_an_ip_san() -> None:
    leaf = LeafMinter(CA, clock=Clock()).leaf("198.18.200.2")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["198.18.200.2"]


@settings(max_examples=30, deadline=None)
@given(name=NAMES, other=NAMES)
def test_a_chain_verifies_for_the_name_minted_and_no_other(name: str, other: str) -> None:
    leaf = LeafMinter(CA, clock=Clock()).leaf(name)
    verify(leaf, name)
    verify(leaf, name, at=NOW - 3500)  # backdated: a VM clock an hour behind still accepts it
    if other != name:
        with pytest.raises(VerificationError):
            verify(leaf, other)
    with pytest.raises(VerificationError):
        verify(leaf, name, ca=OTHER_CA)


def test_a_leaf_is_refused_once_expired() -> None:
    leaf = LeafMinter(CA, clock=Clock()).leaf("web.example.test")
    with pytest.raises(VerificationError):
        verify(leaf, "web.example.test", at=NOW + 86400 + 60)


@pytest.mark.parametrize(
    "name", ["", ".", "a..b", "has space.test", "*.example.test", "x" * 64 + ".test", "bücher.test"]
)
def test_what_is_no_host_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        normalized_name(name)
    with pytest.raises(ValueError):
        LeafMinter(CA).context_for(name)


def test_contexts_are_cached_per_name_reminted_at_half_life_and_bounded() -> None:
    clock = Clock()
    minter = LeafMinter(CA, capacity=2, clock=clock)
    first = minter.context_for("a.test")
    assert minter.context_for("A.test.") is first and minter.minted == 1
    clock.now += LEAF_REUSE_S - 1
    assert minter.context_for("a.test") is first
    clock.now += 2
    renewed = minter.context_for("a.test")
    assert renewed is not first and minter.minted == 2
    minter.context_for("b.test")
    minter.context_for("a.test")  # a.test is now the most recent
    minter.context_for("c.test")  # evicts b.test
    assert minter.minted == 4
    minter.context_for("a.test")
    assert minter.minted == 4
    minter.context_for("b.test")
    assert minter.minted == 5


def client_context(ca: EgressCa, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.set_alpn_protocols(alpn)
    return context


async def handshake(name: str, client: ssl.SSLContext, minter: LeafMinter) -> str | None:
    """A real TLS handshake over the loopback; the ALPN protocol the client got."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=minter.context_for(name))
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=name)
        try:
            assert await reader.read() == b"ok"
            return writer.get_extra_info("ssl_object").selected_alpn_protocol()  # type: ignore[no-any-return]
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_client_trusting_the_ca_completes_a_handshake_with_http1_only() -> None:
    minter = LeafMinter(LIVE_CA)
    name = "web.example.test"
    assert await handshake(name, client_context(LIVE_CA, ["h2", "http/1.1"]), minter) == "http/1.1"
    assert await handshake(name, client_context(LIVE_CA, ["h2"]), minter) is None


async def test_a_client_trusting_another_ca_refuses_the_leaf() -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake("web.example.test", client_context(LIVE_OTHER_CA, ["http/1.1"]), LeafMinter(LIVE_CA))
