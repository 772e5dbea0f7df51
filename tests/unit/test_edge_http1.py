"""The two HTTP/1.1 parsers (gateway/edge/http1.py): the compiled edge's C one and the pure edge's on
httptools make the same calls, with the same arguments, for the same bytes however a read splits them,
and fail the same way."""

from __future__ import annotations

import itertools
from typing import Any

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.edge import observe
from gateway.edge.headers import (
    HOP_BY_HOP,
    REQ_CONNECTION,
    REQ_CREDENTIALS,
    REQ_DROPPED,
    REQ_HOST,
    REQ_OTHER,
    REQ_REQUEST_ID,
    REQ_SANDBOX,
    REQ_TRANSFER_ENCODING,
)
from gateway.edge.http1 import (
    NAME_CONTENT_LENGTH,
    NAME_HOP_BY_HOP,
    NAME_TRANSFER_ENCODING,
    HttptoolsRequestParser,
    HttptoolsResponseParser,
    writers_for,
)
from gateway.edge.impl import COMPILED, compiled_problem

PROBLEM = compiled_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"the compiled edge is {PROBLEM}")

LIMITS = (64, 6, 300)  # target bytes, header count, header bytes

REQUESTS = [
    b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nX-Empty:\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
    b"HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nframes",
    b"GET /" + b"t" * 70 + b" HTTP/1.1\r\n\r\n",  # target over the limit
    b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(8)) + b"\r\n",  # too many headers
    b"GET / HTTP/1.1\r\nBig: " + b"v" * 320 + b"\r\n\r\n",  # header bytes over the limit
    # smuggling: both framings
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
    b"BREW / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: y\r\n\r\n",  # pipelined
    # every class of name the edge acts on, in any case, and names that only look like them
    b"GET / HTTP/1.1\r\nhOsT: x\r\nCOOKIE: a=1\r\nX-Api-Key: k\r\nX-Forwarded-For: 1.2.3.4\r\n"
    b"x-request-id: r\r\nX-Sandbox-Port: 80\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nHostx: y\r\nCookies: z\r\nTE: trailers\r\nConnection: close\r\n\r\n",
]

RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX: y\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n2\r\nhi\r\n0\r\nX-T: 9\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close, X-Private\r\nKeep-Alive: 1\r\n\r\nuntil the end",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nframes",
    b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 2\r\nProxy-Authenticate: x\r\n\r\nok"
    b"HTTP/1.1 304 Not Modified\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
]


