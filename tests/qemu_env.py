"""The qemu driver's guest image for tests: built once per version of its sources, then reused.

Kept under /var/tmp, keyed by ``qemu_image.sources_digest()`` (the builder, the init and the agent), so
repeated local runs skip the ~10 s build and a change to any source builds a new one (CI machines start
without any).
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
from pathlib import Path

from gateway.orchestrator.drivers import qemu_image

CACHE_ROOT = Path(os.environ.get("GATEWAY_TEST_IMAGE_CACHE", "/var/tmp/gateway-test-qemu-image"))


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
    """Built by one test process at a time (./dev test's workers start together): another's build in
    progress is never taken for a stale image."""
    target = CACHE_ROOT / qemu_image.sources_digest()
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT.with_name(CACHE_ROOT.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            qemu_image.load_manifest(target)
        except qemu_image.ImageError:
            qemu_image.build_image(target, say=lambda _line: None)
        # Images (and their boot templates) of other versions of the sources are never used again.
        for stale in CACHE_ROOT.iterdir():
            if stale != target:
                shutil.rmtree(stale, ignore_errors=True)
    return target
