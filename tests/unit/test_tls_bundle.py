from __future__ import annotations

import datetime as dt
import time

import pytest
import trustme

from gateway.tls.bundle import BadCertificate, parse_bundle, self_signed


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_a_chain_and_its_key_parse(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("App.Example.Test", "*.sandbox.example.test")
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    bundle = parse_bundle(chain, leaf.private_key_pem.bytes())
    assert bundle.names == ("app.example.test", "*.sandbox.example.test")
    assert bundle.primary_name == "app.example.test"
    assert bundle.not_before < time.time() < bundle.not_after


def test_a_key_of_another_certificate_is_refused(ca: trustme.CA) -> None:
    one, two = ca.issue_cert("one.example.test"), ca.issue_cert("two.example.test")
    with pytest.raises(BadCertificate, match="does not belong"):
        parse_bundle(one.cert_chain_pems[0].bytes(), two.private_key_pem.bytes())


def test_garbage_and_an_expired_certificate_are_refused(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("app.example.test")
    key = leaf.private_key_pem.bytes()
    with pytest.raises(BadCertificate, match="not valid PEM"):
        parse_bundle(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", key)
    with pytest.raises(BadCertificate, match="private key"):
        parse_bundle(leaf.cert_chain_pems[0].bytes(), b"not a key")
    short = ca.issue_cert("app.example.test", not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    with pytest.raises(BadCertificate, match="not now"):
        parse_bundle(
            short.cert_chain_pems[0].bytes(), short.private_key_pem.bytes(), now=time.time() + 2 * 86400
        )


def test_a_chain_out_of_order_is_refused() -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("app.example.test")
    leaf_pem, intermediate_pem = leaf.cert_chain_pems[0].bytes(), leaf.cert_chain_pems[1].bytes()
    assert parse_bundle(leaf_pem + intermediate_pem, leaf.private_key_pem.bytes()).names
    with pytest.raises(BadCertificate, match="chain"):
        parse_bundle(leaf_pem + root.cert_pem.bytes(), leaf.private_key_pem.bytes())


def test_self_signed_names_what_it_was_asked_for() -> None:
    bundle = self_signed(["LocalHost", "*.sandbox.localhost", "localhost"])
    assert bundle.names == ("localhost", "*.sandbox.localhost")
    assert parse_bundle(bundle.chain_pem, bundle.key_pem) == bundle
