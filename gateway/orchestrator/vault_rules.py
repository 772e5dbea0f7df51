"""What a vault may hold and how a service's ``auth_config`` becomes an injection (pure).

``auth_config`` has the official SDK's forms:

- ``{"type": "bearer", "token": "<credential name>"}``: ``Authorization: Bearer <secret>``;
- ``{"type": "header", "header": "<Header-Name>", "key": "<credential name>"}`` (the SDK's CLI sends
  the same as ``"api-key"``), optionally ``"prefix": "Token"``: ``<Header-Name>: <secret>``.

Other forms the SDK knows (``url-path``, ``basic``) are refused: secrets go only into headers, never
into a URL the VM could read back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.egress.inject import Service

CREDENTIAL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
# An HTTP header name (RFC 9110 token).
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}\Z")
# Headers the proxy or HTTP itself owns: a secret there would break the request or leak elsewhere.
RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "cookie"}
)
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9._~+/-]{0,31}\Z")

BEARER = "bearer"
HEADER_TYPES = ("header", "api-key")
MAX_VALUE_BYTES = 16 * 1024
MAX_CREDENTIALS_PER_VAULT = 64
MAX_SERVICES_PER_VAULT = 64
MAX_VAULTS_PER_OWNER = 100
MAX_VAULTS_PER_VM = 16
REQUEST_LOG_CAP = 1000


@dataclass(frozen=True)
class Template:
    """A catalog entry: a well-known API and the credential name its SDKs read."""

    id: str
    name: str
    host: str
    auth_config: Mapping[str, str]

    @property
    def credential_name(self) -> str:
        return self.auth_config.get("token") or self.auth_config["key"]

    def view(self) -> dict[str, Any]:
        """As the SDK's catalog readers take it (``auth_type``, ``credential_key``, ``header``)."""
        auth_type = self.auth_config["type"]
        return {
            "id": self.id,
            "name": self.name,
            "host": self.host,
            "auth_type": auth_type,
            "credential_key": self.credential_name,
            "header": self.auth_config.get("header", "Authorization"),
            "auth_config": dict(self.auth_config),
        }


CATALOG: tuple[Template, ...] = (
    Template("openai", "OpenAI", "api.openai.com", {"type": BEARER, "token": "OPENAI_API_KEY"}),
    Template(
        "anthropic",
        "Anthropic",
        "api.anthropic.com",
        {"type": "header", "header": "x-api-key", "key": "ANTHROPIC_API_KEY"},
    ),
    Template("stripe", "Stripe", "api.stripe.com", {"type": BEARER, "token": "STRIPE_API_KEY"}),
    Template("github", "GitHub", "api.github.com", {"type": BEARER, "token": "GITHUB_TOKEN"}),
)
CATALOG_BY_ID = {t.id: t for t in CATALOG}


def credential_name_problem(name: str) -> str | None:
    if not CREDENTIAL_NAME.match(name):
        return "a credential name is an env variable name: [A-Za-z_][A-Za-z0-9_]*, at most 128 characters"
    return None


def auth_config_problems(auth: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What is wrong with an ``auth_config``: (field in it, message) pairs; none when it is usable."""
    kind = auth.get("type")
    if kind == BEARER:
        return _name_problems(auth, "token")
    if kind in HEADER_TYPES:
        found = _name_problems(auth, "key")
        header = auth.get("header")
        if not isinstance(header, str) or not HEADER_NAME.match(header):
            found.append(("header", "an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"))
        elif header.lower() in RESERVED_HEADERS:
            found.append(("header", f"{header} cannot carry a credential"))
        prefix = auth.get("prefix")
        if prefix is not None and (not isinstance(prefix, str) or not SCHEME.match(prefix.strip())):
            found.append(("prefix", "a word such as Token or Bearer"))
        return found
    return [("type", "'bearer' or 'header' (secrets go into headers only)")]


def _name_problems(auth: Mapping[str, Any], field: str) -> list[tuple[str, str]]:
    name = auth.get(field)
    if not isinstance(name, str):
        return [(field, "the name of the vault's credential to send")]
    problem = credential_name_problem(name)
    return [(field, problem)] if problem else []


def normalised_auth_config(auth: Mapping[str, Any]) -> dict[str, str]:
    """A checked ``auth_config`` as stored: only the fields that mean something, ``api-key`` as
    ``header``."""
    if auth["type"] == BEARER:
        return {"type": BEARER, "token": auth["token"]}
    kept = {"type": "header", "header": auth["header"], "key": auth["key"]}
    if auth.get("prefix"):
        kept["prefix"] = auth["prefix"].strip()
    return kept


def credential_of(auth: Mapping[str, Any]) -> str | None:
    """The credential name an ``auth_config`` sends (None for one that is not usable)."""
    if auth_config_problems(auth):
        return None
    return str(auth["token"] if auth["type"] == BEARER else auth["key"])


def service_for(host: str, auth: Mapping[str, Any], credential_id: str) -> Service | None:
    """The proxy's ``Service`` for a stored service whose credential is ``credential_id``; None for an
    ``auth_config`` that is not usable (an old record's junk injects nothing)."""
    if auth_config_problems(auth):
        return None
    if auth["type"] == BEARER:
        return Service(host=host, header="Authorization", credential_id=credential_id, scheme="Bearer")
    return Service(
        host=host,
        header=auth["header"],
        credential_id=credential_id,
        scheme=(auth.get("prefix") or "").strip(),
    )
