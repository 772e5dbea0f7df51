"""Vaults through the official SDK (issue 20.4): every vault method, tenancy, secrets sealed at rest with
the storage key, and VMs made with ``vault_ids`` holding placeholders, never the secrets."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from typing import Any

import pytest
from instavm import InstaVM

from gateway.egress.inject import PLACEHOLDER_PREFIX
from gateway.tls.local import storage_key
from gateway.tls.store import Sealer
from tests.conftest import GatewayUnderTest, free_port
from tests.integration.test_sdk import http_error, sdk

SECRET = "sk-live-0123456789-very-secret"
ROTATED = "sk-live-rotated-9876543210"


def other_client(gw: GatewayUnderTest, key: str) -> InstaVM:
    base_url = f"http://{gw.config.server.host}:{gw.config.server.port}"
    return InstaVM(key, base_url=base_url, auto_start_session=False)


def status_of(exc: BaseException) -> int:
    return http_error(exc).response.status_code


async def everything_in_redis(gw: GatewayUnderTest) -> str:
    """Every key and value in the gateway's Redis, as one text (to look for a secret in clear)."""
    client = gw.services.client
    parts: list[str] = []
    async for key in client.scan_iter(count=500):
        kind = await client.type(key)
        if kind == "hash":
            value: Any = await client.hgetall(key)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(await client.smembers(key))
        elif kind == "zset":
            value = await client.zrange(key, 0, -1)
        else:
            value = await client.get(key) if kind == "string" else None
        parts.append(f"{key} {json.dumps(value)}")
    return "\n".join(parts)


def sealer_of(gw: GatewayUnderTest) -> Sealer:
    tls = gw.config.tls
    return Sealer(storage_key(tls.storage_key, tls.storage_key_file, gw.config.data_path))


async def test_every_vault_method_of_the_sdk(gw: GatewayUnderTest) -> None:
    client = await asyncio.to_thread(other_client, gw, gw.api_key)
    call = asyncio.to_thread
    assert await call(client.list_vaults) == []
    vault = await call(client.create_vault, "prod", "production keys")
    vault_id = vault["id"]
    assert (vault["name"], vault["description"]) == ("prod", "production keys") and vault["created_at"]
    assert [v["id"] for v in await call(client.list_vaults)] == [vault_id]
    assert (await call(client.get_vault, vault_id))["name"] == "prod"
    updated = await call(client.update_vault, vault_id, name="production")
    assert (updated["name"], updated["description"]) == ("production", "production keys")
    updated = await call(client.update_vault, vault_id, description="the live ones")
    assert (updated["name"], updated["description"]) == ("production", "the live ones")

    cred = await call(client.add_vault_credential, vault_id, name="OPENAI_API_KEY", value=SECRET)
    assert cred["name"] == "OPENAI_API_KEY" and cred["credential_type"] == "api_key"
    assert SECRET not in json.dumps(cred) and "value" not in cred  # never returned, not even now
    other = await call(
        client.add_vault_credential,
        vault_id,
        name="PARTNER_KEY",
        value="partner-secret",
        description="the partner's",
        credential_type="token",
    )
    listed = await call(client.list_vault_credentials, vault_id)
    assert [(c["id"], c["name"]) for c in listed] == [
        (cred["id"], "OPENAI_API_KEY"),
        (other["id"], "PARTNER_KEY"),
    ]
    assert listed[1]["description"] == "the partner's" and listed[1]["credential_type"] == "token"
    assert all(k in listed[0] for k in ("created_at", "updated_at", "rotated_at"))
    assert SECRET not in json.dumps(listed) and "partner-secret" not in json.dumps(listed)
    with pytest.raises(Exception) as duplicate:
        await call(client.add_vault_credential, vault_id, name="OPENAI_API_KEY", value="again")
    assert status_of(duplicate.value) == 409
    rotated = await call(client.rotate_vault_credential, vault_id, cred["id"], value=ROTATED)
    assert rotated["id"] == cred["id"] and rotated["rotated_at"] and ROTATED not in json.dumps(rotated)

    service = await call(
        client.add_vault_service,
        vault_id,
        host="API.Partner.example",
        auth_config={"type": "header", "header": "X-Partner-Key", "key": "PARTNER_KEY"},
        description="partner API",
    )
    assert service["host"] == "api.partner.example" and service["enabled"] is True
    assert service["auth_config"] == {"type": "header", "header": "X-Partner-Key", "key": "PARTNER_KEY"}
    catalog = await call(client.get_vault_catalog)
    by_id = {t["id"]: t for t in catalog}
    assert (
        by_id["openai"]["host"] == "api.openai.com" and by_id["openai"]["credential_key"] == "OPENAI_API_KEY"
    )
    assert by_id["anthropic"]["auth_config"] == {
        "type": "header",
        "header": "x-api-key",
        "key": "ANTHROPIC_API_KEY",
    }
    added = await call(client.add_vault_services_from_templates, vault_id, ["openai", "github"])
    assert sorted(s["host"] for s in added["services"]) == ["api.github.com", "api.openai.com"]
    services = await call(client.list_vault_services, vault_id)
    assert sorted(s["host"] for s in services) == ["api.github.com", "api.openai.com", "api.partner.example"]
    github = next(s for s in services if s["host"] == "api.github.com")
    assert await call(client.delete_vault_service, vault_id, github["id"]) is True
    summary = await call(client.discover_vault, vault_id)
    assert summary["credential_names"] == ["OPENAI_API_KEY", "PARTNER_KEY"]
    assert summary["service_hosts"] == ["api.openai.com", "api.partner.example"]
    assert SECRET not in json.dumps(summary) and ROTATED not in json.dumps(summary)

    # The request log: what the egress proxy appends (VaultSource), newest first, no query string.
    vaults = gw.services.orchestrator.vaults
    assert vaults is not None
    for n in range(3):
        await vaults.log_vault_request(
            vault_id,
            {"at": 1_700_000_000 + n, "vm_id": "vmid-x", "host": "api.openai.com", "method": "POST",
             "path": f"/v1/chat/{n}?key=leak", "status": 200, "headers": {"Authorization": "leak"}},
        )  # fmt: skip
    logs = await call(client.get_vault_request_logs, vault_id, limit=2)
    assert [e["path"] for e in logs] == ["/v1/chat/2", "/v1/chat/1"]
    assert logs[0]["host"] == "api.openai.com" and logs[0]["status"] == 200 and logs[0]["timestamp"]
    assert "leak" not in json.dumps(await call(client.get_vault_request_logs, vault_id))

    assert await call(client.delete_vault_credential, vault_id, other["id"]) is True
    assert [c["name"] for c in await call(client.list_vault_credentials, vault_id)] == ["OPENAI_API_KEY"]
    assert await call(client.delete_vault, vault_id) is True
    assert await call(client.list_vaults) == []
    with pytest.raises(Exception) as gone:
        await call(client.get_vault, vault_id)
    assert status_of(gone.value) == 404
    # Nothing of it is left in Redis (credentials, services, names, log).
    assert vault_id not in await everything_in_redis(gw)


