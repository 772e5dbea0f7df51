"""The deployment's egress CA, kept in Redis: made once by whichever gateway starts first, loaded by
every other, so every host of a deployment presents leaves of the same CA and every VM trusts them
wherever it runs.

One string key (``Keys.egress_ca``) holds JSON: the CA's certificate (PEM) and its private key sealed
with the storage key (the same ``Sealer`` as the certificates' keys and customers' DNS credentials).
It is written with ``SET NX``: two gateways starting together each make a CA, one write wins, and both
then use what is stored. It is never replaced: the VMs that run trust it. A CA that does not open with
this gateway's storage key is a configuration error (every gateway of a deployment needs the same
storage key), not a reason to make another.

The CA and leaf minting are the egress plane's (``gateway.egress.ca``); sealing and the storage key are
this plane's, hence this module here.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from gateway.config import Config, ConfigError
from gateway.egress.ca import CaError, EgressCa, LeafMinter, load_ca, make_ca
from gateway.state.connection import guarded
from gateway.state.keyspace import Keys
from gateway.tls.serving import cert_store
from gateway.tls.store import Sealer, Unsealable


@dataclass(frozen=True)
class DeploymentCa:
    """The deployment's egress CA: what VMs trust (``cert_pem``) and what signs leaves (``minter``)."""

    cert_pem: bytes
    minter: LeafMinter


async def stored_ca(client: aioredis.Redis, keys: Keys, sealer: Sealer, deployment: str) -> EgressCa:
    """The CA stored under ``keys``' prefix, made and stored first if there is none (see the module
    docstring). ConfigError when the stored one is unusable with this storage key."""
    raw = await guarded(client.get(keys.egress_ca()))
    if raw is None:
        made = make_ca(deployment)
        record = {"cert_pem": made.cert_pem.decode("ascii"), "key_enc": sealer.seal(made.key_pem)}
        await guarded(client.set(keys.egress_ca(), json.dumps(record), nx=True))
        raw = await guarded(client.get(keys.egress_ca()))
        if raw is None:
            raise ConfigError(f"the egress CA vanished from Redis ({keys.egress_ca()}) as it was stored")
    try:
        record = json.loads(raw)
        ca = EgressCa(record["cert_pem"].encode("ascii"), sealer.open(record["key_enc"]))
        load_ca(ca)
    except Unsealable:
        raise ConfigError(
            f"the egress CA in Redis ({keys.egress_ca()}) does not decrypt with this storage key: every "
            "gateway of a deployment needs the same tls.storage_key"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError, CaError) as exc:
        raise ConfigError(f"the egress CA in Redis ({keys.egress_ca()}) is unusable: {exc}") from None
    return ca


def deployment_name(config: Config) -> str:
    """What the CA's name says it is for: the public URL's host (and the key prefix when not the
    default, since deployments sharing one Redis are told apart by it)."""
    host = urlsplit(config.server.public_url).hostname or "localhost"
    prefix = config.redis.key_prefix
    return host if prefix == Keys().prefix else f"{host} {prefix.rstrip(':')}"


async def deployment_ca(config: Config, client: aioredis.Redis) -> DeploymentCa:
    """The deployment's egress CA (loaded, or made by this gateway if it is the first) and a minter."""
    sealer = (await asyncio.to_thread(cert_store, config, client)).sealer  # (may make the key file)
    ca = await stored_ca(client, Keys(config.redis.key_prefix), sealer, deployment_name(config))
    return DeploymentCa(ca.cert_pem, LeafMinter(ca))
