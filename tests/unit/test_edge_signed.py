"""Signed URLs at the edge (pure, ``gateway.edge.signed``), the routing decisions they lead to, and the
route cache's URL key: tables, with the clock passed in (issue 23.3). The real thing through a gateway,
over HTTP and WebSocket: tests/integration/test_signed_urls.py."""

from __future__ import annotations

import time

import pytest

from gateway.edge import signed
from gateway.edge.resolver import Resolver, Route
from gateway.edge.routing import NO_ROUTE, Redirect, Reply, RoutingPolicy
from gateway.edge.target import AppTarget, RoutingConfig, TargetParser
from gateway.state.events import UrlKeyChanged
from gateway.state.records import VmRecord
from gateway.tokens import signed_url_scope, url_signature
from tests.fakes import FakeEventFeed, NoRoutes

# Every test here runs on each edge (the compiled one and the pure-Python one): tests/conftest.py.
pytestmark = pytest.mark.both_edges

VM = "vmid-0123456789abcdef0123"
SID = "0f8fad5b-d9cb-469f-a165-70867728950e"
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_800_000_000.0
EXPIRES = 1_800_000_060  # a minute after NOW
SHARE = "share-0123456789abcdef0123"


def sign(
    vm: str = VM,
    port: int = 3000,
    expires: int = EXPIRES,
    version: int = 1,
    grant: str = "",
    key: bytes = KEY,
) -> bytes:
    return url_signature(key, signed_url_scope(vm, port, expires, version, grant)).encode()


GOOD = sign()
INVALID = "signature_invalid"


@pytest.mark.parametrize(
    ("target", "clean", "signatures", "expires"),
    [
        (b"/x?signature=ab&expires=12", b"/x", [b"ab"], [b"12"]),
        # The rest of the query byte for byte, in order: encodings, empty and bare parameters kept.
        (b"/x?a=1&signature=ab&b=%20+&expires=12&c", b"/x?a=1&b=%20+&c", [b"ab"], [b"12"]),
        (b"/x?a=1&&signature=ab&expires=12", b"/x?a=1&", [b"ab"], [b"12"]),
        (b"/x?expires=12", b"/x", [], [b"12"]),
        # Repeated: every value (the check refuses them).
        (b"/x?signature=a&signature=b&expires=1", b"/x", [b"a", b"b"], [b"1"]),
        # Nothing of ours: the target as it came.
        (b"/x?a=1", b"/x?a=1", [], []),
        (b"/x", b"/x", [], []),
        (b"/signature=1", b"/signature=1", [], []),
        (b"/x?signatures=1&expires_at=2&Signature=3", b"/x?signatures=1&expires_at=2&Signature=3", [], []),
    ],
)
def test_the_parameters_are_split_from_the_target(
    target: bytes, clean: bytes, signatures: list[bytes], expires: list[bytes]
) -> None:
    assert signed.split_params(target) == (clean, signatures, expires)