async def test_another_keys_vault_is_a_404_like_a_missing_one(gw: GatewayUnderTest) -> None:
    mine = await asyncio.to_thread(other_client, gw, gw.api_key)
    theirs = await asyncio.to_thread(other_client, gw, await gw.new_key())
    vault = await asyncio.to_thread(mine.create_vault, "mine")
    cred = await asyncio.to_thread(mine.add_vault_credential, vault["id"], name="TOKEN", value=SECRET)
    assert await asyncio.to_thread(theirs.list_vaults) == []
    calls = [
        (theirs.get_vault, (vault["id"],), {}),
        (theirs.update_vault, (vault["id"],), {"name": "taken"}),
        (theirs.delete_vault, (vault["id"],), {}),
        (theirs.discover_vault, (vault["id"],), {}),
        (theirs.list_vault_credentials, (vault["id"],), {}),
        (theirs.add_vault_credential, (vault["id"],), {"name": "X", "value": "y"}),
        (theirs.rotate_vault_credential, (vault["id"], cred["id"]), {"value": "stolen"}),
        (theirs.delete_vault_credential, (vault["id"], cred["id"]), {}),
        (theirs.list_vault_services, (vault["id"],), {}),
        (theirs.add_vault_services_from_templates, (vault["id"], ["openai"]), {}),
        (theirs.get_vault_request_logs, (vault["id"],), {}),
        (mine.get_vault, ("vault-00000000000000000000",), {}),  # a missing one answers the same
        (mine.get_vault, ("not-an-id:credentials",), {}),
        (mine.delete_vault_credential, (vault["id"], "cred-00000000000000000000"), {}),
        (mine.delete_vault_service, (vault["id"], "svc-00000000000000000000"), {}),
    ]
    for method, args, kwargs in calls:
        with pytest.raises(Exception) as refused:
            await asyncio.to_thread(method, *args, **kwargs)
        assert status_of(refused.value) == 404, method
    assert (await asyncio.to_thread(mine.get_vault, vault["id"]))["name"] == "mine"  # untouched
    # A VM cannot be bound to another key's vault either (422 naming the field, as for a missing one).
    status, body = await gw.request(
        "POST", "/v1/vms", json={"vault_ids": [vault["id"]]}, key=await gw.new_key()
    )
    assert status == 422 and body["detail"][0]["loc"][:2] == ["body", "vault_ids"], body


