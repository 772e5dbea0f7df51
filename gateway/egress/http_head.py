"""An HTTP/1.x request head as the egress proxy reads it where it opens a connection (vault hosts only):
strict parsing, and the head written back after the proxy changed its headers (pure).

Strict, because what is forwarded must be read the same way by the destination: a head with a bare LF,
an obsolete line folding, a header name with spaces or a line without a colon is refused, not guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024
TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Headers of one hop: the proxy decides them for the connection it makes.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer"})


class BadHead(ValueError):
    """Not a request head the proxy forwards."""


@dataclass(frozen=True)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]

    @property
    def path(self) -> str:
        """The target without its query (what a request log keeps: a query may carry secrets)."""
        return self.target.split(b"?", 1)[0].split(b"#", 1)[0].decode("latin-1")

    def upgrading(self) -> bool:
        return any(name.lower() == b"upgrade" for name, _ in self.headers)


def parse_request_head(head: bytes) -> RequestHead:
    """``head``: the bytes before the blank line (no final CRLF CRLF)."""
    bare = head.replace(b"\r\n", b"")
    if b"\n" in bare or b"\r" in bare or b"\x00" in head:
        raise BadHead("a bare CR or LF, or a NUL")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= TOKEN_CHARS or not parts[1]:
        raise BadHead("not a request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadHead("not HTTP/1.x")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not set(name) <= TOKEN_CHARS:
            raise BadHead("not a header line")
        headers.append((name, value.strip(b" \t")))
    return RequestHead(method, target, version, headers)


def one_request(head: RequestHead) -> RequestHead:
    """The head for a connection that carries this request only (``Connection: close``), so every request
    to a vault host passes the proxy's substitution and log; an upgrade (a WebSocket) is left as asked."""
    if head.upgrading():
        return head
    kept = [(n, v) for n, v in head.headers if n.lower() not in HOP_BY_HOP]
    return RequestHead(head.method, head.target, head.version, [*kept, (b"Connection", b"close")])


def render_request_head(head: RequestHead) -> bytes:
    lines = [b" ".join((head.method, head.target, head.version))]
    lines += [name + b": " + value for name, value in head.headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def response_status(first: bytes) -> int | None:
    """The status code of a response whose first bytes are ``first`` (None: not an HTTP/1.x status)."""
    line = first.split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and len(parts[1]) == 3 and parts[1].isdigit():
        return int(parts[1])
    return None
