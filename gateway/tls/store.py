"""Certificates in Redis, so every edge process and machine serves the same ones.

One hash per certificate (``Keys.cert(cert_id)``; the id is the certificate's first name, e.g.
``*.sandbox.example.com``) with the chain, the private key encrypted with the storage key (Fernet:
AES-128-CBC + HMAC-SHA256), the names and the expiry; an index set of ids; and an event on the gateway's
events channel for every change, so each edge's SNI table follows within moments.

A bundle is checked (``parse_bundle``) before it is stored and again when it is read: a corrupt or
mismatched record is never served, and ``put`` refuses one without touching what is stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from cryptography.fernet import Fernet, InvalidToken

from gateway.state.bus import publish_in
from gateway.state.connection import guarded, hash_fields
from gateway.state.events import CertChanged
from gateway.state.keyspace import Keys
from gateway.tls.bundle import BadCertificate, CertBundle, parse_bundle


@dataclass(frozen=True)
class StoredCert:
    cert_id: str
    bundle: CertBundle
    source: str  # "acme", "import" or "self-signed"
    updated_at: float


class Unsealable(Exception):
    """A sealed value does not open with this storage key (another key, or corrupt)."""


class Sealer:
    """Secrets at rest (private keys, customers' DNS credentials): sealed with the storage key."""

    def __init__(self, storage_key: bytes) -> None:
        self._fernet = Fernet(storage_key)

    def seal(self, secret: bytes) -> str:
        return self._fernet.encrypt(secret).decode("ascii")

    def open(self, sealed: str) -> bytes:
        try:
            return self._fernet.decrypt(sealed.encode("ascii"))
        except InvalidToken:
            raise Unsealable("does not decrypt with this storage key") from None


class CertStore:
    def __init__(self, client: aioredis.Redis, keys: Keys, storage_key: bytes) -> None:
        self.client = client
        self.keys = keys
        self.sealer = Sealer(storage_key)

    async def put(self, bundle: CertBundle, *, source: str, cert_id: str | None = None) -> str:
        """Store (or replace) a certificate and tell every edge. Returns its id."""
        checked = parse_bundle(bundle.chain_pem, bundle.key_pem)  # raises BadCertificate: nothing stored
        cert_id = cert_id or checked.primary_name
        record = {
            "chain_pem": checked.chain_pem.decode("ascii"),
            "key_enc": self.sealer.seal(checked.key_pem),
            "names": ",".join(checked.names),
            "not_after": repr(checked.not_after),
            "source": source,
            "updated_at": repr(time.time()),
        }
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.cert(cert_id))
        pipe.hset(self.keys.cert(cert_id), mapping=hash_fields(record))
        pipe.sadd(self.keys.cert_index(), cert_id)
        publish_in(pipe, self.keys, CertChanged(cert_id))
        await guarded(pipe.execute())
        return cert_id

    async def get(self, cert_id: str) -> StoredCert | None:
        """The stored certificate, checked; None when absent. Raises BadCertificate when it is unusable."""
        raw = await guarded(self.client.hgetall(self.keys.cert(cert_id)))
        if not raw:
            return None
        try:
            key_pem = self.sealer.open(raw["key_enc"])
        except (Unsealable, KeyError):
            raise BadCertificate(
                f"{cert_id}: the private key does not decrypt with this storage key"
            ) from None
        bundle = parse_bundle(raw.get("chain_pem", "").encode("ascii"), key_pem)
        return StoredCert(cert_id, bundle, raw.get("source", ""), float(raw.get("updated_at", 0)))

    async def ids(self) -> set[str]:
        return set(await guarded(self.client.smembers(self.keys.cert_index())))

    async def expiries(self) -> dict[str, float]:
        """Each stored certificate's expiry, without decrypting anything."""
        return await self._field_of_each("not_after")

    async def expiry(self, cert_id: str) -> float | None:
        """One certificate's expiry (unix seconds), without decrypting it; None when absent."""
        value = await guarded(self.client.hget(self.keys.cert(cert_id), "not_after"))
        return float(value) if value is not None else None

    async def versions(self) -> dict[str, float]:
        """When each stored certificate was last written (``StoredCert.updated_at``): what changed."""
        return await self._field_of_each("updated_at")

    async def _field_of_each(self, field: str) -> dict[str, float]:
        ids = sorted(await self.ids())
        pipe = self.client.pipeline(transaction=False)
        for cert_id in ids:
            pipe.hget(self.keys.cert(cert_id), field)
        values = await guarded(pipe.execute())
        return {cert_id: float(v) for cert_id, v in zip(ids, values, strict=True) if v is not None}

    async def delete(self, cert_id: str) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.cert(cert_id))
        pipe.srem(self.keys.cert_index(), cert_id)
        publish_in(pipe, self.keys, CertChanged(cert_id))
        deleted, _, _ = await guarded(pipe.execute())
        return bool(deleted)

    async def account_key(self, directory_url: str) -> bytes | None:
        """The ACME account key for a directory (PEM), if one was made; encrypted at rest like the rest."""
        token = await guarded(self.client.hget(self.keys.acme_account(directory_url), "key_enc"))
        if token is None:
            return None
        try:
            return self.sealer.open(token)
        except Unsealable:
            raise BadCertificate(
                f"the ACME account key for {directory_url} does not decrypt with this storage key"
            ) from None

    async def save_account_key(self, directory_url: str, key_pem: bytes) -> bytes:
        """Keep the first account key saved for a directory (two processes may race); returns it."""
        token = self.sealer.seal(key_pem)
        await guarded(self.client.hsetnx(self.keys.acme_account(directory_url), "key_enc", token))
        saved = await self.account_key(directory_url)
        assert saved is not None
        return saved
