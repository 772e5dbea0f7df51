"""What an operator sees: /metrics moving with traffic, /healthz and /readyz (Redis lost and back), and
one access-log line per request with the request id the VM and the control plane saw, and no secrets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from gateway.edge.impl import select
from gateway.embedded_redis import EmbeddedRedis
from tests.conftest import GatewayUnderTest, destroy_all, free_port, running_edge
from tests.integration.test_edge import APP_PORT, start_app

# Gateways started as processes here run each edge in turn too.
pytestmark = pytest.mark.both_edges

WAIT_S = 10.0


def admin_url(gw: GatewayUnderTest) -> str:
    return f"http://{gw.config.admin.listen}"


async def scrape(gw: GatewayUnderTest) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    async with aiohttp.ClientSession() as client:
        async with client.get(admin_url(gw) + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def on_own_redis(
    gateway_factory: object, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Callable[..., Awaitable[tuple[GatewayUnderTest, EmbeddedRedis]]]]:
    """Start a gateway on a Redis of the test's own, which the test may stop and start again. Afterwards
    the gateway stops (its VMs removed) with that Redis running, and then the Redis stops."""
    own = EmbeddedRedis(tmp_path_factory.mktemp("own-redis"))
    own.start()
    started: list[GatewayUnderTest] = []

    async def start(**sections: dict) -> tuple[GatewayUnderTest, EmbeddedRedis]:
        redis_section = {"url": own.url, "call_timeout_s": 0.5} | sections.pop("redis", {})
        gw = await gateway_factory("process", redis=redis_section, **sections)  # type: ignore[operator]
        started.append(gw)
        return gw, own

    try:
        yield start
    finally:
        if own.process is None:
            own.start()
        for gw in started:
            if gw.running:
                await destroy_all(gw.services)
                await gw.stop()
        own.stop()


async def test_metrics_count_requests_failures_cache_and_vms(gw: GatewayUnderTest) -> None:
    sid, vm_id, url = await start_app(gw)
    before = await scrape(gw)
    requests = 25
    async with aiohttp.ClientSession() as client:
        for _ in range(requests):
            async with client.get(url + "echo") as resp:
                assert resp.status == 200
        async with client.get(f"{gw.url}/v1/app/{sid}/{APP_PORT + 1}/") as resp:
            assert resp.status == 404  # not exposed
        status, _ = await gw.request("GET", f"/v1/sessions/app-url/{sid}?port={APP_PORT + 1}")
        assert status == 200  # exposed now, but nothing listens there
        async with client.get(f"{gw.url}/v1/app/{sid}/{APP_PORT + 1}/") as resp:
            assert resp.status == 502
        after = await scrape(gw)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("gateway_edge_requests_total", route="path", status="200") == requests
    assert grew("gateway_edge_requests_total", route="path", status="404") == 1
    assert grew("gateway_edge_requests_total", route="path", status="502") == 1
    assert grew("gateway_edge_requests_total", route="api", status="200") >= 1
    assert grew("gateway_edge_upstream_connect_failures_total", reason="refused") == 1
    assert grew("gateway_edge_upstream_response_seconds_count") >= requests
    assert grew("gateway_edge_sent_bytes_total", route="path") > 0
    assert grew("gateway_route_cache_hits_total") >= requests - 2
    assert grew("gateway_route_cache_misses_total") >= 1
    assert grew("gateway_redis_call_seconds_count") > 0
    assert value(after, "gateway_vms", state="active", driver="process") == 1
    assert ("gateway_acme_orders_total", (("outcome", "issued"),)) in after

    status, _ = await gw.request("DELETE", f"/v1/vms/{vm_id}")
    assert status == 200
    assert value(await scrape(gw), "gateway_vms", state="active", driver="process") == 0


async def test_open_connections_and_tunnels_are_gauges(gw: GatewayUnderTest) -> None:
    _, _, url = await start_app(gw)
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(url + "ws") as ws:
            await ws.send_str("hi")
            assert (await ws.receive()).data == "hi"
            during = await scrape(gw)
        assert value(during, "gateway_edge_open_tunnels") == 1
        assert value(during, "gateway_edge_open_connections") >= 1
        assert value(during, "gateway_edge_tunnels_total") >= 1

        async def tunnel_closed() -> bool:
            return value(await scrape(gw), "gateway_edge_open_tunnels") == 0

        deadline = time.monotonic() + WAIT_S
        while not await tunnel_closed():
            assert time.monotonic() < deadline, "the tunnel gauge did not go back to 0"
            await asyncio.sleep(0.02)


async def test_readiness_follows_redis_down_and_back(on_own_redis) -> None:
    gw, own = await on_own_redis()
    async with aiohttp.ClientSession() as client:

        async def ready() -> tuple[int, dict]:
            async with client.get(admin_url(gw) + "/readyz") as resp:
                return resp.status, await resp.json()

        async def wait_ready(expected: int) -> dict:
            deadline = time.monotonic() + WAIT_S
            while (answer := await ready())[0] != expected:
                assert time.monotonic() < deadline, f"readyz stayed {answer}"
                await asyncio.sleep(0.05)
            return answer[1]

        body = await wait_ready(200)
        assert body == {"ready": True, "checks": {"redis": True, "routes": True, "listeners": True}}
        own.stop()
        body = await wait_ready(503)
        assert body["checks"]["redis"] is False
        async with client.get(admin_url(gw) + "/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})  # alive all along
        async with client.get(admin_url(gw) + "/metrics") as resp:
            assert resp.status == 200  # the process's own counters, Redis failures included
            assert "gateway_redis_errors_total" in await resp.text()
        status, body = await gw.request("GET", "/v1/vms")
        assert (status, body["code"]) == (503, "store_unavailable")
        own.start()  # the same socket and data folder: the gateway reconnects by itself
        assert (await wait_ready(200))["ready"] is True
        status, _ = await gw.request("GET", "/v1/vms")
        assert status == 200


async def test_the_edge_serves_known_routes_through_a_redis_outage_then_fails_closed(on_own_redis) -> None:
    grace_s = 2.0
    gw, own = await on_own_redis(edge={"redis_grace_s": grace_s})
    sid, _, url = await start_app(gw)
    unknown = f"{gw.url}/v1/app/{sid}/{APP_PORT + 7}/"  # never looked up: nothing cached
    async with aiohttp.ClientSession() as client:

        async def status_of(target: str) -> int:
            async with client.get(target) as resp:
                return resp.status

        assert await status_of(url + "echo") == 200  # cached now
        own.stop()
        outage = time.monotonic()
        assert await status_of(url + "echo") == 200  # served from what the edge knew
        assert await status_of(unknown) == 503  # nothing known: fails closed at once
        while (status := await status_of(url + "echo")) == 200:
            assert time.monotonic() - outage < grace_s + 2.0, "the grace did not end"
            await asyncio.sleep(0.05)
        assert status == 503  # fails closed once the grace is over
        assert time.monotonic() - outage >= grace_s - 0.1
        samples = await scrape(gw)
        assert value(samples, "gateway_route_cache_stale_hits_total") >= 1
        own.start()
        deadline = time.monotonic() + WAIT_S
        while await status_of(url + "echo") != 200:  # recovers by itself
            assert time.monotonic() < deadline, "the edge did not recover"
            await asyncio.sleep(0.05)


async def test_one_access_log_line_per_request_with_ids_and_no_secrets(
    gateway_factory: object, capfd: pytest.CaptureFixture[str]
) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", log={"format": "json"})  # type: ignore[operator]
    status, vm = await gw.request("POST", "/v1/vms", json={"share": {"port": APP_PORT, "is_public": False}})
    assert status == 200, vm
    token = vm["share"]["access_token"]
    from tests.integration.test_edge import echo_app_command

    status, out = await gw.request(
        "POST",
        "/execute",
        json={"session_id": vm["session_id"], "language": "bash", "command": echo_app_command(APP_PORT)},
    )
    assert out["exit_code"] == 0
    url = f"{gw.url}/v1/app/{vm['session_id']}/{APP_PORT}/"
    async with aiohttp.ClientSession() as client:
        async with client.get(
            url + "echo?secret=s3cr3t", headers={"X-Access-Token": token, "X-Request-Id": "forged-by-client"}
        ) as resp:
            assert resp.status == 200
            seen = {name.lower(): v for name, v in (await resp.json())["headers"]}
        async with client.get(url + f"echo?gw_access_token={token}", allow_redirects=False) as resp:
            assert resp.status == 303
    await gw.stop()  # flushes the access log
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry.get("type") == "access"]
    request_id = seen["x-request-id"]
    assert request_id != "forged-by-client"  # an untrusted client's id is replaced
    [entry] = [e for e in access if e["request_id"] == request_id]
    assert entry["route"] == "path" and entry["id"] == vm["session_id"]
    assert entry["status"] == 200 and entry["method"] == "GET"
    assert entry["path"] == f"/v1/app/{vm['session_id']}/{APP_PORT}/echo"  # no query string
    assert entry["bytes_out"] > 0 and entry["upstream_ms"] is not None and entry["duration_ms"] >= 0
    assert any(e["status"] == 303 for e in access)
    api_calls = [e for e in access if e["route"] == "api"]
    assert {e["path"] for e in api_calls} >= {"/v1/vms", "/execute"}
    everything = "\n".join(json.dumps(e) for e in lines)
    for secret in (token, gw.api_key, "s3cr3t"):
        assert secret not in everything


async def test_workers_counters_reach_the_serving_processes_metrics(tmp_path: Path) -> None:
    from tests.integration.test_edge_shutdown import serve_env

    port, admin_port = free_port(), free_port()
    # PYTHONUNBUFFERED: a worker's ready line used to be written in two pieces then, and the second
    # failed once the serving process had read the first (the worker died and was restarted).
    env = serve_env(running_edge())
    env |= {"GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}", "PYTHONUNBUFFERED": "1"}
    gateway = ["-m", "gateway", "--data-dir", str(tmp_path / "data")]
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, *gateway, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "2",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
        assert b"2 edge processes" in line, line
        requests = 200
        async with aiohttp.ClientSession() as client:
            for _ in range(requests):  # new connections: the kernel spreads them over both processes
                async with client.get(
                    f"http://127.0.0.1:{port}/openapi.json", headers={"Connection": "close"}
                ):
                    pass

            samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

            async def counted() -> float:
                nonlocal samples
                async with client.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
                    samples = {
                        (s.name, tuple(sorted(s.labels.items()))): s.value
                        for family in text_string_to_metric_families(await resp.text())
                        for s in family.samples
                    }
                return value(samples, "gateway_edge_requests_total", route="api", status="200")

            deadline = time.monotonic() + WAIT_S
            while (seen := await counted()) < requests:
                assert time.monotonic() < deadline, f"/metrics counted {seen} of {requests}"
                await asyncio.sleep(0.1)  # workers write their counters every second
            assert seen == requests
            # Which edge both processes run, on /metrics too.
            running = select(running_edge()).name
            assert value(samples, "gateway_edge_processes", implementation=running) == 2, [
                (k, v) for k, v in samples.items() if k[0] == "gateway_edge_processes"
            ]
            assert f", {running} edge)".encode() in line
    finally:
        proc.terminate()
        await proc.wait()


async def test_a_driver_failure_during_create_is_a_clear_error_and_leaves_nothing(
    gw: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.errors import DriverError

    async def failing_create(spec: object) -> object:
        raise DriverError("no veth left on this host")

    driver = gw.services.orchestrator.driver
    monkeypatch.setattr(driver, "create", failing_create)
    status, body = await gw.request("POST", "/v1/vms", json={})
    assert status == 502
    assert body["code"] == "vm_failed" and "no veth left on this host" in body["detail"]
    vm_id = body["detail"].split()[1]
    status, shown = await gw.request("GET", f"/v1/vms/{vm_id}")
    assert (status, shown["status"]) == (200, "failed")
    store = gw.services.store
    assert await store.live_vm_ids() == []
    assert await store.held_slots(driver.name) == {}
    assert await store.next_expiry() is None  # the reaper has nothing of it to do


async def test_execute_on_a_vm_that_fails_to_boot_is_a_502_not_an_internal_error(
    gw: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.errors import DriverError

    async def failing_create(spec: object) -> object:
        raise DriverError("no veth left on this host")

    monkeypatch.setattr(gw.services.orchestrator.driver, "create", failing_create)
    status, body = await gw.request("POST", "/execute", json={"language": "bash", "command": "true"})
    assert status == 502, body
    assert body["code"] == "vm_failed" and "no veth left on this host" in body["detail"]


async def test_a_slow_redis_gets_503_in_bounded_time_while_known_apps_are_served(on_own_redis) -> None:
    call_timeout_s = 0.5
    gw, own = await on_own_redis(redis={"call_timeout_s": call_timeout_s})
    _, _, url = await start_app(gw)
    async with aiohttp.ClientSession() as client:
        async with client.get(url + "echo") as resp:
            assert resp.status == 200  # the route is known
        pause_s = 4.0
        admin = redis.Redis.from_url(own.url)
        await asyncio.to_thread(admin.execute_command, "CLIENT", "PAUSE", int(pause_s * 1000), "ALL")
        admin.close()
        started = time.monotonic()
        status, body = await gw.request("GET", "/v1/vms")
        took = time.monotonic() - started
        assert (status, body["code"]) == (503, "store_unavailable")
        assert took < call_timeout_s * 4, f"the API took {took:.2f} s to say Redis is too slow"
        for _ in range(5):
            async with client.get(url + "echo") as resp:
                assert resp.status == 200  # served from what the edge knows, Redis or not
        deadline = time.monotonic() + WAIT_S
        while (await gw.request("GET", "/v1/vms"))[0] != 200:
            assert time.monotonic() < deadline, "the API did not recover after the pause"
            await asyncio.sleep(0.05)