async def test_secrets_are_sealed_with_the_storage_key_in_redis(gw: GatewayUnderTest) -> None:
    client = await asyncio.to_thread(other_client, gw, gw.api_key)
    vault = await asyncio.to_thread(client.create_vault, "sealed")
    cred = await asyncio.to_thread(client.add_vault_credential, vault["id"], name="API_KEY", value=SECRET)
    dump = await everything_in_redis(gw)
    assert SECRET not in dump and vault["id"] in dump
    stored = await gw.services.client.hget(
        f"{gw.config.redis.key_prefix}vault:{vault['id']}:credentials", cred["id"]
    )
    sealed = json.loads(stored)["value_sealed"]
    assert sealed and SECRET not in sealed
    assert sealer_of(gw).open(sealed).decode() == SECRET  # it opens with the deployment's storage key
    await asyncio.to_thread(client.rotate_vault_credential, vault["id"], cred["id"], value=ROTATED)
    dump = await everything_in_redis(gw)
    assert ROTATED not in dump and SECRET not in dump


VALIDATION_CASES: list[tuple[str, str, dict[str, Any], list[str | int]]] = [
    ("post", "", {"name": ""}, ["body", "name"]),
    ("post", "", {}, ["body", "name"]),
    ("post", "/{v}/credentials", {"name": "has-dash", "value": "x"}, ["body", "name"]),
    ("post", "/{v}/credentials", {"name": "OK", "value": ""}, ["body", "value"]),
    ("post", "/{v}/credentials", {"name": "OK", "value": "x" * (16 * 1024 + 1)}, ["body", "value"]),
    ("post", "/{v}/credentials", {"name": "OK", "value": "a\r\nX-Evil: 1"}, ["body", "value"]),
    ("post", "/{v}/credentials", {"name": "OK", "value": "x", "credential_type": "A B"},
     ["body", "credential_type"]),
    ("post", "/{v}/services", {"host": "no spaces.test", "auth_config": {"type": "bearer", "token": "T"}},
     ["body", "host"]),
    ("post", "/{v}/services", {"host": "api.x.test", "auth_config": {"type": "url-path", "token": "T"}},
     ["body", "auth_config"]),
    ("post", "/{v}/services", {"host": "api.x.test", "auth_config": {"type": "header", "header": "Bad Name",
     "key": "T"}}, ["body", "auth_config"]),
    ("post", "/{v}/services", {"host": "api.x.test", "auth_config": {"type": "bearer"}},
     ["body", "auth_config"]),
    ("post", "/{v}/services:from_template", {"template_ids": ["nope"]}, ["body", "template_ids"]),
    ("post", "/{v}/services:from_template", {"template_ids": []}, ["body", "template_ids"]),
    ("get", "/{v}/request-logs?limit=0", {}, ["query", "limit"]),
    ("get", "/{v}/request-logs?limit=1001", {}, ["query", "limit"]),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "loc"), VALIDATION_CASES)
async def test_bad_vault_requests_are_422s_naming_the_field(
    gw: GatewayUnderTest, method: str, path: str, body: dict[str, Any], loc: list[str | int]
) -> None:
    status, vault = await gw.request("POST", "/v1/vaults", json={"name": "v"})
    assert status == 201, vault
    kwargs = {"json": body} if method == "post" else {}
    status, answer = await gw.request(method.upper(), "/v1/vaults" + path.format(v=vault["id"]), **kwargs)
    assert status == 422 and answer["detail"][0]["loc"] == loc, answer
    assert "x" * 100 not in json.dumps(answer)  # a value is never echoed back


