"""Sessions, VMs, execute, app URLs, kill and tenancy through the API, on both real drivers."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.conftest import GatewayUnderTest

HTTP_READY_TIMEOUT_S = 10.0


async def new_session(gw: GatewayUnderTest, **extra: object) -> str:
    status, body = await gw.request("POST", "/v1/sessions/session", json={"api_key": gw.api_key, **extra})
    assert status == 200, body
    return body["session_id"]


async def http_get(ip: str, port: int, path: str = "/") -> bytes:
    """A raw HTTP/1.0 GET from the host to a VM address (the edge comes later)."""
    reader, writer = await asyncio.open_connection(ip, port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


async def wait_http(ip: str, port: int) -> bytes:
    deadline = time.monotonic() + HTTP_READY_TIMEOUT_S
    while True:
        try:
            return await http_get(ip, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_walkthrough_session_vm_execute_app_url_kill(gateway: GatewayUnderTest) -> None:
    gw = gateway
    sid = await new_session(gw, vm_lifetime_seconds=120)
    status, body = await gw.request("GET", f"/v1/sessions/status/{sid}")
    assert body == {
        "session_id": sid,
        "exists": True,
        "vm_assigned": False,
        "vm_alive": False,
        "vm_status": None,
        "vm_id": None,
        "uptime_seconds": None,
        "expires_in_seconds": None,
        "created_at": body["created_at"],
        "env_status": "none",
        "env_error": None,
    }
    assert time.strptime(body["created_at"], "%Y-%m-%dT%H:%M:%S")

    status, vm = await gw.request("POST", "/v1/vms", json={"session_id": sid})
    assert status == 200, vm
    assert vm["status"] == "active" and vm["session_id"] == sid and vm["vm_id"].startswith("vmid-")
    assert len(vm["vm_id"]) >= len("vmid-") + 16

    status, out = await gw.request(
        "POST",
        "/execute",
        json={
            "session_id": sid,
            "language": "bash",
            "command": 'cd "$HOME" && echo hello > index.html && '
            '(python3 -m http.server 3000 --bind "${HOST:-0.0.0.0}" >/dev/null 2>&1 &) && echo started',
        },
    )
    assert status == 200, out
    assert out["stdout"] == "started\n" and out["exit_code"] == 0 and out["vm_id"] == vm["vm_id"]

    status, app = await gw.request("GET", f"/v1/sessions/app-url/{sid}?port=3000")
    assert status == 200
    assert app["url"] == f"{gw.url}/v1/app/{sid}/3000/"
    assert app["direct_url"].startswith(f"http://{vm['vm_id']}-3000.sandbox.localhost:")
    assert (app["port"], app["vm_id"], app["session_id"], app["status"]) == (3000, vm["vm_id"], sid, "active")
    assert 100 < app["expires_in_seconds"] <= 120
    assert b"hello" in await wait_http(app["vm_ip"], 3000)

    status, alive = await gw.request("GET", f"/v1/sessions/status/{sid}")
    assert (alive["vm_assigned"], alive["vm_alive"], alive["vm_status"], alive["vm_id"]) == (
        True,
        True,
        "active",
        vm["vm_id"],
    )
    assert alive["uptime_seconds"] >= 0 and 0 < alive["expires_in_seconds"] <= 120

    status, killed = await gw.request("DELETE", f"/v1/vms/{vm['vm_id']}")
    assert (status, killed["status"]) == (200, "killed")
    status, dead = await gw.request("GET", f"/v1/sessions/status/{sid}")
    assert dead | {"created_at": None} == {
        "session_id": sid,
        "exists": True,
        "vm_assigned": True,
        "vm_status": "killed",
        "vm_id": vm["vm_id"],
        "vm_alive": False,
        "uptime_seconds": None,
        "expires_in_seconds": 0,
        "created_at": None,
        "env_status": "none",
        "env_error": None,
    }
    with pytest.raises(OSError):
        await http_get(app["vm_ip"], 3000)
    # Killing twice is harmless and answers the same.
    status, again = await gw.request("DELETE", f"/v1/vms/{vm['vm_id']}")
    assert (status, again["status"]) == (200, "killed")


async def test_session_with_env_spawns_vm_at_once(gateway: GatewayUnderTest) -> None:
    gw = gateway
    sid = await new_session(gw, env={"GREETING": "hi there"}, vcpu_count=1, memory_mb=256)
    status, body = await gw.request("GET", f"/v1/sessions/status/{sid}")
    assert (body["vm_assigned"], body["vm_alive"], body["env_status"]) == (True, True, "configured")
    status, out = await gw.request(
        "POST", "/execute", json={"session_id": sid, "language": "bash", "command": 'echo "$GREETING"'}
    )
    assert out["stdout"] == "hi there\n"
    status, out = await gw.request(
        "POST",
        "/execute",
        json={"session_id": sid, "language": "python", "command": "import os; print(os.environ['GREETING'])"},
    )
    assert status == 200
    assert out["stdout"] == "hi there\n"
    vm = await gw.services.store.get_vm(body["vm_id"])
    assert (vm.vcpu_count, vm.memory_mb) == (1, 256)


async def test_execute_reports_exit_code_stderr_timeout_and_truncation(gateway: GatewayUnderTest) -> None:
    gw = gateway
    status, out = await gw.request(
        "POST", "/execute", json={"language": "bash", "command": "echo oops >&2; exit 3"}
    )
    assert status == 200
    assert (out["stderr"], out["exit_code"], out["timed_out"]) == ("oops\n", 3, False)
    sid = out["session_id"]  # no session given: one was made, with a VM
    status, out = await gw.request(
        "POST",
        "/execute",
        json={"session_id": sid, "language": "bash", "command": "sleep 30", "timeout": 0.5},
    )
    assert (out["timed_out"], out["exit_code"]) == (True, None)
    assert out["execution_time"] < 5
    limit = gw.config.execute.max_output_bytes
    status, out = await gw.request(
        "POST",
        "/execute",
        json={
            "session_id": sid,
            "language": "bash",
            "command": f"head -c {limit + 10} /dev/zero | tr '\\0' a",
        },
    )
    assert out["truncated"] is True and len(out["stdout"]) == limit


async def test_create_vm_without_wait_turns_active(gw: GatewayUnderTest) -> None:
    status, vm = await gw.request("POST", "/v1/vms?wait=false", json={"metadata": {"team": "red"}})
    assert (status, vm["status"]) == (200, "creating")
    deadline = time.monotonic() + 10
    while True:
        status, got = await gw.request("GET", f"/v1/vms/{vm['vm_id']}")
        if got["status"] != "creating" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert got["status"] == "active"
    assert got["metadata"] == {"team": "red"}


async def test_session_with_live_vm_refuses_a_second(gw: GatewayUnderTest) -> None:
    sid = await new_session(gw)
    status, _ = await gw.request("POST", "/v1/vms", json={"session_id": sid})
    assert status == 200
    status, body = await gw.request("POST", "/v1/vms", json={"session_id": sid})
    assert (status, body["code"]) == (409, "session_has_vm")


async def test_list_vms_filters_by_metadata(gw: GatewayUnderTest) -> None:
    made = {}
    for team, n in (("red", 1), ("blue", 2)):
        status, vm = await gw.request("POST", "/v1/vms", json={"metadata": {"team": team, "n": n}})
        made[team] = vm["vm_id"]
    status, listed = await gw.request("GET", "/v1/vms")
    assert status == 200 and sorted(v["vm_id"] for v in listed) == sorted(made.values())
    status, red = await gw.request("GET", "/v1/vms?metadata.team=red")
    assert [v["vm_id"] for v in red] == [made["red"]]
    status, two = await gw.request("GET", "/v1/vms?metadata.n=2")
    assert [v["vm_id"] for v in two] == [made["blue"]]
    await gw.request("DELETE", f"/v1/vms/{made['red']}")
    # GET /v1/vms: the running ones (the official SDK's vms.list()); GET /v1/vms/: every record.
    status, running = await gw.request("GET", "/v1/vms")
    assert status == 200 and [v["vm_id"] for v in running] == [made["blue"]]
    status, everything = await gw.request("GET", "/v1/vms/")
    assert status == 200 and {v["vm_id"]: v["status"] for v in everything} == {
        made["red"]: "killed",
        made["blue"]: "active",
    }
    status, killed = await gw.request("GET", "/v1/vms?status=killed")
    assert status == 200 and [v["vm_id"] for v in killed] == [made["red"]]
    status, red_records = await gw.request("GET", "/v1/vms/?metadata.team=red")
    assert [v["vm_id"] for v in red_records] == [made["red"]]
    status, body = await gw.request("GET", "/v1/vms?status=sleeping")
    assert status == 422 and body["detail"][0]["loc"] == ["query", "status"]


async def test_app_url_errors(gw: GatewayUnderTest) -> None:
    status, body = await gw.request("GET", f"/v1/sessions/app-url/{uuid.uuid4()}")
    assert (status, body["code"]) == (404, "session_not_found")
    sid = await new_session(gw)
    status, body = await gw.request("GET", f"/v1/sessions/app-url/{sid}")
    assert (status, body["code"]) == (409, "no_vm")


async def test_unknown_session_status_does_not_exist(gw: GatewayUnderTest) -> None:
    for sid in (str(uuid.uuid4()), "not-a-uuid"):
        status, body = await gw.request("GET", f"/v1/sessions/status/{sid}")
        assert (status, body["exists"], body["vm_assigned"]) == (200, False, False)


async def test_tenants_cannot_see_each_other(gw: GatewayUnderTest) -> None:
    sid = await new_session(gw)
    status, vm = await gw.request("POST", "/v1/vms", json={"session_id": sid})
    other = await gw.new_key()
    status, body = await gw.request("GET", f"/v1/sessions/status/{sid}", key=other)
    assert (status, body["exists"]) == (200, False)
    missing = "vmid-" + "0" * 20
    for method, path in (("GET", f"/v1/vms/{vm['vm_id']}"), ("DELETE", f"/v1/vms/{vm['vm_id']}")):
        theirs = await gw.request(method, path, key=other)
        unknown = await gw.request(method, path.replace(vm["vm_id"], missing), key=other)
        assert theirs == unknown == (404, {"detail": "VM not found", "code": "vm_not_found"})
    status, body = await gw.request("GET", f"/v1/sessions/app-url/{sid}", key=other)
    assert status == 404
    status, body = await gw.request(
        "POST", "/execute", key=other, json={"session_id": sid, "language": "bash", "command": "id"}
    )
    assert status == 404
    status, body = await gw.request("POST", "/v1/vms", key=other, json={"session_id": sid})
    assert status == 404
    for path in ("/v1/vms", "/v1/vms/", "/v1/sessions/sandboxes"):
        assert await gw.request("GET", path, key=other) == (200, [])
    assert (await gw.services.store.get_vm(vm["vm_id"])).status == "active"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "gk_nope"},
        {"Authorization": "Bearer gk_nope"},
        {"Authorization": "Basic abc"},
        {"X-API-Key": "x" * 4_000},
    ],
    ids=["none", "bad-header", "bad-bearer", "basic", "huge"],
)
async def test_auth_failures_are_401(gw: GatewayUnderTest, headers: dict) -> None:
    status, body = await gw.request("GET", "/v1/vms", headers=headers, anonymous=True)
    assert (status, body["code"]) == (401, "unauthorized")


async def test_oversized_header_is_refused_before_auth(gw: GatewayUnderTest) -> None:
    async with gw.http.get(gw.url + "/v1/vms", headers={"X-API-Key": "x" * 20_000}) as resp:
        text = await resp.text()
    assert resp.status == 400
    assert "8190" in text or "too" in text.lower(), text


async def test_bearer_token_and_revocation(gw: GatewayUnderTest) -> None:
    status, _ = await gw.request("GET", "/v1/vms", headers={"Authorization": f"Bearer {gw.api_key}"})
    assert status == 200
    revoked = await gw.services.key_store.revoke("test")
    assert [r.key_id for r in revoked] == [gw.key_id]
    status, _ = await gw.request("GET", "/v1/vms")
    assert status == 401
    stored = await gw.services.client.keys("*apikey*")
    assert all(gw.api_key not in k for k in stored)
