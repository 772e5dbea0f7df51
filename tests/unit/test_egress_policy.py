"""The egress policy's decision, as tables: names, wildcards, CIDRs, protocols, closed networks."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.egress.policy import (
    EgressPolicy,
    OperatorRules,
    decide,
    name_allowed,
    name_matches,
    valid_pattern,
)

RULES = OperatorRules(
    public_repos=("pypi.org", "files.pythonhosted.org", "*.debian.org"),
    denied_networks=(ipaddress.ip_network("172.30.0.0/16"), ipaddress.ip_network("198.51.100.7/32")),
)
OPEN = EgressPolicy(allow_http=True, allow_https=True, allowed_domains=("api.example.test", "*.cdn.test"))
PUBLIC = "198.18.0.2"


@pytest.mark.parametrize(
    ("name", "pattern", "matches"),
    [
        ("api.example.test", "api.example.test", True),
        ("API.Example.Test.", "api.example.test", True),
        ("x.api.example.test", "api.example.test", False),
        ("a.cdn.test", "*.cdn.test", True),
        ("b.a.cdn.test", "*.cdn.test", True),
        ("cdn.test", "*.cdn.test", False),
        ("evilcdn.test", "*.cdn.test", False),
        ("cdn.test.evil", "*.cdn.test", False),
    ],
)
def test_names_match_exactly_or_below_a_wildcard(name: str, pattern: str, matches: bool) -> None:
    assert name_matches(name, pattern) is matches


@pytest.mark.parametrize(
    ("protocol", "address", "port", "name", "policy", "allowed", "rule"),
    [
        ("tls", PUBLIC, 443, "api.example.test", OPEN, True, "domain:api.example.test"),
        ("tls", PUBLIC, 443, "a.cdn.test", OPEN, True, "domain:*.cdn.test"),
        ("tls", PUBLIC, 443, "other.test", OPEN, False, "not_allowed"),
        ("tls", PUBLIC, 443, None, OPEN, False, "not_allowed"),  # an IP nobody named
        (
            "http",
            PUBLIC,
            80,
            "api.example.test",
            EgressPolicy(allow_https=True, allowed_domains=("api.example.test",)),
            False,
            "http_not_allowed",
        ),
        (
            "tls",
            PUBLIC,
            443,
            "api.example.test",
            EgressPolicy(allow_http=True, allowed_domains=("api.example.test",)),
            False,
            "https_not_allowed",
        ),
        (
            "tls",
            PUBLIC,
            443,
            "pypi.org",
            EgressPolicy(allow_https=True, allow_public_repos=True),
            True,
            "public_repos",
        ),
        (
            "tls",
            PUBLIC,
            443,
            "deb.debian.org",
            EgressPolicy(allow_https=True, allow_public_repos=True),
            True,
            "public_repos",
        ),
        ("tls", PUBLIC, 443, "pypi.org", EgressPolicy(allow_https=True), False, "not_allowed"),
        (
            "tcp",
            PUBLIC,
            5432,
            None,
            EgressPolicy(allowed_cidrs=("198.18.0.0/24",)),
            True,
            "cidr:198.18.0.0/24",
        ),
        (
            "tcp",
            "198.18.1.2",
            5432,
            None,
            EgressPolicy(allowed_cidrs=("198.18.0.0/24",)),
            False,
            "not_allowed",
        ),
        # Closed whatever the policy says: metadata, loopback, the VM range, the operator's list.
        ("http", "169.254.169.254", 80, "api.example.test", OPEN, False, "denied_network:169.254.0.0/16"),
        (
            "tcp",
            "127.0.0.1",
            6379,
            None,
            EgressPolicy(allowed_cidrs=("0.0.0.0/0",)),
            False,
            "denied_network:127.0.0.0/8",
        ),
        (
            "tcp",
            "172.30.0.6",
            80,
            None,
            EgressPolicy(allowed_cidrs=("172.16.0.0/12",)),
            False,
            "denied_network:172.30.0.0/16",
        ),
        (
            "tcp",
            "::ffff:127.0.0.1",
            80,
            None,
            EgressPolicy(allowed_cidrs=("::/0", "0.0.0.0/0")),
            False,
            "denied_network:127.0.0.0/8",
        ),
        (
            "tcp",
            "198.51.100.7",
            80,
            None,
            EgressPolicy(allowed_cidrs=("0.0.0.0/0",)),
            False,
            "denied_network:198.51.100.7/32",
        ),
        # Private ranges: closed by a name, open only by a CIDR that names them.
        ("tls", "10.1.2.3", 443, "api.example.test", OPEN, False, "private_network:10.0.0.0/8"),
        (
            "tcp",
            "10.1.2.3",
            5432,
            None,
            EgressPolicy(allowed_cidrs=("10.1.0.0/16",)),
            True,
            "cidr:10.1.0.0/16",
        ),
        ("tcp", "not-an-ip", 80, None, OPEN, False, "bad_address"),
        ("tcp", PUBLIC, 0, None, OPEN, False, "bad_port"),
    ],
)
def test_decisions(
    protocol: str, address: str, port: int, name: str | None, policy: EgressPolicy, allowed: bool, rule: str
) -> None:
    decision = decide(policy, RULES, protocol, address, port, name)  # type: ignore[arg-type]
    assert (decision.allowed, decision.rule) == (allowed, rule)


def test_the_resolver_answers_only_allowed_names() -> None:
    assert name_allowed(OPEN, RULES, "api.example.test").allowed
    assert name_allowed(OPEN, RULES, "x.cdn.test").allowed
    assert not name_allowed(OPEN, RULES, "pypi.org").allowed
    assert name_allowed(EgressPolicy(allow_public_repos=True), RULES, "pypi.org").rule == "public_repos"
    assert name_allowed(OPEN, RULES, "*.cdn.test").rule == "bad_name"


@pytest.mark.parametrize(
    ("pattern", "valid"),
    [("example.com", True), ("*.example.com", True), ("localhost", False), ("1.2.3.4", False),
     ("a..b", False), ("exa mple.com", False), ("*", False), ("ünï.com", False), ("x" * 64 + ".com", False)],
)  # fmt: skip
def test_allowed_domain_patterns_are_checked(pattern: str, valid: bool) -> None:
    assert valid_pattern(pattern) is valid


@given(st.ip_addresses(), st.integers(1, 65535))
def test_an_empty_policy_opens_nothing(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    for protocol in ("http", "tls", "tcp"):
        assert not decide(EgressPolicy(), RULES, protocol, str(address), port, "api.example.test").allowed  # type: ignore[arg-type]


@given(st.ip_addresses(), st.sampled_from(["http", "tls", "tcp"]), st.text(max_size=30))
def test_closed_networks_stay_closed_whatever_the_policy(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, protocol: str, name: str
) -> None:
    everything = EgressPolicy(True, True, True, ("*.test", name), ("0.0.0.0/0", "::/0"))
    decision = decide(everything, RULES, protocol, str(address), 443, name)  # type: ignore[arg-type]
    closed = [*RULES.always_closed, *RULES.denied_networks]
    mapped = (
        address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address
    )
    if any(mapped.version == n.version and mapped in n for n in closed):
        assert not decision.allowed