class Recorder:
    """An owner that records every call the parser makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_message_begin(self) -> None:
        self.calls.append(("begin",))

    def on_request(self, *args: Any) -> None:
        self.calls.append(("request", *args))

    def on_response(self, *args: Any) -> None:
        self.calls.append(("response", *args))

    def on_body(self, data: bytes) -> None:
        # Bodies come in pieces that depend on the reads: joined before comparing.
        if self.calls and self.calls[-1][0] == "body":
            self.calls[-1] = ("body", self.calls[-1][1] + data)
        else:
            self.calls.append(("body", data))

    def on_message_complete(self, *trailers: Any) -> None:
        self.calls.append(("complete", *trailers))

    def on_head_limit(self, code: str) -> None:
        self.calls.append(("limit", code))


def run(parser_type: Any, data: bytes, cuts: list[int], *args: Any) -> list[tuple[Any, ...]]:
    owner = Recorder()
    parser = parser_type(owner, *args)
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    for start, end in itertools.pairwise(bounds):
        try:
            parser.feed_data(data[start:end])
        except httptools.HttpParserUpgrade as exc:
            owner.calls.append(("upgrade", data[start + exc.args[0] :]))
            break
        except httptools.HttpParserCallbackError as exc:
            # After an owner's call failed (a limit): the owner answered already, the text is unused.
            owner.calls.append(("error", type(exc).__name__))
            break
        except httptools.HttpParserError as exc:
            owner.calls.append(("error", type(exc).__name__, str(exc)))  # the client's 400 says why
            break
    return owner.calls


@settings(max_examples=150, deadline=None)
@given(index=st.integers(0, len(REQUESTS) - 1), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_request_parsers_agree_however_reads_split(index: int, cuts: list[int]) -> None:
    data = REQUESTS[index]
    compiled = run(COMPILED.module("http1c").RequestParser, data, cuts, *LIMITS)
    assert compiled == run(HttptoolsRequestParser, data, cuts, *LIMITS)


@settings(max_examples=150, deadline=None)
@given(index=st.integers(0, len(RESPONSES) - 1), cuts=st.lists(st.integers(0, 200), max_size=6))
def test_response_parsers_agree_however_reads_split(index: int, cuts: list[int]) -> None:
    data = RESPONSES[index]
    compiled = run(COMPILED.module("http1c").ResponseParser, data, cuts, HOP_BY_HOP)
    assert compiled == run(HttptoolsResponseParser, data, cuts, HOP_BY_HOP)


def test_what_the_parsers_report() -> None:
    """A few of the calls spelled out (agreement alone would pass two parsers wrong the same way)."""
    c_request = COMPILED.module("http1c").RequestParser
    calls = run(c_request, REQUESTS[2], [], *LIMITS)
    assert calls == [
        ("begin",),
        (
            "request",
            b"PUT",
            b"/c",
            [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked")],
            True,
            False,
            False,
            bytes([REQ_HOST, REQ_TRANSFER_ENCODING]),
        ),
        ("body", b"abcde"),
        ("complete",),
    ]
    assert run(c_request, REQUESTS[5], [], *LIMITS)[-2:] == [
        ("limit", "uri_too_long"),
        ("error", "HttpParserCallbackError"),
    ]
    assert ("limit", "headers_too_large") in run(c_request, REQUESTS[6], [], *LIMITS)
    classed, lookalikes = (
        run(c_request, REQUESTS[12], [], *LIMITS)[1],
        run(c_request, REQUESTS[13], [], *LIMITS)[1],
    )
    assert classed[-1] == bytes(
        [REQ_HOST, REQ_CREDENTIALS, REQ_CREDENTIALS, REQ_DROPPED, REQ_REQUEST_ID, REQ_SANDBOX]
    )
    assert lookalikes[-1] == bytes([REQ_HOST, REQ_OTHER, REQ_OTHER, REQ_DROPPED, REQ_CONNECTION])
    assert run(c_request, REQUESTS[4], [], *LIMITS)[-1] == ("upgrade", b"frames")
    responses = run(COMPILED.module("http1c").ResponseParser, RESPONSES[2] + RESPONSES[3], [], HOP_BY_HOP)
    assert responses[1] == (
        "response", 200, [(b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X-T")], True,
        NAME_TRANSFER_ENCODING | NAME_HOP_BY_HOP, -1,
    )  # fmt: skip
    assert responses[3] == ("complete", [(b"X-T", b"9")])
    assert responses[5][-3:] == (False, NAME_HOP_BY_HOP, -1)  # Connection: close; no framing header
    first = run(COMPILED.module("http1c").ResponseParser, RESPONSES[0], [], HOP_BY_HOP)
    assert first[1][-2:] == (NAME_CONTENT_LENGTH, 3) and first[-1] == ("complete", [])


TOKENS = st.binary(min_size=1, max_size=12)
HEADER_LISTS = st.lists(st.tuples(TOKENS, st.binary(max_size=40)), max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    method=TOKENS, target=st.binary(max_size=60), headers=HEADER_LISTS,
    count=st.integers(min_value=0, max_value=2**64 - 1),
)  # fmt: skip
def test_the_writers_write_what_the_pure_ones_do(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], count: int
) -> None:
    compiled, pure = writers_for(f"{COMPILED.package}.exchange"), writers_for("gateway.edge.exchange")
    assert compiled.head_bytes is not pure.head_bytes  # (the C ones, not the same functions twice)
    assert compiled.head_bytes(headers) == pure.head_bytes(headers)
    assert compiled.request_head(method, target, headers) == pure.request_head(method, target, headers)
    assert compiled.request_head(method, target, headers).endswith(b"\r\n\r\n" if not headers else b"\r\n")
    assert compiled.request_id(target, count) == pure.request_id(target, count)


def test_the_writers_refuse_what_is_not_bytes() -> None:
    compiled = writers_for(f"{COMPILED.package}.exchange")
    with pytest.raises(TypeError):
        compiled.head_bytes([(b"Name", "text")])
    with pytest.raises(ValueError):  # as unpacking it in Python would
        compiled.request_head(b"GET", b"/", [(b"Name",)])
    with pytest.raises(TypeError):
        compiled.request_id("prefix", 1)


def test_a_read_that_is_all_body_is_passed_on_without_a_copy() -> None:
    """In a long upload or download every read after the first is all body: the compiled parser hands
    that read on as it is (the pure one's httptools copies it)."""
    c_parsers = COMPILED.module("http1c")
    bodies: list[bytes] = []
    owner = Recorder()
    owner.on_body = bodies.append  # type: ignore[method-assign]
    parser = c_parsers.RequestParser(owner, *LIMITS)
    parser.feed_data(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n" + b"a" * 10)
    read = b"b" * 10000
    parser.feed_data(read)
    last = b"c" * 9990
    parser.feed_data(last)
    assert bodies[0] == b"a" * 10 and bodies[1] is read and bodies[2] is last
    response = c_parsers.ResponseParser(owner, HOP_BY_HOP)
    response.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n1234")
    rest = b"5678"
    response.feed_data(rest)
    assert bodies[-1] is rest and bodies[-2] == b"1234"


PIECES = st.binary(max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    json=st.booleans(),
    pieces=st.tuples(PIECES, PIECES, PIECES, PIECES, PIECES, PIECES),
    ms=st.integers(0, 999),
    counts=st.tuples(st.integers(0, 2**62), st.integers(0, 2**62)),
    upstream_us=st.none() | st.integers(-(2**40), 2**40),
    duration_us=st.integers(-(2**40), 2**40) | st.integers(0, 100_000),
)
def test_the_access_lines_are_the_pure_edges(
    json: bool, pieces: tuple[bytes, ...], ms: int, counts: tuple[int, int], upstream_us: int | None,
    duration_us: int,
) -> None:  # fmt: skip
    clock, who, path, what, error, request_id = pieces
    args = (json, clock, ms, who, path, what, error, request_id, *counts, upstream_us, duration_us)
    assert COMPILED.module("http1c").log_line(*args) == observe.log_line(*args)


def test_the_access_line_numbers() -> None:
    numbers = observe.log_numbers
    assert numbers(False, 12, 3456, 1500, 2_345_678) == b" in=12 out=3456 upstream=1.50ms 2345.67ms"
    assert numbers(False, 0, 0, None, 9) == b" in=0 out=0 0.00ms"
    assert (
        numbers(True, 1, 2, None, 10_000)
        == b',"bytes_in":1,"bytes_out":2,"upstream_ms":null,"duration_ms":10.00}\n'
    )
    line = COMPILED.module("http1c").log_line
    assert line(True, b'{"ts":5.', 7, b"", b'"/"', b"", b"", b"r", 1, 2, None, 10_000).startswith(
        b'{"ts":5.007,'
    )
    with pytest.raises(ValueError):
        line(True, b"", 1000, b"", b"", b"", b"", b"", 0, 0, None, 0)
