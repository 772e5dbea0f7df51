"""The one place that names concrete VM drivers: picks one from the configuration.

``auto`` prefers real network isolation (netns) where it can work, i.e. as root on Linux with iproute2,
and falls back to the process driver for development machines.
"""

from __future__ import annotations

import os
import shutil
import sys

from gateway.config import Config
from gateway.orchestrator.drivers.base import VmDriver
from gateway.orchestrator.drivers.netns import NetnsVmDriver
from gateway.orchestrator.drivers.process import ProcessVmDriver

WORK_SUBDIR = "vms"


def netns_available() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("ip") is not None


def choose_driver(requested: str) -> str:
    """Resolve "auto" to the driver this host supports."""
    if requested == "auto":
        return "netns" if netns_available() else "process"
    return requested


def make_driver(config: Config) -> VmDriver:
    """Build the configured driver; VM work folders live under ``<data_dir>/vms``."""
    work_dir = config.data_path / WORK_SUBDIR
    if choose_driver(config.vms.driver) == "netns":
        return NetnsVmDriver(config.netns, work_dir)
    return ProcessVmDriver(config.process, work_dir)
