"""Vault placeholders become secrets only in the bound header toward the bound host."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.egress.inject import PLACEHOLDER_PREFIX, Service, inject, new_placeholder

OPENAI = Service(host="api.openai.test", header="Authorization", credential_id="cred-1", scheme="Bearer")
STRIPE = Service(host="*.stripe.test", header="X-Api-Key", credential_id="cred-2")
SECRETS = {"cred-1": "sk-live-secret", "cred-2": "rk-other-secret"}


def test_the_bound_header_toward_the_bound_host_gets_the_secret() -> None:
    mine, other = new_placeholder(), new_placeholder()
    placeholders = {mine: "cred-1", other: "cred-2"}
    headers = [(b"Host", b"api.openai.test"), (b"Authorization", mine.encode()), (b"X-Trace", mine.encode())]
    done = inject(headers, "api.openai.test", [OPENAI, STRIPE], placeholders, SECRETS)
    assert done.headers == [
        (b"Host", b"api.openai.test"),
        (b"Authorization", b"Bearer sk-live-secret"),
        (b"X-Trace", mine.encode()),  # not the bound header: left as it is
    ]
    assert done.used == ("cred-1",)
    explicit = inject(
        [(b"authorization", f"Bearer {mine}".encode())], "api.openai.test", [OPENAI], placeholders, SECRETS
    )
    assert explicit.headers == [(b"authorization", b"Bearer sk-live-secret")]


def test_another_host_or_another_credentials_placeholder_gets_nothing() -> None:
    mine, other = new_placeholder(), new_placeholder()
    placeholders = {mine: "cred-1", other: "cred-2"}
    elsewhere = inject(
        [(b"Authorization", mine.encode())], "evil.test", [OPENAI, STRIPE], placeholders, SECRETS
    )
    assert elsewhere.headers == [(b"Authorization", mine.encode())] and elsewhere.used == ()
    # cred-2's placeholder in the header bound to cred-1: not swapped (a VM cannot move secrets around).
    crossed = inject([(b"Authorization", other.encode())], "api.openai.test", [OPENAI], placeholders, SECRETS)
    assert crossed.headers == [(b"Authorization", other.encode())]
    below = inject([(b"X-Api-Key", other.encode())], "eu.stripe.test", [STRIPE], placeholders, SECRETS)
    assert below.headers == [(b"X-Api-Key", b"rk-other-secret")]


@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)), max_size=8), st.text(max_size=20))
def test_requests_without_placeholders_pass_untouched(headers: list[tuple[bytes, bytes]], host: str) -> None:
    clean = [(n, v.replace(PLACEHOLDER_PREFIX.encode(), b"")) for n, v in headers]
    assert inject(clean, host, [OPENAI, STRIPE], {}, SECRETS).headers == clean
