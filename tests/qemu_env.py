"""The qemu driver's guest image for tests: built once per content of its sources, then reused.

Keyed by a hash of the builder, the init and the agent, so a change to any of them rebuilds it; kept
under /var/tmp so repeated local runs skip the ~15 s build (CI machines start without it).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

from gateway.orchestrator.drivers import qemu_image

CACHE_ROOT = Path(os.environ.get("GATEWAY_TEST_IMAGE_CACHE", "/var/tmp/gateway-test-qemu-image"))
SOURCES = (
    Path(qemu_image.__file__),
    qemu_image.GUEST_DIR / "qemu_init.sh",
    qemu_image.GUEST_DIR / "agent.py",
)


def qemu_missing() -> str | None:
    """Why the qemu driver cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "the qemu driver needs root"
    for tool in ("qemu-system-x86_64", "ip", "lz4", "cpio", "apt-get"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    return None


@functools.cache
def guest_image() -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    target = CACHE_ROOT / digest
    try:
        qemu_image.load_manifest(target)
    except qemu_image.ImageError:
        qemu_image.build_image(target, say=lambda _line: None)
    return target
