"""Issuance against a real ACME server (pebble) with DNS-01 over RFC 2136 (bind9), both on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from gateway.state.connection import connect
from gateway.state.keyspace import Keys
from gateway.tls.acme import AcmeIssuer, AcmeSettings, IssueError
from gateway.tls.dns01 import DnsProvider
from gateway.tls.renewal import Renewer
from gateway.tls.store import CertStore
from tests.acme_env import AcmeTestEnv
from tests.integration.test_dns_providers import lookup_for, rfc2136, txt_values


@pytest.fixture
async def cert_store(redis_url: str) -> AsyncIterator[CertStore]:
    client: aioredis.Redis = connect(redis_url, 5.0)
    yield CertStore(client, Keys("gw:"), Fernet.generate_key())
    await client.aclose()


@pytest.fixture(scope="module")
def acme_env_rejecting_nonces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcmeTestEnv]:
    """Pebble rejecting 20 % of good nonces (its default is 5 %; the other tests turn it off).

    At 20 %, a client that retries a rejected nonce only once (certbot's acme library) fails an order of
    ~45 signed requests most runs; the gateway's 8 tries fail one in millions."""
    env = AcmeTestEnv(Path(tmp_path_factory.mktemp("acme-nonces")), nonce_reject_percent=20)
    env.start()
    try:
        yield env
    finally:
        env.stop()


def issuer_for(env: AcmeTestEnv, store: CertStore) -> AcmeIssuer:
    settings = AcmeSettings(env.directory_url, email="ops@example.test", ca_bundle=str(env.ca_pem_path))
    return AcmeIssuer(settings, store, lookup_for(env))


def verify(env: AcmeTestEnv, chain_pem: bytes, name: str) -> None:
    root = x509.load_pem_x509_certificate(env.root_pem())
    leaf, *intermediates = x509.load_pem_x509_certificates(chain_pem)
    verifier = PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName(name))
    verifier.verify(leaf, intermediates)


async def test_a_wildcard_and_its_base_name_are_issued_over_rfc2136(
    acme_env: AcmeTestEnv, cert_store: CertStore
) -> None:
    issuer = issuer_for(acme_env, cert_store)
    bundle = await issuer.issue(["*.sandbox.example.test", "sandbox.example.test"], rfc2136(acme_env))
    assert bundle.names == ("*.sandbox.example.test", "sandbox.example.test")
    verify(acme_env, bundle.chain_pem, "vmid-abc-3000.sandbox.example.test")
    verify(acme_env, bundle.chain_pem, "sandbox.example.test")
    with pytest.raises(VerificationError):
        verify(acme_env, bundle.chain_pem, "a.b.sandbox.example.test")
    # The account was made once and is reused: a second order works with the stored key.
    account = await cert_store.account_key(acme_env.directory_url)
    again = await issuer.issue(["app.example.test"], rfc2136(acme_env))
    assert await cert_store.account_key(acme_env.directory_url) == account
    verify(acme_env, again.chain_pem, "app.example.test")


class WrongValue:
    """A provider that publishes a wrong TXT value (as a misconfigured DNS setup would)."""

    name = "wrong"

    def __init__(self, inner: DnsProvider) -> None:
        self.inner = inner

    async def present(self, fqdn: str, value: str) -> None:
        await self.inner.present(fqdn, "not-" + value)

    async def cleanup(self, fqdn: str, value: str) -> None:
        await self.inner.cleanup(fqdn, "not-" + value)


class NoPropagationCheck(AcmeIssuer):
    async def propagated(self, fqdn: str, value: str) -> None:
        return None  # let the ACME server see the wrong value instead of waiting for the right one


async def test_a_failed_validation_reports_the_acme_error_and_cleans_up(
    acme_env: AcmeTestEnv, cert_store: CertStore
) -> None:
    issuer = issuer_for(acme_env, cert_store)
    failing = NoPropagationCheck(issuer.settings, cert_store, issuer.lookup)
    with pytest.raises(IssueError, match="Correct value not found for DNS challenge"):
        await failing.issue(["fails.example.test"], WrongValue(rfc2136(acme_env)))
    assert await txt_values(acme_env, "_acme-challenge.fails.example.test.") == set()


