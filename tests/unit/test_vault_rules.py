"""Vault rules (pure): which auth_configs are accepted, what the proxy makes of them, the catalog, and
what a request log entry may keep."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.egress.inject import Service, VmVault, new_placeholder
from gateway.orchestrator import vault_rules as rules
from gateway.orchestrator.vaults import sanitised_entry

AUTH_TO_SERVICE: list[tuple[dict[str, Any], Service]] = [
    (
        {"type": "bearer", "token": "OPENAI_API_KEY"},
        Service("api.openai.com", "Authorization", "cred-1", "Bearer"),
    ),
    (
        {"type": "header", "header": "x-api-key", "key": "ANTHROPIC_API_KEY"},
        Service("api.openai.com", "x-api-key", "cred-1", ""),
    ),
    (  # the SDK's CLI sends the header form as "api-key"
        {"type": "api-key", "header": "X-Token", "key": "K", "prefix": " Token "},
        Service("api.openai.com", "X-Token", "cred-1", "Token"),
    ),
    (  # fields that mean nothing for the type are ignored
        {"type": "bearer", "token": "T", "header": "X-Other"},
        Service("api.openai.com", "Authorization", "cred-1", "Bearer"),
    ),
]


@pytest.mark.parametrize(("auth", "service"), AUTH_TO_SERVICE)
def test_an_auth_config_becomes_the_proxys_service(auth: dict[str, Any], service: Service) -> None:
    assert rules.auth_config_problems(auth) == []
    assert rules.service_for("api.openai.com", auth, "cred-1") == service
    assert rules.credential_of(auth) == (auth.get("token") or auth.get("key"))


BAD_AUTH: list[tuple[dict[str, Any], list[str]]] = [
    ({}, ["type"]),
    ({"type": "url-path", "token": "T"}, ["type"]),  # secrets never go into URLs
    ({"type": "basic", "username": "U", "password": "P"}, ["type"]),
    ({"type": "bearer"}, ["token"]),
    ({"type": "bearer", "token": "1STARTS_WITH_DIGIT"}, ["token"]),
    ({"type": "bearer", "token": "has-dash"}, ["token"]),
    ({"type": "bearer", "token": 5}, ["token"]),
    ({"type": "header", "key": "K"}, ["header"]),
    ({"type": "header", "header": "Bad Header", "key": "K"}, ["header"]),
    ({"type": "header", "header": "X-Ok:", "key": "K"}, ["header"]),
    ({"type": "header", "header": "Host", "key": "K"}, ["header"]),  # the proxy's own
    ({"type": "header", "header": "Cookie", "key": "K"}, ["header"]),
    ({"type": "header", "header": "X-Key"}, ["key"]),
    ({"type": "header", "header": "X-Key", "key": "K", "prefix": "two words"}, ["prefix"]),
    ({"type": "header", "header": "", "key": ""}, ["key", "header"]),
]


@pytest.mark.parametrize(("auth", "fields"), BAD_AUTH)
def test_unusable_auth_configs_are_refused_naming_the_field(auth: dict[str, Any], fields: list[str]) -> None:
    assert [f for f, _ in rules.auth_config_problems(auth)] == fields
    assert rules.service_for("api.openai.com", auth, "cred-1") is None  # stored junk injects nothing
    assert rules.credential_of(auth) is None


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("OPENAI_API_KEY", True),
        ("_x", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("9LIVES", False),
        ("WITH SPACE", False),
        ("DASH-ED", False),
        ("ÜMLAUT", False),
        ("NEWLINE\n", False),
    ],
)
def test_credential_names_are_env_variable_names(name: str, ok: bool) -> None:
    assert (rules.credential_name_problem(name) is None) is ok


def test_the_catalog_is_usable_and_normalised() -> None:
    assert {t.id for t in rules.CATALOG} >= {"openai", "anthropic", "stripe", "github"}
    for template in rules.CATALOG:
        assert rules.auth_config_problems(template.auth_config) == []
        assert rules.normalised_auth_config(template.auth_config) == template.auth_config
        view = template.view()
        assert view["credential_key"] == rules.credential_of(template.auth_config)
    anthropic = rules.CATALOG_BY_ID["anthropic"]
    assert rules.service_for(anthropic.host, anthropic.auth_config, "c") == Service(
        "api.anthropic.com", "x-api-key", "c", ""
    )


def test_stored_auth_configs_keep_only_what_means_something() -> None:
    assert rules.normalised_auth_config({"type": "api-key", "header": "X-K", "key": "K", "junk": 1}) == {
        "type": "header",
        "header": "X-K",
        "key": "K",
    }


def test_a_vm_vault_intercepts_only_its_services_hosts_and_never_shows_its_secrets() -> None:
    placeholder = new_placeholder()
    vault = VmVault(
        services=(
            Service("api.openai.com", "Authorization", "cred-1", "Bearer"),
            Service("*.stripe.com", "Authorization", "cred-2", "Bearer"),
        ),
        placeholders={placeholder: "cred-1"},
        secrets={"cred-1": "sk-very-secret", "cred-2": "rk-secret"},
        vault_of={"cred-1": "vault-a", "cred-2": "vault-a"},
    )
    assert vault.intercepts("api.openai.com") and vault.intercepts("API.OpenAI.com.")
    assert vault.intercepts("eu.api.stripe.com") and not vault.intercepts("stripe.com")
    assert not vault.intercepts("openai.com") and not vault.intercepts("evil.test")
    assert "secret" not in repr(vault) and "secret" not in str(vault)


def test_a_request_log_entry_keeps_no_query_headers_or_body() -> None:
    entry = sanitised_entry(
        {
            "at": 1700000000.5,
            "vm_id": "vmid-1",
            "host": "api.openai.com",
            "method": "POST",
            "path": "/v1/chat?api_key=sk-leak#frag",
            "status": 200,
            "headers": {"Authorization": "Bearer sk-leak"},
            "body": "sk-leak",
            "credential_id": "cred-1",
        }
    )
    assert entry == {
        "at": 1700000000.5,
        "vm_id": "vmid-1",
        "host": "api.openai.com",
        "method": "POST",
        "path": "/v1/chat",
        "status": 200,
        "credential_id": "cred-1",
    }
    assert sanitised_entry({"path": "/x", "status": "200"})["status"] is None
