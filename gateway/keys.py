"""API keys: created on the command line, stored only as SHA-256 hashes in Redis.

A key is looked up by the hash of what the client sent, so the secret itself is never compared
byte-by-byte (no timing oracle on it), and Redis never holds a usable key. The stored hash is also
checked with ``hmac.compare_digest`` so a corrupt index cannot authenticate the wrong key.
"""

from __future__ import annotations

import builtins
import hmac
import secrets
import time

import redis.asyncio as aioredis

from gateway.ids import is_uuid
from gateway.state.bus import publish_in
from gateway.state.connection import guarded, hash_fields
from gateway.state.events import OrgKeysChanged
from gateway.state.keyspace import Keys
from gateway.state.records import ApiKeyRecord
from gateway.tokens import KEY_PREFIX, token_hash

KEY_RANDOM_BYTES = 32
# Keys longer than this cannot be ours; refuse before hashing attacker-sized input.
MAX_KEY_LENGTH = 256


class ApiKeyStore:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def create(self, name: str, org: str | None = None) -> tuple[str, ApiKeyRecord]:
        """Make a new key (of an organisation, when given); the clear key is returned once, never stored."""
        if org is not None and not is_uuid(org):
            raise ValueError(f"organisation ids are lower-case UUIDs, got {org!r}")
        key = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
        digest = token_hash(key)
        rec = ApiKeyRecord(key_id="key_" + secrets.token_hex(6), name=name, created_at=time.time(), org=org)
        fields = rec.to_hash() | {"hash": digest}
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.api_key(digest), mapping=hash_fields(fields))
        pipe.hset(self.keys.api_key_index(), rec.key_id, digest)
        if org is not None:
            pipe.sadd(self.keys.org_keys(org), digest)
            self._announce(pipe, org)
        await guarded(pipe.execute())
        return key, rec

    def _announce(self, pipe: aioredis.client.Pipeline, org: str) -> None:
        """Edges cache which keys open an organisation's instances: tell them the set changed."""
        publish_in(pipe, self.keys, OrgKeysChanged(org))

    async def authenticate(self, key: str | None) -> ApiKeyRecord | None:
        if not key or len(key) > MAX_KEY_LENGTH:
            return None
        digest = token_hash(key)
        raw = await guarded(self.client.hgetall(self.keys.api_key(digest)))
        if not raw or not hmac.compare_digest(raw.get("hash", ""), digest):
            return None
        return ApiKeyRecord.from_hash(raw)

    async def list(self) -> list[ApiKeyRecord]:
        index = await guarded(self.client.hgetall(self.keys.api_key_index()))
        records = []
        for digest in index.values():
            raw = await guarded(self.client.hgetall(self.keys.api_key(digest)))
            if raw:
                records.append(ApiKeyRecord.from_hash(raw))
        return sorted(records, key=lambda r: r.created_at)

    # `builtins.list`: in this class body `list` is the method above.
    async def revoke(self, key_id_or_name: str) -> builtins.list[ApiKeyRecord]:
        """Revoke by key id, or every key with that name. Returns what was revoked."""
        revoked = []
        index = await guarded(self.client.hgetall(self.keys.api_key_index()))
        for key_id, digest in index.items():
            raw = await guarded(self.client.hgetall(self.keys.api_key(digest)))
            rec = ApiKeyRecord.from_hash(raw) if raw else None
            if key_id == key_id_or_name or (rec is not None and rec.name == key_id_or_name):
                pipe = self.client.pipeline(transaction=True)
                pipe.delete(self.keys.api_key(digest))
                pipe.hdel(self.keys.api_key_index(), key_id)
                if rec is not None and rec.org is not None:
                    pipe.srem(self.keys.org_keys(rec.org), digest)
                    self._announce(pipe, rec.org)
                await guarded(pipe.execute())
                if rec is not None:
                    revoked.append(rec)
        return revoked
