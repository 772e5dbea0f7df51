"""Keeps one edge process's SNI table in step with the certificate store.

At start every stored certificate is loaded; then each ``CertChanged`` event (from the process's event
feed) reloads that one certificate, and a full comparison runs every ``RESYNC_INTERVAL_S`` and after
every (re)subscription, so a missed event costs at most that long. The comparison reads only each
certificate's version (when it was written) and reloads those that changed: decrypting and loading
thousands of certificates every minute in every process would be work for nothing. A certificate that
fails its checks is logged and the one already served keeps serving; connections in progress are never
touched (a new context only affects new handshakes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator

from gateway.background import stop_loop
from gateway.errors import GatewayError
from gateway.state.events import CertChanged, Event
from gateway.state.ports import EventFeed
from gateway.tls.bundle import BadCertificate
from gateway.tls.context import server_context
from gateway.tls.sni import SniTable
from gateway.tls.store import CertStore

log = logging.getLogger(__name__)

RESYNC_INTERVAL_S = 60.0
RETRY_DELAY_S = 1.0


class CertFollower:
    def __init__(self, store: CertStore, table: SniTable) -> None:
        self.store = store
        self.table = table
        self.following = asyncio.Event()  # set while events are followed (and a comparison followed)
        self._pending: set[str] = set()  # certificates an event named, to reload
        self._resync_due = False
        self._connected = False
        self._wake = asyncio.Event()
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

    # events (an EventSubscriber of the process's feed): callbacks only note what to do -------------

    def handle(self, event: Event) -> None:
        if isinstance(event, CertChanged):
            self._pending.add(event.cert_id)
            self._wake.set()

    def connected(self) -> None:
        # Certificates stored while no events were heard are found by a full comparison.
        self._connected = True
        self._resync_due = True
        self._wake.set()

    def disconnected(self) -> None:
        self._connected = False
        self.following.clear()

    # running -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="certificate-follower")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await stop_loop(self._task)
        self._task = None

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + RESYNC_INTERVAL_S
        while not self._stopping:
            if not (self._pending or self._resync_due):
                try:
                    async with asyncio.timeout(max(0.0, next_resync - loop.time())):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            if self._stopping:
                return
            try:
                if self._resync_due or loop.time() >= next_resync:
                    self._resync_due = False
                    connected = self._connected
                    await self.resync()
                    next_resync = loop.time() + RESYNC_INTERVAL_S
                    if connected and self._connected:
                        self.following.set()
                while self._pending and not self._stopping:
                    await self.refresh(self._pending.pop())
            except GatewayError as exc:
                log.warning("certificates not refreshed (serving the ones loaded; trying again): %s", exc)
                self._resync_due = True  # whatever was missed is found by the next comparison
                await asyncio.sleep(RETRY_DELAY_S)


@contextlib.asynccontextmanager
async def following(store: CertStore, table: SniTable, events: EventFeed) -> AsyncIterator[CertFollower]:
    """A started follower whose first full load is done (or failed and logged), hearing ``events``;
    stopped on exit."""
    follower = CertFollower(store, table)
    try:
        await follower.resync()
    except GatewayError as exc:
        log.warning("certificates not loaded at start (Redis unavailable): %s", exc)
    follower.start()
    events.add(follower)
    try:
        yield follower
    finally:
        events.remove(follower)
        await follower.stop()
