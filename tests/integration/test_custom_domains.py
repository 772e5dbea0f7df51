"""Custom domains end to end: created with a VM, issued over ACME DNS-01 (pebble + bind9), served over TLS
by the edge, shown and managed through the API, released with their VM."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.tls.acme import AcmeIssuer
from gateway.tls.dns01 import DnsProvider
from gateway.tls.domains import DomainKeeper
from tests.acme_env import TSIG_KEY_NAME, AcmeTestEnv
from tests.cloudflare_stub import CloudflareStub
from tests.conftest import GatewayUnderTest
from tests.integration.test_acme import WrongValue
from tests.integration.test_dns_providers import rfc2136
from tests.integration.test_edge import APP_PORT, echo_app_command
from tests.integration.test_tls import API_HOST, http_over, tls_address, tls_sections

DELEGATION_ZONE = "acme-delegation.example.test"
STATE_TIMEOUT_S = 30.0


def acme_sections(tmp_path: Path, env: AcmeTestEnv, **acme: object) -> dict[str, dict[str, object]]:
    sections = tls_sections(tmp_path)
    sections["acme"] = {
        "directory_url": env.directory_url,
        "ca_bundle": str(env.ca_pem_path),
        "dns_resolvers": "127.0.0.1",
        "dns_port": env.dns_port,
        "authoritative_port": env.dns_port,
        "rfc2136_server": f"127.0.0.1:{env.dns_port}",
        "rfc2136_key_name": TSIG_KEY_NAME,
        "rfc2136_key_secret": env.tsig_secret,
        "delegation_zone": DELEGATION_ZONE,
        "customer_dns_private_ok": True,  # the customers' DNS server here is bind9 on loopback
        **acme,
    }
    return sections


def rfc2136_credentials(env: AcmeTestEnv) -> dict[str, str]:
    """What a customer who runs their own DNS server gives: its address and a TSIG key."""
    return {"server": f"127.0.0.1:{env.dns_port}", "key_name": TSIG_KEY_NAME, "key_secret": env.tsig_secret}


def keeper_of(gw: GatewayUnderTest) -> DomainKeeper:
    keeper = gw.services.domain_keeper
    assert keeper is not None
    return keeper


async def vm_with_domain(gw: GatewayUnderTest, custom_domain: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A VM serving the echo app on APP_PORT, shared publicly, with a custom domain."""
    body = {"share": {"port": APP_PORT, "is_public": True}, "custom_domain": custom_domain, **extra}
    status, vm = await gw.request("POST", "/v1/vms", json=body)
    assert status == 200, vm
    command = echo_app_command(APP_PORT)
    run = {"session_id": vm["session_id"], "language": "bash", "command": command}
    status, out = await gw.request("POST", "/execute", json=run)
    assert (status, out["exit_code"]) == (200, 0), out
    return vm  # type: ignore[return-value]


async def domain_state(gw: GatewayUnderTest, domain: str, *states: str) -> dict[str, Any]:
    """The domain as the API shows it, once its state is one of ``states`` (awaiting the keeper's checks)."""
    keeper = keeper_of(gw)
    async with asyncio.timeout(STATE_TIMEOUT_S):
        while True:
            checked = asyncio.ensure_future(keeper.next_check())
            status, view = await gw.request("GET", f"/v1/custom-domains/{domain}")
            assert status == 200, view
            if view["state"] in states:  # type: ignore[index]
                checked.cancel()
                return view  # type: ignore[return-value]
            await checked


async def until_served(gw: GatewayUnderTest, domain: str) -> None:
    """Wait until this edge's SNI table holds the domain's certificate (it follows the store's events)."""
    tls = gw.services.tls
    assert tls is not None
    async with asyncio.timeout(5):
        while True:
            refreshed = asyncio.ensure_future(tls.follower.next_refresh())
            if domain in tls.table.cert_ids():
                refreshed.cancel()
                return
            await refreshed


