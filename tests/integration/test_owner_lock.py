"""Two gateways on one host never share host names (issue 17.7): the driver's owner lock.

Here the lock itself, between real processes, in a folder of the test's own (no root needed); the netns
driver's use of it, with real gateways and VMs, is in test_two_gateways.py."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import DriverError
from gateway.orchestrator.drivers.owner_lock import OwnerLock, claim_host_names

REPO = Path(__file__).resolve().parents[2]
CIDR = "172.31.232.0/23"

HOLD = """
import json, sys
from pathlib import Path
from gateway.orchestrator.drivers.owner_lock import OwnerLock, claim_host_names

held = claim_host_names(**json.loads(sys.argv[1]), root=Path(sys.argv[2]))  # (released when collected)
print("held", flush=True)
sys.stdin.read()  # until the test closes it, or kills this process
"""


def claim(root: Path, **changes: str) -> OwnerLock:
    names = {"section": "netns", "name_prefix": "gwo", "cgroup_name": "gateway-otest", "cidr": CIDR}
    return claim_host_names(**(names | changes), data_dir=Path("/srv/this"), driver="netns", root=root)


@pytest.fixture
def other_gateway(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding prefix gwo, cgroup gateway-otest and CIDR."""
    root = tmp_path / "locks"
    names = {
        "section": "netns",
        "name_prefix": "gwo",
        "cgroup_name": "gateway-otest",
        "cidr": CIDR,
        "data_dir": "/srv/other",
        "driver": "netns",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, json.dumps(names), str(root)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({}, 'netns.name_prefix "gwo" is in use by another gateway on this host'),
        ({"name_prefix": "gwp"}, 'netns.cgroup_name "gateway-otest" is in use by another gateway'),
        (
            {"name_prefix": "gwp", "cgroup_name": "gateway-ptest", "cidr": "172.31.233.0/24"},
            "netns.cidr 172.31.233.0/24 overlaps netns.cidr 172.31.232.0/23 of another gateway",
        ),
    ],
)
def test_a_second_claim_is_refused_naming_the_holder_and_the_settings(
    tmp_path: Path, other_gateway: subprocess.Popen[str], changes: dict[str, str], says: str
) -> None:
    with pytest.raises(DriverError) as refused:
        claim(tmp_path / "locks", **changes)
    message = str(refused.value)
    assert says in message, message
    assert f"pid {other_gateway.pid}, data folder /srv/other, driver netns" in message, message
    assert "netns.name_prefix, netns.cgroup_name and netns.cidr of its own" in message, message
    # Refused whole: nothing of it stays held.
    other_gateway.kill()
    other_gateway.wait()
    claim(tmp_path / "locks").release()


def test_names_of_their_own_are_no_conflict_and_a_dead_holder_holds_nothing(
    tmp_path: Path, other_gateway: subprocess.Popen[str]
) -> None:
    root = tmp_path / "locks"
    own = claim(root, name_prefix="gwp", cgroup_name="gateway-ptest", cidr="172.31.230.0/23")
    try:
        other_gateway.kill()  # SIGKILL: no chance to unlock anything
        other_gateway.wait()
        # Its leftovers are ours to sweep now: the kernel dropped its locks with it.
        claim(root).release()
    finally:
        own.release()


def test_a_claim_is_held_until_released_even_within_one_process(tmp_path: Path) -> None:
    """(Two drivers of one test process are two gateways as far as the lock goes.)"""
    first = claim(tmp_path / "locks")
    with pytest.raises(DriverError, match="in use by another gateway"):
        claim(tmp_path / "locks")
    first.release()
    first.release()  # idempotent
    claim(tmp_path / "locks")  # dropped at once: a driver object dropped without close holds nothing
    claim(tmp_path / "locks").release()