@pytest.mark.parametrize(
    ("signatures", "expires", "route", "now", "verdict"),
    [
        # (route: vm, port, share id, key, version)
        ([GOOD], [b"%d" % EXPIRES], (VM, 3000, None, KEY, 1), NOW, "ok"),
        ([GOOD], [b"%d" % EXPIRES], (VM, 3000, None, KEY, 1), EXPIRES - 0.001, "ok"),
        # Past its time: expired (only an authentic URL is told so).
        ([GOOD], [b"%d" % EXPIRES], (VM, 3000, None, KEY, 1), EXPIRES, "signature_expired"),
        ([GOOD], [b"%d" % EXPIRES], (VM, 3000, None, KEY, 1), EXPIRES + 3600, "signature_expired"),
        # Tampered with: another expiry (later or earlier), port, VM.
        ([GOOD], [b"%d" % (EXPIRES + 3600)], (VM, 3000, None, KEY, 1), NOW, "signature_invalid"),
        ([GOOD], [b"%d" % (NOW - 10)], (VM, 3000, None, KEY, 1), NOW, "signature_invalid"),
        ([GOOD], [b"%d" % EXPIRES], (VM, 3001, None, KEY, 1), NOW, "signature_invalid"),
        ([GOOD], [b"%d" % EXPIRES], ("vmid-ffffffffffffffffffff", 3000, None, KEY, 1), NOW, INVALID),
        # The key rotated: another key and version (either alone is enough).
        ([GOOD], [b"%d" % EXPIRES], (VM, 3000, None, OTHER_KEY, 2), NOW, "signature_invalid"),
        ([GOOD], [b"%d" % EXPIRES], (VM, 3000, None, KEY, 2), NOW, "signature_invalid"),
        ([GOOD], [b"%d" % EXPIRES], (VM, 3000, None, OTHER_KEY, 1), NOW, "signature_invalid"),
        # A share's URL opens its port while the share is the port's; the app-url call's ("") always.
        ([sign(grant=SHARE)], [b"%d" % EXPIRES], (VM, 3000, SHARE, KEY, 1), NOW, "ok"),
        ([sign(grant=SHARE)], [b"%d" % EXPIRES], (VM, 3000, "share-other", KEY, 1), NOW, "signature_invalid"),
        ([sign(grant=SHARE)], [b"%d" % EXPIRES], (VM, 3000, None, KEY, 1), NOW, "signature_invalid"),
        ([GOOD], [b"%d" % EXPIRES], (VM, 3000, SHARE, KEY, 1), NOW, "ok"),
        # Malformed: missing, repeated, not plain digits, other case.
        ([], [b"%d" % EXPIRES], (VM, 3000, None, KEY, 1), NOW, "signature_invalid"),
        ([GOOD], [], (VM, 3000, None, KEY, 1), NOW, "signature_invalid"),
        ([GOOD, GOOD], [b"%d" % EXPIRES], (VM, 3000, None, KEY, 1), NOW, "signature_invalid"),
        ([GOOD], [b"%d" % EXPIRES] * 2, (VM, 3000, None, KEY, 1), NOW, "signature_invalid"),
        ([GOOD], [b"+%d" % EXPIRES], (VM, 3000, None, KEY, 1), NOW, "signature_invalid"),
        ([GOOD], [b" %d" % EXPIRES], (VM, 3000, None, KEY, 1), NOW, "signature_invalid"),
        ([GOOD], [b"1" * 13], (VM, 3000, None, KEY, 1), NOW, "signature_invalid"),
        ([GOOD.upper()], [b"%d" % EXPIRES], (VM, 3000, None, KEY, 1), NOW, "signature_invalid"),
        ([b""], [b"%d" % EXPIRES], (VM, 3000, None, KEY, 1), NOW, "signature_invalid"),
    ],
)  # fmt: skip
def test_a_signature_is_checked_then_its_expiry(
    signatures: list[bytes],
    expires: list[bytes],
    route: tuple[str, int, str | None, bytes, int],
    now: float,
    verdict: str,
) -> None:
    vm_id, port, share_id, key, version = route
    assert signed.check(signatures, expires, vm_id, port, share_id, key, version, now)[0] == verdict


def test_a_valid_check_says_its_expiry_and_grant() -> None:
    found = signed.check([sign(grant=SHARE)], [b"%d" % EXPIRES], VM, 3000, SHARE, KEY, 1, NOW)
    assert found == ("ok", EXPIRES, SHARE)


def cookie_header_of(value: bytes, *others: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"Cookie", b"; ".join([*others, b"gw_signed=" + value]))]


COOKIE = signed.cookie_value(VM, 3000, EXPIRES, "", KEY, 1)
SHARE_COOKIE = signed.cookie_value(VM, 3000, EXPIRES, SHARE, KEY, 1)
MOVED_COOKIE = COOKIE.replace(b"%d" % EXPIRES, b"%d" % (EXPIRES + 3600))


@pytest.mark.parametrize(
    ("headers", "route", "now", "opens"),
    [
        (cookie_header_of(COOKIE), (VM, 3000, None, KEY, 1), NOW, True),
        (cookie_header_of(COOKIE, b"app=1", b"gw_signed=stale"), (VM, 3000, SHARE, KEY, 1), NOW, True),
        # Gone at the URL's expiry, with a rotation, or for another app.
        (cookie_header_of(COOKIE), (VM, 3000, None, KEY, 1), EXPIRES, False),
        (cookie_header_of(COOKIE), (VM, 3000, None, OTHER_KEY, 2), NOW, False),
        (cookie_header_of(COOKIE), (VM, 3000, None, KEY, 2), NOW, False),
        (cookie_header_of(COOKIE), (VM, 3001, None, KEY, 1), NOW, False),
        # Its expiry moved: the MAC no longer matches.
        (cookie_header_of(MOVED_COOKIE), (VM, 3000, None, KEY, 1), NOW, False),
        # A share's cookie goes with its share.
        (cookie_header_of(SHARE_COOKIE), (VM, 3000, SHARE, KEY, 1), NOW, True),
        (cookie_header_of(SHARE_COOKIE), (VM, 3000, "share-b", KEY, 1), NOW, False),
        # The URL's signature is no cookie, nor is garbage.
        (cookie_header_of(b"%d.%s" % (EXPIRES, GOOD)), (VM, 3000, None, KEY, 1), NOW, False),
        (cookie_header_of(b"nonsense"), (VM, 3000, None, KEY, 1), NOW, False),
        ([(b"Cookie", b"gw_access=" + COOKIE)], (VM, 3000, None, KEY, 1), NOW, False),
        ([], (VM, 3000, None, KEY, 1), NOW, False),
    ],
)  # fmt: skip
def test_the_cookie_opens_its_app_until_expiry_or_rotation(
    headers: list[tuple[bytes, bytes]],
    route: tuple[str, int, str | None, bytes, int],
    now: float,
    opens: bool,
) -> None:
    vm_id, port, share_id, key, version = route
    assert signed.cookie_opens(headers, vm_id, port, share_id, key, version, now) is opens


