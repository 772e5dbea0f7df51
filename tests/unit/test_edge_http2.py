"""HTTP/2 streams as HTTP/1.1 exchanges: the request head an HTTP/2 request becomes, and the response
fields HTTP/2 may carry (gateway/edge/http2.py; the frames themselves are tested end to end)."""

from __future__ import annotations

import httptools
import pytest

from gateway.edge.http2 import h2_fields, request_head

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/x?y=1")]


class Parsed:
    """What llhttp (the edge's own request parser) reads from a head."""

    def __init__(self, head: bytes) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.complete = False
        self.parser = httptools.HttpRequestParser(self)
        self.parser.feed_data(head)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_message_complete(self) -> None:
        self.complete = True


def test_a_request_without_body_is_one_complete_http11_request_that_closes() -> None:
    made = request_head([*GET, (b"accept", b"*/*"), (b"te", b"trailers")], ended=True)
    assert made is not None
    head, method, chunked = made
    parsed = Parsed(head)
    assert (method, chunked, parsed.url, parsed.complete) == (b"GET", False, b"/x?y=1", True)
    assert parsed.parser.get_method() == b"GET" and (b"connection", b"close") in parsed.headers
    assert (b"host", b"a.test") in parsed.headers and (b"accept", b"*/*") in parsed.headers
    assert b"te" not in dict(parsed.headers)  # HTTP/2's own: the edge asks apps for trailers itself


@pytest.mark.parametrize(("extra", "chunked"), [([], True), ([(b"content-length", b"5")], False)])
def test_a_body_keeps_its_length_or_is_chunked(extra: list[tuple[bytes, bytes]], chunked: bool) -> None:
    fields = [(b":method", b"POST"), (b":authority", b"a.test"), (b":path", b"/"), *extra]
    made = request_head(fields, ended=False)
    assert made is not None and made[2] is chunked
    names = dict(Parsed(made[0]).headers)
    assert (b"transfer-encoding" in names) is chunked and (b"content-length" in names) is not chunked


def test_the_host_field_stands_in_for_a_missing_authority() -> None:
    fields = [(b":method", b"GET"), (b":path", b"/"), (b"host", b"b.test")]
    made = request_head(fields, ended=True)
    assert made is not None and dict(Parsed(made[0]).headers)[b"host"] == b"b.test"


@pytest.mark.parametrize(
    "fields",
    [
        [(b":method", b"CONNECT"), (b":authority", b"a.test:443")],  # no extended CONNECT offered
        [(b":method", b"GET"), (b":authority", b"a.test")],  # no :path
        [(b":method", b"GET /x"), (b":path", b"/")],  # a space would split the request line
        [(b":method", b"GET"), (b":path", b"/a HTTP/1.1")],
        [(b":method", b"GET"), (b":path", b"/a\tb")],
    ],
)
def test_requests_without_an_http11_form_are_refused(fields: list[tuple[bytes, bytes]]) -> None:
    assert request_head(fields, ended=True) is None


def test_response_fields_lose_what_belongs_to_one_http11_connection() -> None:
    fields = [
        (b"Content-Type", b"text/plain"), (b"Connection", b"close"), (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"h2c"), (b"Set-Cookie", b"a=1"),
    ]  # fmt: skip
    assert h2_fields(fields) == [(b"content-type", b"text/plain"), (b"set-cookie", b"a=1")]
