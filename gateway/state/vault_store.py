"""Vaults in Redis: the vault hash, its credentials and services (one hash each, records as JSON), the
name index that keeps credential names unique, and the capped request log.

Values arrive sealed (``gateway.orchestrator.vaults`` seals them with the storage key): this module never
sees a secret in clear. Writes that must agree go through one script or one MULTI, so a vault deleted
while a credential is added or a request logged never leaves keys behind.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from gateway.state.connection import guarded, hash_fields
from gateway.state.keyspace import Keys
from gateway.state.records import VaultCredentialRecord, VaultRecord, VaultServiceRecord

# Add a credential: refused (0) when the vault is gone, (-1) when the name is taken, (-2) when the vault
# holds ARGV[4] already. KEYS: vault, credentials, names. ARGV: id, name, record JSON, the cap.
_ADD_CREDENTIAL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then return -1 end
if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[4]) then return -2 end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""
# Replace a credential's record if it is still there. KEYS: credentials. ARGV: id, record JSON.
_REPLACE_IF_PRESENT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
# Add services (several at once, for templates): refused (0) when the vault is gone, (-1) past the cap.
# KEYS: vault, services. ARGV: the cap, then id, record JSON pairs.
_ADD_SERVICES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HLEN', KEYS[2]) + (#ARGV - 1) / 2 > tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 1
"""
# Log a request while the vault exists (a deleted vault's log is not recreated), newest first, capped.
# KEYS: vault, log. ARGV: entry JSON, the cap.
_LOG_REQUEST = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
return 1
"""

ADDED, GONE, NAME_TAKEN, FULL = 1, 0, -1, -2


def _dump(rec: VaultCredentialRecord | VaultServiceRecord) -> str:
    return json.dumps(rec.to_hash(), separators=(",", ":"), sort_keys=True)


class RedisVaultStore:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._add_credential = client.register_script(_ADD_CREDENTIAL)
        self._replace_if_present = client.register_script(_REPLACE_IF_PRESENT)
        self._add_services = client.register_script(_ADD_SERVICES)
        self._log_request = client.register_script(_LOG_REQUEST)

    # vaults -----------------------------------------------------------------------------------------

    async def put_vault(self, rec: VaultRecord) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.vault(rec.vault_id), mapping=hash_fields(rec.to_hash()))
        pipe.sadd(self.keys.owner_vaults(rec.owner), rec.vault_id)
        await guarded(pipe.execute())

    async def get_vault(self, vault_id: str) -> VaultRecord | None:
        raw = await guarded(self.client.hgetall(self.keys.vault(vault_id)))
        return VaultRecord.from_hash(raw) if raw else None

    async def get_vaults(self, vault_ids: list[str]) -> list[VaultRecord]:
        if not vault_ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for vault_id in vault_ids:
            pipe.hgetall(self.keys.vault(vault_id))
        return [VaultRecord.from_hash(raw) for raw in await guarded(pipe.execute()) if raw]

    async def owner_vault_ids(self, owner: str) -> list[str]:
        return sorted(await guarded(self.client.smembers(self.keys.owner_vaults(owner))))

    async def count_owner_vaults(self, owner: str) -> int:
        return int(await guarded(self.client.scard(self.keys.owner_vaults(owner))))

    async def update_vault(self, vault_id: str, values: dict[str, str]) -> None:
        await guarded(self.client.hset(self.keys.vault(vault_id), mapping=hash_fields(values)))

    async def delete_vault(self, rec: VaultRecord) -> bool:
        """The vault, its credentials (sealed values included), services, names and log, at once."""
        k = self.keys
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(k.vault(rec.vault_id))
        pipe.delete(
            k.vault_credentials(rec.vault_id),
            k.vault_credential_names(rec.vault_id),
            k.vault_services(rec.vault_id),
            k.vault_request_log(rec.vault_id),
        )
        pipe.srem(k.owner_vaults(rec.owner), rec.vault_id)
        deleted, _, _ = await guarded(pipe.execute())
        return bool(deleted)

    # credentials ------------------------------------------------------------------------------------

    async def add_credential(self, rec: VaultCredentialRecord, cap: int) -> int:
        """ADDED, or GONE (no such vault), NAME_TAKEN or FULL (``cap`` credentials already)."""
        k = self.keys
        done = await guarded(
            self._add_credential(
                keys=[
                    k.vault(rec.vault_id),
                    k.vault_credentials(rec.vault_id),
                    k.vault_credential_names(rec.vault_id),
                ],
                args=[rec.credential_id, rec.name, _dump(rec), cap],
            )
        )
        return int(done)

    async def replace_credential(self, rec: VaultCredentialRecord) -> bool:
        """Store a changed credential (rotated) if it was not deleted meanwhile."""
        done = await guarded(
            self._replace_if_present(
                keys=[self.keys.vault_credentials(rec.vault_id)], args=[rec.credential_id, _dump(rec)]
            )
        )
        return bool(done)

    async def credentials(self, vault_id: str) -> list[VaultCredentialRecord]:
        raw = await guarded(self.client.hgetall(self.keys.vault_credentials(vault_id)))
        return [VaultCredentialRecord.from_hash(json.loads(text)) for text in raw.values()]

    async def credentials_of(self, vault_ids: list[str]) -> dict[str, list[VaultCredentialRecord]]:
        """Each vault's credentials, in one round trip (the proxy's read)."""
        if not vault_ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for vault_id in vault_ids:
            pipe.hgetall(self.keys.vault_credentials(vault_id))
        raws = await guarded(pipe.execute())
        return {
            vault_id: [VaultCredentialRecord.from_hash(json.loads(text)) for text in raw.values()]
            for vault_id, raw in zip(vault_ids, raws, strict=True)
        }

    async def delete_credential(self, rec: VaultCredentialRecord) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self.keys.vault_credentials(rec.vault_id), rec.credential_id)
        pipe.hdel(self.keys.vault_credential_names(rec.vault_id), rec.name)
        deleted, _ = await guarded(pipe.execute())
        return bool(deleted)

    # services ---------------------------------------------------------------------------------------

    async def add_services(self, vault_id: str, records: list[VaultServiceRecord], cap: int) -> int:
        """ADDED, GONE (no such vault) or FULL (past ``cap`` services)."""
        pairs = [text for rec in records for text in (rec.service_id, _dump(rec))]
        done = await guarded(
            self._add_services(
                keys=[self.keys.vault(vault_id), self.keys.vault_services(vault_id)], args=[cap, *pairs]
            )
        )
        return FULL if int(done) == -1 else int(done)

    async def services(self, vault_id: str) -> list[VaultServiceRecord]:
        raw = await guarded(self.client.hgetall(self.keys.vault_services(vault_id)))
        return [VaultServiceRecord.from_hash(json.loads(text)) for text in raw.values()]

    async def services_of(self, vault_ids: list[str]) -> dict[str, list[VaultServiceRecord]]:
        if not vault_ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for vault_id in vault_ids:
            pipe.hgetall(self.keys.vault_services(vault_id))
        raws = await guarded(pipe.execute())
        return {
            vault_id: [VaultServiceRecord.from_hash(json.loads(text)) for text in raw.values()]
            for vault_id, raw in zip(vault_ids, raws, strict=True)
        }

    async def delete_service(self, vault_id: str, service_id: str) -> bool:
        return bool(await guarded(self.client.hdel(self.keys.vault_services(vault_id), service_id)))

    # request log ------------------------------------------------------------------------------------

    async def log_request(self, vault_id: str, entry: dict[str, Any], cap: int) -> None:
        text = json.dumps(entry, separators=(",", ":"), sort_keys=True)
        await guarded(
            self._log_request(
                keys=[self.keys.vault(vault_id), self.keys.vault_request_log(vault_id)], args=[text, cap]
            )
        )

    async def request_log(self, vault_id: str, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` entries, newest first."""
        texts = await guarded(self.client.lrange(self.keys.vault_request_log(vault_id), 0, limit - 1))
        return [json.loads(text) for text in texts]
