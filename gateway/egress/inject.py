"""Vault secrets put in at egress (pure): a VM holds placeholders, the proxy swaps in the secret.

A VM made with ``vault_ids`` gets, for each credential, an env variable whose value is a placeholder
(``gwvault-<random>``), never the secret. A service binds a host to a credential and a header. When a
request to that host carries the placeholder in that header, the proxy replaces it with the secret;
the same placeholder in any other header, toward any other host, or in the URL is left as it is (so a
VM cannot make the gateway spell a secret where the VM can read it back, e.g. in a URL it controls).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.egress.policy import name_matches

PLACEHOLDER_PREFIX = "gwvault-"
PLACEHOLDER_RANDOM_BYTES = 18


def new_placeholder() -> str:
    return PLACEHOLDER_PREFIX + secrets.token_urlsafe(PLACEHOLDER_RANDOM_BYTES)


@dataclass(frozen=True)
class Service:
    """Requests to ``host`` (exact, or ``*.suffix``) get the credential in ``header``; ``scheme`` is put
    before it when the VM's header holds only the placeholder (``Bearer`` for Authorization)."""

    host: str
    header: str
    credential_id: str
    scheme: str = ""


@dataclass(frozen=True)
class VmVault:
    """What the proxy needs to put a VM's secrets in (``VaultSource.vm_vault``): read fresh for each
    connection, so a rotated or deleted credential applies at once."""

    # Enabled services whose credential exists.
    services: tuple[Service, ...]
    placeholders: Mapping[str, str]  # placeholder (in the VM's env) -> credential id
    secrets: Mapping[str, str]  # credential id -> the secret (opened; never logged, never stored here)
    vault_of: Mapping[str, str]  # credential id -> vault id (whose request log an injection goes to)

    def intercepts(self, host: str) -> bool:
        """Whether some service binds ``host``: only then is the connection opened (TLS terminated)."""
        return any(name_matches(host, s.host) for s in self.services)

    def __repr__(self) -> str:
        # A dataclass repr would spell every secret into a log line or a traceback.
        hosts = ", ".join(s.host for s in self.services)
        return f"VmVault(services=[{hosts}], credentials={len(self.secrets)})"


@dataclass(frozen=True)
class Injection:
    headers: list[tuple[bytes, bytes]]
    used: tuple[str, ...]  # credential ids put in, for the vault's request log


def inject(
    headers: Sequence[tuple[bytes, bytes]],
    host: str,
    services: Sequence[Service],
    placeholders: Mapping[str, str],
    secrets_by_credential: Mapping[str, str],
) -> Injection:
    """The request's headers with each service's placeholder for ``host`` replaced by its secret.

    ``placeholders`` maps a VM's placeholder to its credential id; a placeholder of another credential
    than the one a service names for the header is left alone."""
    wanted = {
        s.header.lower().encode(): s
        for s in services
        if name_matches(host, s.host) and s.credential_id in secrets_by_credential
    }
    if not wanted:
        return Injection(list(headers), ())
    out: list[tuple[bytes, bytes]] = []
    used: list[str] = []
    for name, value in headers:
        service = wanted.get(name.lower())
        if service is not None and PLACEHOLDER_PREFIX.encode() in value:
            replaced = _replace(
                value.decode("latin-1"), service, placeholders, secrets_by_credential[service.credential_id]
            )
            if replaced is not None:
                value = replaced.encode("latin-1")
                used.append(service.credential_id)
        out.append((name, value))
    return Injection(out, tuple(used))


def _replace(value: str, service: Service, placeholders: Mapping[str, str], secret: str) -> str | None:
    for placeholder, credential_id in placeholders.items():
        if credential_id == service.credential_id and placeholder in value:
            if value.strip() == placeholder and service.scheme:
                return f"{service.scheme} {secret}"
            return value.replace(placeholder, secret)
    return None
