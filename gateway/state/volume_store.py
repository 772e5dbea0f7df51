"""Volumes in Redis: the volume hash, the owner's set, and the volume's checkpoints (one hash, records as
JSON). The bytes are elsewhere (``gateway.volumes``); these are the records the API shows."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from gateway.state.connection import guarded, hash_fields
from gateway.state.keyspace import Keys
from gateway.state.records import VolumeCheckpointRecord, VolumeRecord

# Set fields of a hash only if it exists. KEYS: the hash. ARGV: field, value pairs.
_UPDATE_IF_PRESENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


class RedisVolumeStore:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._update_if_present = client.register_script(_UPDATE_IF_PRESENT)

    async def put_volume(self, rec: VolumeRecord) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.volume(rec.volume_id), mapping=hash_fields(rec.to_hash()))
        pipe.sadd(self.keys.owner_volumes(rec.owner), rec.volume_id)
        await guarded(pipe.execute())

    async def get_volume(self, volume_id: str) -> VolumeRecord | None:
        raw = await guarded(self.client.hgetall(self.keys.volume(volume_id)))
        return VolumeRecord.from_hash(raw) if raw else None

    async def get_volumes(self, volume_ids: list[str]) -> list[VolumeRecord]:
        if not volume_ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for volume_id in volume_ids:
            pipe.hgetall(self.keys.volume(volume_id))
        return [VolumeRecord.from_hash(raw) for raw in await guarded(pipe.execute()) if raw]

    async def owner_volume_ids(self, owner: str) -> list[str]:
        return sorted(await guarded(self.client.smembers(self.keys.owner_volumes(owner))))

    async def count_owner_volumes(self, owner: str) -> int:
        return int(await guarded(self.client.scard(self.keys.owner_volumes(owner))))

    async def update_volume(self, volume_id: str, values: dict[str, str]) -> bool:
        """Fields of a volume that still exists (a deleted one is not brought back by a late write)."""
        args = [text for pair in values.items() for text in pair]
        return bool(await guarded(self._update_if_present(keys=[self.keys.volume(volume_id)], args=args)))

    async def delete_volume(self, rec: VolumeRecord) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.volume(rec.volume_id), self.keys.volume_checkpoints(rec.volume_id))
        pipe.srem(self.keys.owner_volumes(rec.owner), rec.volume_id)
        await guarded(pipe.execute())

    async def put_checkpoint(self, rec: VolumeCheckpointRecord) -> None:
        text = json.dumps(rec.to_hash(), separators=(",", ":"), sort_keys=True)
        await guarded(self.client.hset(self.keys.volume_checkpoints(rec.volume_id), rec.checkpoint_id, text))

    async def checkpoints(self, volume_id: str) -> list[VolumeCheckpointRecord]:
        raw = await guarded(self.client.hgetall(self.keys.volume_checkpoints(volume_id)))
        return [VolumeCheckpointRecord.from_hash(json.loads(text)) for text in raw.values()]

    async def delete_checkpoint(self, volume_id: str, checkpoint_id: str) -> bool:
        return bool(await guarded(self.client.hdel(self.keys.volume_checkpoints(volume_id), checkpoint_id)))
