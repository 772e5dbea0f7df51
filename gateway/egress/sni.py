"""The name a connection asks for, read from its first bytes without terminating anything (pure).

- TLS: the ``server_name`` extension of the ClientHello (RFC 6066), which may span several records.
- HTTP/1: the ``Host`` header of the request head.

``read_tls_name`` and ``read_http_host`` return ``NEED_MORE`` until the bytes decide, then the name, or
None when there is none or the bytes are not what they should be (the proxy then judges the connection
by its address alone, or refuses it). Inputs are capped: a peer that never completes its hello or head
gets None at ``MAX_HELLO_BYTES``.
"""

from __future__ import annotations

from typing import Final

MAX_HELLO_BYTES: Final = 16 * 1024
NEED_MORE: Final = "need-more"

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0


def _handshake_bytes(data: bytes) -> bytes | str | None:
    """The handshake messages carried by the TLS records at the start of ``data`` (NEED_MORE while the
    first message is incomplete), or None when these are not TLS handshake records."""
    out = bytearray()
    pos = 0
    while pos + 5 <= len(data):
        kind, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3 : pos + 5], "big")
        if kind != _HANDSHAKE or major != 3 or length == 0 or length > 1 << 14:
            return None
        end = pos + 5 + length
        out += data[pos + 5 : end]
        if end > len(data):
            break
        pos = end
        if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4], "big"):
            return bytes(out)
    if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4], "big"):
        return bytes(out)
    return NEED_MORE if len(data) < MAX_HELLO_BYTES else None


def read_tls_name(data: bytes) -> str | None:
    """The SNI host name of a ClientHello at the start of ``data`` (lower case), None, or NEED_MORE."""
    handshake = _handshake_bytes(data)
    if not isinstance(handshake, bytes):
        return handshake
    if handshake[0] != _CLIENT_HELLO:
        return None
    body = handshake[4 : 4 + int.from_bytes(handshake[1:4], "big")]
    try:
        pos = 2 + 32  # legacy version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        if pos == len(body):
            return None  # no extensions
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        if end > len(body):
            return None
        while pos + 4 <= end:
            ext_type = int.from_bytes(body[pos : pos + 2], "big")
            ext_len = int.from_bytes(body[pos + 2 : pos + 4], "big")
            ext = body[pos + 4 : pos + 4 + ext_len]
            if len(ext) != ext_len:
                return None
            if ext_type == _SERVER_NAME:
                return _server_name(ext)
            pos += 4 + ext_len
    except IndexError:
        return None
    return None


def _server_name(ext: bytes) -> str | None:
    if len(ext) < 2:
        return None
    end = 2 + int.from_bytes(ext[0:2], "big")
    pos = 2
    while pos + 3 <= min(end, len(ext)):
        kind, length = ext[pos], int.from_bytes(ext[pos + 1 : pos + 3], "big")
        name = ext[pos + 3 : pos + 3 + length]
        if kind == _HOST_NAME:
            return _clean_name(name)
        pos += 3 + length
    return None


def _clean_name(raw: bytes) -> str | None:
    """A host name as bytes on the wire: ASCII letters, digits, dots, dashes (and underscores, which some
    hosts use); anything else is no name."""
    try:
        name = raw.decode("ascii").lower().removesuffix(".")
    except UnicodeDecodeError:
        return None
    if not name or len(name) > 253 or not all(c.isalnum() or c in ".-_" for c in name):
        return None
    if all(part.isdigit() for part in name.split(".")):
        return None  # an address written as a host names nothing
    return name


def read_http_host(data: bytes) -> str | None:
    """The Host of an HTTP/1 request head at the start of ``data`` (without a port), None, or NEED_MORE."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return NEED_MORE if len(data) < MAX_HELLO_BYTES else None
    lines = data[:end].split(b"\r\n")
    request = lines[0].split(b" ")
    if len(request) != 3 or not request[2].startswith(b"HTTP/1."):
        return None
    hosts = [line.split(b":", 1)[1].strip() for line in lines[1:] if line[:5].lower() == b"host:"]
    if len(hosts) != 1:
        return None  # none, or several (a smuggling attempt): no name
    host = hosts[0]
    if host.startswith(b"["):
        return None  # an IPv6 literal names no host
    return _clean_name(host.rsplit(b":", 1)[0] if b":" in host else host)
