"""The contract every DNS provider passes, against a real authoritative server (bind9 on loopback)."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest

from gateway.tls.dns01 import DnsLookup, DnsProvider, DnsProviderError, wait_until_served
from gateway.tls.providers.rfc2136 import Rfc2136Provider, Rfc2136Settings
from tests.acme_env import TSIG_ALGORITHM, TSIG_KEY_NAME, AcmeTestEnv


def lookup_for(env: AcmeTestEnv) -> DnsLookup:
    return DnsLookup(nameservers=("127.0.0.1",), port=env.dns_port, authoritative_port=env.dns_port)


def rfc2136(env: AcmeTestEnv, secret: str | None = None) -> Rfc2136Provider:
    settings = Rfc2136Settings(
        server="127.0.0.1", port=env.dns_port, key_name=TSIG_KEY_NAME,
        key_secret=secret or env.tsig_secret, key_algorithm=TSIG_ALGORITHM,
    )  # fmt: skip
    return Rfc2136Provider(settings, lookup_for(env))


PROVIDERS: dict[str, Callable[[AcmeTestEnv], DnsProvider]] = {"rfc2136": rfc2136}


@pytest.fixture(params=sorted(PROVIDERS))
def provider(request: pytest.FixtureRequest, acme_env: AcmeTestEnv) -> DnsProvider:
    return PROVIDERS[request.param](acme_env)


async def txt_values(env: AcmeTestEnv, fqdn: str) -> set[str]:
    answer = await dns.asyncquery.tcp(
        dns.message.make_query(fqdn, dns.rdatatype.TXT), "127.0.0.1", port=env.dns_port, timeout=2
    )
    return {b"".join(r.strings).decode() for rrset in answer.answer for r in rrset}


async def test_present_adds_cleanup_removes_exactly_one_value(
    provider: DnsProvider, acme_env: AcmeTestEnv
) -> None:
    fqdn = f"_acme-challenge.t{secrets.token_hex(4)}.example.test."
    first, second = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    await provider.present(fqdn, first)
    await provider.present(fqdn, second)  # a wildcard and its bare name share one record name
    await wait_until_served(fqdn, first, lookup_for(acme_env), timeout_s=5)
    await wait_until_served(fqdn, second, lookup_for(acme_env), timeout_s=5)
    await provider.cleanup(fqdn, first)
    assert await txt_values(acme_env, fqdn) == {second}
    await provider.cleanup(fqdn, second)
    await provider.cleanup(fqdn, second)  # already gone: still fine (cleanup runs in finally blocks)
    assert await txt_values(acme_env, fqdn) == set()


async def test_a_value_never_published_is_not_reported_as_served(acme_env: AcmeTestEnv) -> None:
    with pytest.raises(TimeoutError):
        await wait_until_served(
            "_acme-challenge.nothing.example.test.", "x", lookup_for(acme_env), timeout_s=0.3
        )


async def test_rfc2136_errors_name_the_provider(acme_env: AcmeTestEnv) -> None:
    wrong = rfc2136(acme_env, secret="d3Jvbmcgc2VjcmV0IHdyb25nIHNlY3JldCB3cm9uZyE=")
    with pytest.raises(DnsProviderError, match="rfc2136: the server refused our TSIG key"):
        await wrong.present("_acme-challenge.app.example.test.", "v")
    outside = rfc2136(acme_env)
    with pytest.raises(DnsProviderError, match="rfc2136: no zone found"):
        await outside.present("_acme-challenge.app.not-served.test.", "v")
