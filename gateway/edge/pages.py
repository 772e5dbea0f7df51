"""Responses the edge makes itself: error pages and redirects, as complete HTTP/1.1 messages.

Browsers get a small HTML page, everything else JSON. Every edge-made error carries
``X-Gateway-Error: <code>`` so a user can tell it from their app's own errors, and ``no-store`` so a
transient failure is never cached in front of a VM that comes back.
"""

from __future__ import annotations

import html
import http
import json
from collections.abc import Sequence
from typing import Final

_HTML_TEMPLATE: Final = (
    "<!doctype html>\n"
    '<html><head><meta charset="utf-8"><title>{title}</title></head>\n'
    "<body><h1>{title}</h1>\n<p>{message}</p>\n"
    "<p>Error code: <code>{code}</code></p>\n{extra}</body></html>\n"
)


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _check_header_value(value: bytes) -> bytes:
    # A CR or LF in a header value would let it end the head early and inject headers or a body.
    if value.find(b"\r") >= 0 or value.find(b"\n") >= 0 or value.find(b"\0") >= 0:
        raise ValueError("header value contains CR, LF or NUL")
    return value


def _message(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, close: bool, keep_alive_http10: bool
) -> bytes:
    if close:
        headers.append((b"Connection", b"close"))
    elif keep_alive_http10:
        headers.append((b"Connection", b"keep-alive"))  # HTTP/1.0 closes unless told otherwise
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status).encode("ascii"))]
    lines += [name + b": " + _check_header_value(value) + b"\r\n" for name, value in headers]
    return b"".join(lines) + b"\r\n" + body


def _prefers_html(accept: bytes | None) -> bool:
    return accept is not None and accept.lower().find(b"text/html") >= 0


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    accept: bytes | None,
    request_id: str | None = None,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
    close: bool = False,
    head_only: bool = False,
    keep_alive_http10: bool = False,
) -> bytes:
    """A complete error response. Raises ValueError if a header value would contain CR, LF or NUL.

    ``head_only``: the answer to a HEAD, whose head says what a GET would carry and which has no body.
    ``keep_alive_http10``: an HTTP/1.0 client asked to keep the connection and it stays open.
    """
    if _prefers_html(accept):
        title = f"{status} {_reason(status)}"
        extra = f"<p>Request id: <code>{html.escape(request_id)}</code></p>\n" if request_id else ""
        body = _HTML_TEMPLATE.format(
            title=html.escape(title), message=html.escape(message), code=html.escape(code), extra=extra
        ).encode("utf-8")
        content_type = b"text/html; charset=utf-8"
    else:
        doc: dict[str, object] = {"error": code, "message": message, "status": status}
        if request_id is not None:
            doc["request_id"] = request_id
        body = json.dumps(doc).encode("ascii")  # ensure_ascii: the body is plain ASCII
        content_type = b"application/json"
    headers = [
        (b"Content-Type", content_type),
        (b"Content-Length", b"%d" % len(body)),
        (b"X-Gateway-Error", code.encode("ascii")),
        (b"Cache-Control", b"no-store"),
    ]
    if request_id is not None:
        headers.append((b"X-Request-Id", request_id.encode("ascii")))
    headers.extend(extra_headers)
    return _message(status, headers, b"" if head_only else body, close, keep_alive_http10)


def redirect_response(
    status: int,
    location: bytes,
    *,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
    close: bool = False,
    keep_alive_http10: bool = False,
) -> bytes:
    """A redirect with an empty body. Raises ValueError if a header value contains CR, LF or NUL."""
    headers = [(b"Location", _check_header_value(location)), (b"Content-Length", b"0")]
    headers.extend((name, _check_header_value(value)) for name, value in extra_headers)
    return _message(status, headers, b"", close, keep_alive_http10)
