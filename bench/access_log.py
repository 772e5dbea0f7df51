"""What one access-log line costs the edge: built and queued (and written to /dev/null in batches).

    PYTHONPATH=. .venv/bin/python bench/access_log.py [--lines 200000] [--rounds 5]

Drives ``AccessLog.write`` with realistic exchanges (a proxied 200 with its upstream time, an API call,
an edge-made 404, a redirect) for both formats, flushing as the edge does (every ``MAX_BUFFER_LINES``
lines, to /dev/null through the loop's own descriptor), and prints the best round in nanoseconds per
line. ``--compare`` also runs the formatter the edge had before issue 22 (kept below, verbatim, for this
comparison only) in the same process, interleaved round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from typing import Any

from gateway.edge.impl import CHOICES, select
from gateway.edge.observe import AccessLog

CLIENTS = ("127.0.0.1", "10.1.2.3", "2001:db8::7")


class Logged:
    """What the access log reads of an exchange, with slots as ``Exchange`` has (attribute reads cost
    what they cost on the edge)."""

    __slots__ = (
        "bytes_out", "code", "host", "kind", "method", "request_id", "route_id", "sent_bytes", "status",
        "upstream_s", "url",
    )  # fmt: skip

    def __init__(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self, name, value)


def exchanges() -> list[Logged]:
    session = "70653436-f809-4410-b306-b50a3402ca56"
    base: dict[str, Any] = dict(
        request_id=b"5e1f0a3b-1", method=b"GET", url=b"/v1/app/%s/3000/static/app.js?v=3" % session.encode(),
        host=b"gateway.example.test:8080", kind="path", route_id=session, status=200, code=None,
        sent_bytes=0, bytes_out=18_734, upstream_s=0.000734,
    )  # fmt: skip
    variants: list[dict[str, Any]] = [
        {},
        dict(
            method=b"POST",
            url=b"/v1/vms",
            kind="api",
            route_id=None,
            sent_bytes=412,
            bytes_out=733,
            upstream_s=0.0123,
        ),
        dict(
            url=b"/v1/app/nope/3000/",
            kind="rejected",
            route_id=None,
            status=404,
            code="route_not_found",
            bytes_out=0,
            upstream_s=None,
        ),
        dict(
            host=b"vmid-0123456789abcdef-3000.sandbox.example.test",
            url=b"/",
            kind="host",
            route_id="0123456789abcdef",
            status=302,
            upstream_s=None,
            bytes_out=0,
        ),
    ]
    out = []
    for i in range(64):
        fields = base | variants[i % len(variants)]
        fields["request_id"] = b"5e1f0a3b-%x" % (i + 1)
        out.append(Logged(**fields))
    return out


# --- the formatter before issue 22 (observe.py at f592638: per-line regex checks and float formats) -----

_quote = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_JSON_UNSAFE = re.compile(rb"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_JSON_LINE = (
    b'{"ts":%.3f,"type":"access","request_id":%s,"client":%s,"method":%s,"host":%s,"path":%s,'
    b'"route":%s,"id":%s,"status":%d,"error":%s,"bytes_in":%d,"bytes_out":%d,"upstream_ms":%s,'
    b'"duration_ms":%.2f}\n'
)
_TEXT_LINE = b"%s %s %s %s%s -> %d %s%s in=%d out=%d%s %.2fms%s rid=%s\n"


def _json(value: bytes) -> bytes:
    if _JSON_UNSAFE.search(value) is None:
        return b'"' + value + b'"'
    return _quote(value.decode("latin-1")).encode()  # type: ignore[no-any-return]


def _printable(value: bytes) -> bytes:
    return value if _JSON_UNSAFE.search(value) is None else _json(value)[1:-1]


class OldAccessLog(AccessLog):
    """The pre-issue-22 ``write``; buffering and flushing are the current class's."""

    _second = 0
    _old_clock = b""

    def write(self, ex: Any, client: str, duration_s: float) -> None:
        now = time.time()
        path = ex.url.partition(b"?")[0]
        upstream_s = ex.upstream_s
        kind = ex.kind.encode()
        route_id = ex.route_id.encode("ascii", "replace") if ex.route_id else None
        code = ex.code.encode() if ex.code else None
        if self.json:
            line = _JSON_LINE % (
                now, _json(ex.request_id), _json(client.encode()), _json(ex.method), _json(ex.host or b""),
                _json(path), _json(kind), _json(route_id) if route_id else b"null", ex.status,
                _json(code) if code else b"null", ex.sent_bytes, ex.bytes_out,
                b"null" if upstream_s is None else b"%.2f" % (upstream_s * 1000), duration_s * 1000,
            )  # fmt: skip
        else:
            second = int(now)
            if second != self._second:
                clock = time.strftime("%H:%M:%S", time.localtime(second))
                self._second, self._old_clock = second, clock.encode()
            line = _TEXT_LINE % (
                self._old_clock, client.encode(), _printable(ex.method), _printable(ex.host or b""),
                _printable(path), ex.status, kind, b" " + route_id if route_id else b"", ex.sent_bytes,
                ex.bytes_out, b"" if upstream_s is None else b" upstream=%.2fms" % (upstream_s * 1000),
                duration_s * 1000, b" error=" + code if code else b"", _printable(ex.request_id),
            )  # fmt: skip
        self.lines.append(line)
        if len(self.lines) >= 1000:
            self.flush()


# --- the run ---------------------------------------------------------------------------------------


def one_round(cls: type[Any], fmt: str, lines: int) -> float:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        log = cls(fmt, devnull)
        work = exchanges()
        n = len(work)
        clients = [CLIENTS[i % len(CLIENTS)] for i in range(n)]
        durations = [0.000812 + i * 0.0003 for i in range(n)]
        write = log.write
        if cls is OldAccessLog:
            start = time.perf_counter_ns()
            for i in range(lines):
                j = i % n
                write(work[j], clients[j], durations[j])
        else:
            # What Edge.observe hands over: the exchange's fields.
            fields = [
                (clients[j], ex.method, ex.host, ex.url, ex.kind, ex.route_id, ex.status, ex.code,
                 ex.request_id, ex.sent_bytes, ex.bytes_out, ex.upstream_s, durations[j])
                for j, ex in enumerate(work)
            ]  # fmt: skip
            start = time.perf_counter_ns()
            for i in range(lines):
                write(*fields[i % n])
        log.flush()
        elapsed = time.perf_counter_ns() - start
        log.close()
        return elapsed / lines
    finally:
        os.close(devnull)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare", action="store_true", help="also the formatter from before issue 22")
    parser.add_argument("--edge", choices=("both", *CHOICES), default="both", help="(default: %(default)s)")
    args = parser.parse_args()
    edges = ("compiled", "pure") if args.edge == "both" else (args.edge,)
    sides: list[tuple[str, type[Any]]] = [
        (impl.name, impl.observe.AccessLog) for impl in dict.fromkeys(select(edge) for edge in edges)
    ]
    if args.compare:
        sides.append(("before", OldAccessLog))
    for fmt in ("json", "text"):
        results: dict[str, list[float]] = {name: [] for name, _ in sides}
        for _ in range(args.rounds):  # interleaved: a busier moment of the machine hits both sides
            for name, cls in sides:
                results[name].append(one_round(cls, fmt, args.lines))
        for name, rounds in results.items():
            print(
                f"access log {fmt:4} {name:8}: {min(rounds):6.0f} ns per line (best of {args.rounds} rounds "
                f"of {args.lines:,}; rounds {', '.join(f'{r:.0f}' for r in rounds)})"
            )


if __name__ == "__main__":
    main()
