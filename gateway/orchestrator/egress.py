"""Egress policies as users read and change them (``/v1/egress/vm/{id}`` and ``/v1/egress/session/{id}``).

A VM's policy is its own when it has one, else its session's, else the operator's default. A change is
a write to the record and an ``EgressPolicyChanged`` event: every gateway's egress plane reads policies
again at once (and every ``REFRESH_S`` while it cannot hear events) and applies them to new connections
and DNS answers; connections already open keep going. What the egress plane saw (bytes, recent
denials) comes back through the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.egress.policy import EgressPolicy, effective_policy
from gateway.errors import VmNotRunning
from gateway.orchestrator.model import VmRecord, is_live
from gateway.orchestrator.service import Orchestrator
from gateway.state.events import EgressPolicyChanged

# Drivers whose VMs have a network of their own behind the host's veth (what egress intercepts).
EGRESS_DRIVERS = frozenset({"netns", "qemu"})

EGRESS_OFF = "VMs have no egress on this gateway (egress.enabled is off)"

Source = Literal["vm", "session", "default"]


@dataclass
class EgressView:
    """The policy that applies, where it comes from, and what the VM's egress did."""

    policy: EgressPolicy
    source: Source
    enabled: bool
    vm: VmRecord | None = None
    denials: list[dict[str, Any]] = field(default_factory=list)


def egress_available(orchestrator: Orchestrator) -> bool:
    """Whether VMs here reach the network at all (``egress.enabled`` and a driver that can)."""
    return orchestrator.config.egress.enabled and orchestrator.driver.name in EGRESS_DRIVERS


def applying(vm_policy: dict[str, Any], session_policy: dict[str, Any]) -> tuple[EgressPolicy, Source]:
    if vm_policy:
        return effective_policy(vm_policy), "vm"
    if session_policy:
        return effective_policy(session_policy), "session"
    return effective_policy({}), "default"


class EgressPolicies:
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator
        self.store = orchestrator.store

    @property
    def available(self) -> bool:
        return egress_available(self.orchestrator)

    async def of_vm(self, owner: str, vm_id: str) -> EgressView:
        vm = await self.orchestrator.get_vm(owner, vm_id)
        session = await self.store.get_session(vm.session_id)
        policy, source = applying(vm.egress_policy, session.egress_policy if session else {})
        denials = await self.store.egress_denials(vm.vm_id)
        return EgressView(policy, source, self.available, vm, denials)

    async def set_vm(self, owner: str, vm_id: str, fields: dict[str, Any]) -> EgressView:
        vm = await self.orchestrator.get_vm(owner, vm_id)
        if not is_live(vm):
            raise VmNotRunning(f"VM {vm_id} has ended ({vm.status}): its policy can no longer change")
        await self.store.update_vm(vm.vm_id, egress_policy=fields)
        await self.store.publish(EgressPolicyChanged(vm_id=vm.vm_id))
        return await self.of_vm(owner, vm_id)

    async def of_session(self, owner: str, session_id: str) -> EgressView:
        session = await self.orchestrator.owned_session(owner, session_id)
        vm = await self.orchestrator.session_vm(session)
        if vm is not None and vm.egress_policy:
            # The session's VM has its own: show what applies to it, and say so.
            policy, source = applying(vm.egress_policy, session.egress_policy)
        else:
            policy, source = applying({}, session.egress_policy)
        denials = await self.store.egress_denials(vm.vm_id) if vm is not None else []
        return EgressView(policy, source, self.available, vm, denials)

    async def set_session(self, owner: str, session_id: str, fields: dict[str, Any]) -> EgressView:
        """The session's policy: for its VMs that have none of their own, live ones included."""
        session = await self.orchestrator.owned_session(owner, session_id)
        await self.store.update_session(session.session_id, egress_policy=fields)
        await self.store.publish(EgressPolicyChanged(session_id=session.session_id))
        return await self.of_session(owner, session_id)
