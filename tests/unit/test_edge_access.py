"""Private routes' credentials (pure): where a token may come from, and how it is checked."""

from __future__ import annotations

import pytest

from gateway.edge.access import (
    cookie_header,
    cookie_scope,
    cookie_value,
    cookie_values,
    is_platform_key_header,
    opens,
    presented_cookie,
    presented_token,
    split_token_from_target,
    strip_platform_key_params,
    token_hash,
    token_matches,
)

# Every test here runs on each edge (the compiled one and the pure-Python one): tests/conftest.py.
pytestmark = pytest.mark.both_edges


def test_a_token_matches_when_its_hash_is_accepted() -> None:
    accepted = frozenset({token_hash("gk_one"), token_hash("gk_two")})
    assert token_matches(b"gk_two", accepted)
    assert not token_matches(b"gk_three", accepted)
    assert not token_matches(None, accepted)
    assert not token_matches(b"gk_one", frozenset())  # an organisation without keys: nobody


def test_the_token_comes_from_its_header_and_the_cookie_from_the_cookie_header() -> None:
    headers = [(b"Cookie", b"a=1; gw_access=from-cookie"), (b"X-Access-Token", b" from-header ")]
    assert presented_token(headers) == b"from-header"
    assert presented_cookie(headers) == b"from-cookie"
    assert presented_token([(b"Cookie", b"a=1; gw_access=from-cookie")]) is None
    assert presented_cookie([(b"Cookie", b"gw_accessx=no")]) is None


ACCEPTED = frozenset({token_hash("gk_one"), token_hash("gk_two")})
SCOPE = cookie_scope("0123456789abcdef", 3000)
COOKIES = cookie_values(ACCEPTED, SCOPE)


def test_a_cookie_opens_only_the_app_it_was_made_for_and_is_not_the_token() -> None:
    cookie = cookie_value(token_hash("gk_one"), SCOPE)
    assert b"gk_one" not in cookie and token_hash("gk_one").encode() != cookie
    assert opens([(b"Cookie", b"gw_access=" + cookie)], ACCEPTED, COOKIES)
    other_app = cookie_value(token_hash("gk_one"), cookie_scope("0123456789abcdef", 3001))
    assert not opens([(b"Cookie", b"gw_access=" + other_app)], ACCEPTED, COOKIES)
    # The token itself in the cookie (what the edge set before): no longer a credential there.
    assert not opens([(b"Cookie", b"gw_access=gk_one")], ACCEPTED, COOKIES)
    # Revoked (its hash gone from the accepted set): its cookie stops opening the app.
    assert not opens([(b"Cookie", b"gw_access=" + cookie)], frozenset(), cookie_values(frozenset(), SCOPE))


def test_a_header_token_wins_over_the_cookie() -> None:
    cookie = cookie_value(token_hash("gk_two"), SCOPE)
    assert opens([(b"X-Access-Token", b"gk_two")], ACCEPTED, COOKIES)
    assert not opens([(b"X-Access-Token", b"wrong"), (b"Cookie", b"gw_access=" + cookie)], ACCEPTED, COOKIES)
    assert opens([(b"Authorization", b"Bearer gk_one")], ACCEPTED, COOKIES, bearer=True)
    assert not opens([(b"Authorization", b"Bearer gk_one")], ACCEPTED, COOKIES)


def test_a_bearer_token_counts_only_where_the_route_takes_one() -> None:
    headers = [(b"Authorization", b"Bearer gk_org")]
    assert presented_token(headers) is None  # a private share: the app's own Authorization is not ours
    assert presented_token(headers, bearer=True) == b"gk_org"
    assert presented_token([(b"authorization", b"bearer  gk_org ")], bearer=True) == b"gk_org"
    assert presented_token([(b"Authorization", b"Basic Zm9vOmJhcg==")], bearer=True) is None
    assert presented_token([(b"Authorization", b"Bearer ")], bearer=True) is None


def test_the_query_token_is_taken_out_of_the_target() -> None:
    assert split_token_from_target(b"/a?x=1&gw_access_token=t&y=2") == (b"/a?x=1&y=2", b"t")
    assert split_token_from_target(b"/a?gw_access_token=t") == (b"/a", b"t")
    assert split_token_from_target(b"/a?x=1") == (b"/a?x=1", None)


def test_the_cookie_is_host_only_and_http_only() -> None:
    name, value = cookie_header(b"gk_tok", b"/", secure=True)
    assert name == b"Set-Cookie"
    assert value == b"gw_access=gk_tok; Path=/; HttpOnly; SameSite=Lax; Secure"


@pytest.mark.parametrize(
    ("name", "value", "platform"),
    [
        (b"x-api-key", b"gk_abc", True),
        (b"x-api-key", b"  gk_abc ", True),
        (b"x-api-key", b"sk-live-abc", False),  # the app's own key
        (b"authorization", b"Bearer gk_abc", True),
        (b"authorization", b"bearer   gk_abc", True),
        (b"authorization", b"Bearer app-token", False),
        (b"authorization", b"Basic Z2tfYWJjOg==", False),
        (b"x-other", b"gk_abc", False),  # only where a client would put a key
    ],
)
def test_platform_keys_are_known_by_their_format(name: bytes, value: bytes, platform: bool) -> None:
    assert is_platform_key_header(name, value) is platform


@pytest.mark.parametrize(
    ("target", "clean"),
    [
        (b"/a?api_key=gk_x", b"/a"),
        (b"/a?x=1&api_key=gk_x&y=2", b"/a?x=1&y=2"),
        (b"/a?api_key=mine&x=gk_", b"/a?api_key=mine&x=gk_"),  # the app's own parameters
        (b"/a?my_api_key=gk_x", b"/a?my_api_key=gk_x"),
        (b"/gk_/a", b"/gk_/a"),
    ],
)
def test_platform_key_parameters_leave_the_target(target: bytes, clean: bytes) -> None:
    assert strip_platform_key_params(target) == clean
