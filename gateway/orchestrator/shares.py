"""Shares: ports of a VM opened through the edge, each a resource with an id (``/v1/shares``).

A share is public, or private behind an access token shown once (kept only as its SHA-256). The edge
reads a VM's shares per port with its route, so making, changing or revoking one takes effect at the
next request; a revoked share's open connections and WebSockets are closed by every edge as soon as it
hears of it (the events channel). A custom domain can be pointed at a share: it then serves that port.
"""

from __future__ import annotations

import secrets
import time

from gateway.errors import Conflict, NotFound, VmNotRunning
from gateway.orchestrator.domains import DomainRequest
from gateway.orchestrator.model import HOST_PRESERVE, DomainRecord, ShareRecord, VmRecord, is_live
from gateway.orchestrator.service import Orchestrator
from gateway.state.events import DomainChanged, ShareChanged
from gateway.tokens import token_hash

ID_PREFIX = "share-"
TOKEN_BYTES = 32


def new_share_token() -> tuple[str, str]:
    """A private share's access token (shown once) and the hash that is all the gateway keeps of it."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, token_hash(token)


class Shares:
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator
        self.store = orchestrator.store

    async def create(
        self,
        owner: str,
        *,
        session_id: str | None,
        vm_id: str | None,
        port: int,
        is_public: bool,
        host: str = HOST_PRESERVE,
    ) -> tuple[ShareRecord, VmRecord, str | None]:
        """Open ``port`` of the session's (or the named) VM; the share, its VM and a private share's token."""
        vm = await self._live_vm(owner, session_id, vm_id)
        return await self.open(vm, port, is_public, host)

    async def open(
        self, vm: VmRecord, port: int, is_public: bool, host: str = HOST_PRESERVE
    ) -> tuple[ShareRecord, VmRecord, str | None]:
        token, token_sha256 = (None, None) if is_public else new_share_token()
        rec = await self.register(vm, port, is_public, token_sha256, host=host)
        return rec, vm, token

    async def register(
        self,
        vm: VmRecord,
        port: int,
        is_public: bool,
        token_sha256: str | None,
        *,
        main: bool = False,
        host: str = HOST_PRESERVE,
    ) -> ShareRecord:
        """The share record of a port opened with its token hash; ``main``: the share the VM was created
        with (its ``share``, what a custom domain serves), which learns its id."""
        rec = ShareRecord(
            share_id=ID_PREFIX + secrets.token_hex(10),
            owner=vm.owner,
            vm_id=vm.vm_id,
            session_id=vm.session_id,
            port=port,
            is_public=is_public,
            created_at=time.time(),
            token_sha256=token_sha256,
            host=host,
        )
        await self.store.put_share(rec, self._ttl(vm))
        if main:
            vm.share = {**vm.share, "share_id": rec.share_id}
            await self.store.update_vm(vm.vm_id, share=vm.share)
        return rec

    async def get(self, owner: str, share_id: str) -> ShareRecord:
        rec = await self.store.get_share(share_id) if share_id.startswith(ID_PREFIX) else None
        if rec is None or rec.owner != owner:
            raise NotFound("Share not found", code="share_not_found")
        return rec

    async def update(
        self,
        owner: str,
        share_id: str,
        *,
        is_public: bool | None,
        revoke: bool | None,
        host: str | None = None,
    ) -> tuple[ShareRecord, str | None]:
        """Revoke it (for good), or change who may open it (a share made private gets a new token) and
        the Host its app sees."""
        rec = await self.get(owner, share_id)
        if revoke:
            if rec.revoked_at is None:
                await self.store.revoke_share(rec)
                rec.revoked_at = time.time()
            return rec, None
        if rec.revoked_at is not None:
            raise Conflict("the share was revoked; make a new one", code="share_revoked")
        token = None
        changed = False
        if host is not None and host != rec.host:
            rec.host, changed = host, True
        if is_public is not None and is_public != rec.is_public:
            rec.is_public = is_public
            token, rec.token_sha256 = (None, None) if is_public else new_share_token()
            changed = True
        if changed:
            vm = await self._vm_of(rec)
            await self.store.put_share(rec, self._ttl(vm))
            if vm.share.get("share_id") == rec.share_id:
                await self.store.update_vm(vm.vm_id, share=rec.route_entry())
        return rec, token

    async def point_domain(self, owner: str, share_id: str, request: DomainRequest) -> DomainRecord:
        """Serve a custom domain from the share's port (its VM's main share from then on)."""
        domains = self.orchestrator.domains
        if domains is None:
            raise NotFound("custom domains are not available on this gateway", code="domain_not_found")
        rec = await self.get(owner, share_id)
        if rec.revoked_at is not None:
            raise Conflict("the share was revoked", code="share_revoked")
        vm = await self._vm_of(rec)
        if vm.custom_domain and vm.custom_domain != request.domain:
            held = await domains.of_vm(vm.vm_id, vm.custom_domain)
            if held is not None:
                raise Conflict(
                    f"the VM already serves {vm.custom_domain}; delete it first", code="vm_has_domain"
                )
        domain = await domains.claim(owner, vm.vm_id, request)
        await self.store.update_vm(vm.vm_id, custom_domain=domain.domain, share=rec.route_entry())
        await self.store.publish(ShareChanged(vm.vm_id, rec.port))
        await self.store.publish(DomainChanged(domain.domain))
        return domain

    async def _live_vm(self, owner: str, session_id: str | None, vm_id: str | None) -> VmRecord:
        if vm_id is not None:
            vm = await self.orchestrator.get_vm(owner, vm_id)
        else:
            assert session_id is not None
            session = await self.orchestrator.get_session(owner, session_id)
            if session is None:
                raise NotFound("Session not found", code="session_not_found")
            found = await self.orchestrator.session_vm(session)
            if found is None:
                raise Conflict("session has no VM yet: run code or create one first", code="no_vm")
            vm = found
        if not is_live(vm):
            raise VmNotRunning(f"VM {vm.vm_id} is {vm.status}")
        return vm

    async def _vm_of(self, rec: ShareRecord) -> VmRecord:
        vm = await self.store.get_vm(rec.vm_id)
        if vm is None or not is_live(vm):
            raise VmNotRunning(f"the share's VM {rec.vm_id} has ended")
        return vm

    def _ttl(self, vm: VmRecord) -> int:
        """A share lives as long as its VM, and is shown for the retention after."""
        return int(max(0.0, (vm.expires_at or time.time()) - time.time())) + self.store.retention_s
