"""Secrets as the gateway keeps them (pure): the one hash of an API key or access token, and the edge's
cookie MAC.

Redis holds only hashes, so an API key is looked up by the hash of what the client sent (nothing secret
is compared byte by byte) and a route never carries a usable secret. The edge's cookie holds a MAC of one
app keyed by a token's hash, never the token. The API (minting share tokens), the key store and the edge
(checking tokens and cookies) all compute these here, so they can never disagree.
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
