"""Certificate issuance over ACME (RFC 8555) with DNS-01, driven by certbot's ``acme`` library.

``acme`` is synchronous (requests): each call runs in a thread, and the order is driven from here:
account (made once per directory, key kept encrypted in the store), order, for each authorization not
already valid a TXT record through the DNS provider, a wait until every authoritative server serves it,
the answer, polling, finalization, download, and the checks every stored certificate passes. TXT records
are removed in every case, failure included. Polling is ours (every ``POLL_INTERVAL_S``, growing to
``MAX_POLL_INTERVAL_S``): the library's own finalization poll sleeps a whole second before its first look.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.tls.bundle import BadCertificate, CertBundle, new_private_key_pem, parse_bundle
from gateway.tls.dns01 import (
    DnsLookup,
    DnsProvider,
    DnsProviderError,
    RedirectingProvider,
    wait_until_served,
)
from gateway.tls.renewal_policy import parse_retry_after
from gateway.tls.store import CertStore

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
MAX_POLL_INTERVAL_S = 2.0
ORDER_TIMEOUT_S = 300.0
USER_AGENT = "sandbox-gateway"


# A rate-limited order waits at least this long, whatever else the server says.
RATE_LIMITED_RETRY_S = 3600.0
# When the renewal window could not be asked for (server unreachable, no answer), ask again after this.
ARI_RETRY_S = 3600.0
# ACME orders of this process by outcome ("issued", "failed"), for gateway.metrics.
ORDER_OUTCOMES: dict[str, int] = {}
# Tries of one signed request while the server answers badNonce (each answer carries a fresh nonce).
BAD_NONCE_ATTEMPTS = 8


class IssueError(Exception):
    """Issuance failed; the message is what an operator or customer needs (e.g. the ACME error).
    ``retry_after_s``: how long the ACME server asked us to wait (Retry-After, rate limits), if it did."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _RetryAfterNetwork(client.ClientNetwork):
    """Remembers the Retry-After of the last error answer: the library's errors do not carry headers.

    Also retries a rejected nonce more than once. RFC 8555 lets a server reject any nonce (pebble does
    5 % by default); the library retries once, so an order of ~45 signed requests failed about one run
    in ten on a second rejection in a row.
    """

    last_retry_after_s: float | None = None

    def post(self, *args: Any, **kwargs: Any) -> Any:
        for _ in range(BAD_NONCE_ATTEMPTS - 1):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce":
                    raise
        return self._post_once(*args, **kwargs)

    # A classmethod in acme, which calls it on the instance: here it also records on the instance.
    def _check_response(  # type: ignore[override]
        self, response: requests.Response, content_type: str | None = None
    ) -> requests.Response:
        try:
            return super()._check_response(response, content_type=content_type)
        except messages.Error:
            self.last_retry_after_s = parse_retry_after(response.headers.get("Retry-After"), time.time())
            raise


@dataclass(frozen=True)
class AcmeSettings:
    directory_url: str
    email: str = ""
    ca_bundle: str = ""  # a CA file to trust for the ACME server's HTTPS (tests: pebble's); empty: system
    propagation_timeout_s: float = 120.0


