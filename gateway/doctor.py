"""``gateway doctor``: what this host can run, as the configuration would use it (no VM is started).

One line per check; the exit status is 1 when the configured driver cannot work here. The ``isolation:``
line says what stands between a VM and the host with that driver (the same sentence ``gateway serve``
prints when it starts).
"""

from __future__ import annotations

import os
import shutil

from gateway.config import Config
from gateway.errors import DriverError
from gateway.orchestrator.drivers.base import VmDriver
from gateway.orchestrator.drivers.netns import NetnsVmDriver
from gateway.orchestrator.drivers.process import ROOT_REFUSED
from gateway.orchestrator.drivers.qemu import QemuVmDriver
from gateway.orchestrator.drivers.registry import choose_driver, make_driver, qemu_image_dir


def isolation(driver: VmDriver) -> str:
    """The driver's own sentence (each driver class says it, as ``isolation``)."""
    return str(getattr(driver, "isolation", "unknown"))


async def diagnose(config: Config) -> tuple[list[str], bool]:
    """(report lines, whether the configured driver can run VMs here)."""
    kind = choose_driver(config.vms.driver)
    lines = [f"VM driver: {kind} (vms.driver = {config.vms.driver!r})"]
    try:
        driver = make_driver(config)
    except DriverError as exc:
        return [*lines, f"{kind}: {exc}"], False
    ok = True
    if kind in ("netns", "qemu"):
        root = os.geteuid() == 0
        ip = shutil.which("ip")
        tools = f"iproute2: {ip or 'missing (apt-get install iproute2)'}"
        lines.append(f"root: {'yes' if root else 'no (needed)'}; {tools}")
        ok = root and ip is not None
    if kind == "process" and os.geteuid() == 0 and not config.process.allow_root:
        lines.append(f"process driver as root: refused ({ROOT_REFUSED})")
        ok = False
    if isinstance(driver, QemuVmDriver):
        try:
            found = await driver.detect()
        except DriverError as exc:
            lines += [f"qemu: {exc}", f"isolation: {driver.isolation}"]
            return lines, False
        lines += [
            f"qemu: {found['qemu']}",
            f"boot image: {found['image_id']} (kernel {found['kernel']}, built {found['image_built_at']}) "
            f"in {found['image_dir']}",
            f"default image disk: {found['default_disk'] or 'not made (is the default image built?)'}",
            f"/dev/kvm: {'usable' if found['kvm_device'] else 'not usable'}",
            f"accelerator: {found['accel']}"
            + (
                " (software emulation: boots take seconds, not milliseconds)"
                if found["accel"] == "tcg"
                else ""
            ),
            f"isolation: {found['isolation']}",
        ]
        return lines, ok
    if isinstance(driver, NetnsVmDriver) and driver.runs_containers:
        for line, usable in await driver.container_checks():
            lines.append(line)
            ok = ok and usable
    if config.vms.driver == "auto":
        lines.append(f'qemu boot image: {qemu_image_dir(config)} (driver = "qemu" to use it)')
    lines.append(f"isolation: {isolation(driver)}")
    return lines, ok
