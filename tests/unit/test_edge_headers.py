"""Header rewriting: hop-by-hop stripping, forwarding headers, upgrades, gateway credentials."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.edge import headers as hdr
from gateway.edge.headers import (
    HOP_BY_HOP,
    ClientInfo,
    check_header_limits,
    connection_tokens,
    forwarded_headers,
    is_websocket_upgrade,
    strip_gateway_credentials,
    strip_hop_by_hop,
    upgrade_protocol,
)

# Every test here runs on each edge (the compiled one and the pure-Python one): tests/conftest.py.
pytestmark = pytest.mark.both_edges

H = list[tuple[bytes, bytes]]


def values(headers: H, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name.lower()]


def names(headers: H) -> list[bytes]:
    return [n.lower() for n, _ in headers]


# --- hop-by-hop -------------------------------------------------------------------------------------


def test_connection_tokens() -> None:
    headers = [(b"Connection", b" Keep-Alive ,, X-Foo"), (b"connection", b"close"), (b"X", b"a, b")]
    assert connection_tokens(headers) == {b"keep-alive", b"x-foo", b"close"}


def test_strip_fixed_hop_by_hop() -> None:
    headers = [(name.title(), b"v") for name in sorted(HOP_BY_HOP)] + [(b"Accept", b"*/*")]
    assert strip_hop_by_hop(headers) == [(b"Accept", b"*/*")]


def test_strip_connection_named_headers() -> None:
    headers = [
        (b"Host", b"h"),
        (b"Connection", b"X-Secret, x-other"),
        (b"x-secret", b"1"),
        (b"X-OTHER", b"2"),
        (b"X-Kept", b"3"),
    ]
    assert strip_hop_by_hop(headers) == [(b"Host", b"h"), (b"X-Kept", b"3")]


def test_connection_cannot_remove_host() -> None:
    headers = [(b"Host", b"h"), (b"Connection", b"host")]
    assert strip_hop_by_hop(headers) == [(b"Host", b"h")]


def test_response_headers_keep_content_length() -> None:
    headers = [(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked"), (b"Keep-Alive", b"timeout=5")]
    assert strip_hop_by_hop(headers) == [(b"Content-Length", b"3")]


# --- forwarding headers -----------------------------------------------------------------------------

SPOOFED: H = [
    (b"Host", b"Api.Example.com"),
    (b"X-Forwarded-For", b"6.6.6.6"),
    (b"x-forwarded-proto", b"https"),
    (b"X-Forwarded-Host", b"evil.example"),
    (b"X-Forwarded-Prefix", b"/evil"),
    (b"X-Real-IP", b"6.6.6.6"),
    (b"Forwarded", b"for=6.6.6.6"),
    (b"Accept", b"*/*"),
    (b"Content-Length", b"5"),
    (b"Connection", b"keep-alive"),
]


def test_untrusted_peer_cannot_spoof() -> None:
    client = ClientInfo(peer_ip="10.0.0.7", scheme="http", host=b"api.example.com", trusted=False)
    out = forwarded_headers(SPOOFED, client, b"/v1/app/sid/80")
    assert out[:2] == [(b"Host", b"Api.Example.com"), (b"Accept", b"*/*")]  # Host as received
    assert values(out, b"x-forwarded-for") == [b"10.0.0.7"]
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"x-forwarded-host") == [b"api.example.com"]
    assert values(out, b"x-forwarded-prefix") == [b"/v1/app/sid/80"]
    assert values(out, b"forwarded") == [b"for=10.0.0.7;proto=http;host=api.example.com"]
    assert values(out, b"x-real-ip") == []
    assert b"connection" not in names(out)
    assert b"content-length" not in names(out)  # the caller re-frames the body


def test_untrusted_without_prefix_removes_client_prefix() -> None:
    client = ClientInfo(peer_ip="10.0.0.7", scheme="https", host=b"h", trusted=False)
    out = forwarded_headers(SPOOFED, client, None)
    assert values(out, b"x-forwarded-prefix") == []


def test_trusted_proxy_chain_is_extended() -> None:
    client = ClientInfo(peer_ip="10.0.0.1", scheme="http", host=b"api.example.com", trusted=True)
    out = forwarded_headers(SPOOFED, client, None)
    assert values(out, b"x-forwarded-for") == [b"6.6.6.6, 10.0.0.1"]
    assert values(out, b"forwarded") == [b"for=6.6.6.6, for=10.0.0.1;proto=http;host=api.example.com"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"evil.example"]
    assert values(out, b"x-forwarded-prefix") == [b"/evil"]
    assert values(out, b"x-real-ip") == [b"6.6.6.6"]


def test_trusted_proxy_multiple_headers_are_merged_and_missing_ones_set() -> None:
    headers = [(b"Host", b"h"), (b"X-Forwarded-For", b"1.1.1.1"), (b"X-Forwarded-For", b"2.2.2.2")]
    client = ClientInfo(peer_ip="10.0.0.1", scheme="https", host=b"h:8443", trusted=True)
    out = forwarded_headers(headers, client, b"/p")
    assert values(out, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 10.0.0.1"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"h:8443"]
    assert values(out, b"x-forwarded-prefix") == [b"/p"]
    assert values(out, b"forwarded") == [b'for=10.0.0.1;proto=https;host="h:8443"']


@pytest.mark.parametrize(
    ("peer", "host", "expected"),
    [
        ("::1", b"localhost", b'for="[::1]";proto=http;host=localhost'),
        ("2001:db8::7", b"[2001:db8::1]:80", b'for="[2001:db8::7]";proto=http;host="[2001:db8::1]:80"'),
        ("192.0.2.1", b"h:80", b'for=192.0.2.1;proto=http;host="h:80"'),
        ("", b"h", b"for=unknown;proto=http;host=h"),
    ],
)
def test_forwarded_quoting(peer: str, host: bytes, expected: bytes) -> None:
    out = forwarded_headers([(b"Host", host)], ClientInfo(peer, "http", host, False), None)
    assert values(out, b"forwarded") == [expected]


# --- upgrades ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "protocol", "websocket"),
    [
        ([(b"Connection", b"Upgrade"), (b"Upgrade", b"WebSocket")], b"websocket", True),
        ([(b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"websocket")], b"websocket", True),
        ([(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c")], b"h2c", False),
        ([(b"Connection", b"upgrade"), (b"Upgrade", b"websocket, h2c")], b"h2c", False),
        ([(b"Connection", b"upgrade"), (b"Upgrade", b"foo/2, bar")], b"foo/2, bar", False),
        ([(b"Upgrade", b"websocket")], None, False),  # no Connection: upgrade
        ([(b"Connection", b"keep-alive"), (b"Upgrade", b"websocket")], None, False),
        ([(b"Connection", b"upgrade")], None, False),  # no Upgrade
        ([(b"Connection", b"upgrade"), (b"Upgrade", b" , ")], None, False),
        ([], None, False),
    ],
)
def test_upgrade_detection(headers: H, protocol: bytes | None, websocket: bool) -> None:
    assert upgrade_protocol(headers) == protocol
    assert is_websocket_upgrade(headers) is websocket


def test_upgrade_headers_are_stripped_for_the_caller_to_re_add() -> None:
    headers = [(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    out = forwarded_headers(headers, ClientInfo("1.2.3.4", "http", b"h", False), None)
    assert b"upgrade" not in names(out) and b"connection" not in names(out)


# --- gateway credentials ----------------------------------------------------------------------------

COOKIES = frozenset({b"gw_session", b"gw_token"})


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        (b"a=1; gw_session=secret; b=2", b"a=1; b=2"),
        (b"gw_session=secret", None),
        (b"gw_session=s; gw_token=t", None),
        (b"a=1; b=x=y", b"a=1; b=x=y"),  # untouched
        (b"a=1;b=2", b"a=1;b=2"),  # untouched, byte for byte
        (b"a=1;gw_token=t;  c=3", b"a=1; c=3"),  # rebuilt only when something was removed
        (b"GW_SESSION=1; a=1", b"GW_SESSION=1; a=1"),  # cookie names are case-sensitive
        (b"gw_session=x; ", None),
    ],
)
def test_cookie_stripping(cookie: bytes, expected: bytes | None) -> None:
    headers = [(b"Host", b"h"), (b"Cookie", cookie), (b"Accept", b"*/*")]
    out = strip_gateway_credentials(headers, COOKIES, frozenset({b"x-gateway-token"}))
    assert values(out, b"cookie") == ([] if expected is None else [expected])
    assert out[0] == (b"Host", b"h") and out[-1] == (b"Accept", b"*/*")


def test_every_cookie_header_and_the_token_header_are_cleaned() -> None:
    headers = [
        (b"cookie", b"gw_token=1"),
        (b"x-gateway-TOKEN", b"secret"),
        (b"COOKIE", b"c=3; gw_session=2"),
        (b"Authorization", b"Bearer app-own"),
    ]
    out = strip_gateway_credentials(headers, COOKIES, frozenset({b"x-gateway-token"}))
    assert out == [(b"COOKIE", b"c=3"), (b"Authorization", b"Bearer app-own")]


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"a", b"b", b"gw_session", b"gw_token", b"c"]),
            st.binary(max_size=6).map(lambda v: v.replace(b";", b"").strip()),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_cookie_stripping_keeps_others_in_order(pairs: list[tuple[bytes, bytes]]) -> None:
    cookie = b"; ".join(name + b"=" + value for name, value in pairs)
    out = strip_gateway_credentials([(b"Cookie", cookie)], COOKIES, frozenset({b"x-t"}))
    kept = [name + b"=" + value for name, value in pairs if name not in COOKIES]
    assert values(out, b"cookie") == ([b"; ".join(kept)] if kept else [])


# --- limits -----------------------------------------------------------------------------------------


def test_header_limits() -> None:
    headers = [(b"A", b"12"), (b"Bb", b"3")]  # 3 + 3 bytes
    assert check_header_limits(headers, 2, 6)
    assert not check_header_limits(headers, 1, 6)
    assert not check_header_limits(headers, 2, 5)
    assert check_header_limits([], 0, 0)


def test_upgrade_responses_must_answer_the_handshake() -> None:
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    request = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Key", key)]
    good = [
        (b"Connection", b"upgrade"),
        (b"Upgrade", b"WebSocket"),
        (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    ]
    assert hdr.websocket_accept(key) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455's own example
    assert hdr.valid_upgrade_response(request, good)
    assert not hdr.valid_upgrade_response(request, [*good[:2], (b"Sec-WebSocket-Accept", b"d3Jvbmc=")])
    assert not hdr.valid_upgrade_response(request, good[1:])  # no Connection: upgrade
    assert not hdr.valid_upgrade_response(request, [good[0], (b"Upgrade", b"h2c"), good[2]])  # not offered
    assert not hdr.valid_upgrade_response([(b"Host", b"a")], good)  # nothing was asked
    other = [(b"Connection", b"upgrade"), (b"Upgrade", b"foo/2")]
    assert hdr.valid_upgrade_response([(b"Connection", b"upgrade"), (b"Upgrade", b"foo/1, bar")], other)


@pytest.mark.parametrize(
    ("content_type", "grpc"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"Application/GRPC; charset=x", True),
        (b"application/grpc-web", False),  # HTTP/1.1-friendly: goes as any request
        (b"application/grpc-web+proto", False),
        (b"application/json", False),
        (None, False),
    ],
)
def test_grpc_requests_are_told_by_their_content_type(content_type: bytes | None, grpc: bool) -> None:
    headers = [(b"Host", b"x")] + ([(b"Content-Type", content_type)] if content_type else [])
    assert hdr.is_grpc(headers) is grpc


_CLASSED_NAMES = [*sorted(hdr.REQUEST_NAME_CLASSES), b"x-custom", b"hostx", b"cookies", b"close", b"accept"]


@st.composite
def _any_case(draw: st.DrawFn, names: list[bytes]) -> bytes:
    name = draw(st.sampled_from(names))
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return bytes(c - 32 if flip and 97 <= c <= 122 else c for c, flip in zip(name, flips, strict=True))


@given(
    st.lists(
        st.one_of(
            st.tuples(_any_case(_CLASSED_NAMES), st.binary(max_size=8)),
            # a Connection header naming what goes anyway, or something else (then the general way)
            st.tuples(
                st.just(b"Connection"),
                st.lists(_any_case(_CLASSED_NAMES), max_size=3).map(lambda ts: b", ".join(ts)),
            ),
        ),
        max_size=10,
    )
)
def test_headers_dropped_by_their_classes_are_those_dropped_by_their_names(
    headers: list[tuple[bytes, bytes]],
) -> None:
    classes = hdr.request_name_classes(headers)
    assert len(classes) == len(headers)
    assert hdr._without_classified(headers, classes) == hdr._without(headers, hdr._UNTRUSTED_DROP)


def test_the_name_classes_agree_with_the_names_the_edge_drops_and_reads() -> None:
    for name, kind in hdr.REQUEST_NAME_CLASSES.items():
        assert name == name.lower()
        assert (kind >= hdr.REQ_FIRST_DROPPED) == (name in hdr._UNTRUSTED_DROP), name
    assert hdr._UNTRUSTED_DROP <= set(hdr.REQUEST_NAME_CLASSES)
    assert hdr.request_name_classes([(b"HOST", b"h"), (b"Cookie", b"c"), (b"X-Sandbox-Id", b"s")]) == bytes(
        [hdr.REQ_HOST, hdr.REQ_CREDENTIALS, hdr.REQ_SANDBOX]
    )