async def https_get(gw: GatewayUnderTest, env: AcmeTestEnv, name: str, path: str = "/") -> tuple[int, bytes]:
    """GET over TLS with SNI ``name``, trusting only pebble's root (so the chain and name are verified)."""
    await until_served(gw, name)
    ctx = ssl.create_default_context(cadata=env.root_pem().decode())
    host, port = tls_address(gw)
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=name)
    try:
        status, _, body = await http_over(reader, writer, name, path, close=True)
        return status, body
    finally:
        writer.close()


async def all_redis_text(client: aioredis.Redis) -> str:
    """Every key and value in Redis, as text: to prove a secret is nowhere in it."""
    parts = []
    async for key in client.scan_iter():
        kind = await client.type(key)
        if kind == "hash":
            parts.append(json.dumps(await client.hgetall(key)))
        elif kind == "string":
            parts.append(str(await client.get(key)))
        elif kind in ("set", "zset", "list"):
            parts.append(key)
    return "\n".join(parts)


async def test_a_custom_domain_over_rfc2136_is_issued_served_managed_and_released(
    gateway_factory: object, tmp_path: Path, acme_env: AcmeTestEnv
) -> None:
    sections = acme_sections(tmp_path, acme_env, domain_grace_s=0)
    gw: GatewayUnderTest = await gateway_factory("process", **sections)  # type: ignore[operator]
    domain = "shop.example.org.test"
    requested = {"domain": "Shop.Example.ORG.test.", "dns_provider": "rfc2136",
                 "dns_credentials": rfc2136_credentials(acme_env)}  # fmt: skip
    vm = await vm_with_domain(gw, requested)
    assert vm["custom_domain"]["domain"] == domain
    assert vm["custom_domain"]["state"] in ("pending", "verifying", "issued")
    assert "dns_credentials" not in vm["custom_domain"]

    issued = await domain_state(gw, domain, "issued", "failed")
    assert issued["state"] == "issued", issued
    assert issued["expires_at"] and issued["last_error"] is None
    status, seen = await gw.request("GET", f"/v1/vms/{vm['vm_id']}")
    assert status == 200 and seen["custom_domain"]["state"] == "issued"  # type: ignore[index]

    # Served on https://<domain>/ with pebble's chain; the app sees the domain and https.
    status, body = await https_get(gw, acme_env, domain, "/echo?x=1")
    assert status == 200, body
    echoed = json.loads(body)
    headers = {k.lower(): v for k, v in echoed["headers"]}
    assert echoed["path"] == "/echo?x=1" and headers["host"] == domain
    assert headers["x-forwarded-proto"] == "https" and "x-forwarded-prefix" not in headers

    # The customer's credentials are sealed: the TSIG secret is nowhere in Redis, nor in any answer.
    assert acme_env.tsig_secret not in await all_redis_text(gw.services.client)
    status, listed = await gw.request("GET", "/v1/custom-domains")
    assert status == 200 and [(d["id"], d["status"]) for d in listed] == [(domain, "issued")]  # type: ignore[index]
    assert acme_env.tsig_secret not in json.dumps(listed)

    # Another account can neither take the domain nor see it.
    other = await gw.new_key()
    status, body = await gw.request("POST", "/v1/vms", key=other, json={"custom_domain": {"domain": domain}})
    assert status == 409 and body["code"] == "domain_taken", body  # type: ignore[index]
    assert (await gw.request("GET", f"/v1/custom-domains/{domain}", key=other))[0] == 404
    assert (await gw.request("DELETE", f"/v1/custom-domains/{domain}", key=other))[0] == 404
    status, listed = await gw.request("GET", "/v1/custom-domains", key=other)
    assert listed == []

    # Deleted: no longer routed, and (grace 0) its certificate is gone from the store and the SNI table.
    assert (await gw.request("DELETE", f"/v1/custom-domains/{domain}"))[0] == 204
    assert (await gw.request("GET", f"/v1/custom-domains/{domain}"))[0] == 404
    tls = gw.services.tls
    assert tls is not None
    async with asyncio.timeout(5):
        while True:
            refreshed = asyncio.ensure_future(tls.follower.next_refresh())
            if domain not in tls.table.cert_ids():  # it leaves the table once deleted from the store
                refreshed.cancel()
                break
            await refreshed
    assert await tls.store.get(domain) is None
    host, port = tls_address(gw)
    insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, port, ssl=insecure, server_hostname=domain)
    try:
        status, headers, _ = await http_over(reader, writer, domain, "/echo", close=True)
        assert (status, headers["x-gateway-error"]) == (404, "no_route")
    finally:
        writer.close()


