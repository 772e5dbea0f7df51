"""Signed URLs: a URL that opens one port of a VM until a time, private share or not, with no token.

``?signature=<hex>&expires=<unix seconds>``: an HMAC-SHA256 (``gateway.tokens``) of what the URL grants
(the VM, the port, the expiry, the key's version, and the share it was made from, or "" for the app-url
call's) under the VM's URL key. The key is random, made at the VM's first signed URL and kept with the
VM's record; rotating it makes a new key and version and tells every edge (``UrlKeyChanged``), which
revokes every URL signed before at once. A URL made from a share also stops when the share is revoked
(or another takes its port); one made by the app-url call opens its port until it expires, whether the
port is shared or not (and does not make it public).

The key is kept as it is, not hashed like tokens: an edge must compute the HMAC. It never leaves the
gateway (the API shows its version only); a key rotation is the answer to a leaked URL or key.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from gateway.errors import Conflict, NotFound, VmNotRunning
from gateway.orchestrator.model import VmRecord, is_live
from gateway.orchestrator.service import Orchestrator
from gateway.orchestrator.shares import Shares
from gateway.tokens import signed_url_scope, url_signature

# How long a signed URL may be valid: at least a second, at most a week (its VM usually ends sooner).
MIN_EXPIRES_IN_S = 1
MAX_EXPIRES_IN_S = 7 * 24 * 3600
SIGNATURE_PARAM = "signature"
EXPIRES_PARAM = "expires"


@dataclass(frozen=True)
class SignedUrl:
    vm: VmRecord
    port: int
    expires: int  # unix seconds: the URL opens its app until then
    signature: str
    key_version: int
    share_id: str | None  # the share it was made from; None: the app-url call's

    @property
    def query(self) -> str:
        """What goes after the app's URL (``?`` + this)."""
        return f"{SIGNATURE_PARAM}={self.signature}&{EXPIRES_PARAM}={self.expires}"


class SignedUrls:
    def __init__(self, orchestrator: Orchestrator, shares: Shares) -> None:
        self.orchestrator = orchestrator
        self.shares = shares
        self.store = orchestrator.store

    async def for_share(self, owner: str, share_id: str, expires_in: int) -> SignedUrl:
        """A URL opening the share's port for ``expires_in`` seconds, until the share is revoked."""
        rec = await self.shares.get(owner, share_id)
        if rec.revoked_at is not None:
            raise Conflict("the share was revoked; make a new one", code="share_revoked")
        vm = await self.store.get_vm(rec.vm_id)
        return await self._sign(vm, rec.port, expires_in, rec.share_id)

    async def for_session_port(self, owner: str, session_id: str, port: int, expires_in: int) -> SignedUrl:
        """The app-url call with ``expires_in``: a URL opening the session VM's ``port`` for that long."""
        vm = await self.orchestrator.app_vm(owner, session_id)  # (the port is not made public)
        return await self._sign(vm, port, expires_in, None)

    async def rotate(self, owner: str, vm_id: str) -> tuple[VmRecord, int]:
        """A new URL key for the VM: every URL signed before stops working on every edge. The VM and the
        new key's version."""
        vm = await self.orchestrator.get_vm(owner, vm_id)
        if not is_live(vm):
            raise VmNotRunning(f"VM {vm.vm_id} is {vm.status}")
        found = await self.store.url_key(vm, rotate=True)
        if found is None:
            raise NotFound("VM not found", code="vm_not_found")
        return vm, found[1]

    async def _sign(self, vm: VmRecord | None, port: int, expires_in: int, share_id: str | None) -> SignedUrl:
        if vm is None or not is_live(vm):
            raise VmNotRunning("the VM has ended" if vm is None else f"VM {vm.vm_id} is {vm.status}")
        found = await self.store.url_key(vm)
        if found is None:
            raise VmNotRunning(f"VM {vm.vm_id} has ended")
        key, version = found
        # Whole seconds, rounded up: the URL is valid for at least expires_in.
        expires = math.ceil(time.time()) + expires_in
        signature = url_signature(key, signed_url_scope(vm.vm_id, port, expires, version, share_id or ""))
        return SignedUrl(vm, port, expires, signature, version, share_id)
