"""What the edge does with a request, decided from facts alone: the routing policy, pure.

``EdgeProtocol`` gathers the facts (the parsed target, the connection's scheme and TLS name, the route
the cache or Redis gave) and carries the decision out (writes, lookups, pooled connections). The policy
itself lives here, with no I/O, so a table of cases tests it (``tests/unit/test_routing.py``).

Two steps, because the route lookup between them may leave the parser's callbacks for a task:

- ``before_lookup``: a refused target, 421 for a name outside the connection's certificate, the
  redirect to https, the control plane, or the route-cache key of an app;
- ``after_lookup``: no route, a query token traded for a cookie (303), a private app's missing
  credentials (the same 404 as no route: no oracle), a body known to be too large (413), or the
  request target to forward.

On the hot path (an app whose route is cached, no token) nothing is made here but the forwarded target:
the cache key comes with the parsed target, fixed answers are module constants, and the arguments are
positional (this runs for every request).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import access
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


NO_ROUTE = Reply("no_route")
SUSPENDED = Reply("vm_suspended")


@dataclass(frozen=True, slots=True)
class Wake:
    """Hold the request while its suspended VM (made with auto_resume) resumes, then route it again."""


WAKE = Wake()
# The connection's certificate was chosen for another name (RFC 9110 section 15.5.20).
MISDIRECTED = Reply("misdirected_request", close=True)


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
        if route.tokens is not None:
            request_target, token = access.split_token_from_target(request_target)
            if token is not None:
                return _token_for_cookie(target, route, token, url, scheme)
            if not access.opens(headers, route.tokens, route.cookies, bearer=route.bearer):
                return NO_ROUTE  # the same answer as an unknown app: no oracle
        elif request_target.find(access.TOKEN_QUERY_PARAM) >= 0:
            request_target, _ = access.split_token_from_target(request_target)
        if route.suspended:  # (only for those who may open it: a private app says nothing of its state)
            return WAKE if route.auto_resume else SUSPENDED
        if request_target.find(access.PLATFORM_KEY_PREFIX) >= 0:
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
