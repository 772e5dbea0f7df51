"""The image store: which images are defined, which are built, where their root file systems are.

Layout under the store's root (``images.dir``, by default ``<data_dir>/images/rootfs``)::

    <name>/.lock              flock(2): one build of an image at a time, across processes
    <name>/<digest>/rootfs/   the root file system VMs run on (read-only to them)
    <name>/<digest>/manifest.json

The digest is the definition's (``definition_digest``): a changed package list or builder makes a new
folder, built beside the old one. Folders of older digests are kept unless ``ensure`` is asked to remove
them (``remove_stale``): a VM still running on one keeps using it, and removing a mounted layer's files
under a running VM is undefined behaviour for overlayfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from gateway.config import Config
from gateway.errors import DriverError
from gateway.images.builder import MANIFEST, ROOTFS, ImageError, build_rootfs, load_manifest, remove_tree
from gateway.images.definitions import ImageDefinition, definition_digest

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
ROOTFS_SUBDIR = "images/rootfs"
# VM drivers whose VMs run on a root file system image of this store: a VM of an image that is not
# built is refused, and the default image is built at start. (netns mounts the image's folder; qemu
# attaches an ext4 disk made from it, ``drivers/qemu_disk.py``.)
ROOTFS_DRIVERS = frozenset({"netns", "qemu"})
# Drivers that accept any defined image and run on the host's own files whatever it names (development).
HOST_FILES_DRIVERS = frozenset({"process"})


class ImageStore:
    """Defined images and their built root file systems.

    Reading (``rootfs``, ``is_built``, ``describe``) is cheap (a few stats) and safe from any process.
    ``ensure`` blocks for the length of a build (about a minute): call it from a thread.
    """

    def __init__(
        self, root: Path, definitions: Mapping[str, ImageDefinition], default: str = "default"
    ) -> None:
        self.root = Path(root)
        self._definitions = dict(definitions)
        self.default = default

    def names(self) -> list[str]:
        return list(self._definitions)

    def resolve(self, name: str | None) -> str:
        """The image a request means: none (or "default" when no image has that name) is the default one."""
        if not name or (name == "default" and name not in self._definitions):
            return self.default
        return name

    def definition(self, name: str) -> ImageDefinition:
        name = self.resolve(name)
        try:
            return self._definitions[name]
        except KeyError:
            raise DriverError(
                f"unknown image {name!r}; defined: {', '.join(self.names()) or 'none'} ([images.definitions])"
            ) from None

    def digest(self, name: str) -> str:
        return definition_digest(self.definition(name))

    def folder(self, name: str) -> Path:
        """Where the image's current build lives (whether or not it is built)."""
        definition = self.definition(name)
        return self.root / definition.name / definition_digest(definition)

    def is_built(self, name: str) -> bool:
        # A build lands in its folder by one rename, once complete: a folder with both parts is whole.
        folder = self.folder(name)
        return (folder / ROOTFS).is_dir() and (folder / MANIFEST).is_file()

    def rootfs(self, name: str) -> Path:
        """The current root file system of image ``name`` ("" is the default image), or DriverError."""
        folder = self.folder(name)
        if not self.is_built(name):
            name = self.resolve(name)
            raise DriverError(f"image {name} is not built on this gateway: run `gateway image build {name}`")
        return folder / ROOTFS

    def manifest(self, name: str) -> dict[str, Any] | None:
        return load_manifest(self.folder(name)) if self.is_built(name) else None

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[Path]:
        """Hold image ``name``'s lock (blocking; across processes) and yield its folder: what builds it, or
        derives files from it (a driver's disk), does so under this lock."""
        folder = self.folder(name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield folder

    def ensure(
        self,
        name: str,
        say: Callable[[str], None] = print,
        *,
        remove_stale: bool = False,
        cancel: threading.Event | None = None,
    ) -> Path:
        """Build the image unless it is built and current; return its root file system.

        Two processes ensuring one image build it once: the second waits for the first's lock, then
        finds it built. ``remove_stale`` also removes the image's folders of other digests: only when
        no VM runs on them (this process cannot tell). Setting ``cancel`` stops a build.
        """
        definition = self.definition(name)
        folder = self.folder(name)
        with self.locked(name):
            if not self.is_built(name):
                # What a build that crashed or was killed left (we hold the lock: no build runs now).
                for leftover in folder.parent.glob(".*"):
                    if leftover.name != LOCK_FILE:
                        remove_tree(leftover)
                try:
                    build_rootfs(definition, folder, say=say, cancel=cancel)
                except ImageError as exc:
                    raise DriverError(str(exc)) from None
            if remove_stale:
                for other in folder.parent.iterdir():
                    if other.is_dir() and other != folder and not other.name.startswith("."):
                        say(f"image {definition.name}: removing {other.name} (older definition or builder)")
                        remove_tree(other)
        return folder / ROOTFS

    def describe(self) -> list[dict[str, Any]]:
        """Every defined image, as the API lists them."""
        views = []
        for name, definition in self._definitions.items():
            manifest = self.manifest(name) or {}
            views.append(
                {
                    "name": name,
                    "description": definition.description,
                    "packages": list(definition.packages),
                    "suite": definition.suite,
                    "digest": definition_digest(definition),
                    "built": bool(manifest),
                    "default": name == self.default,
                    "size_bytes": manifest.get("size_bytes"),
                    "built_at": manifest.get("built_at"),
                }
            )
        return views


def image_store(config: Config) -> ImageStore:
    """The configured store: ``[images.definitions]`` in ``images.dir`` (empty: <data_dir>/images/rootfs)."""
    images = config.images
    root = Path(images.dir) if images.dir else config.data_path / ROOTFS_SUBDIR
    definitions = {
        name: ImageDefinition(name, entry.description, tuple(entry.packages), entry.suite)
        for name, entry in images.definitions.items()
    }
    return ImageStore(root, definitions, images.default)


async def ensure_default_image(store: ImageStore, say: Callable[[str], None]) -> Path:
    """Build the default image unless it is built (a first start, or a changed definition); its rootfs.

    Cancelling stops the build (and waits for mmdebstrap to clean up).
    """
    if not store.is_built(store.default):
        say(f"building image {store.default} (first start, or its definition changed; about a minute) ...")
    cancel = threading.Event()
    build = asyncio.ensure_future(asyncio.to_thread(store.ensure, store.default, say, cancel=cancel))
    try:
        return await asyncio.shield(build)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(Exception):
            await build
        raise
