"""Request and response header rewriting at the edge.

Pure: headers are ``list[tuple[bytes, bytes]]`` (name as received, value), in order. Framing
(Content-Length, Transfer-Encoding) and the Upgrade handshake are the caller's: it re-frames every body
and re-adds ``Connection: Upgrade`` itself, so nothing here passes framing through.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from .access import API_KEY_HEADER, AUTHORIZATION, TOKEN_HEADER, is_platform_key_header
from .target import SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER

Headers = Sequence[tuple[bytes, bytes]]

HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# A Connection header may name any header as hop-by-hop; naming Host would leave the VM with a request
# it must refuse (HTTP/1.1 requires Host), so that one name is never removed that way.
_NEVER_NOMINATED: Final = frozenset({b"host"})
# Headers whose meaning is "what a proxy saw": believed only from a trusted proxy.
_FORWARDING: Final = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
        b"x-real-ip",
        b"forwarded",
        b"x-request-id",  # the edge sets its own, keeping a trusted proxy's
    }
)
_OWS: Final = b" \t"
SANDBOX_ROUTING: Final = frozenset({SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER})
# What an untrusted client's request loses before it goes upstream (framing is re-made by the caller).
_UNTRUSTED_DROP: Final = HOP_BY_HOP | _FORWARDING | {b"content-length"}

# Each request header's class: the request parser gives one byte per header, in order (the compiled
# edge's compares names in C, without a copy), so the edge acts on a request's headers without lower-
# casing and hashing every name (on a 14-header browser request, 30 % of the edge's instructions).
# Kept: anything else, and
REQ_OTHER: Final = 0
REQ_HOST: Final = 1
REQ_CREDENTIALS: Final = 2  # what may open a private app: cookies, tokens, keys
REQ_SANDBOX: Final = 3  # header routing (target.header_form)
# and from here on, what an untrusted client's request loses (_UNTRUSTED_DROP):
REQ_FIRST_DROPPED: Final = 4
REQ_CONTENT_LENGTH: Final = 4
REQ_TRANSFER_ENCODING: Final = 5
REQ_REQUEST_ID: Final = 6
REQ_CONNECTION: Final = 7
REQ_DROPPED: Final = 8  # the rest of the hop-by-hop and forwarding headers
REQUEST_NAME_CLASSES: Final[dict[bytes, int]] = {
    **dict.fromkeys(_UNTRUSTED_DROP, REQ_DROPPED),
    b"content-length": REQ_CONTENT_LENGTH,
    b"transfer-encoding": REQ_TRANSFER_ENCODING,
    b"x-request-id": REQ_REQUEST_ID,
    b"connection": REQ_CONNECTION,
    b"host": REQ_HOST,
    **dict.fromkeys((b"cookie", TOKEN_HEADER, AUTHORIZATION, API_KEY_HEADER), REQ_CREDENTIALS),
    SANDBOX_ID_HEADER: REQ_SANDBOX,
    SANDBOX_PORT_HEADER: REQ_SANDBOX,
}


def request_name_classes(headers: Headers) -> bytes:
    """The class of each header's name (the pure edge's parser; the compiled one's does this in C)."""
    return bytes([REQUEST_NAME_CLASSES.get(name.lower(), REQ_OTHER) for name, _ in headers])


@dataclass(frozen=True, slots=True)
class ClientInfo:
    peer_ip: str  # socket peer
    scheme: str  # "http" or "https"
    host: bytes  # validated Host header value
    trusted: bool  # the peer is a configured trusted proxy
    # What an untrusted client's requests carry upstream, made once (the edge keeps one per connection).
    forwarding: tuple[tuple[bytes, bytes], ...] = field(init=False)

    def __post_init__(self) -> None:
        peer = _peer(self)
        scheme = self.scheme.encode("ascii")
        forwarding = (
            (b"X-Forwarded-For", peer),
            (b"X-Forwarded-Proto", scheme),
            (b"X-Forwarded-Host", self.host),
            (b"Forwarded", _forwarded_element(self)),
        )
        object.__setattr__(self, "forwarding", forwarding)  # frozen: the one way to set it


def _tokens(value: bytes) -> Iterable[bytes]:
    for part in value.split(b","):
        token = part.strip(_OWS).lower()
        if token:
            yield token


def connection_tokens(headers: Headers) -> set[bytes]:
    """Lower-cased tokens from every Connection header."""
    return {token for name, value in headers if name.lower() == b"connection" for token in _tokens(value)}


