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

import contextlib
import json
import os
import queue
import select
import stat
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, BinaryIO, Final

from gateway.edge.http1 import compiled_for

# Upstream time (request sent -> response head) buckets, seconds: from a VM on this host to a slow app.
# (tuple[float, ...]: a fixed-length tuple type would be a C struct in the compiled edge, made into a
# Python tuple again for every bisect.)
UPSTREAM_BUCKETS_S: Final[tuple[float, ...]] = (
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
FLUSH_INTERVAL_S: Final = 0.25
# Writes to a pipe up to PIPE_BUF (4096 on Linux) are atomic: each write is whole lines within it.
MAX_WRITE_BYTES: Final = 4096
MAX_BUFFER_LINES: Final = 1000
# Chunks (one per flush) waiting for the writer thread; beyond this lines are dropped, not queued.
MAX_PENDING_CHUNKS: Final = 256
# Bytes kept for a pipe that is full; beyond this, they are dropped.
MAX_PENDING_BYTES: Final = 1 << 20
# At exit: how long the log waits for a slow reader to take the lines still waiting for it.
CLOSE_TIMEOUT_S: Final = 5.0


# What counts as a VM's client activity (the idle clock, ``idle_timeout_s``; the state's ACTIVITY_*):
# a request head or request body bytes; client-to-VM WebSocket data frames (never ping, pong or close);
# client bytes in any other upgraded connection. Responses and bytes from the VM never count.
ACTIVITY_HTTP: Final = "http"
ACTIVITY_WEBSOCKET: Final = "websocket"
ACTIVITY_TUNNEL: Final = "tunnel"


class VmUse:
    """One VM's use of this edge: what it carried since the last flush, what it has open now, and the
    source of its latest client activity. The exchange holds it, so the hot path counts in plain fields
    (no dict keyed by the VM per request)."""

    __slots__ = ("active", "bytes_in", "bytes_out", "exchanges", "requests", "tunnels")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.requests = 0  # exchanges ended (requests and upgrades)
        self.exchanges = 0  # open now: requests in flight and tunnels
        self.tunnels = 0  # of them, tunnels
        self.active: str | None = None  # one of the ACTIVITY_* sources, since the last take_active()

    def ended(self, bytes_in: int, bytes_out: int, tunnel: bool) -> None:
        """An exchange counted by ``VmTraffic.started`` ended, having carried these bytes."""
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.requests += 1
        self.exchanges -= 1
        if tunnel:
            self.tunnels -= 1

    def unused(self) -> bool:
        return not (self.exchanges or self.requests or self.bytes_in or self.bytes_out or self.active)


class VmTraffic:
    """Per VM: bytes carried and exchanges (requests and upgrades) since the last flush (a session's
    usage), what is open now, and the last client activity; a task hands them to the state.

    Counted when an exchange ends: a long WebSocket's bytes land when it closes. Activity is noted as it
    happens (a field store: the flush stamps the time, so the hot path reads no clock). A VM with
    nothing open and nothing to report holds no entry (the table stays as small as what is in use)."""

    __slots__ = ("vms",)

    def __init__(self) -> None:
        self.vms: dict[str, VmUse] = {}

    def started(self, vm_id: str, cap: int) -> VmUse | None:
        """Count one more exchange open to the VM; None, counting nothing, when it has ``cap`` open
        already (0: no cap)."""
        use = self.vms.get(vm_id)
        if use is None:  # (_use's lookup, inline: a call here cost ~160 instructions per request)
            use = self.vms[vm_id] = VmUse()
        elif cap and use.exchanges >= cap:
            return None
        use.exchanges += 1
        return use

    def take(self) -> dict[str, tuple[int, int, int]]:
        """What was counted since the last take (bytes in, bytes out, exchanges), and start again from
        zero."""
        counts = {}
        for vm_id, use in list(self.vms.items()):
            if use.bytes_in or use.bytes_out or use.requests:
                counts[vm_id] = (use.bytes_in, use.bytes_out, use.requests)
                use.bytes_in = use.bytes_out = use.requests = 0
            elif use.unused():
                del self.vms[vm_id]
        return counts

    def take_active(self) -> dict[str, str]:
        """The VMs active since the last take, with their latest activity's source."""
        active = {}
        for vm_id, use in list(self.vms.items()):
            if use.active is not None:
                active[vm_id] = use.active
                use.active = None
            elif use.unused():
                del self.vms[vm_id]
        return active

    def open_now(self) -> dict[str, tuple[int, int]]:
        """Exchanges (requests in flight and tunnels) and, of them, tunnels open per VM right now."""
        return {vm_id: (use.exchanges, use.tunnels) for vm_id, use in self.vms.items() if use.exchanges}

    def give_back(
        self, counts: dict[str, tuple[int, int, int]], active: dict[str, str] | None = None
    ) -> None:
        """Counts (and activity) a flush could not write: kept for the next one (newer activity wins)."""
        for vm_id, (bytes_in, bytes_out, requests) in counts.items():
            use = self._use(vm_id)
            use.bytes_in += bytes_in
            use.bytes_out += bytes_out
            use.requests += requests
        for vm_id, source in (active or {}).items():
            use = self._use(vm_id)
            if use.active is None:
                use.active = source

    def _use(self, vm_id: str) -> VmUse:
        use = self.vms.get(vm_id)
        if use is None:
            use = self.vms[vm_id] = VmUse()
        return use


class KindCounts:
    """One route kind's counters: requests per status, body bytes each way."""

    __slots__ = ("bytes_in", "bytes_out", "statuses")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0


class EdgeStats:
    """Counters of one edge process. Keys are small strings; values plain ints and floats.

    Counted per route kind first (one dict lookup by an interned string, then plain fields): a key of
    (kind, status) would be a tuple made, hashed and compared on every request."""

    __slots__ = (
        "connect_failures",
        "kinds",
        "tunnels_open",
        "tunnels_opened",
        "upstream_buckets",
        "upstream_count",
        "upstream_sum",
    )

    def __init__(self) -> None:
        self.kinds: dict[str, KindCounts] = {}
        self.connect_failures: dict[str, int] = {}  # "refused" / "timeout" -> count
        self.upstream_buckets = [0] * (len(UPSTREAM_BUCKETS_S) + 1)  # the last one is +Inf
        self.upstream_sum = 0.0
        self.upstream_count = 0
        self.tunnels_open = 0
        self.tunnels_opened = 0

    def count(self, kind: str, status: int, bytes_in: int, bytes_out: int, upstream_s: float | None) -> None:
        counts = self._kind(kind)
        statuses = counts.statuses
        statuses[status] = statuses.get(status, 0) + 1
        counts.bytes_in += bytes_in
        counts.bytes_out += bytes_out
        if upstream_s is not None:
            # bisect_left by hand: a loop over 15 floats is native code in the compiled edge, where a call
            # to bisect cost more than the rest of this method.
            bucket = 0
            for bound in UPSTREAM_BUCKETS_S:
                if upstream_s <= bound:
                    break
                bucket += 1
            self.upstream_buckets[bucket] += 1
            self.upstream_sum += upstream_s
            self.upstream_count += 1

    @property
    def requests(self) -> dict[tuple[str, int], int]:
        """(route kind, status) -> requests."""
        return {(kind, status): n for kind, c in self.kinds.items() for status, n in c.statuses.items()}

    @property
    def bytes_in(self) -> dict[str, int]:
        """Route kind -> request body bytes (and tunnel bytes up)."""
        return {kind: c.bytes_in for kind, c in self.kinds.items() if c.bytes_in}

    @property
    def bytes_out(self) -> dict[str, int]:
        """Route kind -> response body bytes (and tunnel bytes down)."""
        return {kind: c.bytes_out for kind, c in self.kinds.items() if c.bytes_out}

    def _kind(self, kind: str) -> KindCounts:
        counts = self.kinds.get(kind)
        if counts is None:
            counts = self.kinds[kind] = KindCounts()
        return counts

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
                    statuses = total._kind(kind).statuses
                    statuses[int(status)] = statuses.get(int(status), 0) + int(n)
                for kind, n in snap["bytes_in"].items():
                    total._kind(kind).bytes_in += int(n)
                for kind, n in snap["bytes_out"].items():
                    total._kind(kind).bytes_out += int(n)
                for key, n in snap["connect_failures"].items():
                    total.connect_failures[key] = total.connect_failures.get(key, 0) + int(n)
                for i, n in enumerate(snap["upstream_buckets"][: len(total.upstream_buckets)]):
                    total.upstream_buckets[i] += int(n)
                total.upstream_sum += float(snap["upstream_sum"])
                total.upstream_count += int(snap["upstream_count"])
                total.tunnels_open += int(snap["tunnels_open"])
                total.tunnels_opened += int(snap["tunnels_opened"])
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
        return total


# (A Final alias: the compiled edge calls it without looking up the module's attribute.)
_wall_clock: Final = time.time
_quote: Final = json.encoder.encode_basestring_ascii  # C: "text" with escapes
# Bytes that may stand in a JSON string as they are: printable ASCII but '"' and '\\'. A value is safe when
# deleting them leaves nothing (bytes.translate, one C loop: half the cost of a regex search here).
_JSON_SAFE: Final = bytes(b for b in range(0x20, 0x7F) if b not in b'"\\')
# Pre-formatted pieces per (client, method, host), per path and per (route kind, id, status, error): a
# busy edge sees few distinct ones, so most of a line is cached bytes. Each cache is emptied when it holds
# this many; targets are kept only up to MAX_CACHED_PATH_BYTES (so the path cache stays under 4 MiB).
MAX_CACHED_PIECES: Final = 4096
MAX_CACHED_PATH_BYTES: Final = 256
# A line is joined from cached pieces (the clock's second, who, path, outcome) and numbers, with no
# format call: small numbers come from tables; times are whole microseconds split into milliseconds and
# hundredths by integer arithmetic (native in the compiled edge). A %-format of the same line cost about
# half of all the line's work there (callgrind).
_DECIMAL: Final = [b"%d" % n for n in range(1000)]
_TWO_DIGITS: Final = [b"%02d" % n for n in range(100)]
_THREE_DIGITS: Final = [b"%03d" % n for n in range(1000)]


def _decimal(n: int) -> bytes:
    return _DECIMAL[n] if 0 <= n < 1000 else b"%d" % n


def _milliseconds(us: int) -> bytes:
    """Microseconds as milliseconds with two decimals ("12.34")."""
    return _decimal(us // 1000) + b"." + _TWO_DIGITS[us // 10 % 100]


def log_numbers(
    json: bool, bytes_in: int, bytes_out: int, upstream_us: int | None, duration_us: int
) -> bytes:
    """An access line's numbers, from `` in=`` to the duration's ``ms`` (text) or from ``,"bytes_in"`` to
    the end of the line (JSON). The compiled edge writes the same bytes in C (http1c.log_numbers)."""
    if json:
        return b"".join([
            b',"bytes_in":', _decimal(bytes_in), b',"bytes_out":', _decimal(bytes_out), b',"upstream_ms":',
            _milliseconds(upstream_us) if upstream_us is not None else b"null", b',"duration_ms":',
            _milliseconds(duration_us), b"}\n",
        ])  # fmt: skip
    return b"".join([
        b" in=", _decimal(bytes_in), b" out=", _decimal(bytes_out),
        b" upstream=" + _milliseconds(upstream_us) + b"ms " if upstream_us is not None else b" ",
        _milliseconds(duration_us), b"ms",
    ])  # fmt: skip


def log_line(
    json: bool, clock: bytes, ms: int, who: bytes, path: bytes, what: bytes, error: bytes, request_id: bytes,
    bytes_in: int, bytes_out: int, upstream_us: int | None, duration_us: int,
) -> bytes:  # fmt: skip
    """One access line: the second's ``clock`` (JSON: and its milliseconds, ``ms``), the cached pieces
    (``error`` is text lines' only), the request id and the numbers. The compiled edge writes the same
    bytes in C (http1c.log_line), in one allocation."""
    numbers = log_numbers(json, bytes_in, bytes_out, upstream_us, duration_us)
    if json:
        return b"".join([
            clock, _THREE_DIGITS[ms], b',"type":"access","request_id":"', request_id, b'"', who, b',"path":',
            path, what, numbers,
        ])  # fmt: skip
    return b"".join([clock, b" ", who, path, what, numbers, error, b" rid=", request_id, b"\n"])


_COMPILED: Final = compiled_for(__name__)
_LOG_LINE: Final = _COMPILED.log_line if _COMPILED is not None else log_line


def _json(value: bytes) -> bytes:
    """A JSON string of raw bytes (read as Latin-1, as HTTP heads are)."""
    if not value.translate(None, _JSON_SAFE):
        return b'"' + value + b'"'
    return _quote(value.decode("latin-1")).encode()


def printable(value: bytes) -> bytes:
    """``value`` as it may stand inside a JSON string (and in a text line): escaped where it must be."""
    return value if not value.translate(None, _JSON_SAFE) else _json(value)[1:-1]


class AccessLog:
    """Buffered access-log lines, JSON or human-readable, that never make the event loop wait.

    Given a file descriptor (stderr), lines are written from the loop itself, which costs least: to a
    regular file or a character device directly, to a pipe through a non-blocking descriptor of its own
    (a full pipe nobody reads keeps up to ``MAX_PENDING_BYTES`` waiting, then drops lines and counts
    them in ``dropped``). A descriptor that cannot be made non-blocking alone (a socket) or a Python
    stream is written by a thread instead (dearer: the two threads trade the GIL).
    """

    def __init__(self, fmt: str = "json", target: int | BinaryIO | None = None) -> None:
        self.json = fmt == "json"
        self.lines: list[bytes] = []
        self.dropped = 0
        self._second = 0
        self._clock = b""  # the line's start for the current second
        self._who: dict[tuple[str, bytes, bytes | None], bytes] = {}
        self._what: dict[tuple[str, str | None, int, str | None], tuple[bytes, bytes]] = {}
        self._paths: dict[bytes, bytes] = {}  # request target -> its path, escaped
        self._last_who: tuple[str, bytes, bytes | None, bytes] = ("", b"", None, b"")  # (no method is b"")
        self._last_what: tuple[str, str | None, int, str | None, bytes, bytes] = ("", None, 0, None, b"", b"")
        self._pending = b""  # not yet accepted by a full pipe
        self._fd: int | None = None
        self._own_fd = False
        self._stream: BinaryIO | None = None
        self._chunks: queue.Queue[bytes | None] | None = None
        target = sys.stderr.buffer if target is None else target
        if isinstance(target, int):
            self._fd, self._own_fd = _loop_writable(target)
        if self._fd is None:
            self._stream = target if not isinstance(target, int) else os.fdopen(target, "wb", closefd=False)
            self._chunks = queue.Queue(MAX_PENDING_CHUNKS)
            self._writer = threading.Thread(target=self._write_chunks, name="access-log", daemon=True)
            self._writer.start()

    def write(
        self, client: str, method: bytes, host: bytes | None, url: bytes, kind: str, route_id: str | None,
        status: int, code: str | None, request_id: bytes, bytes_in: int, bytes_out: int,
        upstream_s: float | None, duration_s: float,
    ) -> None:  # fmt: skip
        """One line for an exchange that ended (its fields as ``Exchange`` has them; ``bytes_in`` is its
        ``sent_bytes``), joined from cached pieces and numbers (see _DECIMAL). The request id
        must be ``printable`` already (the edge's own ids are; Edge.observe escapes a proxy's)."""
        now = _wall_clock()
        second = int(now)
        if second != self._second:
            self._new_second(second)
        # Targets repeat (an app's pages, assets, API calls): each one's path is cut from its query (never
        # logged: apps put tokens there) and escaped once, then looked up.
        logged_path = self._paths.get(url)
        if logged_path is None:
            logged_path = self._path_piece(url)
            if len(url) <= MAX_CACHED_PATH_BYTES:
                self._cache(self._paths, url, logged_path)
        # The previous line's pieces are tried first: lines come in runs of one client's keep-alive
        # connection, and comparing them costs less than a tuple key's hash and lookup.
        last_who = self._last_who
        if client == last_who[0] and method == last_who[1] and host == last_who[2]:
            who = last_who[3]
        else:
            peer = (client, method, host)
            cached = self._who.get(peer)
            who = cached if cached is not None else self._cache(self._who, peer, self._who_piece(*peer))
            self._last_who = (client, method, host, who)
        last_what = self._last_what
        if (
            kind == last_what[0] and route_id == last_what[1] and status == last_what[2]
            and code == last_what[3]
        ):  # fmt: skip
            what, error = last_what[4], last_what[5]
        else:
            outcome = (kind, route_id, status, code)
            what_error = self._what.get(outcome)
            if what_error is None:
                what_error = self._cache(self._what, outcome, self._what_piece(kind, route_id, status, code))
            what, error = what_error
            self._last_what = (kind, route_id, status, code, what, error)
        line = _LOG_LINE(
            self.json, self._clock, int((now - second) * 1000), who, logged_path, what, error, request_id,
            bytes_in, bytes_out, int(upstream_s * 1_000_000) if upstream_s is not None else None,
            int(duration_s * 1_000_000),
        )  # fmt: skip
        lines = self.lines
        lines.append(line)
        if len(lines) >= MAX_BUFFER_LINES:
            self.flush()

    def _new_second(self, second: int) -> None:
        self._second = second
        if self.json:
            self._clock = b'{"ts":%d.' % second  # the milliseconds follow, %03d
        else:
            self._clock = time.strftime("%H:%M:%S", time.localtime(second)).encode()

    @staticmethod
    def _cache(cache: dict[Any, Any], key: Any, piece: Any) -> Any:
        if len(cache) >= MAX_CACHED_PIECES:
            cache.clear()
        cache[key] = piece
        return piece

    def _who_piece(self, client: str, method: bytes, host: bytes | None) -> bytes:
        if self.json:
            return b',"client":%s,"method":%s,"host":%s' % (
                _json(client.encode()),
                _json(method),
                _json(host or b""),
            )
        return b"%s %s %s" % (client.encode(), printable(method), printable(host or b""))

    def _path_piece(self, url: bytes) -> bytes:
        path = url.partition(b"?")[0]
        return _json(path) if self.json else printable(path)

    def _what_piece(
        self, kind: str, route_id: str | None, status: int, code: str | None
    ) -> tuple[bytes, bytes]:
        """The outcome's piece, and (text lines) its error's, which comes at the end of the line."""
        route = route_id.encode("ascii", "replace") if route_id else None
        error = code.encode() if code else None
        if self.json:
            what = b',"route":%s,"id":%s,"status":%d,"error":%s' % (
                _json(kind.encode()), _json(route) if route else b"null", status,
                _json(error) if error else b"null",
            )  # fmt: skip
            return what, b""
        what = b" -> %d %s%s" % (status, kind.encode(), b" " + printable(route) if route else b"")
        return what, b" error=" + printable(error) if error else b""

    def flush(self) -> None:
        """Write (or hand over) the buffered lines: joined once, written in pieces of whole lines of at
        most ``MAX_WRITE_BYTES`` (see ``_out``)."""
        if not self.lines:
            return
        lines, self.lines = self.lines, []
        self._out(b"".join(lines), len(lines))

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Flush, and wait up to ``timeout_s`` for every line to be taken: a pipe that was full gets what
        waited for it (the process is stopping: a SIGTERM loses no line to a slow reader), a writer thread
        finishes what it has."""
        self.flush()
        if self._chunks is not None:
            with contextlib.suppress(queue.Full):
                self._chunks.put_nowait(None)
            self._writer.join(timeout_s)
        elif self._pending and self._fd is not None:
            self._drain_pending(time.monotonic() + timeout_s)
        if self._own_fd and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _drain_pending(self, deadline: float) -> None:
        """Write what a full pipe kept waiting, waiting for room until ``deadline`` (at close only)."""
        assert self._fd is not None
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                break
            chunk, self._pending = self._pending, b""
            self._write(chunk)
        if self._pending:
            self.dropped += self._pending.count(b"\n")
            self._pending = b""

    def _out(self, chunk: bytes, lines: int) -> None:
        if self._chunks is not None:
            try:
                self._chunks.put_nowait(chunk)
            except queue.Full:
                self.dropped += lines
            return
        if self._pending:
            if len(self._pending) > MAX_PENDING_BYTES:
                self.dropped += self._pending.count(b"\n")
                self._pending = b""
            chunk, self._pending = self._pending + chunk, b""
        self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        assert self._fd is not None
        view = memoryview(chunk)  # pieces by offset: the rest is not copied for each piece
        start = 0
        try:
            while start < len(chunk):
                # Pieces of at most PIPE_BUF on a whole-line boundary: each lands whole or not at all.
                end = start + MAX_WRITE_BYTES
                if end < len(chunk):
                    newline = chunk.rfind(b"\n", start, end)
                    if newline >= 0:
                        end = newline + 1
                start += os.write(self._fd, view[start:end])
        except BlockingIOError:
            self._pending = chunk[start:]  # the reader is behind: try again at the next flush
        except OSError:
            self.dropped += chunk.count(b"\n", start)  # stderr is gone: the edge keeps serving without it

    def _write_chunks(self) -> None:
        assert self._chunks is not None and self._stream is not None
        while (chunk := self._chunks.get()) is not None:
            try:
                self._stream.write(chunk)
                self._stream.flush()
            except (OSError, ValueError):
                return  # the stream is closed: the edge keeps serving, without its access log


def _loop_writable(fd: int) -> tuple[int | None, bool]:
    """(a descriptor the loop may write ``fd``'s lines to without blocking, whether it is our own)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return None, False
    if stat.S_ISREG(mode) or stat.S_ISCHR(mode):
        return fd, False  # a file or /dev/null (or a terminal): writes complete at once
    if stat.S_ISFIFO(mode):
        # A pipe opened again is a new open-file description: non-blocking for us alone.
        try:
            return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC), True
        except OSError:
            return None, False
    return None, False
