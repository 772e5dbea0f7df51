"""The embedded redis-server is supervised (issue 17.4): killed, it comes back on the same data and the
gateway recovers by itself; a gateway that is stopping never restarts it; a server that cannot start is
retried with a capped back-off, never in a tight loop."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from gateway.embedded_redis import RESTARTS, Backoff, EmbeddedRedis, RedisSupervisor
from tests.conftest import free_port
from tests.integration.test_cli import START_TIMEOUT_S, Server, gateway, sweep_vms

# Every gateway these tests start runs each edge in turn (test_cli's cli_env).
pytestmark = pytest.mark.both_edges

WAIT_S = 20.0
POLL_S = 0.05


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def redis_pid(socket: Path) -> int | None:
    try:
        with redis.Redis(unix_socket_path=str(socket), socket_timeout=1) as client:
            return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError):
        return None


def gone(pid: int) -> bool:
    """No such process (a zombie counts as there: its parent did not reap it)."""
    return not Path(f"/proc/{pid}").exists()


def redis_servers_of(folder: Path) -> list[int]:
    """redis-server processes running on this folder's config."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(folder / "redis.conf").encode() in cmdline:
                found.append(int(entry.name))
    return found


def restarts_metric(admin: str, outcome: str) -> float:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_embedded_redis_restarts_total" and sample.labels == {
                "outcome": outcome
            }:
                return sample.value
    raise AssertionError("no gateway_embedded_redis_restarts_total in /metrics")


def test_a_killed_embedded_redis_comes_back_on_the_same_data_and_the_gateway_recovers(tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "gateway.log"
    admin = f"127.0.0.1:{free_port()}"
    server = Server(data, env={"GATEWAY_ADMIN_LISTEN": admin}, log_path=log)
    socket = data / "redis" / "redis.sock"
    try:
        key = gateway("--data-dir", str(data), "keys", "create", "--name", "k").stdout.split()[-1]
        status, vm = server.call("POST", "/v1/vms", {"vm_lifetime_seconds": 600}, key)
        assert status == 200, vm
        serve_files = 'python3 -m http.server 3000 --bind "${HOST:-0.0.0.0}" >/dev/null 2>&1 &'
        assert (
            server.call(
                "POST",
                "/execute",
                {"session_id": vm["session_id"], "language": "bash", "command": serve_files},
                key,
            )[0]
            == 200
        )
        status, app = server.call("GET", f"/v1/sessions/app-url/{vm['session_id']}?port=3000", None, key)
        assert status == 200, app
        wait_for(lambda: http_status(app["url"]) == 200, "the app answers through the edge")
        assert http_status(f"http://{admin}/readyz") == 200

        old = redis_pid(socket)
        assert old is not None
        os.kill(old, signal.SIGKILL)  # as the OOM killer would

        new = wait_for(lambda: (pid := redis_pid(socket)) not in (None, old) and pid, "a new redis-server")
        wait_for(lambda: gone(old), "the killed redis-server reaped, not left a zombie")
        wait_for(lambda: http_status(f"http://{admin}/readyz") == 200, "/readyz back to 200")
        # What was written before is there: the key (the VM's owner) and the VM with its route.
        status, seen = server.call("GET", f"/v1/vms/{vm['vm_id']}", None, key)
        assert (status, seen["status"]) == (200, "active"), seen
        wait_for(lambda: http_status(app["url"]) == 200, "the app answers through the edge again")
        assert server.call("POST", "/v1/sessions/session", {"api_key": key})[0] == 200
        assert restarts_metric(admin, "restarted") == 1
        assert restarts_metric(admin, "failed") == 0
        said = log.read_text()
        assert f"redis-server (pid {old}) was killed by SIGKILL; restarting it on the same data" in said, said
        assert f"embedded redis-server restarted (pid {new})" in said, said

        assert server.call("DELETE", f"/v1/vms/{vm['vm_id']}", None, key)[0] == 200
        assert server.stop() == 0
        assert redis_servers_of(data / "redis") == []  # it stopped the restarted one too
    finally:
        server.kill()
        sweep_vms(data)


def test_a_stopping_gateway_does_not_restart_its_redis(tmp_path: Path) -> None:
    """SIGTERM to every process of the service at once, as systemd stops a unit, while a request is in
    flight (so the gateway drains for a while): Redis goes, and stays gone."""
    data, log = tmp_path / "data", tmp_path / "gateway.log"
    server = Server(data, log_path=log)
    socket = data / "redis" / "redis.sock"
    try:
        key = gateway("--data-dir", str(data), "keys", "create", "--name", "k").stdout.split()[-1]
        fifo = tmp_path / "started"
        os.mkfifo(fifo)
        command = f"echo started > {fifo}; sleep 2"
        caller = threading.Thread(
            target=lambda: server.call("POST", "/execute", {"language": "bash", "command": command}, key)
        )
        caller.start()
        fifo.read_text()  # the request is in flight
        pid = redis_pid(socket)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)  # Redis first: the supervisor sees it exit before the gateway stops
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=START_TIMEOUT_S) == 0
        caller.join(START_TIMEOUT_S)
        said = log.read_text()
        assert "restarted" not in said, said
        assert redis_servers_of(data / "redis") == []
    finally:
        server.kill()
        sweep_vms(data)


