"""The deployment's egress CA and the leaf certificates the proxy presents for vault hosts (pure: no
I/O but building ``ssl`` contexts).

The egress proxy terminates TLS only for hosts that have a vault service, so it can swap placeholders
for secrets; for that a VM must trust the certificate it is shown. Every VM of a deployment trusts one
CA (``make_ca``; kept sealed in Redis by ``gateway.tls.egress_ca``, which hands this module its PEMs),
and ``LeafMinter`` signs a short-lived leaf per host name on demand.

- The CA: EC P-256, 10 years, ``basicConstraints`` CA with ``pathlen 0`` (it signs leaves, never another
  CA) and ``keyUsage`` keyCertSign (and cRLSign, which OpenSSL's strict checks expect beside it). No
  name constraints: vault hosts are whatever names users give.
- A leaf: the name as its one SAN (``dNSName``, or ``iPAddress`` for an address), ``serverAuth``,
  valid a day and backdated an hour (a VM's clock may lag the host's: a qemu guest restored from an old
  snapshot until it steps its clock), re-minted once half its life is gone, so a served leaf always
  has twelve hours or more left.
- One leaf key per minter (one EC key, made with it), not one per leaf: the key never leaves this
  process's memory, which holds the CA's key too, so a key per leaf would protect nothing more, and
  minting stays a signature (about a millisecond) rather than a key generation too.
- Contexts are kept per name (LRU, ``capacity``): a TLS server context per host, TLS 1.2+, ALPN offering
  ``http/1.1`` only (the proxy reads and rewrites HTTP/1.1 heads; a client that wants h2 falls back).

``ssl`` loads a certificate and key only from a path, so a context is loaded through an anonymous memory
file (``memfd_create``, read back as ``/proc/self/fd/N``): nothing touches a file system.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=1)
# How far a certificate's start lies before the moment it is made (clocks of VMs lag).
BACKDATE = dt.timedelta(hours=1)
# A cached leaf is minted again once it is this old (half its life): what a client sees has >= 12 h left.
LEAF_REUSE_S = LEAF_VALIDITY.total_seconds() / 2
LEAF_CACHE_CAPACITY = 1024
CA_NAME_PREFIX = "Sandbox Gateway Egress CA"
ORGANIZATION = "Sandbox Gateway"
# X.509's upper bound on a common name (RFC 5280 ub-common-name).
CN_MAX_CHARS = 64
DNS_NAME_MAX_CHARS = 253


class CaError(ValueError):
    """A CA's PEMs are unusable (not a CA, key and certificate apart, another algorithm)."""


@dataclass(frozen=True)
class EgressCa:
    """A CA as stored: its certificate and its private key (PKCS#8), both PEM."""

    cert_pem: bytes
    key_pem: bytes


def make_ca(deployment: str, *, now: float | None = None) -> EgressCa:
    """A new CA for the deployment named ``deployment`` (any text; it only names the CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = _instant(now)
    common_name = f"{CA_NAME_PREFIX} {deployment}".strip()[:CN_MAX_CHARS]
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return EgressCa(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def load_ca(ca: EgressCa) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA's certificate and key, checked to belong together and to be a CA; CaError otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(ca.cert_pem)
        key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except ValueError as exc:
        raise CaError(f"unreadable CA: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError("the CA's key is not an EC key")
    if cert.public_key() != key.public_key():
        raise CaError("the CA's certificate and key do not belong together")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CaError("the CA's certificate has no basicConstraints") from None
    if not constraints.ca:
        raise CaError("the CA's certificate is not a CA")
    return cert, key


def normalized_name(name: str) -> str:
    """A host name as a leaf names it: lower case, no trailing dot; ValueError when it is not one."""
    text = name.strip().rstrip(".").lower()
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    labels = text.split(".")
    if (
        not text
        or len(text) > DNS_NAME_MAX_CHARS
        or not text.isascii()
        or any(not label or len(label) > 63 for label in labels)
        or not all(c.isalnum() or c in "-_" for c in text.replace(".", ""))
    ):
        raise ValueError(f"not a host name: {name!r}")
    return text


def mint_leaf(
    cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    leaf_key: ec.EllipticCurvePrivateKey,
    name: str,
    *,
    now: float | None = None,
) -> x509.Certificate:
    """A server certificate for ``name`` (checked with ``normalized_name``) signed by the CA."""
    host = normalized_name(name)
    start = _instant(now)
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)] if len(host) <= CN_MAX_CHARS else [])
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(min(start + LEAF_VALIDITY, cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


class LeafMinter:
    """Server contexts for host names, each with a leaf signed by the CA, minted on first use and cached.

    Not thread-safe (one event loop uses it); ``context_for`` costs about a millisecond on a miss (a
    signature and a context), nothing on a hit.
    """

    def __init__(
        self,
        ca: EgressCa,
        *,
        capacity: int = LEAF_CACHE_CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ca = ca
        self._cert, self._ca_key = load_ca(ca)
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._capacity = capacity
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, ssl.SSLContext]] = OrderedDict()
        self.minted = 0  # leaves signed so far (tests and metrics)

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    def leaf(self, name: str) -> x509.Certificate:
        """A fresh leaf for ``name`` (uncached; ``context_for`` is what serves)."""
        return mint_leaf(self._cert, self._ca_key, self._leaf_key, name, now=self._clock())

    def context_for(self, name: str) -> ssl.SSLContext:
        """The server context presenting ``name``'s leaf; ValueError when ``name`` is no host name."""
        host = normalized_name(name)
        now = self._clock()
        cached = self._cache.get(host)
        if cached is not None and now - cached[0] < LEAF_REUSE_S:
            self._cache.move_to_end(host)
            return cached[1]
        context = self._context(mint_leaf(self._cert, self._ca_key, self._leaf_key, host, now=now))
        self.minted += 1
        self._cache[host] = (now, context)
        self._cache.move_to_end(host)
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return context

    def _context(self, leaf: x509.Certificate) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        context.set_alpn_protocols(["http/1.1"])
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self._leaf_key_pem
        fd = os.memfd_create("egress-leaf", os.MFD_CLOEXEC)
        try:
            written = 0
            while written < len(chain):
                written += os.write(fd, chain[written:])
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return context


def _instant(now: float | None) -> dt.datetime:
    return dt.datetime.now(dt.UTC) if now is None else dt.datetime.fromtimestamp(now, dt.UTC)
