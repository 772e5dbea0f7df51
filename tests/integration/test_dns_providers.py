"""The contract every DNS provider passes, against a real authoritative server (bind9 on loopback)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable

import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest

from gateway.tls.dns01 import (
    DnsLookup,
    DnsProvider,
    DnsProviderError,
    RedirectingProvider,
    wait_until_served,
)
from gateway.tls.providers.delegated import DelegatedProvider
from gateway.tls.providers.lexicon import LexiconProvider
from gateway.tls.providers.rfc2136 import Rfc2136Provider, Rfc2136Settings
from tests.acme_env import TSIG_ALGORITHM, TSIG_KEY_NAME, ZONES, AcmeTestEnv
from tests.cloudflare_stub import CloudflareStub

DELEGATION_ZONE = "acme-delegation.example.test"


def lookup_for(env: AcmeTestEnv) -> DnsLookup:
    return DnsLookup(nameservers=("127.0.0.1",), port=env.dns_port, authoritative_port=env.dns_port)


def rfc2136(
    env: AcmeTestEnv, secret: str | None = None, *, server: str = "127.0.0.1", private_ok: bool = True
) -> Rfc2136Provider:
    settings = Rfc2136Settings(
        server=server, port=env.dns_port, key_name=TSIG_KEY_NAME,
        key_secret=secret or env.tsig_secret, key_algorithm=TSIG_ALGORITHM, private_ok=private_ok,
    )  # fmt: skip
    return Rfc2136Provider(settings, lookup_for(env))


def lexicon_cloudflare(env: AcmeTestEnv, stub: CloudflareStub, **credentials: str) -> LexiconProvider:
    return LexiconProvider(
        "cloudflare", {"auth_token": stub.token, **credentials}, lookup_for(env), api_endpoint=stub.url
    )


@contextlib.asynccontextmanager
async def rfc2136_provider(env: AcmeTestEnv) -> AsyncIterator[DnsProvider]:
    yield rfc2136(env)


@contextlib.asynccontextmanager
async def lexicon_cloudflare_provider(env: AcmeTestEnv) -> AsyncIterator[DnsProvider]:
    async with CloudflareStub(mirror=rfc2136(env)) as stub:
        yield lexicon_cloudflare(env, stub)


class CnameAddedByCustomer:
    """The delegated mode as a customer sets it up: their CNAME exists before the first challenge."""

    name = "delegated"

    def __init__(self, env: AcmeTestEnv) -> None:
        self.env = env
        self.inner = DelegatedProvider(rfc2136(env), DELEGATION_ZONE, lookup_for(env))

    def record_name(self, fqdn: str) -> str:
        return self.inner.record_name(fqdn)

    async def present(self, fqdn: str, value: str) -> None:
        await self.env.add_cname(fqdn, self.record_name(fqdn))
        await self.inner.present(fqdn, value)

    async def cleanup(self, fqdn: str, value: str) -> None:
        await self.inner.cleanup(fqdn, value)


@contextlib.asynccontextmanager
async def delegated_provider(env: AcmeTestEnv) -> AsyncIterator[DnsProvider]:
    yield CnameAddedByCustomer(env)


# Each provider with whatever it needs running (a local API for cloud providers), for the shared contract.
PROVIDERS: dict[str, Callable[[AcmeTestEnv], contextlib.AbstractAsyncContextManager[DnsProvider]]] = {
    "rfc2136": rfc2136_provider,
    "lexicon-cloudflare": lexicon_cloudflare_provider,
    "delegated": delegated_provider,
}


@pytest.fixture(params=sorted(PROVIDERS))
async def provider(request: pytest.FixtureRequest, acme_env: AcmeTestEnv) -> AsyncIterator[DnsProvider]:
    async with PROVIDERS[request.param](acme_env) as made:
        yield made


@pytest.fixture
async def cloudflare(acme_env: AcmeTestEnv) -> AsyncIterator[CloudflareStub]:
    async with CloudflareStub(mirror=rfc2136(acme_env)) as stub:
        yield stub


async def txt_values(env: AcmeTestEnv, fqdn: str) -> set[str]:
    """The TXT values a resolver finds at ``fqdn``, following a CNAME as ACME servers do."""
    answer = await dns.asyncquery.tcp(
        dns.message.make_query(fqdn, dns.rdatatype.TXT), "127.0.0.1", port=env.dns_port, timeout=2
    )
    txt = [rrset for rrset in answer.answer if rrset.rdtype == dns.rdatatype.TXT]
    return {b"".join(r.strings).decode() for rrset in txt for r in rrset}


async def test_present_adds_cleanup_removes_exactly_one_value(
    provider: DnsProvider, acme_env: AcmeTestEnv
) -> None:
    fqdn = f"_acme-challenge.t{secrets.token_hex(4)}.example.test."
    first, second = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    await provider.present(fqdn, first)
    await provider.present(fqdn, second)  # a wildcard and its bare name share one record name
    written = provider.record_name(fqdn) if isinstance(provider, RedirectingProvider) else fqdn
    await wait_until_served(written, first, lookup_for(acme_env), timeout_s=5)
    await wait_until_served(written, second, lookup_for(acme_env), timeout_s=5)
    await provider.cleanup(fqdn, first)
    assert await txt_values(acme_env, fqdn) == {second}
    await provider.cleanup(fqdn, second)
    await provider.cleanup(fqdn, second)  # already gone: still fine (cleanup runs in finally blocks)
    assert await txt_values(acme_env, fqdn) == set()


async def test_an_rfc2136_server_named_by_its_host_name_is_resolved(acme_env: AcmeTestEnv) -> None:
    # dnspython dials IP addresses only: a name given as the server failed every update (a bare ValueError).
    named = rfc2136(acme_env, server="ns1.example.test")
    fqdn = f"_acme-challenge.n{secrets.token_hex(4)}.example.test."
    await named.present(fqdn, "by-name")
    assert await txt_values(acme_env, fqdn) == {"by-name"}
    await named.cleanup(fqdn, "by-name")
    assert await txt_values(acme_env, fqdn) == set()
    unknown = rfc2136(acme_env, server="nowhere.example.test")
    unresolved = r"rfc2136: the server nowhere\.example\.test could not be resolved"
    with pytest.raises(DnsProviderError, match=unresolved):
        await unknown.present(fqdn, "v")


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ("127.0.0.1", "the server 127.0.0.1 is a loopback address"),
        ("ns1.example.test", r"the server ns1.example.test \(127.0.0.1\) is a loopback address"),
    ],
)
async def test_a_customers_server_on_the_gateways_own_network_gets_no_update(
    acme_env: AcmeTestEnv, server: str, message: str
) -> None:
    customer = rfc2136(acme_env, server=server, private_ok=False)
    fqdn = f"_acme-challenge.p{secrets.token_hex(4)}.example.test."
    with pytest.raises(DnsProviderError, match=message):
        await customer.present(fqdn, "never-sent")
    assert await txt_values(acme_env, fqdn) == set()  # bind9 on loopback would have taken it


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


async def test_lexicon_wrong_token_names_the_provider_and_hides_the_token(
    acme_env: AcmeTestEnv, cloudflare: CloudflareStub
) -> None:
    wrong_token = secrets.token_urlsafe(30)
    wrong = LexiconProvider(
        "cloudflare", {"auth_token": wrong_token}, lookup_for(acme_env), api_endpoint=cloudflare.url
    )
    with pytest.raises(DnsProviderError, match=r"^cloudflare: .*refused the credentials: HTTP 403") as caught:
        await wrong.present("_acme-challenge.app.example.test.", "v")
    assert caught.value.provider == "cloudflare"
    assert wrong_token not in str(caught.value) and cloudflare.token not in str(caught.value)
    assert cloudflare.calls and not any(c.startswith("POST") for c in cloudflare.calls)


async def test_lexicon_zone_missing_from_the_account_or_from_dns(acme_env: AcmeTestEnv) -> None:
    async with CloudflareStub(mirror=rfc2136(acme_env), zones=[ZONES[0]]) as stub:
        provider = lexicon_cloudflare(acme_env, stub)
        with pytest.raises(DnsProviderError, match=f"cloudflare: .*does not hold the zone {ZONES[1]}"):
            await provider.present(f"_acme-challenge.app.{ZONES[1]}.", "v")
        with pytest.raises(DnsProviderError, match="cloudflare: no zone found"):
            await provider.present("_acme-challenge.app.not-served.test.", "v")


async def test_lexicon_token_scoped_to_one_zone_by_its_id(
    acme_env: AcmeTestEnv, cloudflare: CloudflareStub
) -> None:
    scoped = lexicon_cloudflare(acme_env, cloudflare, zone_id=cloudflare.zone_ids[ZONES[0]])
    fqdn, value = f"_acme-challenge.s{secrets.token_hex(4)}.{ZONES[0]}.", secrets.token_urlsafe(32)
    await scoped.present(fqdn, value)
    await wait_until_served(fqdn, value, lookup_for(acme_env), timeout_s=5)
    await scoped.cleanup(fqdn, value)
    assert await txt_values(acme_env, fqdn) == set()
    assert f"GET /client/v4/zones/{cloudflare.zone_ids[ZONES[0]]}" in cloudflare.calls
    assert "GET /client/v4/zones" not in cloudflare.calls  # no account-wide listing with a scoped token


async def test_lexicon_endpoint_override_needs_a_provider_that_has_one(acme_env: AcmeTestEnv) -> None:
    duckdns = LexiconProvider(
        "duckdns", {"auth_token": "t0ken-value"}, lookup_for(acme_env), api_endpoint="http://127.0.0.1:9"
    )
    with pytest.raises(DnsProviderError, match="duckdns: its lexicon provider has no API endpoint"):
        await duckdns.present("_acme-challenge.app.example.test.", "v")


async def test_lexicon_unreachable_api(acme_env: AcmeTestEnv) -> None:
    async with CloudflareStub(mirror=rfc2136(acme_env)) as stub:
        provider = lexicon_cloudflare(acme_env, stub)
    # The stub is closed: its port refuses connections.
    with pytest.raises(DnsProviderError, match=r"cloudflare: .*the API at 127\.0\.0\.1 could not be reached"):
        await provider.cleanup("_acme-challenge.app.example.test.", "v")
