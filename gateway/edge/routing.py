"""What the edge does with a request, decided from facts alone: the routing policy, pure.

``EdgeProtocol`` gathers the facts (the parsed target, the connection's scheme and TLS name, the route
the cache or Redis gave) and carries the decision out (writes, lookups, pooled connections). The policy
itself lives here, with no I/O, so a table of cases tests it (``tests/unit/test_routing.py``).

Two steps, because the route lookup between them may leave the parser's callbacks for a task:

- ``before_lookup``: a refused target, 421 for a name outside the connection's certificate, the
  redirect to https, the control plane, or the route-cache key of an app;
- ``after_lookup``: no route, a query token traded for a cookie (303), a signed URL checked
  (``signed``: refused with 403, traded for a cookie on a browser navigation, or forwarded without its
  parameters), a private app's missing credentials (the same 404 as no route: no oracle), a body known
  to be too large (413), or the request target to forward.

On the hot path (an app whose route is cached, no token) nothing is made here but the forwarded target:
the cache key comes with the parsed target, fixed answers are module constants, and the arguments are
positional (this runs for every request).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from . import access, signed
from .target import ApiTarget, AppTarget, Rejection

if TYPE_CHECKING:
    from .resolver import Route


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer with the edge-made error ``code`` (gateway.errors.EDGE_ERRORS), closing if ``close``."""

    code: str
    message: str | None = None
    close: bool = False


@dataclass(frozen=True, slots=True)
class Redirect:
    status: int
    location: bytes
    cookie: tuple[bytes, bytes] | None = None  # a Set-Cookie header to send with it


NO_ROUTE: Final = Reply("no_route")
SUSPENDED: Final = Reply("vm_suspended")


@dataclass(frozen=True, slots=True)
class Wake:
    """Hold the request while its suspended VM (made with auto_resume) resumes, then route it again."""


WAKE: Final = Wake()
# The connection's certificate was chosen for another name (RFC 9110 section 15.5.20).
MISDIRECTED: Final = Reply("misdirected_request", close=True)


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """The settings the decisions read, fixed for an edge process."""

    https_redirect_port: int  # 0: plain HTTP is served, not redirected
    plain_http_paths: tuple[bytes, ...]  # served over plain HTTP even when redirecting (ACME HTTP-01)

    def before_lookup(
        self, target: AppTarget | ApiTarget | Rejection, url: bytes, scheme: str, sni_name: bytes | None
    ) -> Reply | Redirect | ApiTarget | AppTarget:
        """What to do before any route is known: answer, redirect, go to the API, or look up the app's
        route by its key (``AppTarget.key``)."""
        if isinstance(target, Rejection):
            if target.location is not None:
                return Redirect(target.status, target.location)
            return Reply(target.code, target.message, close=target.status == 400)
        if sni_name is not None and target.host_name != sni_name:
            return MISDIRECTED
        if self.https_redirect_port and scheme == "http" and not url.startswith(self.plain_http_paths):
            port = self.https_redirect_port
            location = b"https://" + target.host_name + (b"" if port == 443 else b":%d" % port) + url
            return Redirect(308, location)
        return target

    def after_lookup(
        self,
        target: AppTarget,
        route: Route | None,
        url: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        scheme: str,
        max_body: int,
        content_length: int | None,
        body_bytes_so_far: int,
    ) -> Reply | Redirect | Wake | bytes:
        """With the route looked up: answer, redirect, wake its VM, or the request target to send to the
        VM (the gateway's own token and credentials taken out of it)."""
        if route is None:
            return NO_ROUTE
        request_target = target.upstream_target
        url_key = route.url_key
        # Tokens, signatures and platform keys are all query parameters: most targets have no query,
        # and a bytes method called from the compiled edge costs about 600 instructions.
        query = request_target.find(b"?") >= 0
        if route.tokens is not None:
            request_target, token = access.split_token_from_target(request_target)
            if token is not None:
                return _token_for_cookie(target, route, token, url, scheme)
            answer: Reply | Redirect | bytes | None = None
            if query and url_key is not None and request_target.find(signed.SIGNATURE_PARAM) >= 0:
                answer = _signed_url(
                    target, route, url_key, request_target, url, headers, scheme, content_length
                )
            if answer is not None:
                if not isinstance(answer, bytes):
                    return answer  # refused (403), or sent on with a cookie
                request_target = answer
            elif not access.opens(headers, route.tokens, route.cookies, bearer=route.bearer) and not (
                url_key is not None and _signed_cookie_opens(route, url_key, headers)
            ):
                return NO_ROUTE  # the same answer as an unknown app: no oracle
        elif query:
            if request_target.find(access.TOKEN_QUERY_PARAM) >= 0:
                request_target, _ = access.split_token_from_target(request_target)
            if url_key is not None and request_target.find(signed.SIGNATURE_PARAM) >= 0:
                request_target = _without_authentic_signature(route, url_key, request_target)
        if route.suspended:  # (only for those who may open it: a private app says nothing of its state)
            return WAKE if route.auto_resume else SUSPENDED
        if query and request_target.find(access.PLATFORM_KEY_PREFIX) >= 0:
            request_target = access.strip_platform_key_params(request_target)
        # The length says the body is too large, or a chunked body read before the route was known
        # already passed the limit.
        if max_body and ((content_length or 0) > max_body or body_bytes_so_far > max_body):
            return body_too_large(max_body)
        return request_target


