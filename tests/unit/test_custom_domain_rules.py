"""Which names may be custom domains, and what the registry says of a provider choice (pure checks)."""

from __future__ import annotations

import pytest

from gateway.config import load_config, override
from gateway.orchestrator.domains import domain_problem, normalise_domain
from gateway.tls.dns01 import DnsLookup
from gateway.tls.providers.addresses import refusal
from gateway.tls.providers.delegated import challenge_name, delegation_target
from gateway.tls.providers.registry import ProviderSettings, credential_problems, provider_name
from gateway.tls.providers.rfc2136 import Rfc2136Provider, Rfc2136Settings

CONFIG = override(
    load_config(environ={}),
    edge={"api_hosts": "api.example.com"},
    api={"sandbox_domain": "sandbox.example.com"},
    acme={"delegation_zone": "acme.example.net"},
)
LOOKUP = DnsLookup()
OPERATOR = Rfc2136Provider(Rfc2136Settings("127.0.0.1", 53, "k.", "c2VjcmV0"), LOOKUP)
WITH_DELEGATION = ProviderSettings(LOOKUP, OPERATOR, "acme.example.net")
WITHOUT_DELEGATION = ProviderSettings(LOOKUP, OPERATOR, "")
PRIVATE_DNS_OK = ProviderSettings(LOOKUP, OPERATOR, "acme.example.net", customer_dns_private_ok=True)
TSIG = {"key_name": "k.", "key_secret": "s"}


@pytest.mark.parametrize("domain", ["shop.example.org", "a.b.c.example.co.uk", "xn--bcher-kva.example"])
def test_good_domains(domain: str) -> None:
    assert domain_problem(domain, CONFIG) is None


@pytest.mark.parametrize(
    ("domain", "fragment"),
    [
        ("localhost", "not a valid DNS name"),
        ("-bad.example.org", "not a valid DNS name"),
        ("a..example.org", "not a valid DNS name"),
        ("*.example.org", "not a valid DNS name"),
        ("a_b.example.org", "not a valid DNS name"),
        ("x" * 64 + ".example.org", "not a valid DNS name"),
        ("192.168.1.1", "IP address"),
        ("bücher.example", "punycode"),
        ("api.example.com", "belongs to this gateway"),
        ("v.api.example.com", "belongs to this gateway"),
        ("sandbox.example.com", "belongs to this gateway"),
        ("vmid-1-80.sandbox.example.com", "belongs to this gateway"),
        ("x.acme.example.net", "belongs to this gateway"),
    ],
)
def test_bad_domains(domain: str, fragment: str) -> None:
    problem = domain_problem(domain, CONFIG)
    assert problem is not None and fragment in problem


def test_domains_are_compared_lower_case_without_the_final_dot() -> None:
    assert normalise_domain(" Shop.Example.ORG. ") == "shop.example.org"


def test_no_provider_means_delegated_and_its_cname_target_is_stable_and_opaque() -> None:
    assert provider_name(None) == provider_name("") == provider_name(" Delegated ") == "delegated"
    target = delegation_target("Shop.Example.org.", "acme.example.net")
    assert target == delegation_target("shop.example.org", "acme.example.net.")
    assert target.endswith(".acme.example.net.") and "shop" not in target
    assert target != delegation_target("other.example.org", "acme.example.net")
    assert challenge_name("shop.example.org") == "_acme-challenge.shop.example.org."


@pytest.mark.parametrize(
    ("name", "credentials", "settings", "fragment"),
    [
        ("delegated", {}, WITHOUT_DELEGATION, "not configured"),
        ("delegated", {"token": "x"}, WITH_DELEGATION, "takes no dns_credentials"),
        ("rfc2136", {"server": "ns1.example.org"}, WITH_DELEGATION, "needs key_name, key_secret"),
        ("rfc2136", {"server": "ns:99999", "key_name": "k", "key_secret": "s"}, WITH_DELEGATION, "HOST:PORT"),
        ("rfc2136", {"server": "ns", "key_name": "k", "key_secret": "s", "pw": "x"}, WITH_DELEGATION,
         "unknown rfc2136 credentials pw"),
        ("rfc2136", {"server": "127.0.0.1:6379", **TSIG}, WITH_DELEGATION, "127.0.0.1 is a loopback address"),
        ("rfc2136", {"server": "[::1]:5353", **TSIG}, WITH_DELEGATION, "::1 is a loopback address"),
        ("rfc2136", {"server": "10.1.2.3", **TSIG}, WITH_DELEGATION, "private or reserved"),
        ("rfc2136", {"server": "169.254.169.254:80", **TSIG}, WITH_DELEGATION, "link-local"),
        ("rfc2136", {"server": "[::ffff:127.0.0.1]", **TSIG}, WITH_DELEGATION, "loopback"),
        ("rfc2136", {"server": "0.0.0.0", **TSIG}, WITH_DELEGATION, "unspecified"),
    ],
)  # fmt: skip
def test_provider_problems(
    name: str, credentials: dict[str, str], settings: ProviderSettings, fragment: str
) -> None:
    problems = credential_problems(name, credentials, settings)
    assert any(fragment in p for p in problems), problems


def test_good_provider_choices_have_no_problems() -> None:
    assert credential_problems("delegated", {}, WITH_DELEGATION) == []
    full = {"server": "[2a00:1450:4001::53]:5353", "key_name": "k.", "key_secret": "s", "zone": "example.org"}
    assert credential_problems("rfc2136", full, WITH_DELEGATION) == []
    # A name is checked when it is resolved (before each update), not here.
    assert credential_problems("rfc2136", {"server": "ns1.example.org", **TSIG}, WITH_DELEGATION) == []
    private = {"server": "10.1.2.3:53", **TSIG}
    assert credential_problems("rfc2136", private, PRIVATE_DNS_OK) == []


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", None),
        ("2a00:1450:4001::53", None),
        ("127.0.0.53", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:10.0.0.1", "a private or reserved address"),
        ("192.168.1.1", "a private or reserved address"),
        ("100.64.0.1", "a private or reserved address"),  # carrier-grade NAT
        ("172.30.0.2", "a private or reserved address"),  # the VM range
        ("fd00::1", "a private or reserved address"),
        ("fe80::1", "a link-local address"),
        ("224.0.0.251", "a multicast address"),
        ("::", "the unspecified address"),
    ],
)
def test_customer_dns_servers_must_be_public_unicast(address: str, refused: str | None) -> None:
    assert refusal(address) == refused
