"""Secrets as the gateway keeps them (pure): the one hash of an API key or access token, the edge's
cookie MAC, and signed URLs' HMAC.

Redis holds only hashes, so an API key is looked up by the hash of what the client sent (nothing secret
is compared byte by byte) and a route never carries a usable secret. The edge's cookie holds a MAC of one
app keyed by a token's hash, never the token. The API (minting share tokens), the key store and the edge
(checking tokens and cookies) all compute these here, so they can never disagree.

The one secret Redis holds as it is: each VM's URL key (``VmRecord.url_key``), since an edge must compute
a signed URL's HMAC, which no hash of the key allows. It opens nothing by itself (no edge takes a key, only
signatures), the API never shows it, and rotating it revokes every URL it signed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

# The platform's API keys: recognised by this prefix (the edge strips them from requests to apps).
KEY_PREFIX = "gk_"


def token_hash(token: str | bytes) -> str:
    """SHA-256, hex: what Redis holds for an API key or an access token."""
    raw = token.encode("utf-8", "surrogatepass") if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


def cookie_scope(vm_id: str, port: int) -> bytes:
    """What a cookie is bound to: one app (a VM's port), whatever host form reached it."""
    return b"%s:%d" % (vm_id.encode(), port)


def cookie_value(token_sha256: str, scope: bytes) -> bytes:
    """The edge's cookie for a token (by its hash) and an app: HMAC-SHA256, hex."""
    return hmac.new(token_sha256.encode(), scope, hashlib.sha256).hexdigest().encode()


def cookie_values(tokens_sha256: Iterable[str], scope: bytes) -> frozenset[bytes]:
    """Every cookie that opens the app: one per accepted token (computed once per cached route)."""
    return frozenset(cookie_value(token, scope) for token in tokens_sha256)


# Signed URLs: a URL that opens one app (a VM's port) until a time, with an HMAC-SHA256 keyed by the VM's
# URL key (random, rotated on request: every URL signed before stops working). What is signed is what
# the URL grants: the VM, the port, the expiry, the key's version, and the share it came from ("" for the
# app-url call's), so a URL made from a share stops when that share is revoked or replaced.
URL_KEY_BYTES = 32


def signed_url_scope(vm_id: str, port: int, expires: int, key_version: int, share_id: str) -> bytes:
    """The bytes a signed URL's signature covers (one field a line: none can spill into another)."""
    fields = (vm_id.encode(), port, expires, key_version, share_id.encode())
    return b"gw-signed-url\n%s\n%d\n%d\n%d\n%s" % fields


def url_signature(key: bytes, scope: bytes) -> str:
    """A signed URL's ``signature`` parameter: HMAC-SHA256 of its scope, hex."""
    return hmac.new(key, scope, hashlib.sha256).hexdigest()


def signed_cookie_mac(key: bytes, scope: bytes) -> str:
    """The MAC in the cookie a signed URL is traded for (another message than the URL's signature, so
    neither stands for the other)."""
    return hmac.new(key, b"cookie\n" + scope, hashlib.sha256).hexdigest()
