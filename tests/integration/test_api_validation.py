"""Every field and constraint of the spec's endpoints, and bad input: a precise 4xx, nothing stored."""

from __future__ import annotations

import io
import json
import re
import uuid

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import GatewayUnderTest


async def redis_snapshot(gw: GatewayUnderTest) -> dict[str, object]:
    client: aioredis.Redis = gw.services.client
    keys = sorted(await client.keys("*"))
    return {k: await client.type(k) for k in keys} | {"dbsize": await client.dbsize()}


def detail_of(body: object) -> list[dict[str, object]]:
    assert isinstance(body, dict) and isinstance(body["detail"], list), body
    for item in body["detail"]:
        assert set(item) == {"loc", "msg", "type"}, item
    return body["detail"]


SESSION_CASES = [
    # (body without api_key, loc, type)
    ({"vm_lifetime_seconds": 19}, ["body", "vm_lifetime_seconds"], "greater_than_equal"),
    ({"vm_lifetime_seconds": 86401}, ["body", "vm_lifetime_seconds"], "less_than_equal"),
    ({"vm_lifetime_seconds": "abc"}, ["body", "vm_lifetime_seconds"], "int_parsing"),
    ({"vm_lifetime_seconds": 30.5}, ["body", "vm_lifetime_seconds"], "int_from_float"),
    ({"memory_mb": 127}, ["body", "memory_mb"], "greater_than_equal"),
    ({"memory_mb": 8193}, ["body", "memory_mb"], "less_than_equal"),
    ({"vcpu_count": 3}, ["body", "vcpu_count"], "literal_error"),
    ({"vcpu_count": 0}, ["body", "vcpu_count"], "literal_error"),
    ({"metadata": [1, 2]}, ["body", "metadata"], "dict_type"),
    ({"env": {"A": 1}}, ["body", "env", "A"], "string_type"),
    ({"env": {"1BAD": "x"}}, ["body", "env"], "env_name"),
    ({"env": "A=1"}, ["body", "env"], "dict_type"),
]


@pytest.mark.parametrize(("extra", "loc", "kind"), SESSION_CASES)
async def test_create_session_constraints(gw: GatewayUnderTest, extra: dict, loc: list, kind: str) -> None:
    before = await redis_snapshot(gw)
    status, body = await gw.request("POST", "/v1/sessions/session", json={"api_key": gw.api_key, **extra})
    assert status == 422
    assert [(d["loc"], d["type"]) for d in detail_of(body)] == [(loc, kind)]
    assert await redis_snapshot(gw) == before


async def test_create_session_bounds_are_inclusive(gw: GatewayUnderTest) -> None:
    for extra in (
        {"vm_lifetime_seconds": 20, "memory_mb": 128, "vcpu_count": 1},
        {"vm_lifetime_seconds": 86400, "memory_mb": 8192, "vcpu_count": 8},
    ):
        status, body = await gw.request("POST", "/v1/sessions/session", json={"api_key": gw.api_key, **extra})
        assert status == 200, body
        session = await gw.services.store.get_session(body["session_id"])
        assert (session.vm_lifetime_seconds, session.memory_mb, session.vcpu_count) == (
            extra["vm_lifetime_seconds"],
            extra["memory_mb"],
            extra["vcpu_count"],
        )


async def test_create_session_defaults_and_unknown_fields_ignored(gw: GatewayUnderTest) -> None:
    status, body = await gw.request(
        "POST", "/v1/sessions/session", json={"api_key": gw.api_key, "future_field": {"x": 1}}
    )
    assert status == 200
    assert set(body) == {"session_id"}
    assert uuid.UUID(body["session_id"]).version == 4
    session = await gw.services.store.get_session(body["session_id"])
    assert (session.vm_lifetime_seconds, session.vcpu_count, session.memory_mb) == (300, 2, 512)
    assert session.vm_id is None  # no env: no VM yet