async def test_the_delegated_mode_says_which_cname_to_add_then_issues_once_it_exists(
    gateway_factory: object, tmp_path: Path, acme_env: AcmeTestEnv
) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", **acme_sections(tmp_path, acme_env))  # type: ignore[operator]
    domain = "blog.example.org.test"
    vm = await vm_with_domain(gw, {"domain": domain})  # no provider, no credentials: delegated
    record = vm["custom_domain"]["dns_record"]
    assert record["name"] == f"_acme-challenge.{domain}" and record["type"] == "CNAME"
    assert record["value"].endswith("." + DELEGATION_ZONE)

    failed = await domain_state(gw, domain, "failed", "issued")
    assert failed["state"] == "failed" and f"CNAME {record['value']}." in failed["last_error"], failed

    await acme_env.add_cname(record["name"], record["value"])
    try:
        status, retried = await gw.request("POST", f"/v1/custom-domains/{domain}/retry")
        assert status == 202 and retried["state"] == "pending", retried  # type: ignore[index]
        issued = await domain_state(gw, domain, "issued", "failed")
        assert issued["state"] == "issued", issued
        status, body = await https_get(gw, acme_env, domain, "/echo")
        assert status == 200 and json.loads(body)["path"] == "/echo"
    finally:  # (the test runs once per edge against the same zone)
        await acme_env.remove_record(record["name"], "CNAME")


async def test_a_custom_domain_at_a_cloud_dns_provider_is_issued_through_dns_lexicon(
    gateway_factory: object, tmp_path: Path, acme_env: AcmeTestEnv
) -> None:
    async with CloudflareStub(mirror=rfc2136(acme_env)) as cloudflare:
        sections = acme_sections(tmp_path, acme_env, lexicon_api_endpoints=f"cloudflare={cloudflare.url}")
        gw: GatewayUnderTest = await gateway_factory("process", **sections)  # type: ignore[operator]
        domain = "cloud.example.org.test"
        body = {"domain": domain, "dns_provider": "cloudflare", "dns_credentials": {"auth_tokn": "x"}}
        status, refused = await gw.request("POST", "/v1/vms", json={"custom_domain": body})
        assert status == 422 and "allowed: " in refused["detail"][0]["msg"], refused  # type: ignore[index]

        body["dns_credentials"] = {"auth_token": cloudflare.token}
        await vm_with_domain(gw, body)
        issued = await domain_state(gw, domain, "issued", "failed")
        assert issued["state"] == "issued", issued
        assert any("dns_records" in call for call in cloudflare.calls)  # the records went through its API
        status, response = await https_get(gw, acme_env, domain, "/echo")
        assert status == 200 and json.loads(response)["path"] == "/echo"
        assert cloudflare.token not in await all_redis_text(gw.services.client)


class _SkipPropagation(AcmeIssuer):
    async def propagated(self, fqdn: str, value: str) -> None:
        return None  # let pebble see the wrong value instead of waiting for the right one


