"""``gateway doctor``: what this host can run, as the configuration would use it (no VM is started).

One line per check; the exit status is 1 when the configured driver cannot work here.
"""

from __future__ import annotations

import os
import shutil

from gateway.config import Config
from gateway.errors import DriverError
from gateway.orchestrator.drivers.qemu import QemuVmDriver
from gateway.orchestrator.drivers.registry import choose_driver, make_driver, qemu_image_dir


async def diagnose(config: Config) -> tuple[list[str], bool]:
    """(report lines, whether the configured driver can run VMs here)."""
    kind = choose_driver(config.vms.driver)
    lines = [f"VM driver: {kind} (vms.driver = {config.vms.driver!r})"]
    ok = True
    if kind in ("netns", "qemu"):
        root = os.geteuid() == 0
        ip = shutil.which("ip")
        tools = f"iproute2: {ip or 'missing (apt-get install iproute2)'}"
        lines.append(f"root: {'yes' if root else 'no (needed)'}; {tools}")
        ok = root and ip is not None
    if kind == "qemu":
        driver = make_driver(config)
        assert isinstance(driver, QemuVmDriver)
        try:
            found = await driver.detect()
        except DriverError as exc:
            lines.append(f"qemu: {exc}")
            return lines, False
        lines += [
            f"qemu: {found['qemu']}",
            f"image: {found['image_id']} (kernel {found['kernel']}, built {found['image_built_at']}) "
            f"in {found['image_dir']}",
            f"/dev/kvm: {'usable' if found['kvm_device'] else 'not usable'}",
            f"accelerator: {found['accel']}"
            + (
                " (software emulation: boots take seconds, not milliseconds)"
                if found["accel"] == "tcg"
                else ""
            ),
        ]
    elif config.vms.driver == "auto":
        lines.append(f'qemu image: {qemu_image_dir(config)} (driver = "qemu" to use it)')
    return lines, ok
