"""What the VM's resolver told each VM, and what that lets a connection claim (pure).

A VM learns addresses only from the gateway's resolver, which answers only names its policy allows. The
answers are remembered per VM until their TTL runs out, so that:

- a connection by address is judged by the name the VM resolved it from (an address no allowed name
  gave this VM opens nothing, unless a CIDR of its policy does);
- a TLS SNI or HTTP Host must be a name that resolved to the address the connection goes to: a VM that
  resolved ``pypi.org`` cannot send ``SNI: pypi.org`` to another address (domain fronting the policy).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.egress.policy import Decision, EgressPolicy, OperatorRules, Protocol, decide, normalise_name

# Remembered answers per VM; past it the oldest go first (a VM cannot grow the gateway's memory).
MAX_ANSWERS_PER_VM = 4096
# Answers are kept at least this long whatever their TTL: a connection follows its lookup closely, and a
# TTL of 0 must not make a just-resolved name useless.
MIN_KEEP_S = 30.0


@dataclass
class _VmAnswers:
    # (name, address) -> expiry (monotonic seconds), oldest first
    answers: dict[tuple[str, str], float] = field(default_factory=dict)


class ResolvedNames:
    def __init__(self, max_per_vm: int = MAX_ANSWERS_PER_VM) -> None:
        self.max_per_vm = max_per_vm
        self._vms: dict[str, _VmAnswers] = {}

    def record(self, vm_id: str, name: str, addresses: Iterable[str], ttl_s: float, now: float) -> None:
        vm = self._vms.setdefault(vm_id, _VmAnswers())
        until = now + max(ttl_s, MIN_KEEP_S)
        name = normalise_name(name)
        for address in addresses:
            key = (name, address)
            vm.answers.pop(key, None)  # re-inserted last: the freshest
            vm.answers[key] = until
        while len(vm.answers) > self.max_per_vm:
            del vm.answers[next(iter(vm.answers))]

    def names_for(self, vm_id: str, address: str, now: float) -> set[str]:
        vm = self._vms.get(vm_id)
        if vm is None:
            return set()
        return {name for (name, addr), until in vm.answers.items() if addr == address and until > now}

    def forget(self, vm_id: str) -> None:
        """The VM ended: what it resolved goes with it (its address may serve another VM next)."""
        self._vms.pop(vm_id, None)


def judge(
    policy: EgressPolicy,
    rules: OperatorRules,
    resolved: ResolvedNames,
    vm_id: str,
    protocol: Protocol,
    address: str,
    port: int,
    asked: str | None,
    now: float,
) -> Decision:
    """The connection's decision: by the name it asks for (which must have resolved to ``address`` for
    this VM), else by any name this VM resolved the address from, else by the address alone."""
    names = resolved.names_for(vm_id, address, now)
    if asked is not None:
        asked = normalise_name(asked)
        if asked not in names:
            by_address = decide(policy, rules, protocol, address, port, None)
            if by_address.allowed:
                return by_address  # a CIDR the policy opens: the name it claims does not matter
            return Decision(False, "name_not_resolved_to_address")
        return decide(policy, rules, protocol, address, port, asked)
    denied = None
    for name in sorted(names):
        decision = decide(policy, rules, protocol, address, port, name)
        if decision.allowed:
            return decision
        denied = denied or decision
    return decide(policy, rules, protocol, address, port, None) if denied is None else denied
