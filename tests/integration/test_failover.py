"""Redis behind Sentinel, its primary killed while traffic flows: the edge serves every app request from
the routes it knew, the API fails only while the failover lasts, and afterwards routes and their
invalidation work on the new primary."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.conftest import GatewayUnderTest, destroy_all
from tests.integration.test_edge import start_app
from tests.redis_ha import RedisClusterNodes, RedisHA

FAILOVER_TIMEOUT_S = 30.0
TRAFFIC_PAUSE_S = 0.02


async def test_a_primary_failover_loses_no_app_request_and_no_route(
    gateway_factory: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ha = RedisHA(tmp_path_factory.mktemp("redis-ha"))
    ha.start()
    gw: GatewayUnderTest | None = None
    try:
        gw = await gateway_factory(  # type: ignore[operator]
            "process", redis={"url": ha.url, "call_timeout_s": 0.5}, edge={"redis_grace_s": 60.0}
        )
        _, vm_id, url = await start_app(gw)
        app_results: list[tuple[float, int]] = []
        api_results: list[tuple[float, int]] = []
        stop = asyncio.Event()
        progress = asyncio.Condition()

        async def hammer(client: aiohttp.ClientSession, target: str, into: list, headers: dict) -> None:
            while not stop.is_set():
                try:
                    async with client.get(target, headers=headers) as resp:
                        await resp.read()
                        into.append((time.monotonic(), resp.status))
                except aiohttp.ClientError:
                    into.append((time.monotonic(), 0))
                async with progress:
                    progress.notify_all()
                await asyncio.sleep(TRAFFIC_PAUSE_S)

        async def until(condition) -> None:
            async with asyncio.timeout(FAILOVER_TIMEOUT_S), progress:
                await progress.wait_for(condition)

        async with aiohttp.ClientSession() as client:
            loops = [
                asyncio.create_task(hammer(client, url + "echo", app_results, {})),
                asyncio.create_task(hammer(client, gw.url + "/v1/vms", api_results, gw.auth)),
            ]
            try:
                await until(lambda: len(app_results) >= 10)  # traffic flows before the primary dies
                killed_at = time.monotonic()
                ha.kill_primary()
                await asyncio.to_thread(ha.wait_failover, FAILOVER_TIMEOUT_S)
                failover_s = time.monotonic() - killed_at
                await until(lambda: api_results[-1][1] == 200 and api_results[-1][0] > killed_at + failover_s)
                settled = len(app_results) + 10
                await until(lambda: len(app_results) >= settled)  # more traffic on the new primary
            finally:
                stop.set()
                await asyncio.gather(*loops)

        assert {status for _, status in app_results} == {200}, "an app request failed during the failover"
        api_failures = [t for t, status in api_results if status != 200]
        assert api_failures, "the API never noticed the primary was gone (was it killed?)"
        assert all(status in (200, 503) for _, status in api_results)  # a clear 503, never a hang or a 500
        assert max(api_failures) - min(api_failures) <= failover_s + 2.0  # failed only while it lasted

        # The new primary has every route, and edges follow its events: a kill is refused at once.
        status, _ = await gw.request("DELETE", f"/v1/vms/{vm_id}")
        assert status == 200
        async with aiohttp.ClientSession() as client:
            deadline = time.monotonic() + 1.0
            while True:
                async with client.get(url + "echo") as resp:
                    if resp.status == 404:
                        break
                assert time.monotonic() < deadline, "the killed VM is still routed after the failover"
                await asyncio.sleep(TRAFFIC_PAUSE_S)
    finally:
        if gw is not None and gw.running:
            with_redis = ha.procs["replica"].poll() is None
            if with_redis:
                await destroy_all(gw.services)
            await gw.stop()
        ha.stop()


async def test_a_redis_cluster_serves_the_whole_gateway(
    gateway_factory: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Keys, VMs, scripts, pub/sub and locks on a three-node Redis Cluster (all keys in one slot)."""
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    gw: GatewayUnderTest | None = None
    try:
        gw = await gateway_factory(  # type: ignore[operator]
            "process", redis={"url": cluster.url, "key_prefix": "{gwt}:", "call_timeout_s": 2.0}
        )
        sid, vm_id, url = await start_app(gw)
        async with aiohttp.ClientSession() as client:
            async with client.get(url + "echo") as resp:
                assert resp.status == 200
            async with client.get(gw.url + f"/v1/sessions/status/{sid}", headers=gw.auth) as resp:
                assert (await resp.json())["vm_alive"] is True
            status, _ = await gw.request("DELETE", f"/v1/vms/{vm_id}")
            assert status == 200
            deadline = time.monotonic() + 1.0
            while True:  # the kill reaches the edge through the cluster's pub/sub
                async with client.get(url + "echo") as resp:
                    if resp.status == 404:
                        break
                assert time.monotonic() < deadline, "the killed VM is still routed"
                await asyncio.sleep(TRAFFIC_PAUSE_S)
        per_node = cluster.keys_per_node()
        assert sum(1 for keys in per_node if keys) == 1  # one slot, so one node holds them all
        assert all(key.startswith("{gwt}:") for keys in per_node for key in keys)
    finally:
        if gw is not None and gw.running:
            await destroy_all(gw.services)
            await gw.stop()
        cluster.stop()
