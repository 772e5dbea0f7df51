"""DNS-01 through dns-lexicon: the ~90 cloud DNS APIs a customer's domain may live at (Cloudflare, OVH,
Gandi, Route 53 with its extra...) behind our ``DnsProvider`` contract, so we write no provider client.

How lexicon is used, and why:

- Its provider classes directly, not ``lexicon.client.Client``: the Client guesses the zone with
  tldextract, which downloads the public suffix list from the internet, and without a config of ours it
  reads ``LEXICON_*`` variables and ``lexicon*.yml`` files. We find the zone ourselves (``zone_of``, an SOA
  lookup through the configured resolvers) and hand lexicon a ``ConfigResolver`` built from a dict only.
- Lexicon 3.x keeps its providers under ``lexicon._private.providers`` (the public ``lexicon.providers``
  is deprecated, warns, and imports all of them); we load them with ``lexicon._private.discovery``, the
  functions lexicon's own Client uses, one module at a time.
- It is synchronous (requests), so every call runs in a thread. Its providers call requests without a
  timeout: ``CALL_TIMEOUT_S`` bounds our wait, and the thread is a daemon of its own, not one of the
  loop's executor: a call stuck on an API that never answers must not hold up the gateway's shutdown
  (the loop's executor is joined when the loop closes; a test run hung there once).
- The customer's credentials never reach a message: lexicon's exception texts (request URLs can carry
  keys) are not passed on, and whatever we quote of an API's answer is scrubbed of every credential value.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import functools
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

import requests
from lexicon._private import discovery
from lexicon.config import ConfigResolver
from lexicon.exceptions import AuthenticationError
from lexicon.interfaces import Provider as LexiconApi

from gateway.tls.dns01 import DnsLookup, DnsProviderError, zone_of

T = TypeVar("T")


def _in_daemon_thread(function: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """``asyncio.to_thread`` on a daemon thread of its own (see the module docstring)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # handed to the awaiting task, not lost in the thread
            report = functools.partial(settle, functools.partial(future.set_exception, exc))
        else:
            report = functools.partial(settle, functools.partial(future.set_result, result))
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(report)

    threading.Thread(target=run, name="lexicon-call", daemon=True).start()
    return future


# Short, so that a challenge retried soon after is not answered from a resolver's cache of the previous
# value. Providers whose API has a higher minimum raise it themselves (godaddy, desec, hetzner...).
RECORD_TTL_S = 60
CALL_TIMEOUT_S = 60.0
ANSWER_EXCERPT_CHARS = 300
# A shorter credential value cannot be a working secret, and blanking it would garble the message.
REDACT_MIN_CHARS = 4

# Shipped by lexicon, but not something a customer's credentials may drive on our hosts.
NOT_OFFERED = {
    "auto": "it picks a provider by asking public DNS for the zone's name servers",
    "localzone": "it edits a zone file on the gateway's own disk",
    "oci": "it reads its configuration and key files from the gateway's own disk",
}
# Options lexicon reads as a path on this host unless the value carries the content inline.
INLINE_ONLY = {
    ("googleclouddns", "auth_service_account_info"): "base64::",
    ("transip", "auth_api_key"): "base64::",
}
_FLAG_VALUES = {"true": True, "false": False}

Operation = Callable[[LexiconApi, str], bool]


@functools.cache
def _shipped() -> dict[str, bool]:
    """Every provider lexicon ships -> whether its extra dependencies are installed (imports none)."""
    return discovery.find_providers()


@functools.cache
def _provider_class(provider_name: str) -> type[LexiconApi]:
    return discovery.load_provider_module(provider_name).Provider


@functools.cache
def _options(provider_name: str) -> dict[str, bool]:
    """Option name -> whether it is a flag, as the provider's own CLI parser declares them."""
    parser = argparse.ArgumentParser(add_help=False)
    _provider_class(provider_name).configure_parser(parser)
    # Parsing nothing yields every option's default: False marks a store_true flag, None a value.
    return {name: default is False for name, default in vars(parser.parse_args([])).items()}


def supported_providers() -> list[str]:
    """The lexicon providers a customer may name: shipped, their extra dependencies installed, and not
    in ``NOT_OFFERED``."""
    return sorted(name for name, ready in _shipped().items() if ready and name not in NOT_OFFERED)


def credential_options(provider_name: str) -> list[str]:
    """The credential keys ``provider_name`` accepts: its parser's options, ``--auth-token`` as
    ``auth_token``. ValueError for a provider not in ``supported_providers()``."""
    if provider_name not in supported_providers():
        raise ValueError(f"{provider_name!r} is not a supported DNS provider")
    return list(_options(provider_name))


