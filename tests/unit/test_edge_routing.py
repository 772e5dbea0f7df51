"""The edge's routing policy (pure): facts in, a decision out, one table per step."""

from __future__ import annotations

import pytest

from gateway.edge import access
from gateway.edge.resolver import Route
from gateway.edge.routing import MISDIRECTED, NO_ROUTE, Redirect, Reply, RoutingPolicy
from gateway.edge.target import ApiTarget, AppTarget, RoutingConfig, TargetParser, route_key

# Every test here runs on each edge (the compiled one and the pure-Python one): tests/conftest.py.
pytestmark = pytest.mark.both_edges

SID = "0f8fad5b-d9cb-469f-a165-70867728950e"
VM = "vmid-0123456789abcdef0123"
API = b"api.example.com"
CONFIG = RoutingConfig(
    api_hosts=("api.example.com",),
    sandbox_domains=("sandbox.example.com",),
    instance_domains=("browser.example.com",),
)
SERVE_PLAIN = RoutingPolicy(https_redirect_port=0, plain_http_paths=())
REDIRECT = RoutingPolicy(https_redirect_port=443, plain_http_paths=(b"/.well-known/acme-challenge/",))
REDIRECT_8443 = RoutingPolicy(https_redirect_port=8443, plain_http_paths=())


def parsed(url: bytes, host: bytes = API, method: bytes = b"GET") -> AppTarget | ApiTarget:
    target = TargetParser(CONFIG)(method, url, host)
    assert isinstance(target, AppTarget | ApiTarget), target
    return target


APP_URL = b"/v1/app/%s/3000/x?q=1" % SID.encode()
INSTANCE_HOST = b"instance-%s.browser.example.com" % SID.encode()
ACME_PATH = b"/.well-known/acme-challenge/abc"


@pytest.mark.parametrize(
    ("policy", "url", "host", "scheme", "sni", "expected"),
    [
        # An app: its cache key, whichever of the four forms.
        (SERVE_PLAIN, APP_URL, API, "http", None, route_key("s", SID, 3000)),
        (
            SERVE_PLAIN,
            b"/x",
            VM.encode() + b"-8080.sandbox.example.com",
            "http",
            None,
            route_key("v", VM, 8080),
        ),
        (SERVE_PLAIN, b"/", b"app.customer.test", "http", None, route_key("d", "app.customer.test", 0)),
        (SERVE_PLAIN, b"/", INSTANCE_HOST, "http", None, route_key("i", SID, 0)),
        # The control plane: the API target itself.
        (SERVE_PLAIN, b"/v1/vms", API, "http", None, ApiTarget(API, API)),
        # TLS: the name in the request must be the certificate's.
        (SERVE_PLAIN, APP_URL, API, "https", API, route_key("s", SID, 3000)),
        (SERVE_PLAIN, APP_URL, API, "https", b"other.example.com", MISDIRECTED),
        (SERVE_PLAIN, b"/v1/vms", API, "https", b"other.example.com", MISDIRECTED),
        # Plain HTTP redirected to https, with the request target kept, except the ACME paths.
        (REDIRECT, APP_URL, API, "http", None, Redirect(308, b"https://api.example.com" + APP_URL)),
        (REDIRECT_8443, b"/v1/vms", API, "http", None, Redirect(308, b"https://api.example.com:8443/v1/vms")),
        (REDIRECT, b"/v1/vms", API, "https", API, ApiTarget(API, API)),
        (REDIRECT, ACME_PATH, b"app.customer.test", "http", None, route_key("d", "app.customer.test", 0)),
    ],
)
def test_before_the_lookup(
    policy: RoutingPolicy, url: bytes, host: bytes, scheme: str, sni: bytes | None, expected: object
) -> None:
    decision = policy.before_lookup(parsed(url, host), url, scheme, sni)
    if isinstance(decision, AppTarget):  # look its route up: by its key
        decision = decision.key
    assert decision == expected


