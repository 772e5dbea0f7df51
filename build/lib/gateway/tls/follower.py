"""Keeps one edge process's SNI table in step with the certificate store.

At start every stored certificate is loaded; then each ``cert`` event on the events channel reloads that
one certificate, and a full comparison runs every ``RESYNC_INTERVAL_S`` and after every (re)subscription,
so a missed event costs at most that long. The comparison reads only each certificate's version (when
it was written) and reloads those that changed: decrypting and loading thousands of certificates every
minute in every process would be work for nothing. A certificate that fails its checks is logged and the one
already served keeps serving; connections in progress are never touched (a new context only affects new
handshakes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from gateway.background import stop_loop
from gateway.errors import GatewayError
from gateway.tls.bundle import BadCertificate
from gateway.tls.context import server_context
from gateway.tls.sni import SniTable
from gateway.tls.store import CERT_EVENT, CertStore

log = logging.getLogger(__name__)

RESYNC_INTERVAL_S = 60.0
RESUBSCRIBE_DELAY_S = 1.0

Subscribe = Callable[[], AbstractAsyncContextManager[Callable[[float], Awaitable[dict[str, Any] | None]]]]


class CertFollower:
    def __init__(self, store: CertStore, table: SniTable, subscribe: Subscribe) -> None:
        self.store = store
        self.table = table
        self.subscribe = subscribe
        self.following = asyncio.Event()  # set while events are followed
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.refused = 0  # certificates that failed their checks (the old one kept serving)
        self._handled = asyncio.Event()  # replaced after each refresh: see next_refresh
        self._served_versions: dict[str, float] = {}  # cert id -> updated_at of what the table serves

    async def refresh(self, cert_id: str) -> None:
        """Serve the stored version of one certificate (or stop serving it when it was deleted)."""
        try:
            stored = await self.store.get(cert_id)
            if stored is None:
                self.table.remove(cert_id)
                self._served_versions.pop(cert_id, None)
            else:
                context = await asyncio.to_thread(server_context, stored.bundle)
                self.table.put(cert_id, stored.bundle.names, context)
                self._served_versions[cert_id] = stored.updated_at
        except (BadCertificate, ssl.SSLError) as exc:
            self.refused += 1
            log.error("certificate %s refused, the one being served is kept: %s", cert_id, exc)
        finally:
            handled, self._handled = self._handled, asyncio.Event()
            handled.set()

    async def next_refresh(self) -> None:
        """Wait until the next certificate has been handled (served, removed or refused)."""
        await self._handled.wait()

    async def resync(self) -> None:
        """Serve what the store holds: drop what it no longer has, (re)load what is new or changed (a
        refused certificate is tried again each time)."""
        versions = await self.store.versions()
        for cert_id in self.table.cert_ids() - set(versions):
            self.table.remove(cert_id)
            self._served_versions.pop(cert_id, None)
        for cert_id, version in sorted(versions.items()):
            if self._served_versions.get(cert_id) != version:
                await self.refresh(cert_id)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        self._stopping = True
        await stop_loop(self._task)
        self._task = None

    async def _follow(self) -> None:
        while not self._stopping:
            try:
                async with self.subscribe() as next_event:
                    await self.resync()  # anything stored before the subscription
                    self.following.set()
                    loop = asyncio.get_running_loop()
                    next_resync = loop.time() + RESYNC_INTERVAL_S
                    while not self._stopping:
                        event = await next_event(max(0.0, next_resync - loop.time()))
                        if event is not None and event.get("type") == CERT_EVENT:
                            await self.refresh(str(event.get("cert_id", "")))
                        if loop.time() >= next_resync:
                            await self.resync()
                            next_resync = loop.time() + RESYNC_INTERVAL_S
            except GatewayError as exc:
                if self._stopping:
                    return
                log.warning("certificate events unavailable (serving the certificates loaded): %s", exc)
            finally:
                self.following.clear()
            await asyncio.sleep(RESUBSCRIBE_DELAY_S)


@contextlib.asynccontextmanager
async def following(store: CertStore, table: SniTable, subscribe: Subscribe) -> AsyncIterator[CertFollower]:
    """A started follower whose first full load is done (or failed and logged); stopped on exit."""
    follower = CertFollower(store, table, subscribe)
    try:
        await follower.resync()
    except GatewayError as exc:
        log.warning("certificates not loaded at start (Redis unavailable): %s", exc)
    follower.start()
    try:
        yield follower
    finally:
        await follower.stop()
