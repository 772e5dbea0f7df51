"""What the planes need from the state, as small protocols (the edge imports these, never the store).

``RedisStore`` satisfies ``RouteSource`` and ``RedisEventFeed`` satisfies ``EventFeed`` structurally;
tests and benchmarks hand the edge plain fakes instead. The records named here are pure data
(``gateway.state.records``) and are re-exported so that a plane speaks of them through this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from gateway.state.events import Event
from gateway.state.records import HOST_LOCALHOST, VM_SUSPENDED, InstanceRecord, VmRecord

if TYPE_CHECKING:
    from gateway.egress.inject import VmVault

__all__ = [
    "HOST_LOCALHOST",
    "VM_SUSPENDED",
    "EgressSink",
    "EventFeed",
    "EventSubscriber",
    "InstanceRecord",
    "PolicySource",
    "RouteSource",
    "TrafficSink",
    "VaultSource",
    "VmRecord",
    "Waker",
]


class RouteSource(Protocol):
    """The edge's route lookups, each one round trip. Raise ``StoreUnavailable`` when the state cannot be
    read (the edge then serves what it last knew, for a grace); never any other library's exception.
    Safe to call concurrently; cancelling one leaves nothing behind."""

    async def vm_and_port(self, vm_id: str, port: int) -> tuple[VmRecord | None, bool]:
        """The VM and whether ``port`` is exposed publicly."""
        ...

    async def session_vm_and_port(self, session_id: str, port: int) -> tuple[VmRecord | None, bool]:
        """``vm_and_port`` for the VM the session holds."""
        ...

    async def domain_vm(self, domain: str) -> VmRecord | None:
        """The VM a custom domain is routed to."""
        ...

    async def instance_route(
        self, instance_uuid: str
    ) -> tuple[InstanceRecord | None, VmRecord | None, frozenset[str]]:
        """A browser instance, its VM and the key hashes of its organisation (who may open it)."""
        ...


class TrafficSink(Protocol):
    """Where edges add the bytes they carried for each VM (its session's usage)."""

    async def add_traffic(self, counts: dict[str, tuple[int, int, int]]) -> None:
        """Add (bytes in, bytes out, requests) per VM id; VMs whose record is gone are skipped. Raises
        ``StoreUnavailable`` when the state cannot be written (the edge keeps the counts for later)."""
        ...

    async def report_open(
        self, edge_id: str, open_counts: Mapping[str, tuple[int, int]], ttl_s: float
    ) -> None:
        """What the edge process ``edge_id`` has open per VM id now: (exchanges, tunnels among them);
        it holds for ``ttl_s`` unless reported again (an edge that died stops counting). Raises
        ``StoreUnavailable`` like ``add_traffic``."""
        ...

    async def mark_active(self, sources: Mapping[str, str], at: float) -> None:
        """The last client activity per VM id (its source: "http", "websocket" or "tunnel") happened by
        ``at`` (unix seconds); only active VMs whose recorded activity is older take it. Raises
        ``StoreUnavailable`` like ``add_traffic``."""
        ...


class PolicySource(Protocol):
    """What the egress plane reads: the running VMs by address, with their egress policy."""

    async def egress_policies(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """VM address -> (VM id, its egress policy as stored; empty for the default)."""
        ...


class EgressSink(Protocol):
    """Where the egress plane leaves what it saw: bytes per VM (its usage) and the VM's denials (what the
    API shows a user whose ``pip install`` failed)."""

    async def add_egress(self, counts: dict[str, tuple[int, int]], denials: dict[str, list[str]]) -> None:
        """Add (bytes out, bytes in) per VM id and append denials (JSON objects, oldest first) per VM id.
        ``StoreUnavailable`` when the state cannot be written (the caller keeps them for later)."""
        ...


class VaultSource(Protocol):
    """What the egress proxy reads to put vault secrets into a VM's requests, and where it logs them.
    ``gateway.orchestrator.vaults.VaultService`` implements it. Both raise ``StoreUnavailable`` when the
    state cannot be read or written; safe to call concurrently."""

    async def vm_vault(self, vm_id: str) -> VmVault | None:
        """What the proxy needs to inject for this VM (None: the VM has no vaults). Read fresh on each
        call: a rotated secret, a deleted credential or a disabled service applies at once."""
        ...

    async def log_vault_request(self, vault_id: str, entry: Mapping[str, Any]) -> None:
        """Append one request log entry (keys: at, vm_id, host, method, path, status; optionally
        credential_id); kept capped. The query string is dropped from ``path``; other keys are ignored
        (never headers or bodies). A deleted vault's log is not recreated."""
        ...


class Waker(Protocol):
    """How an edge asks for a suspended VM (made with auto_resume) to be resumed."""

    async def request_wake(self, vm_id: str) -> None:
        """Ask the control planes (they resume it once, whoever asks how often). ``StoreUnavailable``
        when the state cannot be written."""
        ...


class EventSubscriber(Protocol):
    """Told of every event while the process follows the events channel. Callbacks run on the feed's
    task and must not block or await; they are called one at a time, never concurrently."""

    def connected(self) -> None:
        """The subscription is (again) up: anything learnt before it may have missed events."""

    def disconnected(self) -> None:
        """The subscription is down: events may be missed until ``connected`` again."""

    def handle(self, event: Event) -> None:
        """One event, in the order published."""


class EventFeed(Protocol):
    """One subscription per process, shared: ``add`` a subscriber (told ``connected`` at once when the
    feed already is), ``remove`` it (told ``disconnected``). Idempotent per subscriber."""

    def add(self, subscriber: EventSubscriber) -> None: ...

    def remove(self, subscriber: EventSubscriber) -> None: ...