def test_the_cookie_holds_no_key_and_suits_iframes_over_https() -> None:
    assert KEY.hex().encode() not in COOKIE and COOKIE.startswith(b"%d." % EXPIRES)
    name, plain = signed.cookie_header(COOKIE, b"/v1/app/s/3000/", 60, secure=False)
    assert name == b"Set-Cookie"
    assert plain == b"gw_signed=" + COOKIE + b"; Path=/v1/app/s/3000/; Max-Age=60; HttpOnly; SameSite=Lax"
    _, tls = signed.cookie_header(COOKIE, b"/", 0, secure=True)
    assert tls.endswith(b"; Path=/; Max-Age=1; HttpOnly; Secure; SameSite=None; Partitioned")


@pytest.mark.parametrize(
    ("headers", "navigation"),
    [
        ([(b"Sec-Fetch-Mode", b"navigate"), (b"Sec-Fetch-Dest", b"iframe")], True),
        ([(b"sec-fetch-mode", b" Navigate ")], True),
        ([(b"Sec-Fetch-Mode", b"websocket")], False),
        ([(b"Sec-Fetch-Mode", b"cors")], False),
        ([], False),
    ],
)
def test_a_browser_navigation_is_told_by_fetch_metadata(
    headers: list[tuple[bytes, bytes]], navigation: bool
) -> None:
    assert signed.is_navigation(headers) is navigation


# Routing: what a request with a signed URL (or its cookie) becomes.

APP = b"/v1/app/%s/3000" % SID.encode()
CONFIG = RoutingConfig(api_hosts=("api.example.com",), sandbox_domains=("sandbox.example.com",))
POLICY = RoutingPolicy(https_redirect_port=0, plain_http_paths=())
QUERY = b"signature=%s&expires=%d" % (GOOD, EXPIRES)
LATER_QUERY = b"signature=%s&expires=%d" % (GOOD, EXPIRES + 1)  # its expiry moved
PAST = 1_000_000_000
PAST_QUERY = b"signature=%s&expires=%d" % (sign(expires=PAST), PAST)
NAVIGATE = [(b"Sec-Fetch-Mode", b"navigate")]
ROUTES: dict[str, dict[str, object]] = {
    # A port only a signed URL opens (private, no token), a public one, one of a VM that signs nothing.
    "private": {"tokens": frozenset(), "url_key": KEY, "url_key_version": 1},
    "public": {"url_key": KEY, "url_key_version": 1},
    "unsigned": {"tokens": frozenset()},
}


def after(
    route: str, url: bytes, headers: list[tuple[bytes, bytes]], scheme: str, length: int | None
) -> object:
    target = TargetParser(CONFIG)(b"GET", url, b"api.example.com")
    assert isinstance(target, AppTarget)
    # Built here, not at collection: on the compiled edge these are its own classes.
    found = Route(VM, SID, "10.0.0.2", 3000, None, **ROUTES[route])  # type: ignore[arg-type]
    return POLICY.after_lookup(target, found, url, headers, scheme, 0, length, 0)


