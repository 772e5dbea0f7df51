from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.tls.sni import SniTable, choose, lookup_names

TABLE = {
    "api.example.test": "api",
    "*.sandbox.example.test": "sandbox",
    "shop.customer.test": "shop",
}


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [
        ("api.example.test", "api"),
        ("API.Example.Test.", "api"),  # case and a trailing dot do not matter
        ("vmid-abc-3000.sandbox.example.test", "sandbox"),
        ("a.b.sandbox.example.test", None),  # a wildcard covers one label only
        ("sandbox.example.test", None),  # nor the bare parent
        ("shop.customer.test", "shop"),
        ("other.customer.test", None),
        ("test", None),
        ("", None),
        (None, None),
    ],
)
def test_exact_then_one_label_wildcard(server_name: str | None, expected: str | None) -> None:
    assert choose(TABLE, server_name) == expected


@given(st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,4}", fullmatch=True))
def test_lookup_names_never_offer_a_deeper_wildcard(name: str) -> None:
    names = lookup_names(name)
    assert names[0] == name
    for candidate in names[1:]:
        assert candidate.startswith("*.") and name.endswith(candidate[1:])
        assert candidate[2:].count(".") == name.count(".") - 1


def _ctx() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


def test_table_replaces_and_removes_per_certificate() -> None:
    default, first, second, other = _ctx(), _ctx(), _ctx(), _ctx()
    table = SniTable(default)
    table.put("*.sandbox.example.test", ("*.sandbox.example.test",), first)
    assert table.context_for("x.sandbox.example.test") is first
    table.put("*.sandbox.example.test", ("*.sandbox.example.test", "sandbox.example.test"), second)
    assert table.context_for("x.sandbox.example.test") is second
    assert table.context_for("sandbox.example.test") is second
    # A name another certificate took over stays with it when the first certificate goes.
    table.put("bare", ("sandbox.example.test",), other)
    table.remove("*.sandbox.example.test")
    assert table.context_for("x.sandbox.example.test") is default
    assert table.context_for("sandbox.example.test") is other
    assert table.context_for(None) is default
    assert table.cert_ids() == {"bare"}