def credential_problems(provider_name: str, credentials: Mapping[str, str]) -> list[str]:
    """What is wrong with a customer's ``dns_provider`` and ``dns_credentials``, as messages for a 422;
    empty when nothing is. Names keys, never values. No I/O beyond importing one provider module."""
    shipped = _shipped()
    if provider_name not in shipped:
        offered = supported_providers()
        close = difflib.get_close_matches(provider_name, offered, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [f"unknown DNS provider {provider_name!r}{hint}; supported: {', '.join(offered)}"]
    if provider_name in NOT_OFFERED:
        return [f"the DNS provider {provider_name!r} is not offered: {NOT_OFFERED[provider_name]}"]
    if not shipped[provider_name]:
        return [
            f"the DNS provider {provider_name!r} needs dns-lexicon[{provider_name}], "
            "which this gateway does not have installed"
        ]
    options = _options(provider_name)
    problems: list[str] = []
    unknown = sorted(set(credentials) - set(options))
    if unknown:
        problems.append(
            f"unknown credential keys for {provider_name}: {', '.join(unknown)} "
            f"(allowed: {', '.join(options)})"
        )
    for key, value in credentials.items():
        if options.get(key) and value.lower() not in _FLAG_VALUES:
            problems.append(f"{key} is a flag: give 'true' or 'false'")
        prefix = INLINE_ONLY.get((provider_name, key))
        if prefix is not None and not value.startswith(prefix):
            problems.append(f"{key} must carry its content inline, starting with {prefix!r}")
    return problems


class LexiconProvider:
    """A customer's cloud DNS account through one lexicon provider. ``name`` is lexicon's provider name
    (``"cloudflare"``), the same string the customer gave as ``dns_provider``.

    Each call looks the zone up, then in a worker thread builds its own lexicon provider, authenticates
    (finds the zone's id at the API), and creates or deletes the one TXT value: lexicon's
    ``create_record`` leaves other values at the name alone and treats an identical record as done;
    ``delete_record`` by type, name and content removes only that value and does nothing when it is gone.
    So calls may overlap and be retried. Cancelling a call stops our wait, not the thread's request.

    ``api_endpoint`` replaces the provider's API base URL (tests point Cloudflare at a local stub). Lexicon
    has no option for it: most providers keep the URL in an ``api_endpoint`` attribute set in their
    constructor, which we overwrite right after construction; for a provider without one the call fails.
    """

    def __init__(
        self,
        provider_name: str,
        credentials: Mapping[str, str],
        lookup: DnsLookup,
        *,
        api_endpoint: str | None = None,
    ) -> None:
        problems = credential_problems(provider_name, credentials)
        if problems:
            raise DnsProviderError(provider_name, "; ".join(problems))
        self.name = provider_name
        self.lookup = lookup
        self.api_endpoint = api_endpoint
        flags = _options(provider_name)
        # A flag's "false" must be left out: lexicon tests options for truth, and "false" is truthy.
        self._options: dict[str, str | bool] = {
            key: _FLAG_VALUES[value.lower()] if flags[key] else value
            for key, value in credentials.items()
            if not (flags[key] and value.lower() == "false")
        }
        secrets = [v for k, v in credentials.items() if not flags[k] and len(v) >= REDACT_MIN_CHARS]
        # Longest first, so that a secret containing another is blanked whole.
        self._secrets = sorted(secrets, key=len, reverse=True)

    async def present(self, fqdn: str, value: str) -> None:
        await self._call(fqdn, "adding", lambda api, name: api.create_record("TXT", name, value))

    async def cleanup(self, fqdn: str, value: str) -> None:
        await self._call(fqdn, "removing", lambda api, name: api.delete_record(None, "TXT", name, value))

    async def _call(self, fqdn: str, verb: str, operation: Operation) -> None:
        zone = (await zone_of(fqdn, self.lookup, provider=self.name)).to_text(omit_final_dot=True)
        action = f"{verb} the TXT record at {fqdn}"
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                done = await _in_daemon_thread(self._run, zone, fqdn.rstrip("."), action, operation)
        except TimeoutError:
            raise DnsProviderError(self.name, f"{action}: no answer within {CALL_TIMEOUT_S:g} s") from None
        if not done:
            raise DnsProviderError(self.name, f"{action}: the API did not confirm it")

    def _run(self, zone: str, name: str, action: str, operation: Operation) -> bool:
        """In a worker thread: one lexicon provider, authenticated, for one operation."""
        config = ConfigResolver().with_dict(
            {"provider_name": self.name, "domain": zone, "ttl": RECORD_TTL_S, self.name: self._options}
        )
        try:
            api = _provider_class(self.name)(config)
            if self.api_endpoint is not None:
                if not hasattr(api, "api_endpoint"):
                    raise DnsProviderError(self.name, "its lexicon provider has no API endpoint to replace")
                api.api_endpoint = self.api_endpoint.rstrip("/")
            api.authenticate()
            try:
                return bool(operation(api, name))
            finally:
                api.cleanup()
        except DnsProviderError:
            raise
        except Exception as exc:  # lexicon's providers raise anything: requests, LexiconError, KeyError...
            raise DnsProviderError(self.name, f"{action}: {self._describe(exc, zone)}") from None

    def _describe(self, exc: Exception, zone: str) -> str:
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            answer = exc.response
            refused = answer.status_code in (401, 403)
            what = "the API refused the credentials" if refused else "the API answered"
            excerpt = " ".join(answer.text.split())[:ANSWER_EXCERPT_CHARS]
            text = f"{what}: HTTP {answer.status_code} {answer.reason}" + (f": {excerpt}" if excerpt else "")
        elif isinstance(exc, requests.ConnectionError | requests.Timeout):
            url = exc.request.url if exc.request is not None else None
            if isinstance(url, bytes):  # an unprepared Request keeps its URL as given
                url = url.decode("ascii", "replace")
            host = urlsplit(url or "").hostname
            text = f"the API at {host or 'its address'} could not be reached ({type(exc).__name__})"
        elif isinstance(exc, requests.RequestException):
            text = f"the request to the API failed ({type(exc).__name__})"
        elif isinstance(exc, AuthenticationError):
            text = f"the account does not hold the zone {zone}, or refused the credentials ({exc})"
        else:
            text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text