def body_too_large(max_body: int) -> Reply:
    return Reply("body_too_large", f"the request body is larger than {max_body} bytes", close=True)


def _token_for_cookie(
    target: AppTarget, route: Route, token: bytes, url: bytes, scheme: str
) -> Reply | Redirect:
    """A token in the query: a valid one becomes a cookie for this app only, and the client goes to the
    same URL without it; an invalid one is no route."""
    if not access.token_matches(token, route.tokens or frozenset()):
        return NO_ROUTE
    clean, _ = access.split_token_from_target(url)
    cookie_path = target.prefix + b"/" if target.prefix is not None else b"/"
    value = access.cookie_value(access.token_hash(token), access.cookie_scope(route.vm_id, route.port))
    return Redirect(303, clean, access.cookie_header(value, cookie_path, secure=scheme == "https"))


def _signed_url(
    target: AppTarget, route: Route, key: bytes, request_target: bytes, url: bytes,
    headers: Sequence[tuple[bytes, bytes]], scheme: str, content_length: int | None,
) -> Reply | Redirect | bytes | None:  # fmt: skip
    """A private app's request with ``signature``/``expires`` in its query (None: it has neither): 403
    when refused; else the target without them, or for a browser navigation a redirect there with the
    cookie that opens the app until the URL's expiry."""
    clean, signatures, expires = signed.split_params(request_target)
    if not signatures and not expires:
        return None
    now = time.time()
    verdict, expiry, grant = signed.check(
        signatures, expires, route.vm_id, route.port, route.share_id, key, route.url_key_version, now
    )
    if verdict != signed.OK:
        return Reply(verdict)
    if not content_length and signed.is_navigation(headers):  # (a form's body is not redirected)
        location, _, _ = signed.split_params(url)
        value = signed.cookie_value(route.vm_id, route.port, expiry, grant, key, route.url_key_version)
        cookie_path = target.prefix + b"/" if target.prefix is not None else b"/"
        cookie = signed.cookie_header(value, cookie_path, int(expiry - now), secure=scheme == "https")
        return Redirect(303, location, cookie)
    return clean


def _signed_cookie_opens(route: Route, key: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return signed.cookie_opens(
        headers, route.vm_id, route.port, route.share_id, key, route.url_key_version, time.time()
    )


def _without_authentic_signature(route: Route, key: bytes, request_target: bytes) -> bytes:
    """A public app needs no signature: one this VM's key made (valid or expired) is taken out; anything
    else under those names is the app's own and goes through untouched."""
    clean, signatures, expires = signed.split_params(request_target)
    if not signatures:
        return request_target
    verdict, _, _ = signed.check(
        signatures, expires, route.vm_id, route.port, route.share_id, key, route.url_key_version, time.time()
    )
    return request_target if verdict == signed.INVALID else clean
