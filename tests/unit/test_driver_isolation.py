"""Which isolation each driver gives, said in one sentence per driver, and the process driver (which gives
none) refusing to run VM code as root unless told to."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Config, ProcessConfig, override
from gateway.doctor import diagnose, isolation
from gateway.errors import DriverError
from gateway.orchestrator.drivers import process, registry
from gateway.orchestrator.drivers.netns import NetnsVmDriver
from gateway.orchestrator.drivers.process import ProcessVmDriver
from gateway.orchestrator.drivers.qemu import QemuVmDriver


def as_root(monkeypatch: pytest.MonkeyPatch, root: bool = True) -> None:
    monkeypatch.setattr(process.os, "geteuid", lambda: 0 if root else 1000)


async def test_the_process_driver_refuses_root_saying_what_it_would_give_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_root(monkeypatch)
    driver = ProcessVmDriver(ProcessConfig(), tmp_path / "vms")
    with pytest.raises(DriverError) as refused:
        await driver.start()
    said = str(refused.value)
    assert "isolates nothing" in said and "as root" in said and "process.allow_root" in said
    assert not (tmp_path / "vms").exists()


async def test_the_process_driver_runs_as_root_when_allowed_and_as_anyone_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_root(monkeypatch)
    await ProcessVmDriver(ProcessConfig(allow_root=True), tmp_path / "a").start()
    assert (tmp_path / "a").is_dir()
    as_root(monkeypatch, root=False)
    await ProcessVmDriver(ProcessConfig(), tmp_path / "b").start()
    assert (tmp_path / "b").is_dir()


def test_each_driver_says_its_isolation() -> None:
    assert ProcessVmDriver.isolation.startswith("NONE (process driver: development only")
    assert isinstance(NetnsVmDriver.isolation, str) and NetnsVmDriver.isolation


def test_the_qemu_sentence_names_accelerator_uid_and_confinement(tmp_path: Path) -> None:
    config = override(Config(), server={"data_dir": str(tmp_path)}, vms={"driver": "qemu"})
    driver = registry.make_driver(config)
    assert isinstance(driver, QemuVmDriver)
    said = isolation(driver)
    assert said.startswith("QEMU microVMs (KVM or TCG), each QEMU confined")
    assert "seccomp" in said and "uid/gid 2000001 + slot" in said and "chroot" in said
    driver._accel = "tcg"
    assert isolation(driver).startswith("QEMU microVMs (TCG)")


async def test_doctor_says_the_isolation_and_fails_for_the_process_driver_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_root(monkeypatch)
    monkeypatch.setattr("gateway.doctor.os.geteuid", lambda: 0)
    config = override(Config(), server={"data_dir": str(tmp_path)}, vms={"driver": "process"})
    lines, ok = await diagnose(config)
    assert not ok
    assert any(line.startswith("process driver as root: refused") for line in lines), lines
    assert lines[-1] == f"isolation: {ProcessVmDriver.isolation}"
    lines, ok = await diagnose(override(config, process={"allow_root": True}))
    assert ok and lines[-1].startswith("isolation: NONE")


async def test_doctor_checks_what_netns_containers_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.doctor.os.geteuid", lambda: 0)
    config = override(Config(), server={"data_dir": str(tmp_path)}, vms={"driver": "netns"})
    lines, ok = await diagnose(config)
    # An image not built yet is said, and is no failure: `gateway serve` builds the default at start.
    assert any(line.startswith("default image: image default is not built") for line in lines), lines
    assert lines[-1] == f"isolation: {NetnsVmDriver.isolation}"
    lines, ok = await diagnose(override(config, netns={"runtime": "/nonexistent/runc"}))
    assert not ok
    assert "OCI runtime: missing (apt-get install runc)" in lines