async def test_issuance_survives_the_acme_servers_rejected_nonces(
    acme_env_rejecting_nonces: AcmeTestEnv, cert_store: CertStore
) -> None:
    env = acme_env_rejecting_nonces
    issuer = issuer_for(env, cert_store)
    for n in range(3):  # about 15 signed requests each
        bundle = await issuer.issue([f"n{n}.example.test"], rfc2136(env))
        verify(env, bundle.chain_pem, f"n{n}.example.test")


class Counting:
    """Counts the DNS-01 records an issuance publishes (one per new order here)."""

    def __init__(self, inner: DnsProvider) -> None:
        self.inner = inner
        self.name = inner.name
        self.presented = 0

    async def present(self, fqdn: str, value: str) -> None:
        self.presented += 1
        await self.inner.present(fqdn, value)

    async def cleanup(self, fqdn: str, value: str) -> None:
        await self.inner.cleanup(fqdn, value)


async def test_two_processes_racing_to_renew_issue_once_and_failures_back_off(
    acme_env: AcmeTestEnv, cert_store: CertStore, redis_url: str
) -> None:
    keys = Keys("gw:")
    provider = Counting(rfc2136(acme_env))
    # Two edges: each its own issuer and renewer (its own lock token), on the one Redis.
    renewers = [
        Renewer(cert_store, issuer_for(acme_env, cert_store), cert_store.client, keys) for _ in range(2)
    ]
    cert_id, names = "race.example.test", ["race.example.test"]
    # Orders are counted at the issuer: DNS records presented would undercount when the ACME server
    # reuses a still-valid authorization (pebble did once, in CI), which is legitimate.
    orders: list[list[str]] = []
    for renewer in renewers:
        real_issue = renewer.issuer.issue

        async def counted(names: list[str], provider: DnsProvider, real_issue=real_issue) -> object:
            orders.append(names)
            return await real_issue(names, provider)

        renewer.issuer.issue = counted  # type: ignore[method-assign]

    issued = await asyncio.gather(*(r.ensure(cert_id, names, provider) for r in renewers))
    assert sorted(issued) == [False, True] and len(orders) == 1
    first = await cert_store.get(cert_id)
    assert first is not None and (await renewers[0].state(cert_id)).status == "issued"

    # Not due: nothing happens. Due (time moved past two thirds of the lifetime): renewed once.
    assert not await renewers[1].ensure(cert_id, names, provider)
    # That check asked pebble for a renewal window (ARI): it offers none, so ask again in six hours.
    state = await renewers[1].state(cert_id)
    assert state.ari_renew_at == 0 and state.ari_next_poll > time.time() + 5 * 3600
    later = first.bundle.not_after - 1
    issued = await asyncio.gather(*(r.ensure(cert_id, names, provider, now=later) for r in renewers))
    assert sorted(issued) == [False, True] and len(orders) == 2
    second = await cert_store.get(cert_id)
    assert second is not None and second.bundle.chain_pem != first.bundle.chain_pem

    # A failure is recorded with the ACME error and backs off: no new attempt before its time.
    failing = NoPropagationCheck(renewers[0].issuer.settings, cert_store, renewers[0].issuer.lookup)
    renewer = Renewer(cert_store, failing, cert_store.client, keys)
    bad = Counting(WrongValue(rfc2136(acme_env)))
    assert not await renewer.ensure("bad.example.test", ["bad.example.test"], bad)
    state = await renewer.state("bad.example.test")
    assert state.status == "failed" and "Correct value not found" in state.last_error and state.failures == 1
    assert not await renewer.ensure("bad.example.test", ["bad.example.test"], bad)
    assert bad.presented == 1  # the back-off held the second call