@pytest.mark.parametrize(
    ("method", "url", "host", "expected"),
    [
        (b"GET", b"/v1/app/not-a-session/3000/", API, Reply("invalid_target", close=True)),
        (b"GET", b"/v1/app/%s/0/" % SID.encode(), API, Reply("invalid_target", close=True)),
        (b"GET", b"/", b"instance-nope.browser.example.com", Reply("no_route", close=False)),
        (b"GET", b"/", None, Reply("bad_host", close=True)),
        (b"CONNECT", b"api.example.com:443", API, Reply("method_not_allowed", close=False)),
        (b"GET", b"/v1/app/%s/3000" % SID.encode(), API, Redirect(308, b"/v1/app/%s/3000/" % SID.encode())),
    ],
)
def test_a_refused_target_is_answered_before_anything_else(
    method: bytes, url: bytes, host: bytes | None, expected: Reply | Redirect
) -> None:
    target = TargetParser(CONFIG)(method, url, host)
    decision = REDIRECT.before_lookup(target, url, "http", None)
    if isinstance(expected, Reply):
        assert isinstance(decision, Reply)
        assert (decision.code, decision.close) == (expected.code, expected.close)
    else:
        assert decision == expected


TOKEN = b"share-token-1"
PUBLIC = Route("vm1", SID, "10.0.0.2", 3000, None)
PRIVATE = Route(
    "vm1", SID, "10.0.0.2", 3000, None,
    tokens=frozenset({access.token_hash(TOKEN)}),
    cookies=access.cookie_values({access.token_hash(TOKEN)}, access.cookie_scope("vm1", 3000)),
)  # fmt: skip
COOKIE = access.cookie_value(access.token_hash(TOKEN), access.cookie_scope("vm1", 3000))


def after(
    route: Route | None,
    url: bytes = APP_URL,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    scheme: str = "http",
    max_body: int = 1000,
    content_length: int | None = None,
    body_bytes_so_far: int = 0,
) -> Reply | Redirect | bytes:
    target = parsed(url)
    assert isinstance(target, AppTarget)
    return SERVE_PLAIN.after_lookup(
        target, route, url, headers or [], scheme, max_body, content_length, body_bytes_so_far
    )


APP = b"/v1/app/%s/3000" % SID.encode()
TOO_LARGE = Reply("body_too_large", "the request body is larger than 1000 bytes", close=True)


@pytest.mark.parametrize(
    ("decision", "expected"),
    [
        # Public: forwarded as written below the prefix.
        (after(PUBLIC), b"/x?q=1"),
        # The gateway's own parameters never reach the app, public or private.
        (after(PUBLIC, APP + b"/x?gw_access_token=abc&q=1"), b"/x?q=1"),
        (after(PUBLIC, APP + b"/x?api_key=gk_secret&q=1"), b"/x?q=1"),
        (after(PUBLIC, APP + b"/x?api_key=the-apps-own"), b"/x?api_key=the-apps-own"),
        # No route: 404, as for a private app without credentials (no oracle).
        (after(None), NO_ROUTE),
        (after(PRIVATE), NO_ROUTE),
        (after(PRIVATE, headers=[(b"X-Access-Token", b"wrong")]), NO_ROUTE),
        (after(PRIVATE, APP + b"/x?gw_access_token=wrong"), NO_ROUTE),
        # The right token in a header or the cookie it was traded for opens it.
        (after(PRIVATE, headers=[(b"X-Access-Token", TOKEN)]), b"/x?q=1"),
        (after(PRIVATE, headers=[(b"Cookie", b"gw_access=" + COOKIE)]), b"/x?q=1"),
        # The right token in the query becomes a cookie for this app, and the client goes to the
        # same URL without it (Secure on https).
        (
            after(PRIVATE, APP + b"/x?gw_access_token=" + TOKEN + b"&q=1"),
            Redirect(303, APP + b"/x?q=1", access.cookie_header(COOKIE, APP + b"/", secure=False)),
        ),
        (
            after(PRIVATE, APP + b"/x?gw_access_token=" + TOKEN, scheme="https"),
            Redirect(303, APP + b"/x", access.cookie_header(COOKIE, APP + b"/", secure=True)),
        ),
        # A body known to be over the limit: 413 and close, by its length or what already came.
        (after(PUBLIC, content_length=1001), TOO_LARGE),
        (after(PUBLIC, body_bytes_so_far=1001), TOO_LARGE),
        (after(PUBLIC, content_length=1000), b"/x?q=1"),
        (after(PUBLIC, content_length=10**9, max_body=0), b"/x?q=1"),  # 0: no limit
        # Credentials are checked before the size: a stranger learns nothing about the app.
        (after(PRIVATE, content_length=1001), NO_ROUTE),
    ],
)  # fmt: skip
def test_after_the_lookup(decision: object, expected: object) -> None:
    assert decision == expected