def test_the_back_off_doubles_up_to_its_cap() -> None:
    delays = Backoff(first_s=0.0, min_s=0.25, max_s=2.0).delays()
    assert [next(delays) for _ in range(7)] == [0.0, 0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def test_a_redis_that_cannot_start_is_retried_with_back_off_then_comes_back(
    own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    with redis.Redis(unix_socket_path=str(own_redis.socket_path)) as client:
        client.set("before", "kept")
    attempts = tmp_path / "attempts"
    failing = tmp_path / "failing-redis-server"
    failing.write_text(f"#!/bin/sh\ndate +%s.%N >> {attempts}\nexit 1\n")
    failing.chmod(0o755)
    backoff = Backoff(first_s=0.0, min_s=0.1, max_s=0.4)
    supervisor = RedisSupervisor(own_redis, backoff=backoff)
    supervisor.start()
    failed_before = RESTARTS.get("failed", 0)
    try:
        real_binary, own_redis.binary = own_redis.binary, str(failing)
        assert own_redis.process is not None
        own_redis.process.kill()
        # Counted once the supervisor saw the attempt fail, which is after the script wrote its line.
        await asyncio.to_thread(
            wait_for, lambda: RESTARTS.get("failed", 0) - failed_before >= 6, "six failed attempts"
        )
        times = [float(t) for t in attempts.read_text().split()]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Each attempt waited at least its delay (a little less for the clock's granularity): no spinning.
        for gap, delay in zip(gaps, [0.1, 0.2, 0.4, 0.4, 0.4], strict=False):
            assert gap >= delay * 0.9, gaps
        assert len(times) >= 6

        own_redis.binary = real_binary  # the cause is fixed: the next attempt succeeds
        await asyncio.to_thread(wait_for, lambda: redis_pid(own_redis.socket_path), "redis-server back")
        with redis.Redis(unix_socket_path=str(own_redis.socket_path)) as client:
            assert client.get("before") == b"kept"  # its append-only file, read again
    finally:
        await supervisor.stop()


async def test_a_supervisor_that_is_stopping_does_not_restart(own_redis: EmbeddedRedis) -> None:
    supervisor = RedisSupervisor(own_redis, backoff=Backoff(first_s=60.0))
    supervisor.start()
    assert own_redis.process is not None
    own_redis.process.kill()
    await asyncio.to_thread(wait_for, lambda: own_redis.process is None, "the exit seen")
    started = time.monotonic()
    await supervisor.stop()  # during the back-off
    assert time.monotonic() - started < 2.0
    assert own_redis.process is None
    assert redis_servers_of(own_redis.folder) == []