async def test_missing_api_key_is_422_and_wrong_key_401(gw: GatewayUnderTest) -> None:
    status, body = await gw.request("POST", "/v1/sessions/session", json={}, headers={"X-Other": "1"})
    assert status == 422
    assert [(d["loc"], d["type"], d["msg"]) for d in detail_of(body)] == [
        (["body", "api_key"], "missing", "Field required")
    ]
    status, body = await gw.request("POST", "/v1/sessions/session", json={"api_key": "gk_wrong"})
    assert status == 401
    assert body["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("payload", "headers", "status", "check"),
    [
        (b'{"api_key": ', {"Content-Type": "application/json"}, 422, ("json_invalid", ["body", 12])),
        (b"", {"Content-Type": "application/json"}, 422, ("missing", ["body"])),
        (b"[1]", {"Content-Type": "application/json"}, 422, ("model_type", ["body"])),
        (b'{"api_key": "x"}', {"Content-Type": "text/plain"}, 415, None),
        (b"\xff\xfe", {"Content-Type": "application/json"}, 422, ("json_invalid", ["body", 0])),
    ],
    ids=["truncated-json", "empty", "not-an-object", "wrong-content-type", "not-utf8"],
)
async def test_malformed_bodies(
    gw: GatewayUnderTest, payload: bytes, headers: dict, status: int, check: tuple | None
) -> None:
    before = await redis_snapshot(gw)
    got, body = await gw.request("POST", "/v1/sessions/session", data=payload, headers=headers)
    assert got == status, body
    if check:
        assert [(d["type"], d["loc"]) for d in detail_of(body)] == [check]
    else:
        assert "application/json" in body["detail"]
    assert await redis_snapshot(gw) == before


async def test_body_without_content_type_is_read_as_json(gw: GatewayUnderTest) -> None:
    payload = f'{{"api_key": "{gw.api_key}"}}'.encode()
    async with (
        aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as http,
        http.post(gw.url + "/v1/sessions/session", data=payload) as resp,
    ):
        assert resp.status == 200


async def test_huge_body_is_413_and_nothing_stored(gw: GatewayUnderTest) -> None:
    before = await redis_snapshot(gw)
    big = {"api_key": gw.api_key, "metadata": {"blob": "x" * (gw.config.api.max_body_bytes + 1)}}
    payload = io.BytesIO(json.dumps(big).encode())
    headers = {"Content-Type": "application/json"}
    status, body = await gw.request("POST", "/v1/sessions/session", data=payload, headers=headers)
    assert status == 413
    assert body["code"] == "payload_too_large"
    assert await redis_snapshot(gw) == before


VM_CASES = [
    ({"share": {"port": 0}}, ["body", "share", "port"], "greater_than_equal"),
    ({"share": {"port": 65536}}, ["body", "share", "port"], "less_than_equal"),
    ({"share": {}}, ["body", "share", "port"], "missing"),
    ({"share": {"port": 80, "is_public": "maybe"}}, ["body", "share", "is_public"], "bool_parsing"),
    ({"custom_domain": {}}, ["body", "custom_domain", "domain"], "missing"),
    ({"volumes": [{"volume_id": "v"}]}, ["body", "volumes", 0, "mount_path"], "missing"),
    ({"vault_ids": [1]}, ["body", "vault_ids", 0], "string_type"),
    ({"snapshot_on_terminate": "perhaps"}, ["body", "snapshot_on_terminate"], "bool_parsing"),
    ({"session_id": 5}, ["body", "session_id"], "string_type"),
    ({"memory_mb": 10_000}, ["body", "memory_mb"], "less_than_equal"),
    ({"snapshot_id": "snap-1"}, ["body", "snapshot_id"], "unsupported"),
    ({"volumes": [{"volume_id": "v", "mount_path": "/data"}]}, ["body", "volumes"], "unsupported"),
    ({"image_variant": "windows"}, ["body", "image_variant"], "unsupported"),
]


@pytest.mark.parametrize(("extra", "loc", "kind"), VM_CASES)
async def test_create_vm_constraints(gw: GatewayUnderTest, extra: dict, loc: list, kind: str) -> None:
    before = await redis_snapshot(gw)
    status, body = await gw.request("POST", "/v1/vms", json=extra)
    assert status == 422
    assert [(d["loc"], d["type"]) for d in detail_of(body)] == [(loc, kind)]
    assert await redis_snapshot(gw) == before


