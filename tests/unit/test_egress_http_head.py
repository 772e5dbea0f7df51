"""The request head the egress proxy reads where it opens a vault host's TLS (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.egress.http_head import (
    BadHead,
    RequestHead,
    one_request,
    parse_request_head,
    render_request_head,
    response_status,
)

GOOD = b"POST /v1/chat?key=secret HTTP/1.1\r\nHost: api.example.test\r\nAuthorization:  Bearer x \r\n"


def test_a_head_is_parsed_strictly_and_its_path_drops_the_query() -> None:
    head = parse_request_head(GOOD.removesuffix(b"\r\n"))
    assert (head.method, head.target, head.version) == (b"POST", b"/v1/chat?key=secret", b"HTTP/1.1")
    assert head.headers == [(b"Host", b"api.example.test"), (b"Authorization", b"Bearer x")]
    assert head.path == "/v1/chat"


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\nHost: a",  # bare LF
        b"GET / HTTP/1.1\r\nHost: a\rb",  # bare CR
        b"GET / HTTP/1.1\r\nHost: a\r\n folded",  # obsolete line folding
        b"GET / HTTP/1.1\r\nBad Name: a",  # a space in a name
        b"GET / HTTP/1.1\r\nno-colon",
        b"GET / HTTP/1.1\r\n: empty-name",
        b"GET /  HTTP/1.1",  # two spaces
        b"GET / HTTP/2.0",
        b"G(T / HTTP/1.1",
        b"GET / HTTP/1.1\r\nX: a\x00b",
    ],
)
def test_what_the_destination_could_read_differently_is_refused(raw: bytes) -> None:
    with pytest.raises(BadHead):
        parse_request_head(raw)


def test_one_request_per_connection_unless_upgrading() -> None:
    head = parse_request_head(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\nTE: x"
    )
    closed = one_request(head)
    assert [n for n, _ in closed.headers] == [b"Host", b"Connection"]
    assert closed.headers[-1] == (b"Connection", b"close")
    ws = parse_request_head(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket")
    assert one_request(ws) == ws


def test_response_status() -> None:
    assert response_status(b"HTTP/1.1 201 Created\r\n") == 201
    assert response_status(b"HTTP/1.0 404\r\n") == 404
    assert response_status(b"SSH-2.0-x\r\n") is None
    assert response_status(b"HTTP/1.1 2000 x") is None


TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1,
                max_size=20)  # fmt: skip
VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)


@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE"]),
    path=st.text(alphabet="abc/?=&%", min_size=1, max_size=30).map(lambda p: ("/" + p).encode()),
    headers=st.lists(st.tuples(TOKEN, VALUE), max_size=8),
)
def test_a_rendered_head_parses_back_to_itself(
    method: bytes, path: bytes, headers: list[tuple[str, str]]
) -> None:
    head = RequestHead(method, path, b"HTTP/1.1", [(n.encode(), v.encode()) for n, v in headers])
    rendered = render_request_head(head)
    assert rendered.endswith(b"\r\n\r\n")
    assert parse_request_head(rendered.removesuffix(b"\r\n\r\n")) == head