def strip_hop_by_hop(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Remove the fixed hop-by-hop headers and every header a Connection header names."""
    return _without(headers, HOP_BY_HOP)


def _without(headers: Headers, drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """Headers minus the names in ``drop`` (which always holds "connection") and minus those a
    Connection header nominates.

    One pass that lower-cases each name once: this runs twice per proxied request. A request rarely
    has a Connection header; when it has one, the names it lists may come before it, so that case
    starts over with the nominated names added.
    """
    kept = []
    for header in headers:
        low = header[0].lower()
        if low not in drop:
            kept.append(header)
        elif low == b"connection":
            return _without_nominated(headers, drop)
    return kept


def _without_classified(headers: Headers, classes: bytes) -> list[tuple[bytes, bytes]]:
    """``_without(headers, _UNTRUSTED_DROP)`` by the headers' classes: no name is lower-cased. A
    Connection header that names only what goes anyway (``keep-alive``, ``upgrade``...) changes
    nothing; one naming anything else takes the general way."""
    kept = []
    for i in range(len(classes)):
        kind = classes[i]
        if kind < REQ_FIRST_DROPPED:
            kept.append(headers[i])
        elif kind == REQ_CONNECTION and not _names_only_dropped(headers[i][1]):
            return _without_nominated(headers, _UNTRUSTED_DROP)
    return kept


def _names_only_dropped(connection: bytes) -> bool:
    for token in _tokens(connection):
        if token not in _UNTRUSTED_DROP and token not in _NEVER_NOMINATED:
            return False
    return True


def _without_nominated(headers: Headers, drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    nominated = {
        token for name, value in headers if name.lower() == b"connection" for token in _tokens(value)
    }
    drop = drop | (nominated - _NEVER_NOMINATED)
    return [header for header in headers if header[0].lower() not in drop]


def _forwarded_element(client: ClientInfo) -> bytes:
    # RFC 7239: an IPv6 node is bracketed and then quoted (":" is not a token character); an unknown
    # peer (e.g. a unix socket) is spelled "unknown".
    peer = _peer(client)
    node = b'"[' + peer + b']"' if peer.find(b":") >= 0 else peer
    host = b'"' + client.host + b'"' if client.host.find(b":") >= 0 else client.host
    return b"for=" + node + b";proto=" + client.scheme.encode("ascii") + b";host=" + host


def _peer(client: ClientInfo) -> bytes:
    return client.peer_ip.encode("ascii") if client.peer_ip else b"unknown"


def _joined(headers: Headers, lower_name: bytes) -> bytes | None:
    values = [value.strip(_OWS) for name, value in headers if name.lower() == lower_name]
    values = [v for v in values if v]
    return b", ".join(values) if values else None


def forwarded_headers(
    headers: Headers, client: ClientInfo, prefix: bytes | None, classes: bytes | None = None
) -> list[tuple[bytes, bytes]]:
    """The request headers to send upstream (``classes``: their ``request_name_classes``, as the
    parser gave them).

    Hop-by-hop headers and Content-Length are removed (the caller re-frames the body). From an
    untrusted peer every forwarding header is the client's claim and is replaced; from a trusted proxy
    the chain is extended instead. Host is kept as received: the VM sees what the client asked for.
    """
    if client.trusted:
        return _extended_forwarded_headers(headers, client, prefix)
    if classes is None:
        classes = request_name_classes(headers)
    out = _without_classified(headers, classes)
    out += client.forwarding
    if prefix is not None:
        out.append((b"X-Forwarded-Prefix", prefix))
    return out


def _extended_forwarded_headers(
    headers: Headers, client: ClientInfo, prefix: bytes | None
) -> list[tuple[bytes, bytes]]:
    kept = strip_hop_by_hop(headers)
    peer = _peer(client)
    element = _forwarded_element(client)
    xff: bytes = peer
    forwarded: bytes = element
    previous_xff = _joined(kept, b"x-forwarded-for")
    previous_forwarded = _joined(kept, b"forwarded")
    if previous_xff is not None:
        xff = previous_xff + b", " + peer
    if previous_forwarded is not None:
        forwarded = previous_forwarded + b", " + element
    proto = _joined(kept, b"x-forwarded-proto") or client.scheme.encode("ascii")
    fwd_host = _joined(kept, b"x-forwarded-host") or client.host
    replaced = {
        b"x-forwarded-for",
        b"forwarded",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"content-length",
    }
    if prefix is not None:
        replaced.add(b"x-forwarded-prefix")
    out = [(name, value) for name, value in kept if name.lower() not in replaced]
    out.append((b"X-Forwarded-For", xff))
    out.append((b"X-Forwarded-Proto", proto))
    out.append((b"X-Forwarded-Host", fwd_host))
    out.append((b"Forwarded", forwarded))
    if prefix is not None:
        out.append((b"X-Forwarded-Prefix", prefix))
    return out


def upgrade_protocol(headers: Headers) -> bytes | None:
    """The lower-cased Upgrade value when this is an upgrade request, else None.

    When any offered protocol is h2c the answer is exactly b"h2c", so a caller that refuses h2c cannot
    be slipped past with ``Upgrade: h2c, websocket``.
    """
    if b"upgrade" not in connection_tokens(headers):
        return None
    value = _joined(headers, b"upgrade")
    if value is None:
        return None
    offered = list(_tokens(value))
    if not offered:
        return None
    if any(token.partition(b"/")[0] == b"h2c" for token in offered):
        return b"h2c"
    return b", ".join(offered)


def is_websocket_upgrade(headers: Headers) -> bool:
    """An upgrade request (Connection: upgrade + Upgrade) offering the websocket protocol."""
    protocol = upgrade_protocol(headers)
    if protocol is None:
        return False
    return any(token.partition(b"/")[0] == b"websocket" for token in _tokens(protocol))


def with_host(headers: Headers, host: bytes) -> list[tuple[bytes, bytes]]:
    """The request's headers with ``host`` as its Host (a request reaching the edge has exactly one)."""
    return [(name, host) if name.lower() == b"host" else (name, value) for name, value in headers]


def strip_sandbox_routing(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Header routing's X-Sandbox-Id and X-Sandbox-Port: the edge's to read, not the app's."""
    return [header for header in headers if header[0].lower() not in SANDBOX_ROUTING]


def strip_gateway_credentials(
    headers: Headers, cookie_names: frozenset[bytes], token_headers: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """Remove the gateway's own credentials so the app in the VM never sees them: the route's token
    headers and cookies, and any header that carries a platform API key.

    ``token_headers`` are lower-case names. Cookie names are case-sensitive (RFC 6265); other cookies are
    kept byte for byte, in order, and a Cookie header that loses nothing is kept exactly as received.
    """
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lower = name.lower()
        if lower in token_headers or is_platform_key_header(lower, value):
            continue
        if lower == b"cookie" and cookie_names:
            pairs = value.split(b";")
            kept = [
                p.strip(_OWS)
                for p in pairs
                if p.strip(_OWS).partition(b"=")[0].strip(_OWS) not in cookie_names
            ]
            if len(kept) != len(pairs):
                kept = [p for p in kept if p]
                if not kept:
                    continue
                value = b"; ".join(kept)
        out.append((name, value))
    return out


def check_header_limits(headers: Headers, max_count: int, max_total_bytes: int) -> bool:
    """True when within limits. Size counts name and value bytes, as the edge's parser callback does."""
    if len(headers) > max_count:
        return False
    return sum(len(name) + len(value) for name, value in headers) <= max_total_bytes


_WEBSOCKET_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def websocket_accept(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value that answers a Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip(_OWS) + _WEBSOCKET_GUID).digest())


def valid_upgrade_response(request: Headers, response: Headers) -> bool:
    """Whether a 101 answers this upgrade request with a valid handshake.

    The response must name ``Connection: upgrade`` and one of the requested protocols; for WebSocket
    its ``Sec-WebSocket-Accept`` must answer the request's key. A tunnel opens only then, so an app
    that says 101 to anything (or a request smuggled past it) does not get the raw connection.
    """
    offered = upgrade_protocol(request)
    if offered is None or b"upgrade" not in connection_tokens(response):
        return False
    chosen = _joined(response, b"upgrade")
    if chosen is None:
        return False
    chosen_names = {token.partition(b"/")[0] for token in _tokens(chosen)}
    offered_names = {token.partition(b"/")[0] for token in _tokens(offered)}
    if len(chosen_names) != 1 or not chosen_names <= offered_names:
        return False
    if chosen_names == {b"websocket"}:
        key = _joined(request, b"sec-websocket-key")
        accept = _joined(response, b"sec-websocket-accept")
        return key is not None and accept is not None and hmac.compare_digest(accept, websocket_accept(key))
    return True


def is_grpc(headers: list[tuple[bytes, bytes]]) -> bool:
    """A gRPC request (content-type application/grpc or application/grpc+<codec>; not gRPC-Web, which
    is HTTP/1.1-friendly and goes as any request)."""
    for name, value in headers:
        if name.lower() == b"content-type":
            kind = value.lower().partition(b";")[0].strip()
            return kind == b"application/grpc" or kind.startswith(b"application/grpc+")
    return False