@pytest.mark.parametrize(
    ("route", "url", "headers", "scheme", "length", "expected"),
    [
        # Valid: forwarded without the two parameters (a WebSocket upgrade or an API client alike).
        ("private", APP + b"/x?a=1&" + QUERY + b"&b=2", [], "http", None, b"/x?a=1&b=2"),
        ("private", APP + b"/ws?" + QUERY, [(b"Sec-Fetch-Mode", b"websocket")], "http", None, b"/ws"),
        # Refused with its reason (403).
        ("private", APP + b"/x?" + PAST_QUERY, [], "http", None, Reply("signature_expired")),
        ("private", APP + b"/x?" + LATER_QUERY, [], "http", None, Reply(INVALID)),
        ("private", APP + b"/x?signature=00&expires=%d" % EXPIRES, [], "http", None, Reply(INVALID)),
        # Nothing of ours: as any private app, 404 (no oracle); a VM that signs nothing: the same.
        ("private", APP + b"/x?a=1", [], "http", None, NO_ROUTE),
        ("private", APP + b"/signature", [], "http", None, NO_ROUTE),
        ("unsigned", APP + b"/x?" + QUERY, [], "http", None, NO_ROUTE),
        # A browser navigation: the same URL without them, with the cookie.
        ("private", APP + b"/x?" + QUERY + b"&a=1", NAVIGATE, "http", None, Redirect(
            303, APP + b"/x?a=1", signed.cookie_header(COOKIE, APP + b"/", 60, secure=False))),
        # ... unless it carries a body (a form): forwarded.
        ("private", APP + b"/x?" + QUERY, NAVIGATE, "http", 5, b"/x"),
        # The cookie opens the app; expired or rotated it does not (table above).
        ("private", APP + b"/x?a=1", cookie_header_of(COOKIE), "http", None, b"/x?a=1"),
        # A public app: an authentic signature (valid or expired) is taken out; the app's own goes through.
        ("public", APP + b"/x?" + QUERY + b"&a=1", [], "http", None, b"/x?a=1"),
        ("public", APP + b"/x?" + PAST_QUERY, [], "http", None, b"/x"),
        ("public", APP + b"/x?signature=apps-own&expires=soon", [], "http", None,
         b"/x?signature=apps-own&expires=soon"),
    ],
)  # fmt: skip
def test_routing_a_signed_url(
    route: str, url: bytes, headers: list[tuple[bytes, bytes]], scheme: str, length: int | None,
    expected: object, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(time, "time", lambda: NOW)  # the routing policy reads the clock through time.time
    assert after(route, url, headers, scheme, length) == expected


# The route cache: the key comes with the route, and a new key drops what was cached.


def vm_record(url_key: str | None, share: dict[str, object] | None = None) -> VmRecord:
    now = time.time()
    return VmRecord(
        vm_id=VM, session_id=SID, owner="o", driver="netns", slot=0, ip="172.30.0.2", status="active",
        created_at=now, vm_lifetime_seconds=300, memory_mb=128, vcpu_count=1, expires_at=now + 300,
        share=share or {}, url_key=url_key, url_key_version=3 if url_key else 0,
    )  # fmt: skip


class OneVm(NoRoutes):
    """One VM by its id; no port exposed by app-url; counts lookups."""

    def __init__(self, vm: VmRecord) -> None:
        self.vm = vm
        self.calls = 0

    async def vm_and_port(self, vm_id: str, port: int) -> tuple[VmRecord | None, bool]:
        self.calls += 1
        return (self.vm if vm_id == self.vm.vm_id else None), False


def cache(store: OneVm) -> Resolver:
    res = Resolver(store, ["172.30.0.0/16"])
    FakeEventFeed().add(res)
    return res


async def test_a_port_nobody_shared_is_opened_by_signed_urls_once_the_vm_has_a_key() -> None:
    assert await cache(OneVm(vm_record(None))).by_vm(VM, 4000) is None
    route = await cache(OneVm(vm_record(KEY.hex()))).by_vm(VM, 4000)
    assert route is not None
    assert (route.tokens, route.url_key, route.url_key_version, route.share_id) == (frozenset(), KEY, 3, None)
    shared = {"share_id": SHARE, "port": 4000, "is_public": False, "token_sha256": "ab" * 32}
    route = await cache(OneVm(vm_record(KEY.hex(), shared))).by_vm(VM, 4000)
    assert route is not None and route.share_id == SHARE and route.tokens == frozenset({"ab" * 32})
    assert (await cache(OneVm(vm_record("not hex"))).by_vm(VM, 4000)) is None  # a key it cannot use


async def test_a_new_key_drops_the_cached_routes_of_the_vm() -> None:
    store = OneVm(vm_record(KEY.hex()))
    res = cache(store)
    assert await res.by_vm(VM, 4000) is not None
    assert await res.by_vm(VM, 4000) is not None and store.calls == 1  # cached
    store.vm = vm_record(OTHER_KEY.hex())
    res.handle(UrlKeyChanged(VM, SID))
    route = await res.by_vm(VM, 4000)
    assert route is not None and route.url_key == OTHER_KEY and store.calls == 2