async def test_query_parameters_are_validated(gw: GatewayUnderTest) -> None:
    status, body = await gw.request("POST", "/v1/vms?wait=sometimes", json={})
    assert status == 422
    assert [(d["loc"], d["type"]) for d in detail_of(body)] == [(["query", "wait"], "bool_parsing")]
    status, session = await gw.request("POST", "/v1/sessions/session", json={"api_key": gw.api_key})
    for port, kind in (("0", "greater_than_equal"), ("65536", "less_than_equal"), ("http", "int_parsing")):
        status, body = await gw.request("GET", f"/v1/sessions/app-url/{session['session_id']}?port={port}")
        assert status == 422
        assert [(d["loc"], d["type"]) for d in detail_of(body)] == [(["query", "port"], kind)]


@pytest.mark.parametrize(
    ("extra", "loc", "kind"),
    [
        ({}, ["body", "command"], "missing"),
        ({"command": ""}, ["body", "command"], "string_too_short"),
        ({"command": "ls", "language": "ruby"}, ["body", "language"], "literal_error"),
        ({"command": "ls", "timeout": 0}, ["body", "timeout"], "greater_than"),
        ({"command": "ls", "timeout": 10**9}, ["body", "timeout"], "less_than_equal"),
    ],
)
@pytest.mark.parametrize("path", ["/execute", "/execute_async"])
async def test_execute_constraints(
    gw: GatewayUnderTest, path: str, extra: dict, loc: list, kind: str
) -> None:
    """The background form validates as the foreground one does, before anything is recorded."""
    before = await redis_snapshot(gw)
    status, body = await gw.request("POST", path, json=extra)
    assert status == 422
    assert [(d["loc"], d["type"]) for d in detail_of(body)] == [(loc, kind)]
    assert await redis_snapshot(gw) == before


async def test_unknown_route_and_method_are_json(gw: GatewayUnderTest) -> None:
    status, body = await gw.request("GET", "/v1/nope")
    assert (status, body["code"]) == (404, "not_found")
    status, body = await gw.request("PUT", "/v1/vms")
    assert (status, body["code"]) == (405, "method_not_allowed")


async def test_openapi_document_lists_every_endpoint(gw: GatewayUnderTest) -> None:
    status, doc = await gw.request("GET", "/openapi.json")
    assert status == 200
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in gw.services.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    } - {("get", "/openapi.json")}
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == served  # every endpoint the API serves, and nothing it does not
    assert {"/v1/sessions/session", "/orgs/{org_uuid}/api/instances/{instance_uuid}"} <= set(doc["paths"])
    assert doc["paths"]["/v1/custom-domains/{domain}"]["delete"]["responses"]["204"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            declared = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path)), (method, path)  # snapshot_id was missing
            if op["security"]:
                assert {"401", "422", "503"} <= set(op["responses"]), (method, path)
            else:  # public (the templates, as the SDK lists them): no key, so no 401
                assert (method, path[:13]) == ("get", "/v1/templates"), (method, path)
                assert "401" not in op["responses"]
    # Success statuses as the handlers answer them (tested against the handlers in their own tests).
    instances = doc["paths"]["/orgs/{org_uuid}/api/instances"]["post"]["responses"]
    assert "201" in instances and "200" not in instances
    assert "202" in doc["paths"]["/v1/custom-domains/{domain}/retry"]["post"]["responses"]
    assert {"404", "409", "413", "415", "502"} <= set(doc["paths"]["/v1/vms"]["post"]["responses"])
    assert {"404", "410", "502", "504"} <= set(doc["paths"]["/execute"]["post"]["responses"])
    for path in ("/execute", "/execute_async"):  # the per-VM cap
        assert "Retry-After" in doc["paths"][path]["post"]["responses"]["429"]["headers"]
    assert "202" in doc["paths"]["/execute_async"]["post"]["responses"]
    assert "404" in doc["paths"]["/v1/executions/{execution_id}"]["get"]["responses"]
    create_vm = doc["components"]["schemas"]["VMCreateRequest"]["properties"]
    assert {"session_id", "share", "custom_domain", "volumes", "vault_ids", "egress_policy"} <= set(create_vm)
