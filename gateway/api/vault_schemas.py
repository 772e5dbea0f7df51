"""Request and response models of ``/v1/vaults`` (the official SDK's vault methods).

No response model has a field for a credential's value: it goes in once (create, rotate) and never out.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from gateway.egress.policy import normalise_name, valid_pattern
from gateway.orchestrator import vault_rules as rules

CREDENTIAL_TYPE = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
MAX_NAME = 128
MAX_DESCRIPTION = 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class VaultCreateRequest(_Model):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)


class VaultUpdateRequest(_Model):
    name: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)


class VaultResponse(_Model):
    id: str
    vault_id: str
    name: str
    description: str | None = None
    created_at: str
    updated_at: str | None = None


class VaultList(_Model):
    vaults: list[VaultResponse]


class VaultDiscoverResponse(_Model):
    """A safe summary: what the vault's VMs will see (credential names) and where it sends them."""

    id: str
    vault_id: str
    name: str
    credential_names: list[str]
    service_hosts: list[str]


def _value(value: str) -> str:
    if len(value.encode()) > rules.MAX_VALUE_BYTES:
        raise PydanticCustomError(
            "value_too_long", "a credential value is at most {limit} bytes", {"limit": rules.MAX_VALUE_BYTES}
        )
    if any(c in value for c in "\r\n\0"):
        # It goes into an HTTP header: a line break there would let it forge headers.
        raise PydanticCustomError("value_invalid", "a credential value cannot hold line breaks or NUL", {})
    return value


class CredentialCreateRequest(_Model):
    name: str
    value: str = Field(min_length=1)
    credential_type: str = "api_key"
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        problem = rules.credential_name_problem(value)
        if problem:
            raise PydanticCustomError("credential_name", problem, {})
        return value

    @field_validator("value")
    @classmethod
    def _checked_value(cls, value: str) -> str:
        return _value(value)

    @field_validator("credential_type")
    @classmethod
    def _type(cls, value: str) -> str:
        if not CREDENTIAL_TYPE.match(value):
            raise PydanticCustomError("credential_type", "a short lowercase word such as api_key", {})
        return value


class CredentialRotateRequest(_Model):
    value: str = Field(min_length=1)

    @field_validator("value")
    @classmethod
    def _checked_value(cls, value: str) -> str:
        return _value(value)


class CredentialResponse(_Model):
    id: str
    credential_id: str
    vault_id: str
    name: str
    credential_type: str
    description: str | None = None
    created_at: str
    updated_at: str | None = None
    rotated_at: str | None = None


class CredentialList(_Model):
    credentials: list[CredentialResponse]


class ServiceCreateRequest(_Model):
    host: str
    auth_config: dict[str, Any]
    enabled: bool = True
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not valid_pattern(value):
            raise PydanticCustomError(
                "host_pattern", "not a DNS name or *.suffix: {host!r}", {"host": value[:64]}
            )
        return normalise_name(value)

    @field_validator("auth_config")
    @classmethod
    def _auth(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = rules.auth_config_problems(value)
        if problems:
            said = "; ".join(f"{field}: {msg}" for field, msg in problems)
            raise PydanticCustomError("auth_config", "{problems}", {"problems": said})
        return value


class ServiceResponse(_Model):
    id: str
    service_id: str
    vault_id: str
    host: str
    auth_config: dict[str, str]
    enabled: bool
    description: str | None = None
    created_at: str


class ServiceList(_Model):
    services: list[ServiceResponse]


class TemplatesRequest(_Model):
    template_ids: list[str] = Field(min_length=1, max_length=len(rules.CATALOG))

    @field_validator("template_ids")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in rules.CATALOG_BY_ID]
        if unknown:
            raise PydanticCustomError(
                "unknown_template",
                "unknown template {unknown!r}; the catalog has {known}",
                {"unknown": unknown[0][:64], "known": ", ".join(rules.CATALOG_BY_ID)},
            )
        return value


class TemplatesResponse(_Model):
    vault_id: str
    services: list[ServiceResponse]


class CatalogTemplate(_Model):
    id: str
    name: str
    host: str
    auth_type: str
    credential_key: str
    header: str
    auth_config: dict[str, str]


class CatalogResponse(_Model):
    templates: list[CatalogTemplate]


class RequestLogQuery(_Model):
    limit: int = Field(100, ge=1, le=rules.REQUEST_LOG_CAP)


class RequestLogEntry(_Model):
    timestamp: str
    vm_id: str
    host: str
    method: str
    path: str
    status: int | None = None
    credential_id: str | None = None


class RequestLogList(_Model):
    logs: list[RequestLogEntry]
