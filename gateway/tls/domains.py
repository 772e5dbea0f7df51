"""Keeps customers' custom-domain certificates issued and renewed, and shows how it goes on each domain.

Runs beside the operator's ``CertKeeper`` in ``gateway serve``. A domain is checked:
- at once when its event arrives (claimed, retried or released through the API on any gateway);
- on every round (``acme.check_interval_s``), which also renews and retries after a back-off.
Each check builds the domain's DNS provider from its sealed credentials and calls ``Renewer.ensure``
(one process per certificate at a time, whichever gateway gets the lock), then copies the outcome onto
the domain's record: ``verifying`` while an order runs, then ``issued`` with the expiry, or ``failed``
with the error. A domain whose VM has ended is released; a released domain's certificate is deleted
after ``acme.domain_grace_s``, unless the domain was claimed again meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.background import stop_loop
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.state.events import DomainChanged, Event
from gateway.state.ports import EventFeed
from gateway.state.records import DOMAIN_FAILED, DOMAIN_ISSUED, DOMAIN_VERIFYING, DomainRecord, is_live
from gateway.state.store import RedisStore
from gateway.tls.dns01 import DnsProvider, DnsProviderError
from gateway.tls.keeper import acme_renewer, provider_settings
from gateway.tls.providers.registry import ProviderSettings, credential_problems, make_provider
from gateway.tls.renewal import Renewer
from gateway.tls.store import CertStore, Unsealable

log = logging.getLogger(__name__)

# Domains checked at once; each may wait minutes on DNS propagation.
CONCURRENT_CHECKS = 8
# A domain is claimed just before its VM record is written: one whose VM is still missing after this
# long was left by a crash between the two.
ORPHAN_AFTER_S = 300.0


class DomainKeeper:
    def __init__(
        self, renewer: Renewer, routes: RedisStore, certs: CertStore, providers: ProviderSettings,
        *, interval_s: float, grace_s: float,
    ) -> None:  # fmt: skip
        self.renewer = renewer
        self.routes = routes
        self.certs = certs
        self.providers = providers
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.rounds = 0
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._round_done = asyncio.Event()
        self._check_done = asyncio.Event()
        self._limit = asyncio.Semaphore(CONCURRENT_CHECKS)
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    # one domain -----------------------------------------------------------------------------------

    async def check(self, domain: str) -> None:
        try:
            await self._check(domain)
        finally:
            done, self._check_done = self._check_done, asyncio.Event()
            done.set()

    async def next_check(self) -> None:
        """Return when the next check of any domain has finished (tests and tools wait on it)."""
        await self._check_done.wait()

    async def _check(self, domain: str) -> None:
        async with self._limit:
            rec = await self.routes.get_domain(domain)
            if rec is None or await self._released_if_orphan(rec):
                return
            try:
                provider = self.provider_for(rec)
            except (Unsealable, DnsProviderError, ValueError) as exc:
                await self._show(rec, DOMAIN_FAILED, last_error=f"DNS provider: {exc}")
                return

            async def issuing() -> None:
                await self._show(rec, DOMAIN_VERIFYING)

            await self.renewer.ensure(domain, [domain], provider, on_issuing=issuing)
            state = await self.renewer.state(domain)
            expiry = await self.certs.expiry(domain)
            if state.status == "failed" and state.last_error:
                await self._show(rec, DOMAIN_FAILED, last_error=state.last_error, not_after=expiry)
            elif expiry is not None:
                await self._show(rec, DOMAIN_ISSUED, not_after=expiry)
            # else: another process holds the lock and is issuing; it shows the outcome

    def provider_for(self, rec: DomainRecord) -> DnsProvider:
        credentials: dict[str, str] = {}
        if rec.credentials_sealed:
            credentials = json.loads(self.certs.sealer.open(rec.credentials_sealed))
        problems = credential_problems(rec.dns_provider, credentials, self.providers)
        if problems:
            raise ValueError("; ".join(problems))
        return make_provider(rec.dns_provider, credentials, self.providers)

    async def _released_if_orphan(self, rec: DomainRecord) -> bool:
        vm = await self.routes.get_vm(rec.vm_id)
        orphan = vm is None and time.time() - rec.created_at > ORPHAN_AFTER_S
        if orphan or (vm is not None and not is_live(vm)):
            await self.routes.release_domain(rec.domain, rec.owner, rec.vm_id)
            return True
        return False

    async def _show(self, rec: DomainRecord, state: str, **values: object) -> None:
        fields = {"state": state, "last_error": None, "updated_at": time.time(), **values}
        await self.routes.update_domain(rec.domain, rec.vm_id, **fields)

    # every domain ---------------------------------------------------------------------------------

    async def check_all(self) -> None:
        await self._check_each(await self.routes.domain_names())
        await self.drop_retired()
        self.rounds += 1
        done, self._round_done = self._round_done, asyncio.Event()
        done.set()

    async def drop_retired(self) -> None:
        for domain in await self.routes.retired_domains(before=time.time() - self.grace_s):
            if await self.routes.get_domain(domain) is None:  # not claimed again meanwhile
                await self.certs.delete(domain)
                await self.renewer.states.forget(domain)
                log.info("certificate of released custom domain %s deleted", domain)
            await self.routes.forget_retired_domain(domain)

    async def next_round(self) -> None:
        await self._round_done.wait()

    async def _check_each(self, domains: list[str]) -> None:
        results = await asyncio.gather(*(self.check(d) for d in domains), return_exceptions=True)
        for domain, result in zip(domains, results, strict=True):
            if isinstance(result, GatewayError):  # Redis unavailable: the next round tries again
                log.warning("custom domain %s not checked: %s", domain, result)
            elif isinstance(result, BaseException):
                log.error("custom domain %s: check failed", domain, exc_info=result)

    # running --------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="domain-keeper")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await stop_loop(self._task)
        self._task = None

    # events (an EventSubscriber of the process's feed): a changed domain is checked at once -------------

    def handle(self, event: Event) -> None:
        if isinstance(event, DomainChanged):
            self._dirty.add(event.domain)
            self._wake.set()

    def connected(self) -> None:
        """Nothing to drop: rounds check every domain anyway (events only make a change quicker)."""

    def disconnected(self) -> None:
        """Rounds go on without events."""

    async def _run(self) -> None:
        next_round = 0.0
        while not self._stopping:
            try:
                if time.monotonic() >= next_round:
                    next_round = time.monotonic() + self.interval_s
                    self._dirty.clear()
                    await self.check_all()
                elif self._dirty:
                    dirty, self._dirty = sorted(self._dirty), set()
                    await self._check_each(dirty)
                    await self.drop_retired()
            except GatewayError as exc:  # Redis unavailable: the next round tries again
                log.warning("custom domains not checked: %s", exc)
            self._wake.clear()
            if not self._dirty:
                try:
                    async with asyncio.timeout(max(0.0, next_round - time.monotonic())):
                        await self._wake.wait()
                except TimeoutError:
                    pass


@asynccontextmanager
async def keeping_domain_certs(
    config: Config, certs: CertStore | None, routes: RedisStore, events: EventFeed
) -> AsyncIterator[DomainKeeper | None]:
    """A running DomainKeeper when ACME is configured and TLS serves (else None)."""
    if not config.acme.directory_url or certs is None:
        yield None
        return
    renewer = acme_renewer(config, certs, routes.client)
    keeper = DomainKeeper(
        renewer, routes, certs, provider_settings(config),
        interval_s=config.acme.check_interval_s, grace_s=config.acme.domain_grace_s,
    )  # fmt: skip
    keeper.start()
    events.add(keeper)
    try:
        yield keeper
    finally:
        events.remove(keeper)
        await keeper.stop()
