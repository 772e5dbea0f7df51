"""What the edge records about each exchange: counters for the metrics, and the access log.

The hot path only adds to plain numbers here (a dict increment and a bisect, well under a microsecond);
``gateway.metrics`` turns them into Prometheus families when scraped, so no metrics-library call sits on
the request path. Edge worker processes write ``snapshot()`` to a file that the process serving
``/metrics`` adds in (``merge``).

The access log is one line per exchange, buffered and written in whole lines at most every
``FLUSH_INTERVAL_S`` (or when the buffer fills), so several processes sharing stdout never interleave a
line. It holds no query string (apps put tokens there), no header value and no credential.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import queue
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, BinaryIO

# Upstream time (request sent -> response head) buckets, seconds: from a VM on this host to a slow app.
UPSTREAM_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
FLUSH_INTERVAL_S = 0.5
# Writes to a pipe up to PIPE_BUF (4096 on Linux) are atomic: each write is whole lines within it.
MAX_WRITE_BYTES = 4096
MAX_BUFFER_LINES = 1000
# Chunks waiting for the writer thread; beyond this (about 1 MiB) lines are dropped, not queued.
MAX_PENDING_CHUNKS = 256


class EdgeStats:
    """Counters of one edge process. Keys are small strings; values plain ints and floats."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "connect_failures",
        "requests",
        "tunnels_open",
        "tunnels_opened",
        "upstream_buckets",
        "upstream_count",
        "upstream_sum",
    )

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}  # (route kind, status) -> count
        self.bytes_in: dict[str, int] = {}  # route kind -> request body bytes (and tunnel bytes up)
        self.bytes_out: dict[str, int] = {}  # route kind -> response body bytes (and tunnel bytes down)
        self.connect_failures: dict[str, int] = {}  # "refused" / "timeout" -> count
        self.upstream_buckets = [0] * (len(UPSTREAM_BUCKETS_S) + 1)  # the last one is +Inf
        self.upstream_sum = 0.0
        self.upstream_count = 0
        self.tunnels_open = 0
        self.tunnels_opened = 0

    def count(self, kind: str, status: int, bytes_in: int, bytes_out: int, upstream_s: float | None) -> None:
        key = (kind, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if bytes_in:
            self.bytes_in[kind] = self.bytes_in.get(kind, 0) + bytes_in
        if bytes_out:
            self.bytes_out[kind] = self.bytes_out.get(kind, 0) + bytes_out
        if upstream_s is not None:
            self.upstream_buckets[bisect.bisect_left(UPSTREAM_BUCKETS_S, upstream_s)] += 1
            self.upstream_sum += upstream_s
            self.upstream_count += 1

    def connect_failed(self, reason: str) -> None:
        self.connect_failures[reason] = self.connect_failures.get(reason, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """JSON-able counters (tuple keys become "kind status")."""
        return {
            "requests": {f"{kind} {status}": n for (kind, status), n in self.requests.items()},
            "bytes_in": dict(self.bytes_in),
            "bytes_out": dict(self.bytes_out),
            "connect_failures": dict(self.connect_failures),
            "upstream_buckets": list(self.upstream_buckets),
            "upstream_sum": self.upstream_sum,
            "upstream_count": self.upstream_count,
            "tunnels_open": self.tunnels_open,
            "tunnels_opened": self.tunnels_opened,
        }

    @classmethod
    def merge(cls, snapshots: Iterable[dict[str, Any]]) -> EdgeStats:
        """The sum of several processes' snapshots (a malformed one is skipped)."""
        total = cls()
        for snap in snapshots:
            try:
                for key, n in snap["requests"].items():
                    kind, _, status = key.partition(" ")
                    total.requests[(kind, int(status))] = total.requests.get((kind, int(status)), 0) + int(n)
                for name in ("bytes_in", "bytes_out", "connect_failures"):
                    mine = getattr(total, name)
                    for key, n in snap[name].items():
                        mine[key] = mine.get(key, 0) + int(n)
                for i, n in enumerate(snap["upstream_buckets"][: len(total.upstream_buckets)]):
                    total.upstream_buckets[i] += int(n)
                total.upstream_sum += float(snap["upstream_sum"])
                total.upstream_count += int(snap["upstream_count"])
                total.tunnels_open += int(snap["tunnels_open"])
                total.tunnels_opened += int(snap["tunnels_opened"])
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
        return total


class AccessLog:
    """Buffered access-log lines, JSON or human-readable, written by a thread to a binary stream.

    The event loop never waits on the stream: ``flush`` hands whole-line chunks to a writer thread, and
    when the stream does not keep up (a full pipe nobody reads), chunks past ``MAX_PENDING_CHUNKS`` are
    dropped and counted in ``dropped`` rather than stalling the edge.
    """

    def __init__(self, fmt: str = "json", stream: BinaryIO | None = None) -> None:
        self.json = fmt == "json"
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.lines: list[bytes] = []
        self.dropped = 0
        self._chunks: queue.Queue[bytes | None] = queue.Queue(MAX_PENDING_CHUNKS)
        self._writer = threading.Thread(target=self._write_chunks, name="access-log", daemon=True)
        self._writer.start()

    def write(
        self,
        *,
        request_id: str,
        client: str,
        method: str,
        host: str,
        path: str,
        kind: str,
        route_id: str | None,
        status: int,
        code: str | None,
        bytes_in: int,
        bytes_out: int,
        upstream_ms: float | None,
        duration_ms: float,
    ) -> None:
        if self.json:
            entry = {
                "ts": round(time.time(), 3),
                "type": "access",
                "request_id": request_id,
                "client": client,
                "method": method,
                "host": host,
                "path": path,
                "route": kind,
                "id": route_id,
                "status": status,
                "error": code,
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "upstream_ms": upstream_ms,
                "duration_ms": duration_ms,
            }
            line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        else:
            when = time.strftime("%H:%M:%S")
            upstream = f" upstream={upstream_ms}ms" if upstream_ms is not None else ""
            error = f" error={code}" if code else ""
            target = f" {route_id}" if route_id else ""
            line = (
                f"{when} {client} {method} {host}{path} -> {status} {kind}{target} in={bytes_in} "
                f"out={bytes_out}{upstream} {duration_ms}ms{error} rid={request_id}\n"
            ).encode()
        self.lines.append(line)
        if len(self.lines) >= MAX_BUFFER_LINES:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered lines to the writer, in chunks of whole lines up to ``MAX_WRITE_BYTES``."""
        lines, self.lines = self.lines, []
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > MAX_WRITE_BYTES:
                self._hand_over(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._hand_over(chunk)

    def close(self, timeout_s: float = 1.0) -> None:
        """Flush, then let the writer finish what it has (at most ``timeout_s``)."""
        self.flush()
        with contextlib.suppress(queue.Full):
            self._chunks.put_nowait(None)
        self._writer.join(timeout_s)

    def _hand_over(self, chunk: list[bytes]) -> None:
        try:
            self._chunks.put_nowait(b"".join(chunk))
        except queue.Full:
            self.dropped += len(chunk)

    def _write_chunks(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            try:
                self.stream.write(chunk)
                self.stream.flush()
            except (OSError, ValueError):
                return  # stdout closed: the edge keeps serving, without its access log
