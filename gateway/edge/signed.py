"""Signed URLs at the edge (pure): ``?signature=...&expires=...`` checked, stripped, traded for a cookie.

A signed URL opens one app (a VM's port) until ``expires`` (unix seconds): ``signature`` is an HMAC of
what it grants under the VM's URL key (``gateway.tokens``; the route carries the key, its version and the
port's share). Rotating the key (a new one, a new version) makes every URL signed before fail at once.

- Both parameters leave the request before it goes to the VM; the rest of the query stays byte for
  byte as it came.
- The signature is checked before the expiry, so only an authentic URL is ever told it expired.
- A browser navigation (``Sec-Fetch-Mode: navigate``: a page, or an iframe) with a valid URL is sent on
  to the same URL without the two parameters, with a cookie for this app that holds the expiry and a MAC
  (never the key): it opens the app's other requests (scripts, XHR, WebSocket) until the URL's expiry,
  and stops with a rotation like the URL. Over HTTPS it is ``SameSite=None; Partitioned`` so that it
  works in a third-party iframe; over plain HTTP browsers allow only ``Lax``.
- Everything else (an API client, a WebSocket upgrade) is forwarded directly.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Final

from gateway.tokens import signed_cookie_mac, signed_url_scope, url_signature

SIGNATURE_PARAM: Final = b"signature"
EXPIRES_PARAM: Final = b"expires"
COOKIE_NAME: Final = b"gw_signed"
# Answers: the edge-made errors (gateway.errors.EDGE_ERRORS) of a refused signed URL, or OK.
OK: Final = "ok"
INVALID: Final = "signature_invalid"
EXPIRED: Final = "signature_expired"
MAX_EXPIRES_DIGITS: Final = 12  # unix seconds far past any useful expiry; more is no number we signed
SEC_FETCH_MODE: Final = b"sec-fetch-mode"


def split_params(target: bytes) -> tuple[bytes, list[bytes], list[bytes]]:
    """The target without its ``signature`` and ``expires`` parameters (the other parameters byte for
    byte, in order; no ``?`` when none is left), and the values of each, in order."""
    path, sep, query = target.partition(b"?")
    signatures: list[bytes] = []
    expires: list[bytes] = []
    if not sep:
        return target, signatures, expires
    kept: list[bytes] = []
    for param in query.split(b"&"):
        name, _, value = param.partition(b"=")
        if name == SIGNATURE_PARAM:
            signatures.append(value)
        elif name == EXPIRES_PARAM:
            expires.append(value)
        else:
            kept.append(param)
    if not signatures and not expires:
        return target, signatures, expires
    return (path + b"?" + b"&".join(kept)) if kept else path, signatures, expires


def parse_expires(text: bytes) -> int:
    """Unix seconds as a plain decimal number; -1 for anything else (signs, spaces, too many digits)."""
    if not text or len(text) > MAX_EXPIRES_DIGITS or not text.isdigit():
        return -1
    return int(text)


def grants(share_id: str | None) -> tuple[str, ...]:
    """What a signature may grant on a port: its current share's URLs, and the app-url call's ("")."""
    return (share_id, "") if share_id else ("",)


def check(
    signatures: Sequence[bytes], expires: Sequence[bytes], vm_id: str, port: int, share_id: str | None,
    key: bytes, key_version: int, now: float,
) -> tuple[str, int, str]:  # fmt: skip
    """(OK, INVALID or EXPIRED; the expiry; the grant that matched) for a URL's parameters. One of each
    exactly: a repeated one is invalid (the app must never be left a second value the edge did not
    check)."""
    if len(signatures) != 1 or len(expires) != 1:
        return INVALID, 0, ""
    expiry = parse_expires(expires[0])
    if expiry < 0:
        return INVALID, 0, ""
    presented = signatures[0]
    for grant in grants(share_id):
        expected = url_signature(key, signed_url_scope(vm_id, port, expiry, key_version, grant)).encode()
        if hmac.compare_digest(expected, presented):
            return (OK if now < expiry else EXPIRED), expiry, grant
    return INVALID, 0, ""


def is_navigation(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """A browser loading a page or an iframe (Fetch Metadata), which can be sent on with a cookie."""
    for name, value in headers:
        if name.lower() == SEC_FETCH_MODE:
            return value.strip().lower() == b"navigate"
    return False


def cookie_value(vm_id: str, port: int, expires: int, grant: str, key: bytes, key_version: int) -> bytes:
    """The cookie for a checked URL: its expiry and a MAC of what it grants, ``<expires>.<mac>``."""
    scope = signed_url_scope(vm_id, port, expires, key_version, grant)
    return b"%d.%s" % (expires, signed_cookie_mac(key, scope).encode())


def cookie_opens(
    headers: Sequence[tuple[bytes, bytes]], vm_id: str, port: int, share_id: str | None, key: bytes,
    key_version: int, now: float,
) -> bool:  # fmt: skip
    """Whether one of the request's signed-URL cookies opens this app now (unexpired, under the current
    key, for the port's current grants)."""
    for value in presented_cookies(headers):
        expiry_text, dot, mac = value.partition(b".")
        expiry = parse_expires(expiry_text)
        if not dot or expiry < 0 or now >= expiry:
            continue
        for grant in grants(share_id):
            scope = signed_url_scope(vm_id, port, expiry, key_version, grant)
            if hmac.compare_digest(signed_cookie_mac(key, scope).encode(), mac):
                return True
    return False


def presented_cookies(headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """Every value of the signed-URL cookie the request carries (a browser may send one per path)."""
    found: list[bytes] = []
    for name, value in headers:
        if name.lower() == b"cookie":
            for pair in value.split(b";"):
                key, _, cookie = pair.strip().partition(b"=")
                if key == COOKIE_NAME:
                    found.append(cookie)
    return found


def cookie_header(value: bytes, path: bytes, max_age: int, *, secure: bool) -> tuple[bytes, bytes]:
    """Host-only, HttpOnly, scoped to the app's path, gone at the URL's expiry. Over HTTPS also usable
    in a third-party iframe (SameSite=None, partitioned per embedding site); plain HTTP allows only Lax."""
    same_site = b"; Secure; SameSite=None; Partitioned" if secure else b"; SameSite=Lax"
    attributes = b"; Path=%s; Max-Age=%d; HttpOnly" % (path, max(1, max_age))
    return b"Set-Cookie", COOKIE_NAME + b"=" + value + attributes + same_site
