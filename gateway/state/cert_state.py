"""The outcome of getting each certificate (``cert-state:<id>``): the only module that writes it.

The renewer records issued / failed and the ACME server's renewal window; the control plane asks for an
attempt now (a customer fixed their DNS); the domain keeper forgets it with its released domain. Before,
those three wrote the hash directly from three packages, each with its own idea of its fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway.state.connection import guarded, hash_fields
from gateway.state.keyspace import Keys


@dataclass(frozen=True)
class CertState:
    status: str  # "issued", "failed" or "" (never attempted)
    last_error: str = ""
    failures: int = 0
    next_attempt_at: float = 0.0
    not_after: float = 0.0
    ari_renew_at: float = 0.0  # the ACME server's suggested renewal time (ARI); 0: none offered
    ari_next_poll: float = 0.0  # when to ask it again


class CertStates:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def get(self, cert_id: str) -> CertState:
        raw = await guarded(self.client.hgetall(self.keys.cert_state(cert_id)))
        return CertState(
            status=raw.get("status", ""),
            last_error=raw.get("last_error", ""),
            failures=int(raw.get("failures", 0)),
            next_attempt_at=float(raw.get("next_attempt_at", 0)),
            not_after=float(raw.get("not_after", 0)),
            ari_renew_at=float(raw.get("ari_renew_at", 0)),
            ari_next_poll=float(raw.get("ari_next_poll", 0)),
        )

    async def record(self, cert_id: str, fields: Mapping[str, str | int]) -> None:
        """Set some fields (the renewer's outcome or the renewal window it was told)."""
        await guarded(self.client.hset(self.keys.cert_state(cert_id), mapping=hash_fields(fields)))

    async def retry_now(self, cert_id: str) -> None:
        """Drop a failure's back-off: the next check may issue at once."""
        await self.record(cert_id, {"next_attempt_at": 0})

    async def forget(self, cert_id: str) -> None:
        await guarded(self.client.delete(self.keys.cert_state(cert_id)))
