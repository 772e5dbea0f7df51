"""Certificate bundles: parse and check a chain and its key before anything serves them; self-signed ones.

Pure (cryptography only): PEM in, a checked ``CertBundle`` or ``BadCertificate`` out. A bundle that
reaches the SNI table or the store has passed ``parse_bundle``: the key matches the leaf, the leaf
names at least one DNS name, it is valid now, and each certificate of the chain is issued by the next.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SELF_SIGNED_DAYS = 365


class BadCertificate(ValueError):
    """The PEM is not a usable certificate chain and key; the message says why."""


@dataclass(frozen=True)
class CertBundle:
    chain_pem: bytes  # leaf first, then intermediates
    key_pem: bytes  # PKCS#8, unencrypted (the store encrypts it)
    names: tuple[str, ...]  # the leaf's DNS names, lower-case, in its order
    not_before: float  # epoch seconds
    not_after: float

    @property
    def primary_name(self) -> str:
        return self.names[0]

    def lifetime_left(self, now: float) -> float:
        return self.not_after - now


def parse_bundle(chain_pem: bytes, key_pem: bytes, *, now: float | None = None) -> CertBundle:
    """Check a chain and key; raises ``BadCertificate`` with the reason."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise BadCertificate(f"the certificate is not valid PEM: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BadCertificate(f"the private key is not valid unencrypted PEM: {exc}") from None
    leaf = chain[0]
    if key.public_key().public_bytes(*_SPKI) != leaf.public_key().public_bytes(*_SPKI):
        raise BadCertificate("the private key does not belong to the certificate")
    names = dns_names(leaf)
    if not names:
        raise BadCertificate("the certificate names no DNS name (subjectAltName)")
    moment = dt.datetime.now(dt.UTC) if now is None else dt.datetime.fromtimestamp(now, dt.UTC)
    if not leaf.not_valid_before_utc <= moment < leaf.not_valid_after_utc:
        raise BadCertificate(
            f"the certificate is valid from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} "
            f"to {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now"
        )
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (InvalidSignature, ValueError, TypeError) as exc:
            where = child.subject.rfc4514_string()
            reason = type(exc).__name__
            raise BadCertificate(f"the chain is out of order or broken at {where}: {reason}") from None
    return CertBundle(
        chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        names=names,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
    )


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    names: list[str] = []
    for name in san.get_values_for_type(x509.DNSName):
        low = name.lower()
        if low not in names:
            names.append(low)
    return tuple(names)


def new_private_key_pem() -> bytes:
    """An EC P-256 key (what Let's Encrypt and browsers handle fastest), PKCS#8 PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def self_signed(
    names: Iterable[str], *, days: int = SELF_SIGNED_DAYS, now: float | None = None
) -> CertBundle:
    """A self-signed certificate for ``names`` (development, and the default certificate)."""
    names = list(dict.fromkeys(n.lower() for n in names))
    key_pem = new_private_key_pem()
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    start = dt.datetime.now(dt.UTC) if now is None else dt.datetime.fromtimestamp(now, dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - dt.timedelta(minutes=5))
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return parse_bundle(cert.public_bytes(serialization.Encoding.PEM), key_pem, now=now)
