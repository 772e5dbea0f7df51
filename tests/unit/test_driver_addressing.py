"""Pure slot -> address/name derivation of both VM drivers, and driver selection; no host is touched."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gateway.config import Config, NetnsConfig, ProcessConfig, override
from gateway.errors import DriverError
from gateway.orchestrator.drivers import registry
from gateway.orchestrator.drivers._host import check_vm_id, exit_code
from gateway.orchestrator.drivers.base import VmDriver
from gateway.orchestrator.drivers.netns import plan_slot, slot_capacity
from gateway.orchestrator.drivers.process import slot_address
from gateway.orchestrator.drivers.process import slot_capacity as process_capacity


@pytest.mark.parametrize(
    ("slot", "host_ip", "vm_ip", "namespace", "veth"),
    [
        (0, "172.30.0.1", "172.30.0.2", "gw-0", "gwh0"),
        (1, "172.30.0.5", "172.30.0.6", "gw-1", "gwh1"),
        (64, "172.30.1.1", "172.30.1.2", "gw-64", "gwh64"),
        (16383, "172.30.255.253", "172.30.255.254", "gw-16383", "gwh16383"),
    ],
)
def test_netns_slot_plan(slot: int, host_ip: str, vm_ip: str, namespace: str, veth: str) -> None:
    plan = plan_slot("172.30.0.0/16", "gw", slot)
    assert (plan.slot, plan.host_ip, plan.vm_ip, plan.namespace, plan.veth) == (
        slot,
        host_ip,
        vm_ip,
        namespace,
        veth,
    )


@pytest.mark.parametrize(
    ("cidr", "capacity"), [("172.30.0.0/16", 16384), ("10.0.0.0/24", 64), ("10.0.0.0/29", 2)]
)
def test_netns_capacity_is_number_of_slash30s(cidr: str, capacity: int) -> None:
    assert slot_capacity(cidr) == capacity


def test_netns_slots_are_disjoint_slash30s_inside_the_cidr() -> None:
    cidr = "10.9.0.0/24"
    network = ipaddress.IPv4Network(cidr)
    blocks = set()
    for slot in range(slot_capacity(cidr)):
        plan = plan_slot(cidr, "gw", slot)
        block = ipaddress.IPv4Interface(f"{plan.vm_ip}/30").network
        assert block.subnet_of(network)
        assert ipaddress.IPv4Address(plan.host_ip) in block
        # Neither side is the block's network or broadcast address.
        assert {plan.host_ip, plan.vm_ip}.isdisjoint(
            {str(block.network_address), str(block.broadcast_address)}
        )
        blocks.add(block)
    assert len(blocks) == slot_capacity(cidr)


@pytest.mark.parametrize("slot", [-1, 64, 10**6])
def test_netns_slot_out_of_range(slot: int) -> None:
    with pytest.raises(DriverError):
        plan_slot("10.0.0.0/24", "gw", slot)


def test_netns_driver_address_matches_plan(tmp_path: Path) -> None:
    driver = registry.make_driver(
        _config(tmp_path, "netns", netns={"cidr": "10.0.0.0/24", "name_prefix": "ab"})
    )
    assert driver.capacity == 64
    assert driver.address(3) == "10.0.0.14"
    with pytest.raises(DriverError):
        driver.address(64)


@pytest.mark.parametrize(
    ("prefix", "cidr"),
    [
        ("gatewaytest1", "172.30.0.0/16"),  # gatewaytest1h16383 > 15 characters
        ("GW", "10.0.0.0/24"),
        ("g-w", "10.0.0.0/24"),
        ("1gw", "10.0.0.0/24"),
    ],
)
def test_netns_rejects_prefixes_that_make_bad_interface_names(prefix: str, cidr: str, tmp_path: Path) -> None:
    with pytest.raises(DriverError):
        registry.make_driver(_config(tmp_path, "netns", netns={"cidr": cidr, "name_prefix": prefix}))


def test_netns_longest_interface_name_fits() -> None:
    config = NetnsConfig(cidr="10.0.0.0/8", name_prefix="gwtest")
    last = plan_slot(config.cidr, config.name_prefix, slot_capacity(config.cidr) - 1)
    assert last.veth == "gwtesth4194303" and len(last.veth) <= 15


@pytest.mark.parametrize(
    ("slot", "ip"), [(0, "127.100.0.1"), (1, "127.100.0.2"), (255, "127.100.1.0"), (65533, "127.100.255.254")]
)
def test_process_slot_address(slot: int, ip: str) -> None:
    assert slot_address(ProcessConfig().cidr, slot) == ip


def test_process_capacity_skips_network_and_broadcast() -> None:
    assert process_capacity("127.100.0.0/16") == 65534
    assert process_capacity("127.0.0.0/30") == 2
    with pytest.raises(DriverError):
        slot_address("127.100.0.0/16", 65534)
    with pytest.raises(DriverError):
        slot_address("127.100.0.0/16", -1)


def test_process_driver_address(tmp_path: Path) -> None:
    driver = registry.make_driver(_config(tmp_path, "process", process={"cidr": "127.78.0.0/24"}))
    assert (driver.capacity, driver.address(0), driver.address(253)) == (254, "127.78.0.1", "127.78.0.254")


@pytest.mark.parametrize("vm_id", ["vmid-0123abcd", "a", "A.b_c-1"])
def test_vm_ids_accepted(vm_id: str) -> None:
    assert check_vm_id(vm_id) == vm_id


@pytest.mark.parametrize("vm_id", ["", ".", "..", "../x", "a/b", "-a", "a b", "x" * 200, "a\n"])
def test_vm_ids_that_could_escape_a_path_are_rejected(vm_id: str) -> None:
    with pytest.raises(DriverError):
        check_vm_id(vm_id)


@pytest.mark.parametrize(("returncode", "expected"), [(0, 0), (3, 3), (-9, 137), (-15, 143)])
def test_signal_exit_codes_read_like_a_shell(returncode: int, expected: int) -> None:
    assert exit_code(returncode) == expected


@pytest.mark.parametrize(("available", "expected"), [(True, "netns"), (False, "process")])
def test_auto_picks_netns_only_where_it_can_work(
    available: bool, expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(registry, "netns_available", lambda: available)
    assert registry.choose_driver("auto") == expected
    driver = registry.make_driver(_config(tmp_path, "auto"))
    assert driver.name == expected and isinstance(driver, VmDriver)
    for explicit in ("netns", "process"):
        assert registry.choose_driver(explicit) == explicit


def _config(tmp_path: Path, driver: str, **sections: dict[str, object]) -> Config:
    return override(Config(), server={"data_dir": str(tmp_path / "data")}, vms={"driver": driver}, **sections)