class AcmeIssuer:
    def __init__(self, settings: AcmeSettings, store: CertStore, lookup: DnsLookup) -> None:
        self.settings = settings
        self.store = store
        self.lookup = lookup

    async def issue(self, names: list[str], provider: DnsProvider) -> CertBundle:
        """A certificate for ``names`` (the first is its id), checked; raises IssueError."""
        outcome = "failed"
        try:
            bundle = await self._issue_or_raise(names, provider)
            outcome = "issued"
            return bundle
        finally:
            ORDER_OUTCOMES[outcome] = ORDER_OUTCOMES.get(outcome, 0) + 1

    async def _issue_or_raise(self, names: list[str], provider: DnsProvider) -> CertBundle:
        try:
            async with asyncio.timeout(ORDER_TIMEOUT_S):
                return await self._issue(names, provider)
        except TimeoutError:
            raise IssueError(
                f"the ACME order for {', '.join(names)} did not complete in time (DNS propagation or the "
                "ACME server)"
            ) from None
        except DnsProviderError as exc:
            raise IssueError(f"DNS: {exc}") from None
        except _ServerRefused as refused:
            raise _issue_error(refused.error, refused.retry_after_s) from None
        except errors.Error as exc:
            raise _issue_error(exc, None) from None
        except OSError as exc:  # requests' errors are OSErrors: the ACME server is unreachable
            raise IssueError(f"the ACME server is unreachable: {exc}") from None

    async def renewal_window(self, chain_pem: bytes) -> tuple[float | None, float]:
        """The ACME server's suggested renewal time for a certificate (ARI), or None when it offers none,
        and when to ask again (the server's Retry-After, six hours by default)."""
        try:
            acme = await asyncio.to_thread(self._client, await self._account_key())
            suggested, next_poll = await asyncio.to_thread(acme.renewal_time, chain_pem)
        except errors.ARIError as exc:
            log.warning("renewal info unavailable: %s", exc)
            return None, exc.retry_after.timestamp()
        except (errors.Error, OSError) as exc:
            log.warning("renewal info unavailable: %s", exc)
            return None, time.time() + ARI_RETRY_S
        return (suggested.timestamp() if suggested is not None else None), next_poll.timestamp()

    async def _issue(self, names: list[str], provider: DnsProvider) -> CertBundle:
        account_key = await self._account_key()
        acme = await asyncio.to_thread(self._client, account_key)
        try:
            return await self._order(acme, account_key, names, provider)
        except messages.Error as exc:
            assert isinstance(acme.net, _RetryAfterNetwork)
            raise _ServerRefused(exc, acme.net.last_retry_after_s) from None

    async def _order(
        self, acme: client.ClientV2, account_key: jose.JWKEC, names: list[str], provider: DnsProvider
    ) -> CertBundle:
        key_pem = new_private_key_pem()
        csr_pem = crypto_util.make_csr(key_pem, names)
        order = await asyncio.to_thread(acme.new_order, csr_pem)
        published: list[tuple[str, str]] = []
        try:
            pending = []
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # reused by the server: nothing to prove
                challb = _dns01(authz)
                fqdn = challb.chall.validation_domain_name(authz.body.identifier.value) + "."
                value = challb.chall.validation(account_key)
                await provider.present(fqdn, value)
                published.append((fqdn, value))
                pending.append((authz, challb))
            for fqdn, value in published:
                written = provider.record_name(fqdn) if isinstance(provider, RedirectingProvider) else fqdn
                await self.propagated(written, value)
            for _, challb in pending:
                await asyncio.to_thread(acme.answer_challenge, challb, challb.response(account_key))
            for authz, _ in pending:
                await self._until_valid(acme, authz)
            fullchain = await self._finalize(acme, order)
        finally:
            for fqdn, value in published:
                try:
                    await provider.cleanup(fqdn, value)
                except DnsProviderError as exc:
                    log.warning("DNS-01 record %s left behind: %s", fqdn, exc)
        try:
            bundle = parse_bundle(fullchain.encode("ascii"), key_pem)
        except BadCertificate as exc:
            raise IssueError(f"the ACME server's certificate is unusable: {exc}") from None
        if set(bundle.names) != {n.lower() for n in names}:
            raise IssueError(f"the ACME server's certificate names {bundle.names}, not {names}")
        return bundle

    async def propagated(self, fqdn: str, value: str) -> None:
        """Return once the zone's authoritative servers all serve the record (TimeoutError if not)."""
        await wait_until_served(fqdn, value, self.lookup, timeout_s=self.settings.propagation_timeout_s)

    async def _account_key(self) -> jose.JWKEC:
        url = self.settings.directory_url
        key_pem = await self.store.account_key(url)
        if key_pem is None:
            key_pem = await self.store.save_account_key(url, new_private_key_pem())
        key = serialization.load_pem_private_key(key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return jose.JWKEC(key=key)

    def _client(self, account_key: jose.JWKEC) -> client.ClientV2:
        """Directory and account (blocking). The account is created once; later calls find it."""
        verify: bool | str = self.settings.ca_bundle or True
        net = _RetryAfterNetwork(
            account_key,
            alg=jose.ES256,
            # acme hands verify_ssl to requests' `verify`, which also takes a CA bundle's path.
            verify_ssl=verify,  # type: ignore[arg-type]
            user_agent=USER_AGENT,
        )
        directory = client.ClientV2.get_directory(self.settings.directory_url, net)
        acme = client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(
            email=self.settings.email or None, terms_of_service_agreed=True
        )
        try:
            acme.new_account(registration)
        except errors.ConflictError as exc:  # this key's account exists: use it
            net.account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
        return acme

    async def _until_valid(self, acme: client.ClientV2, authz: messages.AuthorizationResource) -> None:
        interval = POLL_INTERVAL_S
        while True:
            authz, _ = await asyncio.to_thread(acme.poll, authz)
            status = authz.body.status
            if status == messages.STATUS_VALID:
                return
            if status == messages.STATUS_INVALID:
                detail = "; ".join(str(c.error) for c in authz.body.challenges if c.error is not None)
                name = authz.body.identifier.value
                raise IssueError(f"validation of {name} failed: {detail or 'no reason given'}")
            await asyncio.sleep(interval)
            interval = min(interval * 2, MAX_POLL_INTERVAL_S)

    async def _finalize(self, acme: client.ClientV2, order: messages.OrderResource) -> str:
        order = await asyncio.to_thread(acme.begin_finalization, order)
        interval = POLL_INTERVAL_S
        while True:
            body = messages.Order.from_json((await asyncio.to_thread(_post_as_get, acme, order.uri)).json())
            if body.status == messages.STATUS_INVALID:
                raise IssueError(f"the ACME server refused to issue: {body.error or 'no reason given'}")
            if body.status == messages.STATUS_VALID and body.certificate is not None:
                return (await asyncio.to_thread(_post_as_get, acme, body.certificate)).text
            await asyncio.sleep(interval)
            interval = min(interval * 2, MAX_POLL_INTERVAL_S)


def _post_as_get(acme: client.ClientV2, url: str) -> requests.Response:
    """RFC 8555 POST-as-GET through the library's network layer (nonces, signing, badNonce retry)."""
    return acme.net.post(url, None, new_nonce_url=acme.directory["newNonce"])


def _dns01(authz: messages.AuthorizationResource) -> messages.ChallengeBody:
    for challb in authz.body.challenges:
        if isinstance(challb.chall, challenges.DNS01):
            return challb
    raise IssueError(f"the ACME server offers no dns-01 challenge for {authz.body.identifier.value}")


class _ServerRefused(Exception):
    """An ACME error answer with the Retry-After it came with."""

    def __init__(self, error: messages.Error, retry_after_s: float | None) -> None:
        self.error = error
        self.retry_after_s = retry_after_s


def _issue_error(exc: errors.Error, retry_after_s: float | None) -> IssueError:
    if isinstance(exc, messages.Error) and exc.code == "rateLimited":
        wait = max(retry_after_s or 0.0, RATE_LIMITED_RETRY_S)
        return IssueError(f"the ACME server's rate limit was hit: {exc}", retry_after_s=wait)
    if isinstance(exc, errors.IssuanceError):
        return IssueError(f"the ACME server refused to issue: {exc.error}", retry_after_s=retry_after_s)
    return IssueError(f"ACME: {exc}", retry_after_s=retry_after_s)
