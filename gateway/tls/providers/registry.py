"""Which DNS provider a custom domain's ``dns_provider`` names, and whether its ``dns_credentials`` fit.

- ``None`` or ``"delegated"``: no credentials; the customer's ``_acme-challenge`` CNAME points into the
  operator's delegation zone, written with the operator's provider.
- ``"rfc2136"``: the customer's own primary server and TSIG key (``server`` as HOST or HOST:PORT,
  ``key_name``, ``key_secret``, optional ``key_algorithm`` and ``zone``).
- any other name: a dns-lexicon provider, ``dns_credentials`` mapped onto its options.

The concrete classes are named here and in ``app.py`` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.tls.dns01 import DnsLookup, DnsProvider
from gateway.tls.providers.addresses import is_ip_literal, refused_server
from gateway.tls.providers.delegated import DelegatedProvider
from gateway.tls.providers.rfc2136 import Rfc2136Provider, Rfc2136Settings

DELEGATED = "delegated"
RFC2136 = "rfc2136"
RFC2136_REQUIRED = ("server", "key_name", "key_secret")
RFC2136_OPTIONAL = ("key_algorithm", "zone")
DNS_PORT = 53


@dataclass(frozen=True)
class ProviderSettings:
    """What the operator configured that customers' providers use."""

    lookup: DnsLookup
    operator: DnsProvider | None = None  # writes delegated challenges; None: no ACME configured
    delegation_zone: str = ""
    lexicon_api_endpoints: Mapping[str, str] = field(default_factory=dict)
    # Customers' own DNS servers may be private, loopback or link-local (acme.customer_dns_private_ok).
    customer_dns_private_ok: bool = False


def provider_name(requested: str | None) -> str:
    return (requested or DELEGATED).strip().lower()


def credential_problems(name: str, credentials: Mapping[str, str], settings: ProviderSettings) -> list[str]:
    """What is wrong with a provider choice, as messages for the API's 422 (empty: fine)."""
    if name == DELEGATED:
        if not settings.delegation_zone or settings.operator is None:
            return ["delegated DNS validation is not configured on this gateway (acme.delegation_zone)"]
        return ["the delegated mode takes no dns_credentials"] if credentials else []
    if name == RFC2136:
        missing = [k for k in RFC2136_REQUIRED if not credentials.get(k)]
        unknown = sorted(set(credentials) - {*RFC2136_REQUIRED, *RFC2136_OPTIONAL})
        problems = [f"rfc2136 needs {', '.join(missing)}"] if missing else []
        if unknown:
            allowed = ", ".join((*RFC2136_REQUIRED, *RFC2136_OPTIONAL))
            problems.append(f"unknown rfc2136 credentials {', '.join(unknown)}; allowed: {allowed}")
        if credentials.get("server"):
            problems += _server_problems(credentials["server"], settings)
        return problems
    from gateway.tls.providers import lexicon  # imported when used: it loads dns-lexicon

    return lexicon.credential_problems(name, dict(credentials))


def make_provider(name: str, credentials: Mapping[str, str], settings: ProviderSettings) -> DnsProvider:
    """The provider for checked credentials (``credential_problems`` found nothing)."""
    if name == DELEGATED:
        assert settings.operator is not None
        return DelegatedProvider(settings.operator, settings.delegation_zone, settings.lookup)
    if name == RFC2136:
        host, port = _host_port(credentials["server"]) or ("", DNS_PORT)
        rfc = Rfc2136Settings(
            server=host, port=port, key_name=credentials["key_name"], key_secret=credentials["key_secret"],
            key_algorithm=credentials.get("key_algorithm") or "hmac-sha256", zone=credentials.get("zone", ""),
            private_ok=settings.customer_dns_private_ok,
        )  # fmt: skip
        return Rfc2136Provider(rfc, settings.lookup)
    from gateway.tls.providers import lexicon

    return lexicon.LexiconProvider(
        name, dict(credentials), settings.lookup, api_endpoint=settings.lexicon_api_endpoints.get(name)
    )


def _server_problems(server: str, settings: ProviderSettings) -> list[str]:
    """An address refused at once; a name is checked when it is resolved, before each update."""
    host_port = _host_port(server)
    if host_port is None:
        return ["rfc2136 server must be HOST or HOST:PORT"]
    host = host_port[0]
    if settings.customer_dns_private_ok or not is_ip_literal(host):
        return []
    refused = refused_server(host, host)
    return [f"rfc2136 server {refused}"] if refused else []


def _host_port(server: str) -> tuple[str, int] | None:
    host, colon, port = server.strip().rpartition(":")
    if not colon or "]" in port:
        host, port = server.strip(), str(DNS_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)
