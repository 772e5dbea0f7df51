"""Two gateways on one machine (issue 17.7): one with the names another live gateway holds refuses to
start, and the first keeps its VMs; once the first is dead, its leftovers are the next one's to sweep.

Real ``gateway serve`` processes on the netns driver, each with its own data folder and embedded Redis
(so neither knows the other's VMs), on a prefix, CIDR and cgroup of this test's own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config, override
from gateway.images.store import ImageStore
from gateway.orchestrator.drivers.netns import MOUNT_ROOT
from gateway.orchestrator.drivers.owner_lock import lock_paths
from gateway.orchestrator.drivers.registry import make_driver
from tests.conftest import free_port, remove_blackhole, remove_empty_cgroup_parents, remove_host_firewall
from tests.integration.test_cli import START_TIMEOUT_S, Server, cli_env, gateway
from tests.rootfs_env import CACHE_ROOT

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the netns driver needs root"),
    pytest.mark.both_edges,  # (test_cli's cli_env)
]
# Away from tests/conftest.py's (gwt, gwq, 172.31.240.0/22, 172.31.236.0/23) and a developer's gateway.
PREFIX = "gwo"
CIDR = "172.31.232.0/23"
CGROUP = "gateway-otest"
OTHER_PREFIX = "gwp"
OTHER_CGROUP = "gateway-ptest"
NETNS_DIR = Path("/var/run/netns")


def netns_env(**more: str) -> dict[str, str]:
    return {
        "GATEWAY_VMS_DRIVER": "netns",
        "GATEWAY_NETNS_NAME_PREFIX": PREFIX,
        "GATEWAY_NETNS_CIDR": CIDR,
        "GATEWAY_NETNS_CGROUP_NAME": CGROUP,
        "GATEWAY_IMAGES_DIR": str(CACHE_ROOT),
        **more,
    }


def serve(data: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``gateway serve`` that is expected to refuse: it exits by itself."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "--data-dir",
            str(data),
            "serve",
            "--listen",
            f"127.0.0.1:{free_port()}",
        ],
        env=cli_env() | env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S * 3,
    )


def namespaces() -> set[str]:
    return (
        {name for name in os.listdir(NETNS_DIR) if name.startswith(f"{PREFIX}-")}
        if NETNS_DIR.is_dir()
        else set()
    )


def cleanup(*data_dirs: Path) -> None:
    """Whatever the gateways left (VMs outlive a gateway on purpose), and the host state the driver keeps."""
    for data in data_dirs:
        config = override(
            load_config(None),
            server={"data_dir": str(data)},
            vms={"driver": "netns"},
            netns={"name_prefix": PREFIX, "cidr": CIDR, "cgroup_name": CGROUP},
            images={"dir": str(CACHE_ROOT)},
        )
        asyncio.run(make_driver(config).sweep(set()))
    remove_host_firewall(PREFIX)
    remove_blackhole(CIDR)
    remove_empty_cgroup_parents(CGROUP)
    # The lock files no gateway holds any more, and the guest programs' copy of the driver's start.
    for prefix, cgroup in ((PREFIX, CGROUP), (OTHER_PREFIX, OTHER_CGROUP)):
        for path in lock_paths(prefix, cgroup):
            path.unlink(missing_ok=True)
    shutil.rmtree(MOUNT_ROOT / PREFIX, ignore_errors=True)


def test_a_second_gateway_on_the_same_names_refuses_and_the_first_keeps_its_vm(
    tmp_path: Path, rootfs_images: ImageStore
) -> None:
    first_data, second_data = tmp_path / "first", tmp_path / "second"
    second_log = tmp_path / "second.log"
    first = Server(first_data, env=netns_env())
    second: Server | None = None
    try:
        key = gateway("--data-dir", str(first_data), "keys", "create", "--name", "k").stdout.split()[-1]
        status, vm = first.call("POST", "/v1/vms", {"vm_lifetime_seconds": 600}, key)
        assert status == 200, vm
        alive = {"session_id": vm["session_id"], "language": "bash", "command": "echo alive"}
        status, ran = first.call("POST", "/execute", alive, key)
        assert (status, ran["stdout"]) == (200, "alive\n"), ran
        made = namespaces()
        assert len(made) == 1, made

        same = 'netns.name_prefix "gwo" is in use by another gateway on this host'
        same_cgroup = 'netns.cgroup_name "gateway-otest" is in use by another gateway on this host'
        overlap = f"netns.cidr {CIDR} overlaps netns.cidr {CIDR} of another gateway"
        for changes, says in (
            ({}, same),
            ({"GATEWAY_NETNS_NAME_PREFIX": OTHER_PREFIX}, same_cgroup),
            ({"GATEWAY_NETNS_NAME_PREFIX": OTHER_PREFIX, "GATEWAY_NETNS_CGROUP_NAME": OTHER_CGROUP}, overlap),
        ):
            refused = serve(second_data, netns_env(**changes))
            assert refused.returncode == 2, refused.stderr
            assert says in refused.stderr, refused.stderr
            assert f"(pid {first.proc.pid}, data folder {first_data}, driver netns)" in refused.stderr
            assert (
                "give this one a netns.name_prefix, netns.cgroup_name and netns.cidr of its own"
                in refused.stderr
            )

        # The first gateway's VM went on running through all that.
        status, seen = first.call("GET", f"/v1/vms/{vm['vm_id']}", None, key)
        assert (status, seen["status"]) == (200, "active"), seen
        status, ran = first.call("POST", "/execute", alive, key)
        assert (status, ran["stdout"]) == (200, "alive\n"), ran
        assert namespaces() == made

        # Killed (no chance to release anything), the first holds nothing: its VM is a leftover now, which
        # the next gateway with these names sweeps at start-up.
        first.proc.kill()
        first.proc.wait()
        second = Server(second_data, env=netns_env(), log_path=second_log)
        assert namespaces() == set()
        assert "orphaned VM(s) left on the host" in second_log.read_text()
        assert second.stop() == 0
    finally:
        for server in (first, second):
            if server is not None:
                server.kill()
        cleanup(first_data, second_data)
