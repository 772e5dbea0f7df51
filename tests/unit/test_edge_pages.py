"""Edge-made responses: well-framed, escaped, marked with X-Gateway-Error."""

from __future__ import annotations

import json

import pytest

from gateway.edge.pages import error_response, redirect_response

# Every test here runs on each edge (the compiled one and the pure-Python one): tests/conftest.py.
pytestmark = pytest.mark.both_edges


def split(raw: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        assert name.lower() not in headers
        headers[name.lower()] = value
    return status_line, headers, body


def test_json_by_default() -> None:
    status, headers, body = split(error_response(404, "no_route", "no such app", accept=b"*/*"))
    assert status == b"HTTP/1.1 404 Not Found"
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == b"%d" % len(body)
    assert headers[b"x-gateway-error"] == b"no_route"
    assert headers[b"cache-control"] == b"no-store"
    assert b"connection" not in headers and b"x-request-id" not in headers
    assert json.loads(body) == {"error": "no_route", "message": "no such app", "status": 404}


@pytest.mark.parametrize("accept", [None, b"application/json", b""])
def test_json_when_html_is_not_asked_for(accept: bytes | None) -> None:
    _, headers, _ = split(error_response(502, "upstream_refused", "m", accept=accept))
    assert headers[b"content-type"] == b"application/json"


def test_html_for_browsers() -> None:
    accept = b"Text/HTML,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    status, headers, body = split(error_response(504, "upstream_timeout", "too slow", accept=accept))
    assert status == b"HTTP/1.1 504 Gateway Timeout"
    assert headers[b"content-type"] == b"text/html; charset=utf-8"
    assert headers[b"content-length"] == b"%d" % len(body)
    assert b"<title>504 Gateway Timeout</title>" in body
    assert b"too slow" in body and b"upstream_timeout" in body


def test_html_escapes_everything() -> None:
    message = "<script>alert('x')</script> & \"q\""
    _, _, body = split(error_response(400, "bad<code>", message, accept=b"text/html", request_id="<r1>"))
    assert b"<script>" not in body and b"bad<code>" not in body and b"<r1>" not in body
    assert b"&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;q&quot;" in body
    assert b"&lt;r1&gt;" in body


def test_json_escapes_and_non_ascii() -> None:
    message = '<script>\u00e9"\n'
    raw = error_response(400, "bad_request", message, accept=None, request_id="r-1")
    _, headers, body = split(raw)
    assert headers[b"content-length"] == b"%d" % len(body)
    assert json.loads(body) == {
        "error": "bad_request",
        "message": message,
        "status": 400,
        "request_id": "r-1",
    }


def test_optional_headers() -> None:
    raw = error_response(
        503,
        "store_unavailable",
        "m",
        accept=None,
        request_id="abc",
        extra_headers=[(b"Retry-After", b"1")],
        close=True,
    )
    _, headers, _ = split(raw)
    assert headers[b"connection"] == b"close"
    assert headers[b"x-request-id"] == b"abc"
    assert headers[b"retry-after"] == b"1"


def test_unknown_status_still_has_a_reason() -> None:
    status, _, _ = split(error_response(599, "x", "m", accept=None))
    assert status == b"HTTP/1.1 599 Error"


def test_header_injection_refused() -> None:
    with pytest.raises(ValueError):
        error_response(400, "x", "m", accept=None, extra_headers=[(b"X", b"a\r\nSet-Cookie: y")])
    with pytest.raises(ValueError):
        error_response(400, "x", "m", accept=None, request_id="a\nb")


def test_redirect() -> None:
    raw = redirect_response(308, b"/v1/app/s/80/?a=1")
    assert (
        raw == b"HTTP/1.1 308 Permanent Redirect\r\nLocation: /v1/app/s/80/?a=1\r\nContent-Length: 0\r\n\r\n"
    )
    _, headers, body = split(redirect_response(308, b"/x/", close=True))
    assert headers[b"connection"] == b"close" and body == b""


@pytest.mark.parametrize("location", [b"/a\r\nSet-Cookie: x=1", b"/a\nb", b"/a\rb"])
def test_redirect_refuses_cr_lf(location: bytes) -> None:
    with pytest.raises(ValueError):
        redirect_response(308, location)
