"""The name a connection asks for, from its first bytes: real ClientHellos (made by Python's own TLS
client) and HTTP heads, whole, split anywhere, truncated, and garbage."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.egress.sni import MAX_HELLO_BYTES, NEED_MORE, read_http_host, read_tls_name


def client_hello(server_name: str | None) -> bytes:
    """The first flight of a TLS client asking for ``server_name``."""
    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("name", ["pypi.org", "files.pythonhosted.org", "a-b.c_d.example.test"])
def test_the_sni_of_a_real_client_hello(name: str) -> None:
    hello = client_hello(name)
    assert read_tls_name(hello) == name
    assert read_tls_name(hello + b"more bytes after it") == name
    for cut in (0, 1, 5, 40, len(hello) - 1):
        assert read_tls_name(hello[:cut]) == NEED_MORE


def test_a_hello_without_a_name_or_not_tls_has_none() -> None:
    assert read_tls_name(client_hello(None)) is None
    assert read_tls_name(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") is None
    assert read_tls_name(b"\x16\x03\x01\x00\x00") is None  # an empty record
    assert read_tls_name(b"\x17\x03\x03\x00\x10" + b"x" * 16) is None  # application data, no hello


def test_a_hello_split_over_two_records_is_read() -> None:
    hello = client_hello("split.example.test")
    body = hello[5:]
    half = len(body) // 2
    records = b"\x16\x03\x01" + half.to_bytes(2, "big") + body[:half]
    records += b"\x16\x03\x01" + (len(body) - half).to_bytes(2, "big") + body[half:]
    assert read_tls_name(records) == "split.example.test"
    assert read_tls_name(records[: len(records) - 3]) == NEED_MORE


@given(st.binary(max_size=600))
def test_garbage_never_raises(data: bytes) -> None:
    assert read_tls_name(data) in (None, NEED_MORE) or isinstance(read_tls_name(data), str)
    assert read_http_host(data) in (None, NEED_MORE) or isinstance(read_http_host(data), str)
    assert read_tls_name(b"\x16\x03\x01" + data) in (None, NEED_MORE) or isinstance(
        read_tls_name(b"\x16\x03\x01" + data), str
    )


def test_a_hello_that_never_ends_is_given_up() -> None:
    endless = b"\x16\x03\x01\x40\x00" + b"\x01\x00\xff\xff" + b"\x00" * (MAX_HELLO_BYTES + 10)
    assert read_tls_name(endless) is None


@pytest.mark.parametrize(
    ("head", "host"),
    [
        (b"GET / HTTP/1.1\r\nHost: pypi.org\r\n\r\n", "pypi.org"),
        (b"GET /x HTTP/1.1\r\nhost: PyPI.org:8080\r\nAccept: */*\r\n\r\nbody", "pypi.org"),
        (b"GET / HTTP/1.0\r\n\r\n", None),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", None),  # two: no name
        (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: 198.18.0.2:80\r\n\r\n", None),  # an address is no name
        (b"GET / HTTP/1.1\r\nHost: a b.test\r\n\r\n", None),
        (b"\x16\x03\x01\x00\x10", NEED_MORE),
        (b"GET / HTTP/1.1\r\nHost: pypi.org\r\n", NEED_MORE),
        (b"NONSENSE\r\n\r\n", None),
    ],
)
def test_the_host_of_an_http_head(head: bytes, host: str | None) -> None:
    assert read_http_host(head) == host


def test_an_endless_http_head_is_given_up() -> None:
    assert read_http_host(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HELLO_BYTES) is None
