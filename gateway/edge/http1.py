"""HTTP/1.1 parsing for the edge: one interface, two parsers, both llhttp of the same release.

The compiled edge parses with ``http1c`` (Cython over vendor/llhttp, built with it by setup.py): a head
reaches the edge as one call. The pure edge parses with httptools through the adapters below, which
turn its per-piece callbacks into the same calls. Each twin takes the parser of its kind
(``parsers_for``), so the suite, run on both edges, runs both parsers.

A request parser calls its owner's ``on_message_begin()``, ``on_request(method, target, headers,
keep_alive, upgrade, http10, classes)``, ``on_body(data)``, ``on_message_complete()``, and, when the
target or the headers pass their limits, ``on_head_limit(code)`` (the parse then fails); ``classes`` has
a byte for each header, the class of its name (``headers.REQUEST_NAME_CLASSES``). A response parser calls
``on_message_begin()``, ``on_response(status, headers, keep_alive, names, length)``, ``on_body(data)``
and ``on_message_complete(trailers)``; ``names`` has a bit for each kind of framing header the head had,
``length`` is the Content-Length (-1: none).
Both raise httptools' exceptions (HttpParserError, HttpParserCallbackError, HttpParserUpgrade).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple, Protocol

import httptools

from gateway.edge.headers import request_name_classes
from gateway.edge.twin import COMPILED_PACKAGE

NAME_CONTENT_LENGTH: Final = 1
NAME_TRANSFER_ENCODING: Final = 2  # (also hop-by-hop)
NAME_HOP_BY_HOP: Final = 4

Headers = list[tuple[bytes, bytes]]
_NO_HEADERS: Final[Headers] = []  # between requests (on_message_begin makes the next list)


class RequestParser(Protocol):
    def feed_data(self, data: bytes) -> None: ...

    def parsed_bytes(self) -> int:
        """The target's and headers' bytes of the head being read, so far."""
        ...


class ResponseParser(Protocol):
    def feed_data(self, data: bytes) -> None: ...


class RequestParserType(Protocol):
    def __call__(self, owner: Any, max_target: int, max_count: int, max_bytes: int) -> RequestParser: ...


class ResponseParserType(Protocol):
    def __call__(self, owner: Any, hop_by_hop: Iterable[bytes]) -> ResponseParser: ...


class HttptoolsRequestParser:
    """The request parser on httptools (the pure edge's)."""

    __slots__ = (
        "header_bytes", "headers", "limits", "on_body", "on_message_begin", "on_message_complete", "owner",
        "parser", "url",
    )  # fmt: skip

    def __init__(self, owner: Any, max_target: int, max_count: int, max_bytes: int) -> None:
        self.owner = owner
        # httptools calls these straight to the owner (it looks its callbacks up once, here); what this
        # parser collects is let go at the end of each head, so a new message has nothing to reset.
        self.on_message_begin: Callable[[], None] = owner.on_message_begin
        self.on_body: Callable[[bytes], None] = owner.on_body
        self.on_message_complete: Callable[[], None] = owner.on_message_complete
        self.limits = (max_target, max_count, max_bytes)
        self.url = b""
        self.headers: Headers = _NO_HEADERS
        self.header_bytes = 0
        self.parser = httptools.HttpRequestParser(self)

    def feed_data(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def parsed_bytes(self) -> int:
        return len(self.url) + self.header_bytes

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits[0]:
            self.owner.on_head_limit("uri_too_long")
            raise httptools.HttpParserError("request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers is _NO_HEADERS:  # a new head, or a chunked request's trailers
            self.headers = []
        self.headers.append((name, value))
        self.header_bytes += len(name) + len(value)
        if len(self.headers) > self.limits[1] or self.header_bytes > self.limits[2]:
            self.owner.on_head_limit("headers_too_large")
            raise httptools.HttpParserError("headers too large")

    def on_headers_complete(self) -> None:
        parser = self.parser
        url, headers = self.url, self.headers if self.headers is not _NO_HEADERS else []
        self.url, self.headers = b"", _NO_HEADERS  # an idle connection keeps nothing of its last request
        self.header_bytes = 0
        self.owner.on_request(
            parser.get_method(), url, headers, parser.should_keep_alive(), parser.should_upgrade(),
            parser.get_http_version() == "1.0", request_name_classes(headers),
        )  # fmt: skip


class HttptoolsResponseParser:
    """The response parser on httptools (the pure edge's)."""

    __slots__ = ("headers", "hop_by_hop", "on_body", "on_message_begin", "owner", "parser")

    def __init__(self, owner: Any, hop_by_hop: Iterable[bytes]) -> None:
        self.owner = owner
        # (Called straight by httptools; the head's list is let go at its end, the trailers' at theirs.)
        self.on_message_begin: Callable[[], None] = owner.on_message_begin
        self.on_body: Callable[[bytes], None] = owner.on_body
        self.hop_by_hop = frozenset(hop_by_hop)
        self.headers: Headers = _NO_HEADERS
        self.parser = httptools.HttpResponseParser(self)

    def feed_data(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers is _NO_HEADERS:  # a new head, or a chunked body's trailers
            self.headers = []
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        head = self.headers if self.headers is not _NO_HEADERS else []
        self.headers = _NO_HEADERS
        names = 0
        length = -1
        for name, value in head:
            low = name.lower()
            if low == b"content-length":
                names |= NAME_CONTENT_LENGTH
                length = int(value)  # (llhttp checked it: digits, one value)
            elif low == b"transfer-encoding":
                names |= NAME_TRANSFER_ENCODING | NAME_HOP_BY_HOP
            elif low in self.hop_by_hop:
                names |= NAME_HOP_BY_HOP
        parser = self.parser
        self.owner.on_response(parser.get_status_code(), head, parser.should_keep_alive(), names, length)

    def on_message_complete(self) -> None:
        trailers, self.headers = self.headers, _NO_HEADERS
        self.owner.on_message_complete(trailers)


def head_bytes(headers: Headers) -> bytes:
    """``name: value\r\n`` for each header."""
    # Joined piece by piece: a %-format per header cost four times as much (callgrind).
    parts: list[bytes] = []
    for name, value in headers:
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    return b"".join(parts)


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """A request head: its line, its headers, the blank line."""
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, head_bytes(headers))


def request_id(prefix: bytes, n: int) -> bytes:
    """``prefix-<n in hex>``: one of the edge's request ids."""
    return b"%s-%x" % (prefix, n)


def compiled_for(module_name: str) -> Any:
    """The compiled edge's C module (http1c) when ``module_name`` is one of the compiled twin's, else
    None: each twin parses and writes with its own kind."""
    if module_name.startswith(COMPILED_PACKAGE + "."):
        return importlib.import_module(f"{COMPILED_PACKAGE}.http1c")
    return None


def parsers_for(module_name: str) -> tuple[RequestParserType, ResponseParserType]:
    """The parsers of the twin ``module_name`` belongs to: the compiled edge's are built with it."""
    compiled = compiled_for(module_name)
    if compiled is not None:
        return compiled.RequestParser, compiled.ResponseParser
    return HttptoolsRequestParser, HttptoolsResponseParser


class Writers(NamedTuple):
    head_bytes: Callable[[Headers], bytes]
    request_head: Callable[[bytes, bytes, Headers], bytes]
    request_id: Callable[[bytes, int], bytes]


def writers_for(module_name: str) -> Writers:
    """How the twin ``module_name`` belongs to writes heads and log lines: the compiled edge in C
    (one allocation each), the pure edge in Python (the same bytes)."""
    compiled = compiled_for(module_name)
    if compiled is not None:
        return Writers(compiled.head_bytes, compiled.request_head, compiled.request_id)
    return Writers(head_bytes, request_head, request_id)
