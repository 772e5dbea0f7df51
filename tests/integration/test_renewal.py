"""Renewal across edges: two gateways on one Redis race to renew a short-lived certificate; one issues it
over ACME and both serve the new one."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path
from typing import Any

import trustme

from gateway.tls.bundle import parse_bundle
from tests.acme_env import AcmeTestEnv
from tests.conftest import GatewayUnderTest, free_port
from tests.integration.test_custom_domains import acme_sections
from tests.integration.test_tls import API_HOST, bundle_of, served, tls_address


async def test_two_edges_race_to_renew_a_short_lived_certificate_one_issues_and_both_serve_it(
    gateway_factory: Any, tmp_path: Path, acme_env: AcmeTestEnv
) -> None:
    sections = acme_sections(tmp_path, acme_env)  # one storage key: both read what the other stored
    edges: list[GatewayUnderTest] = [
        await gateway_factory(
            "process", **{**sections, "server": {"data_dir": str(tmp_path / f"edge{i}")},
                          "tls": {**sections["tls"], "listen": f"127.0.0.1:{free_port()}"}},
        )
        for i in range(2)
    ]  # fmt: skip
    for gw in edges:  # the first round at start issued what was missing; wait until both are past it
        keeper = gw.services.cert_keeper
        assert keeper is not None
        if keeper.rounds == 0:
            await asyncio.wait_for(keeper.next_round(), 30)

    # A short-lived certificate (an hour, ten minutes left: past two thirds) replaces the API host's.
    now = datetime.datetime.now(datetime.UTC)
    short = trustme.CA().issue_cert(
        API_HOST,
        not_before=now - datetime.timedelta(minutes=50),
        not_after=now + datetime.timedelta(minutes=10),
    )
    tls = [gw.services.tls for gw in edges]
    assert tls[0] is not None and tls[1] is not None
    short_bundle = parse_bundle(*bundle_of(short))
    await tls[0].store.put(short_bundle, source="import", cert_id=API_HOST)
    for gw in edges:
        await served(gw, API_HOST, short_bundle.chain_pem)

    # Both edges check at the same moment; count the ACME orders each makes.
    orders: list[int] = []
    for index, gw in enumerate(edges):
        assert gw.services.cert_keeper is not None
        issuer = gw.services.cert_keeper.renewer.issuer
        real_issue = issuer.issue

        async def counted(names: list[str], provider: Any, _real: Any = real_issue, _i: int = index) -> Any:
            orders.append(_i)
            return await _real(names, provider)

        issuer.issue = counted  # type: ignore[method-assign]
    await asyncio.gather(*(gw.services.cert_keeper.check_all() for gw in edges))  # type: ignore[union-attr]
    assert len(orders) == 1, orders  # one edge issued; the other saw the lock, then nothing due

    renewed = await tls[0].store.get(API_HOST)
    assert renewed is not None and renewed.bundle.not_after > short_bundle.not_after
    trusting_pebble = ssl.create_default_context(cadata=acme_env.root_pem().decode())
    for gw in edges:
        await served(gw, API_HOST, renewed.bundle.chain_pem)
        host, port = tls_address(gw)  # and a client that trusts only pebble's root accepts it
        _, writer = await asyncio.open_connection(host, port, ssl=trusting_pebble, server_hostname=API_HOST)
        writer.close()
