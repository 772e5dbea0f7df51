"""The deployment's egress CA in a real Redis: made once, the same for every gateway and after a restart,
sealed with the storage key, and what ``gateway egress-ca`` prints."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.fernet import Fernet

from gateway.config import ConfigError, load_config, override
from gateway.state.keyspace import Keys
from gateway.tls.egress_ca import deployment_ca, stored_ca
from gateway.tls.store import Sealer
from tests.integration.test_cli import cli_env

KEY = Fernet.generate_key()


@pytest.fixture
async def client(redis_url: str) -> aioredis.Redis:
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield redis
    await redis.aclose()


def gateway_config(tmp_path: Path, redis_url: str, name: str, key: bytes = KEY, prefix: str = "gw:"):  # type: ignore[no-untyped-def]
    return override(
        load_config(environ={}),
        server={"data_dir": str(tmp_path / name), "public_url": "https://api.example.test"},
        redis={"url": redis_url, "key_prefix": prefix},
        tls={"storage_key": key.decode()},
    )


async def test_gateways_starting_together_present_one_ca(client: aioredis.Redis) -> None:
    sealer = Sealer(KEY)
    cas = await asyncio.gather(*(stored_ca(client, Keys(), sealer, "d") for _ in range(8)))
    assert len({ca.cert_pem for ca in cas}) == 1 and len({ca.key_pem for ca in cas}) == 1
    stored = json.loads(await client.get(Keys().egress_ca()))
    assert (
        b"PRIVATE KEY" not in stored["key_enc"].encode() and sealer.open(stored["key_enc"]) == cas[0].key_pem
    )


async def test_two_gateways_and_a_restart_load_the_same_ca(
    client: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    first = await deployment_ca(gateway_config(tmp_path, redis_url, "one"), client)
    second = await deployment_ca(gateway_config(tmp_path, redis_url, "two"), client)
    again = await deployment_ca(gateway_config(tmp_path, redis_url, "one"), client)
    assert first.cert_pem == second.cert_pem == again.cert_pem
    subject = x509.load_pem_x509_certificate(first.cert_pem).subject.rfc4514_string()
    assert "Sandbox Gateway Egress CA api.example.test" in subject
    # Each gateway's leaves chain to it (its own leaf key, the one CA).
    for loaded in (first, second):
        leaf = loaded.minter.leaf("vault.example.test")
        assert leaf.issuer == x509.load_pem_x509_certificate(first.cert_pem).subject
    other = await deployment_ca(gateway_config(tmp_path, redis_url, "three", prefix="other:"), client)
    assert other.cert_pem != first.cert_pem  # another deployment on the same Redis


async def test_a_ca_sealed_with_another_storage_key_stops_the_gateway(
    client: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    await deployment_ca(gateway_config(tmp_path, redis_url, "one"), client)
    stranger = gateway_config(tmp_path, redis_url, "two", key=Fernet.generate_key())
    with pytest.raises(ConfigError, match=r"same tls\.storage_key"):
        await deployment_ca(stranger, client)
    await client.set(Keys().egress_ca(), "{not json")
    with pytest.raises(ConfigError, match="unusable"):
        await deployment_ca(gateway_config(tmp_path, redis_url, "one"), client)


async def test_the_admin_command_prints_the_deployments_ca(
    client: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    env = {**cli_env(), "GATEWAY_REDIS_URL": redis_url, "GATEWAY_TLS_STORAGE_KEY": KEY.decode()}
    argv = [sys.executable, "-m", "gateway", "--data-dir", str(tmp_path / "cli"), "egress-ca"]
    printed = await asyncio.to_thread(
        subprocess.run, argv, env=env, capture_output=True, text=True, timeout=30
    )
    assert printed.returncode == 0, printed.stderr
    ca = await deployment_ca(gateway_config(tmp_path, redis_url, "one"), client)
    assert printed.stdout == ca.cert_pem.decode()