async def test_a_failed_validation_shows_failed_with_the_acme_error_and_the_vm_end_releases_the_domain(
    gateway_factory: object, tmp_path: Path, acme_env: AcmeTestEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw: GatewayUnderTest = await gateway_factory("process", **acme_sections(tmp_path, acme_env))  # type: ignore[operator]
    keeper = keeper_of(gw)
    issuer = keeper.renewer.issuer
    keeper.renewer.issuer = _SkipPropagation(issuer.settings, issuer.store, issuer.lookup)
    real_provider_for = keeper.provider_for

    def misconfigured(rec: Any) -> DnsProvider:
        return WrongValue(real_provider_for(rec))

    monkeypatch.setattr(keeper, "provider_for", misconfigured)
    domain = "broken.example.org.test"
    vm = await vm_with_domain(
        gw, {"domain": domain, "dns_provider": "rfc2136", "dns_credentials": rfc2136_credentials(acme_env)}
    )
    failed = await domain_state(gw, domain, "failed", "issued")
    assert failed["state"] == "failed"
    assert "Correct value not found for DNS challenge" in failed["last_error"], failed

    # The VM ends: the domain is released, so another account may now claim it.
    assert (await gw.request("DELETE", f"/v1/vms/{vm['vm_id']}"))[0] == 200
    assert (await gw.request("GET", f"/v1/custom-domains/{domain}"))[0] == 404
    other = await gw.new_key()
    body = {"custom_domain": {"domain": domain}}
    status, created = await gw.request("POST", "/v1/vms", key=other, json=body)
    assert status == 200 and created["custom_domain"]["domain"] == domain, created  # type: ignore[index]


@pytest.mark.parametrize(
    ("custom_domain", "loc", "fragment"),
    [
        ({"domain": "localhost"}, "domain", "not a valid DNS name"),
        ({"domain": "10.0.0.1"}, "domain", "IP address"),
        ({"domain": "bücher.example"}, "domain", "punycode"),
        ({"domain": f"x.{API_HOST}"}, "domain", "belongs to this gateway"),
        ({"domain": "vm.sandbox.example.test"}, "domain", "belongs to this gateway"),
        ({"domain": "a.example.org.test", "dns_provider": "rfc2136"}, "dns_credentials", "needs server"),
        ({"domain": "a.example.org.test", "dns_credentials": {"token": "x"}}, "dns_credentials", "no dns_"),
    ],
)
async def test_bad_custom_domains_get_a_422_naming_the_field(
    gateway_factory: object, tmp_path: Path, acme_env: AcmeTestEnv,
    custom_domain: dict[str, Any], loc: str, fragment: str,
) -> None:  # fmt: skip
    gw: GatewayUnderTest = await gateway_factory("process", **acme_sections(tmp_path, acme_env))  # type: ignore[operator]
    status, body = await gw.request("POST", "/v1/vms", json={"custom_domain": custom_domain})
    assert status == 422, body
    (item,) = body["detail"]  # type: ignore[index]
    assert item["loc"] == ["body", "custom_domain", loc] and fragment in item["msg"], item
    assert await gw.request("GET", "/v1/vms/") == (200, [])  # no record at all, not even a failed one


async def test_a_customer_dns_server_on_a_private_address_is_refused_by_default(
    gateway_factory: object, tmp_path: Path, acme_env: AcmeTestEnv
) -> None:
    sections = acme_sections(tmp_path, acme_env, customer_dns_private_ok=False)
    gw: GatewayUnderTest = await gateway_factory("process", **sections)  # type: ignore[operator]
    for server in ("127.0.0.1:6379", "169.254.169.254:80", "172.30.0.2"):
        credentials = {**rfc2136_credentials(acme_env), "server": server}
        custom_domain = {"domain": "a.example.org.test", "dns_provider": "rfc2136"}
        custom_domain["dns_credentials"] = credentials
        status, body = await gw.request("POST", "/v1/vms", json={"custom_domain": custom_domain})
        assert status == 422, body
        (item,) = body["detail"]  # type: ignore[index]
        assert item["loc"] == ["body", "custom_domain", "dns_credentials"], item
        assert "updates go only to public addresses" in item["msg"], item
    assert await gw.request("GET", "/v1/vms/") == (200, [])  # no record at all, not even a failed one


async def test_without_acme_a_custom_domain_is_refused_with_the_reason(gw: GatewayUnderTest) -> None:
    status, body = await gw.request("POST", "/v1/vms", json={"custom_domain": {"domain": "shop.example.com"}})
    assert status == 422
    assert "acme.directory_url" in body["detail"][0]["msg"]  # type: ignore[index]
