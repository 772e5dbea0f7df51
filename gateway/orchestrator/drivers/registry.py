"""The one place that names concrete VM drivers: picks one from the configuration.

``auto`` prefers real network isolation (netns) where it can work, i.e. as root on Linux with iproute2,
and falls back to the process driver for development machines.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from gateway.config import Config
from gateway.images.store import image_store
from gateway.orchestrator.drivers.base import VmDriver
from gateway.orchestrator.drivers.hostfw import EgressRedirect
from gateway.orchestrator.drivers.netns import NetnsVmDriver
from gateway.orchestrator.drivers.process import ProcessVmDriver
from gateway.orchestrator.drivers.qemu import QemuVmDriver

WORK_SUBDIR = "vms"
IMAGE_SUBDIR = "images/qemu"


def qemu_image_dir(config: Config) -> Path:
    return Path(config.qemu.image_dir) if config.qemu.image_dir else config.data_path / IMAGE_SUBDIR


def netns_available() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("ip") is not None


def choose_driver(requested: str) -> str:
    """Resolve "auto" to the driver this host supports."""
    if requested == "auto":
        return "netns" if netns_available() else "process"
    return requested


def make_driver(config: Config, *, egress_ca: bytes | None = None) -> VmDriver:
    """Build the configured driver; VM work folders live under ``<data_dir>/vms``. ``egress_ca``: the
    deployment's egress CA (PEM), which VMs with egress trust."""
    work_dir = config.data_path / WORK_SUBDIR
    kind = choose_driver(config.vms.driver)
    driver: NetnsVmDriver
    if kind == "qemu":
        driver = QemuVmDriver(
            config.qemu,
            work_dir,
            image_dir=qemu_image_dir(config),
            boot_timeout_s=config.vms.boot_timeout_s,
            images=image_store(config),
        )
    elif kind == "netns":
        driver = NetnsVmDriver(config.netns, work_dir, images=image_store(config))
    else:
        return ProcessVmDriver(config.process, work_dir)
    if config.egress.enabled:
        # The VMs' TCP and DNS go to the egress plane on their veth's host address (hostfw.py).
        driver.egress = EgressRedirect(config.egress.proxy_port, config.egress.resolver_port)
        # And they get a nameserver and trust the CA the proxy signs vault hosts' leaves with.
        driver.egress_ca = egress_ca
    return driver
