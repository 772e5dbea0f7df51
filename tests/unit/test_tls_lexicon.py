"""The checks the API runs on a customer's dns-lexicon provider and credentials (no network)."""

from __future__ import annotations

import pytest
import requests

from gateway.tls.dns01 import DnsLookup, DnsProviderError
from gateway.tls.providers import lexicon
from gateway.tls.providers.lexicon import (
    LexiconProvider,
    credential_options,
    credential_problems,
    supported_providers,
)


def test_supported_providers_are_lexicon_names_without_the_ones_that_act_on_our_host() -> None:
    names = supported_providers()
    assert {"cloudflare", "ovh", "gandi", "digitalocean"} <= set(names)
    assert not {"auto", "localzone", "oci"} & set(names)
    assert names == sorted(names)


def test_credential_options_come_from_the_providers_parser() -> None:
    assert credential_options("cloudflare") == ["auth_username", "auth_token", "zone_id"]
    with pytest.raises(ValueError, match="not a supported DNS provider"):
        credential_options("auto")


@pytest.mark.parametrize(
    ("provider", "credentials", "expected"),
    [
        ("cloudflare", {"auth_token": "t"}, []),
        ("cloudflare", {"auth_token": "t", "zone_id": "z", "auth_username": "u"}, []),
        ("cloudflare", {}, []),  # what a provider needs is its own business: it fails at the first call
        (
            "cloudflare",
            {"token": "t", "api_key": "k"},
            ["unknown credential keys for cloudflare: api_key, token (allowed: auth_username, auth_token, "],
        ),
        ("cloudfare", {}, ["unknown DNS provider 'cloudfare' (did you mean 'cloudflare'?); supported: "]),
        ("nope-nothing", {}, ["unknown DNS provider 'nope-nothing'; supported: aliyun, "]),
        ("auto", {}, ["the DNS provider 'auto' is not offered: it picks a provider by asking public DNS"]),
        ("localzone", {"filename": "/etc/passwd"}, ["the DNS provider 'localzone' is not offered"]),
        ("transip", {"auth_username": "u", "auth_api_key": "base64::LS0t", "auth_key_is_global": "True"}, []),
        (
            "transip",
            {"auth_api_key": "/etc/ssl/private/key.pem"},
            ["auth_api_key must carry its content inline"],
        ),
        (
            "googleclouddns",
            {"auth_service_account_info": "file::/root/sa.json"},
            ["auth_service_account_info"],
        ),
        (
            "transip",
            {"auth_api_key": "base64::LS0t", "auth_key_is_global": "yes"},
            ["auth_key_is_global is a flag"],
        ),
    ],
)
def test_credential_problems(provider: str, credentials: dict[str, str], expected: list[str]) -> None:
    problems = credential_problems(provider, credentials)
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start)


def test_a_provider_whose_extra_dependencies_are_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lexicon, "_shipped", lambda: {"cloudflare": True, "route53": False})
    assert supported_providers() == ["cloudflare"]
    assert credential_problems("route53", {}) == [
        "the DNS provider 'route53' needs dns-lexicon[route53], which this gateway does not have installed"
    ]


def test_problems_name_keys_never_values() -> None:
    secret = "/very/secret/path/or-token"
    problems = credential_problems("transip", {"auth_api_key": secret, "auth_key_is_global": secret})
    assert len(problems) == 2 and not any(secret in p for p in problems)


def test_the_constructor_refuses_what_credential_problems_reports() -> None:
    with pytest.raises(DnsProviderError, match=r"^cloudflare: unknown credential keys for cloudflare: token"):
        LexiconProvider("cloudflare", {"token": "t"}, DnsLookup())


def test_messages_quote_the_api_answer_without_the_credentials() -> None:
    token, email = "tok-3f9a8b7c6d5e4f3a2b1c", "owner@example.test"
    provider = LexiconProvider("cloudflare", {"auth_token": token, "auth_username": email}, DnsLookup())
    answer = requests.Response()
    answer.status_code, answer.reason = 403, "Forbidden"
    answer._content = f'{{"errors": [{{"message": "bad key {token} for {email}"}}]}}'.encode()
    text = provider._describe(
        requests.HTTPError("403 for url ?key=" + token, response=answer), "example.test"
    )
    assert text.startswith("the API refused the credentials: HTTP 403 Forbidden: ")
    assert token not in text and email not in text and "[redacted]" in text


@pytest.mark.parametrize("url", ["https://api.example.test/zones", b"https://api.example.test/zones"])
def test_an_unreachable_api_is_named_by_its_host_whatever_type_its_url_has(url: str | bytes) -> None:
    # requests keeps an unprepared Request's URL as given, bytes too.
    provider = LexiconProvider("cloudflare", {"auth_token": "t"}, DnsLookup())
    exc = requests.ConnectionError("refused", request=requests.Request("GET", url))
    text = provider._describe(exc, "example.test")
    assert text.startswith("the API at api.example.test could not be reached (ConnectionError)")
