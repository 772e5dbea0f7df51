"""What a VM resolved decides what its connections may claim: names by address, lying SNIs, expiry."""

from __future__ import annotations

from gateway.egress.policy import EgressPolicy, OperatorRules
from gateway.egress.resolved import MIN_KEEP_S, ResolvedNames, judge

RULES = OperatorRules(public_repos=("pypi.org",))
POLICY = EgressPolicy(
    allow_https=True, allow_http=True, allow_public_repos=True, allowed_domains=("api.example.test",)
)
PYPI, OTHER = "198.18.0.2", "198.18.0.6"


def resolved() -> ResolvedNames:
    names = ResolvedNames()
    names.record("vm-a", "PyPI.org.", [PYPI], ttl_s=300, now=0.0)
    return names


def test_a_connection_by_address_is_judged_by_the_name_it_was_resolved_from() -> None:
    names = resolved()
    assert judge(POLICY, RULES, names, "vm-a", "tls", PYPI, 443, None, 1.0).rule == "public_repos"
    assert judge(POLICY, RULES, names, "vm-a", "tls", OTHER, 443, None, 1.0).rule == "not_allowed"
    # Another VM resolved nothing: the same address opens nothing for it.
    assert not judge(POLICY, RULES, names, "vm-b", "tls", PYPI, 443, None, 1.0).allowed


def test_an_sni_must_be_a_name_that_resolved_to_that_address() -> None:
    names = resolved()
    assert judge(POLICY, RULES, names, "vm-a", "tls", PYPI, 443, "pypi.org", 1.0).allowed
    lying = judge(POLICY, RULES, names, "vm-a", "tls", OTHER, 443, "pypi.org", 1.0)
    assert (lying.allowed, lying.rule) == (False, "name_not_resolved_to_address")
    # A CIDR the policy opens does not care what the connection claims.
    cidr = EgressPolicy(allow_https=True, allowed_cidrs=("198.18.0.4/30",))
    assert judge(cidr, RULES, names, "vm-a", "tls", OTHER, 443, "pypi.org", 1.0).rule == "cidr:198.18.0.4/30"


def test_answers_expire_but_not_before_the_floor_and_go_with_the_vm() -> None:
    names = ResolvedNames()
    names.record("vm-a", "pypi.org", [PYPI], ttl_s=0, now=0.0)
    assert names.names_for("vm-a", PYPI, MIN_KEEP_S - 1) == {"pypi.org"}
    assert names.names_for("vm-a", PYPI, MIN_KEEP_S + 1) == set()
    names.record("vm-a", "pypi.org", [PYPI], ttl_s=600, now=0.0)
    names.forget("vm-a")
    assert names.names_for("vm-a", PYPI, 1.0) == set()


def test_a_vm_cannot_grow_the_memory_of_answers() -> None:
    names = ResolvedNames(max_per_vm=3)
    for i in range(10):
        names.record("vm-a", f"n{i}.example.test", [f"198.18.1.{i}"], ttl_s=300, now=0.0)
    assert names.names_for("vm-a", "198.18.1.9", 1.0) == {"n9.example.test"}
    assert names.names_for("vm-a", "198.18.1.0", 1.0) == set()
