"""Background executions through the official SDK (``execute_async``, ``get_task_result``): kept in
Redis, the key's own, failed rather than left pending when their VM or their gateway goes, and capped per
VM (issue 19.2)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from instavm.exceptions import RateLimitError

from gateway.state.records import EXECUTION_PENDING, ExecutionRecord
from tests.conftest import GatewayUnderTest
from tests.integration.test_sdk import poll, sdk


async def execution(gw: GatewayUnderTest, task_id: str, key: str | None = None) -> tuple[int, Any]:
    return await gw.request("GET", f"/v1/executions/{task_id}", key=key)


async def until_status(gw: GatewayUnderTest, task_id: str, *wanted: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        status, rec = await execution(gw, task_id)
        assert status == 200, rec
        return rec if rec["status"] in wanted else None

    return await poll(check, limit_s=60)


async def test_a_background_execution_answers_at_once_and_keeps_its_result(gw: GatewayUnderTest) -> None:
    client = await asyncio.to_thread(sdk, gw)
    started = time.monotonic()
    task = await asyncio.to_thread(client.execute_async, "import time; time.sleep(0.5); print(6 * 7)")
    assert time.monotonic() - started < 0.5 and task["status"] == "pending"
    result = await asyncio.to_thread(client.get_task_result, task["task_id"], 0.1, 60)
    assert result["stdout"] == "42\n" and result["stderr"] == "" and result["execution_time"] >= 0.5
    # The command's own CPU (the process driver's wait4): it mostly slept.
    assert result["cpu_time"] is not None and 0 <= result["cpu_time"] < result["execution_time"]
    status, rec = await execution(gw, task["task_id"])
    assert (rec["status"], rec["is_complete"], rec["exit_code"], rec["language"]) == (
        "completed",
        True,
        0,
        "python",
    )
    assert rec["session_id"] == client.session_id and rec["vm_id"]
    # Kept for the retention, then gone.
    ttl = await gw.services.client.ttl(gw.services.store.keys.execution(task["task_id"]))
    assert 0 < ttl <= gw.config.vms.retention_s

    failing = await asyncio.to_thread(client.execute_async, "echo oops >&2; exit 3", "bash")
    done = await until_status(gw, failing["task_id"], "completed")
    assert (done["exit_code"], done["serialized_stderr"]) == (3, "oops\n")

    # Another key's execution is one that does not exist.
    other = await gw.new_key()
    assert await execution(gw, task["task_id"], key=other) == await execution(
        gw, "exec-" + "0" * 24, key=other
    )
    assert (await execution(gw, task["task_id"], key=other))[0] == 404
    status, body = await gw.request(
        "POST", "/execute_async", json={"session_id": client.session_id}, key=other
    )
    assert status == 422 and body["detail"][0]["loc"] == ["body", "command"]
    status, _ = await gw.request(
        "POST", "/execute_async", json={"session_id": client.session_id, "command": "1"}, key=other
    )
    assert status == 404


async def test_an_execution_whose_vm_is_killed_fails_instead_of_staying_pending(gw: GatewayUnderTest) -> None:
    client = await asyncio.to_thread(sdk, gw)
    await asyncio.to_thread(client.execute, "print('booted')")
    task = await asyncio.to_thread(client.execute_async, "sleep 30", "bash")
    await until_status(gw, task["task_id"], "running")
    vm_id = (await asyncio.to_thread(client.get_session_status))["vm_id"]
    await asyncio.to_thread(client.vms.delete, vm_id)
    failed = await until_status(gw, task["task_id"], "completed", "failed")
    assert failed["status"] == "failed" and failed["is_complete"], failed
    assert "ended while the command ran" in failed["error"]


async def test_commands_per_vm_are_capped_with_retry_after(gateway_factory: Any) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", execute={"max_concurrent_per_vm": 1})
    client = await asyncio.to_thread(sdk, gw)
    await asyncio.to_thread(client.execute, "print('booted')")
    holder = await asyncio.to_thread(client.execute_async, "sleep 3", "bash")
    await until_status(gw, holder["task_id"], "running")
    status, body = await gw.request(
        "POST", "/execute", json={"session_id": client.session_id, "command": "1"}
    )
    assert (status, body["code"]) == (429, "too_many_executions")
    async with gw.http.post(
        gw.url + "/execute",
        json={"session_id": client.session_id, "command": "1"},
        headers={"X-API-Key": gw.api_key},
    ) as resp:
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    with pytest.raises(RateLimitError):
        await asyncio.to_thread(client.execute, "print(1)")
    with pytest.raises(RateLimitError):  # refused at once, not failed later
        await asyncio.to_thread(client.execute_async, "print(1)")
    await until_status(gw, holder["task_id"], "completed")
    assert (await asyncio.to_thread(client.execute, "print('free again')"))["stdout"] == "free again\n"


async def test_executions_outlive_a_restart_and_what_a_dead_gateway_ran_fails(gateway_factory: Any) -> None:
    first: GatewayUnderTest = await gateway_factory("process")
    client = await asyncio.to_thread(sdk, first)
    done = await asyncio.to_thread(client.execute_async, "print('before the restart')")
    await until_status(first, done["task_id"], "completed")
    cut = await asyncio.to_thread(client.execute_async, "sleep 60", "bash")
    await until_status(first, cut["task_id"], "running")
    # One a gateway that crashed had accepted and not started yet (its runner never says it is alive
    # again).
    orphan = ExecutionRecord(
        "exec-" + "ab" * 12,
        first.key_id,
        client.session_id,
        EXECUTION_PENDING,
        time.time(),
        "bash",
        "crashed",
    )
    await first.services.store.put_execution(orphan)
    await first.stop()

    second: GatewayUnderTest = await gateway_factory("process")
    second.api_key, second.key_id = first.api_key, first.key_id
    status, kept = await execution(second, done["task_id"])
    assert (status, kept["status"], kept["serialized_stdout"]) == (200, "completed", "before the restart\n")
    stopped = await until_status(second, cut["task_id"], "failed")
    assert "gateway stopped" in stopped["error"]
    recovered = await until_status(second, orphan.execution_id, "failed")
    assert "restarted" in recovered["error"] and recovered["is_complete"] and recovered["completed_at"]
    assert await second.services.store.running_executions() == {}


async def test_an_idle_gateway_writes_no_runner_key(gw: GatewayUnderTest) -> None:
    """Only a process running executions says it is alive: an idle one leaves Redis as it found it."""
    keys = gw.services.store.keys
    runner = keys.runner("*")
    assert await gw.services.client.keys(runner) == []
    client = await asyncio.to_thread(sdk, gw)
    task = await asyncio.to_thread(client.execute_async, "print(1)")
    assert len(await gw.services.client.keys(runner)) == 1  # alive from before its record named it
    await until_status(gw, task["task_id"], "completed")
    assert await gw.services.client.hlen(keys.running_executions()) == 0


async def test_the_per_vm_count_outlives_short_commands_and_never_goes_negative(gw: GatewayUnderTest) -> None:
    store, client = gw.services.store, gw.services.client
    key = store.keys.vm_executing("vm-count")
    assert await store.take_execution_place("vm-count", 2, 600)
    assert await store.take_execution_place("vm-count", 2, 5)  # a short one: the long one's expiry stays
    assert 5 < await client.ttl(key) <= 600
    assert not await store.take_execution_place("vm-count", 2, 600)
    assert await store.execution_places_taken("vm-count") == 2
    await store.release_execution_place("vm-count")
    await store.release_execution_place("vm-count")
    assert await client.exists(key) == 0
    # A count that expired under its holders is not recreated at -1 by their release.
    await store.release_execution_place("vm-count")
    assert await client.exists(key) == 0
    assert await store.execution_places_taken("vm-count") == 0
