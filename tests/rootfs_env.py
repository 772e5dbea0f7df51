"""Root file system images for tests: built once per definition digest, then reused across runs.

Kept under /var/tmp (``GATEWAY_TEST_ROOTFS_CACHE`` elsewhere) as an ``ImageStore`` of the shipped
definitions, so repeated local runs skip the ~45 s build per image and a changed definition or builder
builds a new one (older digests are removed: no test VM outlives its run). CI machines start without any.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from gateway.config import load_config
from gateway.images.store import ImageStore, image_store

CACHE_ROOT = Path(os.environ.get("GATEWAY_TEST_ROOTFS_CACHE", "/var/tmp/gateway-test-rootfs"))


def rootfs_missing() -> str | None:
    """Why images cannot be built here (None: they can)."""
    if os.geteuid() != 0:
        return "building images needs root"
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is missing (apt-get install mmdebstrap)"
    return None


def cached_image_store() -> ImageStore:
    """The shipped definitions, in the cache."""
    config = load_config(environ={"GATEWAY_IMAGES_DIR": str(CACHE_ROOT)})
    return image_store(config)


_ensured: set[str] = set()


def ensure_test_images(*names: str, say: Callable[[str], None] = lambda _line: None) -> ImageStore:
    """The cache with ``names`` built (each once per process; other processes wait on its lock)."""
    images = cached_image_store()
    for name in names:
        if name not in _ensured:
            images.ensure(name, say, remove_stale=True)
            _ensured.add(name)
    return images
