"""The edge's counters and access log (no sockets: pipes and files stand in for stderr)."""

from __future__ import annotations

import io
import json
import os

import pytest

from gateway.edge.observe import MAX_PENDING_BYTES, UPSTREAM_BUCKETS_S, AccessLog, EdgeStats, VmTraffic

# Every test here runs on each edge (the compiled one and the pure-Python one): tests/conftest.py.
pytestmark = pytest.mark.both_edges


def write(log: AccessLog, client: str, duration_s: float, **changes: object) -> None:
    """A line for an exchange (its fields as Edge.observe hands them over), with ``changes``."""
    fields = dict(
        method=b"GET", host=b"a.test:8080", url=b"/v1/app/s/3000/x?token=secret", kind="path", route_id="s",
        status=200, code=None, request_id=b"1f2e3d4c-2a", bytes_in=5, bytes_out=100, upstream_s=0.0123,
    )  # fmt: skip
    log.write(client=client, duration_s=duration_s, **(fields | changes))  # type: ignore[arg-type]


def test_json_lines_parse_and_never_hold_the_query() -> None:
    out = io.BytesIO()
    log = AccessLog("json", out)
    write(log, "127.0.0.1", 0.02)
    write(log, "::1", 0.001, host=b'e"vil\\\x01\xe9', route_id=None, code="no_route", upstream_s=None)
    log.close()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["path"] == "/v1/app/s/3000/x" and "secret" not in json.dumps(first)
    assert (first["status"], first["bytes_in"], first["bytes_out"]) == (200, 5, 100)
    assert (first["upstream_ms"], first["duration_ms"]) == (12.3, 20.0)
    assert second["host"] == 'e"vil\\\x01\xe9'  # escaped on the way out, intact on the way back
    assert (second["id"], second["error"], second["upstream_ms"]) == (None, "no_route", None)


def test_text_lines_are_one_per_exchange() -> None:
    out = io.BytesIO()
    log = AccessLog("text", out)
    write(log, "127.0.0.1", 0.02)
    log.close()
    [line] = out.getvalue().splitlines()
    assert b"GET a.test:8080/v1/app/s/3000/x -> 200 path s" in line and b"secret" not in line


def test_a_full_pipe_never_blocks_the_writer_and_lines_are_dropped_past_the_limit() -> None:
    read_end, write_end = os.pipe()
    try:
        log = AccessLog("json", write_end)
        line_bytes = 300
        written = 0
        while written < 2 * MAX_PENDING_BYTES + 200_000:  # far more than the pipe and the backlog hold
            write(log, "127.0.0.1", 0.001, url=b"/" + b"p" * (line_bytes - 280))
            written += line_bytes
            if len(log.lines) >= 100:
                log.flush()  # returns at once though nobody reads
        log.flush()
        assert log.dropped > 0
        data = os.read(read_end, 1 << 16)
        assert all(json.loads(line)["status"] == 200 for line in data.splitlines()[:-1])  # whole lines
        log.close()
    finally:
        os.close(read_end)
        os.close(write_end)


def test_stats_merge_sums_processes_and_skips_garbage() -> None:
    one, two = EdgeStats(), EdgeStats()
    one.count("path", 200, 10, 100, 0.002)
    two.count("path", 200, 0, 50, 100.0)
    two.count("api", 404, 0, 0, None)
    two.connect_failed("refused")
    merged = EdgeStats.merge([one.snapshot(), two.snapshot(), {"requests": "garbage"}])
    assert merged.requests == {("path", 200): 2, ("api", 404): 1}
    assert (merged.bytes_in, merged.bytes_out) == ({"path": 10}, {"path": 150})
    assert merged.connect_failures == {"refused": 1}
    assert merged.upstream_count == 2 and merged.upstream_buckets[-1] == 1  # 100 s: past the last bound
    assert merged.upstream_buckets[UPSTREAM_BUCKETS_S.index(0.0025)] == 1


def test_vm_traffic_keeps_the_latest_activity_per_vm_until_taken() -> None:
    traffic = VmTraffic()
    assert traffic.take_active() == {}
    a, b = traffic.started("vm-a", 0), traffic.started("vm-b", 0)
    assert a is not None and b is not None
    a.active = "http"
    b.active = "websocket"
    a.active = "tunnel"  # the latest source wins
    assert traffic.take_active() == {"vm-a": "tunnel", "vm-b": "websocket"}
    assert traffic.take_active() == {}  # taken: starts again
    # A flush that failed gives back what it took; newer activity meanwhile wins over it.
    b.active = "http"
    traffic.give_back({"vm-a": (1, 2, 3)}, {"vm-a": "http", "vm-b": "websocket"})
    assert traffic.take_active() == {"vm-a": "http", "vm-b": "http"}
    assert traffic.take() == {"vm-a": (1, 2, 3)}


def test_vm_traffic_counts_what_is_open_caps_it_and_forgets_a_vm_with_nothing_left() -> None:
    traffic = VmTraffic()
    first, second = traffic.started("vm-a", 2), traffic.started("vm-a", 2)
    assert first is second is not None
    assert traffic.started("vm-a", 2) is None  # at its cap: refused, nothing counted
    first.tunnels += 1  # the second became a tunnel
    assert traffic.open_now() == {"vm-a": (2, 1)}
    first.ended(10, 20, tunnel=False)
    first.ended(5, 7, tunnel=True)
    assert traffic.open_now() == {}
    assert traffic.take() == {"vm-a": (15, 27, 2)}
    assert traffic.take() == {} and traffic.take_active() == {}
    assert traffic.vms == {}  # nothing open, nothing to report: no entry
    again = traffic.started("vm-a", 2)
    assert again is not None and again is not first and again.exchanges == 1
