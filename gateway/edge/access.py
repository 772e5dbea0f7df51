"""Private routes: the access token a client shows, and the cookie the edge trades it for (pure).

A private share is opened with its token, a browser instance with any API key of its organisation. The
token comes in a header (``X-Access-Token``; for an instance also ``Authorization: Bearer``), in a cookie
the edge set, or once in the query (``?gw_access_token=...``): the edge then answers with a redirect to
the same URL without the token and an HttpOnly cookie scoped to that app (host-only, and to the app's
path prefix in the path form), so the token does not linger in the address bar, history or the app's
logs. None of these reach the VM.

Tokens are compared by their SHA-256 hashes (``gateway.tokens``, what Redis holds), so a route never
carries a usable secret.
The cookie does not hold the token either: it holds a MAC of the app (VM and port) keyed by the token's
hash. So a cookie opens only the app it was set for (an instance's cookie is no organisation API key),
and stops opening it when the token is revoked, like the token itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

# The hash and the cookie MAC are computed in gateway.tokens (shared with the key store and the API);
# re-exported here because the edge's connection code names them through this module.
from gateway.tokens import KEY_PREFIX, cookie_scope, cookie_value, cookie_values, token_hash

from .signed import COOKIE_NAME as SIGNED_COOKIE_NAME

__all__ = ["cookie_scope", "cookie_value", "cookie_values", "token_hash"]

TOKEN_HEADER: Final = b"x-access-token"
AUTHORIZATION: Final = b"authorization"
# Request headers that carry the gateway's credentials, lower-case: never forwarded to the VM.
TOKEN_HEADERS: Final = frozenset({TOKEN_HEADER})
BEARER_TOKEN_HEADERS: Final = frozenset({TOKEN_HEADER, AUTHORIZATION})
TOKEN_QUERY_PARAM: Final = b"gw_access_token"
COOKIE_NAME: Final = b"gw_access"
# The gateway's cookies, taken out of every request to an app: this one, and a signed URL's (edge.signed).
COOKIE_NAMES: Final = frozenset({COOKIE_NAME, SIGNED_COOKIE_NAME})
# The platform's own API keys, which a client may send to an app by habit or by mistake (the SDK's
# X-API-Key, a Bearer header, an api_key parameter): recognised by their format, so that an app's own
# X-API-Key or Authorization passes untouched.
PLATFORM_KEY_PREFIX: Final = KEY_PREFIX.encode()
API_KEY_HEADER: Final = b"x-api-key"
API_KEY_QUERY_PARAM: Final = b"api_key"


def token_matches(token: bytes | None, accepted_sha256: frozenset[str]) -> bool:
    """Whether the token is one of those accepted (looked up by hash: nothing secret is compared)."""
    return token is not None and token_hash(token) in accepted_sha256


def is_platform_key_header(lower_name: bytes, value: bytes) -> bool:
    """``X-API-Key: gk_...`` or ``Authorization: Bearer gk_...`` (``lower_name`` is lower-case)."""
    if lower_name == API_KEY_HEADER:
        return value.strip().startswith(PLATFORM_KEY_PREFIX)
    if lower_name == AUTHORIZATION:
        scheme, _, credentials = value.strip().partition(b" ")
        return scheme.lower() == b"bearer" and credentials.strip().startswith(PLATFORM_KEY_PREFIX)
    return False


def platform_key(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The platform API key a request carries in X-API-Key or Authorization: Bearer, if any."""
    for name, value in headers:
        lower = name.lower()
        if is_platform_key_header(lower, value):
            value = value.strip()
            return value if lower == API_KEY_HEADER else value.partition(b" ")[2].strip()
    return None


def strip_platform_key_params(target: bytes) -> bytes:
    """The target without ``api_key`` parameters holding a platform key (others are the app's)."""
    path, sep, query = target.partition(b"?")
    if not sep or query.find(PLATFORM_KEY_PREFIX) < 0:
        return target
    kept = []
    for param in query.split(b"&"):
        name, _, value = param.partition(b"=")
        if not (name == API_KEY_QUERY_PARAM and value.startswith(PLATFORM_KEY_PREFIX)):
            kept.append(param)
    return (path + b"?" + b"&".join(kept)) if kept else path


def split_token_from_target(target: bytes) -> tuple[bytes, bytes | None]:
    """Remove the token parameter from a request target; returns (clean target, token or None)."""
    path, sep, query = target.partition(b"?")
    if not sep:
        return target, None
    token = None
    kept = []
    for param in query.split(b"&"):
        name, _, value = param.partition(b"=")
        if name == TOKEN_QUERY_PARAM:
            token = value
        else:
            kept.append(param)
    if token is None:
        return target, None
    return (path + b"?" + b"&".join(kept)) if kept else path, token


def presented_token(headers: Sequence[tuple[bytes, bytes]], *, bearer: bool = False) -> bytes | None:
    """The token from the header, or from ``Authorization: Bearer`` when ``bearer``."""
    for name, value in headers:
        lower = name.lower()
        if lower == TOKEN_HEADER:
            return value.strip()
        if bearer and lower == AUTHORIZATION:
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
    return None


def presented_cookie(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"cookie":
            for pair in value.split(b";"):
                key, _, cookie = pair.strip().partition(b"=")
                if key == COOKIE_NAME:
                    return cookie
    return None


def opens(
    headers: Sequence[tuple[bytes, bytes]], tokens_sha256: frozenset[str], cookies: frozenset[bytes],
    *, bearer: bool = False,
) -> bool:  # fmt: skip
    """Whether the request may use a private app: its token (a header wins over the cookie), else the
    edge's cookie for this app."""
    token = presented_token(headers, bearer=bearer)
    if token is not None:
        return token_matches(token, tokens_sha256)
    cookie = presented_cookie(headers)
    return cookie is not None and cookie in cookies


def cookie_header(value: bytes, path: bytes, *, secure: bool) -> tuple[bytes, bytes]:
    """Host-only (no Domain), HttpOnly, scoped to the app's path; Secure over HTTPS."""
    if any(c in value for c in b";\r\n ,"):
        raise ValueError("the value has characters a cookie cannot carry")
    attributes = b"; Path=%s; HttpOnly; SameSite=Lax" % path + (b"; Secure" if secure else b"")
    return b"Set-Cookie", COOKIE_NAME + b"=" + value + attributes
