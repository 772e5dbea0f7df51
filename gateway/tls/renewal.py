"""Getting and keeping a certificate: issue when missing or due, one process at a time per certificate.

``ensure`` is what every edge process may call for every certificate it wants, as often as it likes:
- nothing happens while the stored certificate is not due (``renewal_policy.renew_at``) or while a
  failed attempt's back-off runs;
- otherwise it takes the certificate's Redis lock without waiting (another process holding it is
  issuing; this one keeps serving what is stored), checks again under the lock (certmagic's rule: the
  other process may just have finished), issues, and stores; the store's event brings the new
  certificate to every edge's SNI table, while the old one serves until then;
- the outcome is kept per certificate (``CertState``: issued or failed with the error, failures, next
  attempt), which the API shows for custom domains.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import redis.asyncio as aioredis
from redis.exceptions import LockError

from gateway.state.cert_state import CertState, CertStates
from gateway.state.connection import guarded
from gateway.state.keyspace import Keys
from gateway.tls.acme import AcmeIssuer, IssueError
from gateway.tls.bundle import BadCertificate
from gateway.tls.dns01 import DnsProvider
from gateway.tls.renewal_policy import renew_at, retry_delay
from gateway.tls.store import CertStore, StoredCert

log = logging.getLogger(__name__)

# Longer than an issuance takes (ORDER_TIMEOUT_S), so a live issuer never loses its lock; a crashed
# one's lock expires.
LOCK_TTL_S = 600.0


class Renewer:
    def __init__(self, store: CertStore, issuer: AcmeIssuer, client: aioredis.Redis, keys: Keys) -> None:
        self.store = store
        self.issuer = issuer
        self.client = client
        self.keys = keys
        self.states = CertStates(client, keys)

    async def state(self, cert_id: str) -> CertState:
        return await self.states.get(cert_id)

    async def ensure(
        self,
        cert_id: str,
        names: list[str],
        provider: DnsProvider,
        *,
        now: float | None = None,
        on_issuing: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """Issue or renew ``cert_id`` when due. True when this call stored a new certificate.

        ``on_issuing`` is awaited once this process has decided to issue (under the lock).
        """  # fmt: skip
        now = time.time() if now is None else now
        due, seen = await self._due(cert_id, now)
        if not due:
            return False
        lock = self.client.lock(self.keys.cert_lock(cert_id), timeout=LOCK_TTL_S)
        if not await guarded(lock.acquire(blocking=False)):
            return False  # another process is issuing this certificate
        try:
            due, stored_now = await self._due(cert_id, now)
            if not due or stored_now != seen:
                return False  # another process stored one just before we took the lock
            if on_issuing is not None:
                await on_issuing()
            try:
                bundle = await self.issuer.issue(names, provider)
            except IssueError as exc:
                await self._failed(cert_id, str(exc), now, exc.retry_after_s)
                return False
            await self.store.put(bundle, source="acme", cert_id=cert_id)
            issued: dict[str, str | int] = {
                "status": "issued",
                "last_error": "",
                "failures": 0,
                "next_attempt_at": 0,
            }
            # A new certificate: ask the ACME server about its renewal window afresh (ARI).
            ari = {"ari_renew_at": 0, "ari_next_poll": 0}
            await self._record(cert_id, {**issued, **ari, "not_after": repr(bundle.not_after)})
            log.info("certificate %s issued for %s", cert_id, ", ".join(bundle.names))
            return True
        finally:
            try:
                await lock.release()
            except LockError:
                log.warning("the lock on certificate %s expired during issuance", cert_id)

    async def _due(self, cert_id: str, now: float) -> tuple[bool, float]:
        """Whether to issue now, and the stored certificate's version (0: none), to notice a change."""
        state = await self.state(cert_id)
        stored = await self._stored(cert_id)
        version = stored.updated_at if stored is not None else 0.0
        if state.status == "failed" and now < state.next_attempt_at:
            return False, version
        if stored is None:
            return True, version
        if state.ari_next_poll <= now:
            state = await self._ask_renewal_window(cert_id, stored, state)
        if state.ari_renew_at:
            return now >= state.ari_renew_at, version
        return now >= renew_at(stored.bundle.not_before, stored.bundle.not_after), version

    async def _ask_renewal_window(self, cert_id: str, stored: StoredCert, state: CertState) -> CertState:
        """The ACME server's suggested renewal time (ARI), when it offers one; asked again when it says."""
        suggested, next_poll = await self.issuer.renewal_window(stored.bundle.chain_pem)
        fields = {"ari_renew_at": repr(suggested or 0.0), "ari_next_poll": repr(next_poll)}
        await self._record(cert_id, fields)
        return dataclasses.replace(state, ari_renew_at=suggested or 0.0, ari_next_poll=next_poll)

    async def _stored(self, cert_id: str) -> StoredCert | None:
        try:
            return await self.store.get(cert_id)
        except BadCertificate as exc:
            log.error("stored certificate %s is unusable, issuing a new one: %s", cert_id, exc)
            return None

    async def _failed(self, cert_id: str, error: str, now: float, retry_after_s: float | None) -> None:
        failures = (await self.state(cert_id)).failures + 1
        delay = retry_delay(failures, retry_after_s=retry_after_s)
        log.warning("certificate %s failed (attempt %d, next in %.0f s): %s", cert_id, failures, delay, error)
        await self._record(cert_id, {"status": "failed", "last_error": error, "failures": failures,
                                     "next_attempt_at": repr(now + delay)})  # fmt: skip

    async def _record(self, cert_id: str, fields: Mapping[str, str | int]) -> None:
        await self.states.record(cert_id, fields)