async def test_vault_ids_need_egress(gw: GatewayUnderTest) -> None:
    status, vault = await gw.request("POST", "/v1/vaults", json={"name": "v"})
    status, body = await gw.request("POST", "/v1/vms", json={"vault_ids": [vault["id"]]})
    assert status == 422 and body["detail"] == [
        {"loc": ["body", "vault_ids"], "msg": body["detail"][0]["msg"], "type": "unsupported"}
    ]
    assert "egress" in body["detail"][0]["msg"]
    status, _ = await gw.request("GET", "/v1/vaults", anonymous=True)
    assert status == 401


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nftables")
async def test_a_vm_with_vaults_holds_placeholders_and_the_proxy_gets_the_secrets(
    gateway_factory: Any,
) -> None:
    egress = {
        "enabled": True,
        "proxy_port": free_port(),
        "resolver_port": free_port(),
        # Nothing answers there: this test makes no connection out, and nothing may leave the machine.
        "upstream_resolvers": f"127.0.0.1:{free_port()}",
        "dial_networks": "198.18.0.0/15",
    }
    gw: GatewayUnderTest = await gateway_factory("netns", egress=egress)
    client = await asyncio.to_thread(sdk, gw)
    vault = await asyncio.to_thread(client.create_vault, "for-vms")
    cred = await asyncio.to_thread(
        client.add_vault_credential, vault["id"], name="OPENAI_API_KEY", value=SECRET
    )
    await asyncio.to_thread(client.add_vault_services_from_templates, vault["id"], ["openai"])
    extra = await asyncio.to_thread(client.create_vault, "second")
    await asyncio.to_thread(
        client.add_vault_credential, extra["id"], name="SECOND_TOKEN", value="second-secret"
    )

    # Unknown ids are named by position.
    with pytest.raises(Exception) as unknown:
        await asyncio.to_thread(client.vms.create, vault_ids=[vault["id"], "vault-00000000000000000000"])
    assert status_of(unknown.value) == 422
    assert http_error(unknown.value).response.json()["detail"][0]["loc"] == ["body", "vault_ids", 1]
    stranger = await gw.new_key()
    status, theirs = await gw.request("POST", "/v1/vaults", json={"name": "theirs"}, key=stranger)
    status, body = await gw.request("POST", "/v1/vms", json={"vault_ids": [theirs["id"]]})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "vault_ids", 0], body  # not this key's

    env = {"OPENAI_API_KEY": "the-users-own", "PLAIN": "kept"}
    vm = await asyncio.to_thread(client.vms.create, vault_ids=[vault["id"], extra["id"]], env=env)
    assert vm["status"] == "active", vm
    status, out = await gw.request(
        "POST",
        "/execute",
        json={"session_id": vm["session_id"], "language": "bash", "command": "env", "timeout": 30},
    )
    assert status == 200, out
    seen = dict(line.split("=", 1) for line in out["stdout"].splitlines() if "=" in line)
    # A placeholder per credential; the placeholder wins over the user's env of the same name.
    assert seen["OPENAI_API_KEY"].startswith(PLACEHOLDER_PREFIX) and seen["SECOND_TOKEN"].startswith(
        PLACEHOLDER_PREFIX
    )
    assert seen["PLAIN"] == "kept"
    assert SECRET not in out["stdout"] and "second-secret" not in out["stdout"]

    record = await gw.services.store.get_vm(vm["vm_id"])
    assert record is not None and record.vault_ids == [vault["id"], extra["id"]]
    assert record.vault_placeholders[seen["OPENAI_API_KEY"]] == cred["id"]
    assert SECRET not in record.vault_placeholders and SECRET not in json.dumps(record.to_hash())

    vaults = gw.services.orchestrator.vaults
    assert vaults is not None
    bound = await vaults.vm_vault(vm["vm_id"])
    assert bound is not None and bound.intercepts("api.openai.com") and not bound.intercepts("api.github.com")
    assert bound.secrets[cred["id"]] == SECRET and bound.placeholders[seen["OPENAI_API_KEY"]] == cred["id"]
    assert bound.vault_of[cred["id"]] == vault["id"]
    assert [(s.host, s.header, s.scheme) for s in bound.services] == [
        ("api.openai.com", "Authorization", "Bearer")
    ]
    # Rotation applies at once; a deleted vault stops giving anything.
    await asyncio.to_thread(client.rotate_vault_credential, vault["id"], cred["id"], value=ROTATED)
    rotated = await vaults.vm_vault(vm["vm_id"])
    assert rotated is not None and rotated.secrets[cred["id"]] == ROTATED
    await asyncio.to_thread(client.delete_vault, vault["id"])
    after = await vaults.vm_vault(vm["vm_id"])
    assert after is not None and cred["id"] not in after.secrets and not after.services
    # A VM without vaults: None.
    plain = await asyncio.to_thread(client.vms.create, env={"A": "b"})
    assert await vaults.vm_vault(plain["vm_id"]) is None
