"""``LocalVolumeStore``: volumes on this host's disk, one ext4 image per volume on an XFS pool.

Why this shape (README, "Volumes"):
- **One ext4 image per volume**, loop-mounted while attached: the quota is the file system's size, so a
  writer past it gets ``ENOSPC`` from the kernel and no other volume, VM or the host is touched. Project
  quotas would need the data folder on a file system mounted with them (not ours to choose) and would
  give no cheap checkpoints.
- **The images live on an XFS file system** (``pool.img`` in the data folder, loop-mounted at ``pool/``,
  made with ``reflink=1``): the host's ext4 cannot share blocks, XFS can, so a checkpoint is a reflink
  (``FICLONE``): constant time whatever the size, and blocks are shared until either side writes. A
  read-write attach at a checkpoint is another reflink, private to its holder. The pool's logical size
  is kept at least the sum of every image's size (it is a sparse file: that costs nothing), so a volume
  only ever runs out of its own space, never of the pool's.
- **Durability**: mounts are the kernel's and outlive this process; the attachments (who holds which
  view) are a JSON file per volume, written atomically after each change; ``start`` finds the mounts and
  loop devices again, mounts what a holder still holds (after a reboot), and releases what nobody holds.
  Unmount flushes; a checkpoint freezes the file system (``fsfreeze``) for the copy, so it is clean.
- **One loop device per image**: mounting an image always goes through the loop device already bound
  to it if there is one (a VM's mount namespace may still hold a mount we dropped): two devices on one
  ext4 image would be two file systems writing the same blocks.

Layout under ``root`` (``<data_dir>/volumes``)::

    pool.img                 the XFS pool (sparse)         pool/images/<volume>.img
    pool/checkpoints/<volume>/<checkpoint>.img             pool/clones/<volume>/<holder>-<checkpoint>.img
    state/<volume>.json      views and their holders       mnt/<volume>/<view>   mount points

Views of a volume: ``live`` (read-write), ``live-ro`` (a read-only bind mount of ``live``),
``ck-<checkpoint>`` (the checkpoint, read-only) and ``clone-<holder>-<checkpoint>`` (a holder's private
read-write copy of a checkpoint). Any number of holders may share ``live`` read-write: they see one file
system, with the kernel's usual semantics (the last write to a byte wins).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.volumes.paths import holder_slug, is_safe_id
from gateway.volumes.store import (
    CheckpointMissing,
    QuotaTooSmall,
    VolumeBusy,
    VolumeMissing,
    VolumeStoreFailed,
)

log = logging.getLogger(__name__)

FICLONE = 0x40049409  # <linux/fs.h>: share every block of one file with another (XFS, btrfs)
BLOCK_BYTES = 4096
POOL_INITIAL_BYTES = 64 << 30  # logical: the file is sparse and grows as blocks are written
# The pool's logical size covers every image's full size plus this (XFS's log and metadata).
POOL_HEADROOM_BYTES = 2 << 30
COMMAND_TIMEOUT_S = 120.0
LIVE, LIVE_RO = "live", "live-ro"
# ext4 options: no reserved blocks (the quota is the user's); inode tables and journal not zeroed (the
# image is a fresh sparse file: it reads as zeros already), and never zeroed later (noinit_itable).
MKFS_EXT4 = ["mkfs.ext4", "-q", "-F", "-m", "0", "-E"]
MKFS_EXT4_EXTENDED = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
EXT4_MOUNT = "noinit_itable"
# A checkpoint's file system is clean (frozen while copied): noload never replays a journal into it.
EXT4_MOUNT_RO = "ro,noload"


def decode_mount_field(text: str) -> str:
    """/proc/self/mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit() and len(text[i + 1 : i + 4]) == 3:
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def mount_points(mountinfo: str) -> list[str]:
    """Every mount point in a mountinfo text, in mount order (a point mounted over twice: twice)."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            points.append(decode_mount_field(fields[4]))
    return points


def loop_devices(losetup_json: str) -> dict[str, str]:
    """``losetup -J -l`` -> device -> backing file (without a `` (deleted)`` suffix)."""
    if not losetup_json.strip():
        return {}
    found = {}
    for dev in json.loads(losetup_json).get("loopdevices", []):
        back = dev.get("back-file") or ""
        found[dev["name"]] = back.removesuffix(" (deleted)")
    return found


@dataclass
class VolumeState:
    """Who holds which view of a volume (``state/<volume>.json``)."""

    views: dict[str, list[str]] = field(default_factory=dict)

    def holders(self) -> set[str]:
        return {h for hs in self.views.values() for h in hs}

    def to_json(self) -> str:
        return json.dumps({"views": {k: sorted(v) for k, v in sorted(self.views.items()) if v}})

    @classmethod
    def from_json(cls, text: str) -> VolumeState:
        raw: dict[str, Any] = json.loads(text)
        return cls({str(k): [str(h) for h in v] for k, v in raw.get("views", {}).items() if v})


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, close_fds=True, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VolumeStoreFailed(f"{argv[0]}: {exc}") from exc
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise VolumeStoreFailed(f"{' '.join(argv[:2])} failed: {detail[-1] if detail else done.returncode}")
    return done


async def run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(_run, argv, check=check)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def reflink(src: Path, dst: Path) -> None:
    """``dst`` (new) sharing every block of ``src``; made under a temporary name, then renamed."""
    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, "rb") as s, open(tmp, "wb") as d:
        fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        os.fsync(d.fileno())
    os.replace(tmp, dst)


def sparse_copy(src: Path, dst: Path) -> None:
    """A full copy that skips holes (the fallback where the pool cannot reflink; also for the bench)."""
    tmp = dst.with_name(dst.name + ".tmp")
    _run(["cp", "--reflink=never", "--sparse=always", str(src), str(tmp)])
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


class LocalVolumeStore:
    """The ``VolumeStore`` on this host (root: loop devices and mounts). ``root_owner`` (uid, gid) owns a
    new volume's root directory: the user VMs write as, on the host's side of their id mapping."""

    def __init__(
        self,
        root: Path,
        *,
        root_owner: tuple[int, int] = (0, 0),
        pool_initial_bytes: int = POOL_INITIAL_BYTES,
        use_reflink: bool = True,
    ) -> None:
        self.root = root
        self.root_owner = root_owner
        self.pool_initial_bytes = pool_initial_bytes
        self.use_reflink = use_reflink
        self.pool_image = root / "pool.img"
        self.pool = root / "pool"
        self._locks: dict[str, asyncio.Lock] = {}
        self._pool_lock = asyncio.Lock()

    # paths ------------------------------------------------------------------------------------------

    def image(self, volume_id: str) -> Path:
        return self.pool / "images" / f"{volume_id}.img"

    def checkpoint_image(self, volume_id: str, checkpoint_id: str) -> Path:
        return self.pool / "checkpoints" / volume_id / f"{checkpoint_id}.img"

    def _clone_image(self, volume_id: str, view: str) -> Path:
        return self.pool / "clones" / volume_id / f"{view.removeprefix('clone-')}.img"

    def _state_file(self, volume_id: str) -> Path:
        return self.root / "state" / f"{volume_id}.json"

    def mount_dir(self, volume_id: str, view: str) -> Path:
        return self.root / "mnt" / volume_id / view

    def _view_image(self, volume_id: str, view: str) -> tuple[Path, bool]:
        """The image a view mounts and whether read-only (``live-ro`` is a bind of ``live``: its image)."""
        if view in (LIVE, LIVE_RO):
            return self.image(volume_id), False
        if view.startswith("ck-"):
            return self.checkpoint_image(volume_id, view.removeprefix("ck-")), True
        return self._clone_image(volume_id, view), False

    def _lock(self, volume_id: str) -> asyncio.Lock:
        return self._locks.setdefault(volume_id, asyncio.Lock())

    @staticmethod
    def _check_ids(*ids: str) -> None:
        for value in ids:
            if not is_safe_id(value):
                raise VolumeMissing()

    # the host: mounts and loop devices --------------------------------------------------------------

    @staticmethod
    def _mounted() -> list[str]:
        return mount_points(Path("/proc/self/mountinfo").read_text())

    async def is_mounted(self, path: Path) -> bool:
        return str(path) in await asyncio.to_thread(self._mounted)

    async def _loops(self) -> dict[str, str]:
        return loop_devices((await run(["losetup", "-J", "-l"])).stdout)

    async def _devices_of(self, image: Path) -> list[str]:
        return sorted(dev for dev, back in (await self._loops()).items() if back == str(image))

    async def _mount(self, image: Path, target: Path, *, fstype: str, options: str) -> None:
        """Mount ``image`` at ``target`` through its loop device (the one already bound to it, if any).

        A device found bound to the image may be in a deferred detach: ``losetup -d`` while another
        process had it open (tools that probe loop devices do), which the kernel completes once that
        process lets go. When the mount fails and that device no longer backs the image, a fresh device
        is attached and the mount tried again, once.
        """
        ro = "ro" in options.split(",")
        devices = await self._devices_of(image)
        device = devices[0] if devices else await self._attach(image, ro=ro)
        await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
        mount = ["mount", "-t", fstype, "-o", options]
        try:
            try:
                await run([*mount, device, str(target)])
            except VolumeStoreFailed:
                if not devices or device in await self._devices_of(image):
                    raise
                await run([*mount, await self._attach(image, ro=ro), str(target)])
        except BaseException:
            await self._release_device(image)
            raise

    async def _attach(self, image: Path, *, ro: bool) -> str:
        """A free loop device bound to ``image``."""
        argv = ["losetup", "--find", "--show", *(["--read-only"] if ro else []), str(image)]
        return (await run(argv)).stdout.strip()

    async def _release_device(self, image: Path) -> None:
        # A device still in use (a VM's namespace holds a mount of it) is detached when it is let go.
        for device in await self._devices_of(image):
            await run(["losetup", "-d", device], check=False)

    async def _unmount(self, target: Path, image: Path | None) -> None:
        while await self.is_mounted(target):
            await run(["umount", str(target)])
        if image is not None:
            await self._release_device(image)
        with contextlib.suppress(FileNotFoundError, OSError):
            await asyncio.to_thread(target.rmdir)

    # the pool ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._make_dirs)
        if not self.pool_image.exists():
            tmp = self.pool_image.with_name("pool.img.tmp")
            await asyncio.to_thread(self._sparse_file, tmp, self.pool_initial_bytes)
            await run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(tmp)])
            await asyncio.to_thread(os.replace, tmp, self.pool_image)
        if not await self.is_mounted(self.pool):
            await self._mount(self.pool_image, self.pool, fstype="xfs", options="defaults")
        for sub in ("images", "checkpoints", "clones"):
            await asyncio.to_thread((self.pool / sub).mkdir, exist_ok=True)
        await self._reconcile()

    def _make_dirs(self) -> None:
        for path in (self.root, self.pool, self.root / "state", self.root / "mnt"):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # volumes' files are their owners' business

    @staticmethod
    def _sparse_file(path: Path, size: int) -> None:
        with open(path, "wb") as f:
            f.truncate(size)

    async def close(self) -> None:
        """Nothing to do: mounts stay for the VMs that hold them (``start`` finds them again)."""

    async def release_all(self) -> None:
        """Detach every holder of every volume and unmount the pool: for tests and for taking a host out
        of service (VMs must be gone first)."""
        for state_file in sorted((self.root / "state").glob("*.json")):
            volume_id = state_file.stem
            for holder in await self.holders(volume_id):
                await self.detach(volume_id, holder)
        await self._unmount_strays(keep=set())
        if await self.is_mounted(self.pool):
            await self._unmount(self.pool, self.pool_image)
        else:
            await self._release_device(self.pool_image)

    async def _ensure_pool_room(self, extra_bytes: int) -> None:
        """Grow the pool (online) so its logical size covers every image's size plus ``extra_bytes``."""
        async with self._pool_lock:
            need = await asyncio.to_thread(self._images_bytes) + extra_bytes + POOL_HEADROOM_BYTES
            have = (await asyncio.to_thread(os.statvfs, self.pool)).f_blocks * BLOCK_BYTES
            if need <= have:
                return
            size = max(need * 2, self.pool_image.stat().st_size * 2)
            await asyncio.to_thread(os.truncate, self.pool_image, size)
            for device in await self._devices_of(self.pool_image):
                await run(["losetup", "-c", device])
            await run(["xfs_growfs", str(self.pool)])
            log.info("volumes: pool grown to %d GiB (logical)", size >> 30)

    def _images_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.pool.rglob("*.img") if p.is_file())

    # state ------------------------------------------------------------------------------------------

    def _load(self, volume_id: str) -> VolumeState:
        if not self.image(volume_id).exists():
            raise VolumeMissing()
        try:
            return VolumeState.from_json(self._state_file(volume_id).read_text())
        except FileNotFoundError:
            return VolumeState()

    async def _save(self, volume_id: str, state: VolumeState) -> None:
        await asyncio.to_thread(_write_atomic, self._state_file(volume_id), state.to_json())

    async def _reconcile(self) -> None:
        """After a restart (or a crash, or a reboot): held views mounted, everything else released."""
        keep: set[str] = set()
        for state_file in sorted((self.root / "state").glob("*.json")):
            volume_id = state_file.stem
            if not is_safe_id(volume_id) or not self.image(volume_id).exists():
                await asyncio.to_thread(state_file.unlink, True)
                continue
            async with self._lock(volume_id):
                state = await asyncio.to_thread(self._load, volume_id)
                for view in list(state.views):
                    image, _ = self._view_image(volume_id, view)
                    if not image.exists():
                        log.warning("volumes: %s view %s lost its image; dropped", volume_id, view)
                        del state.views[view]
                        continue
                    await self._ensure_view(volume_id, view)
                    keep.add(str(self.mount_dir(volume_id, view)))
                    if view == LIVE_RO:
                        keep.add(str(self.mount_dir(volume_id, LIVE)))
                await self._save(volume_id, state)
        await self._unmount_strays(keep)
        # A gateway that died during a checkpoint left its volume frozen: thaw (harmless if not frozen).
        for point in keep:
            if point.endswith("/" + LIVE):
                await run(["fsfreeze", "-u", point], check=False)
        for tmp in await asyncio.to_thread(lambda: list(self.pool.rglob("*.tmp"))):
            await asyncio.to_thread(tmp.unlink, True)  # half-made copies and images

    async def _unmount_strays(self, keep: set[str]) -> None:
        """Unmount mounts under ``mnt/`` nobody holds; detach loop devices of pool files not mounted."""
        mnt = str(self.root / "mnt") + "/"
        mounted = await asyncio.to_thread(self._mounted)
        # Deepest first, binds (live-ro) before what they bind.
        strays = sorted(
            {p for p in mounted if p.startswith(mnt) and p not in keep}, key=lambda p: (-len(p), p)
        )
        for point in strays:
            if point.endswith("/" + LIVE):
                await run(["fsfreeze", "-u", point], check=False)
            await self._unmount(Path(point), None)
        pool = str(self.pool) + "/"
        in_use = {self._image_of_mount(Path(p)) for p in keep}
        for device, back in (await self._loops()).items():
            if back.startswith(pool) and back not in in_use:
                await run(["losetup", "-d", device], check=False)
        with contextlib.suppress(OSError):
            for volume_dir in (self.root / "mnt").iterdir():
                for view_dir in volume_dir.iterdir():
                    if str(view_dir) not in keep:
                        with contextlib.suppress(OSError):
                            view_dir.rmdir()
                with contextlib.suppress(OSError):
                    volume_dir.rmdir()

    def _image_of_mount(self, point: Path) -> str:
        return str(self._view_image(point.parent.name, point.name)[0])

    # views ------------------------------------------------------------------------------------------

    async def _ensure_view(self, volume_id: str, view: str) -> Path:
        target = self.mount_dir(volume_id, view)
        if await self.is_mounted(target):
            return target
        image, ro = self._view_image(volume_id, view)
        if view == LIVE_RO:
            live = await self._ensure_view(volume_id, LIVE)
            await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
            await run(["mount", "--bind", str(live), str(target)])
            try:
                await run(["mount", "-o", "remount,bind,ro", str(target)])
            except BaseException:
                await self._unmount(target, None)
                raise
        else:
            await self._mount(image, target, fstype="ext4", options=EXT4_MOUNT_RO if ro else EXT4_MOUNT)
        return target

    async def _drop_view(self, volume_id: str, view: str, state: VolumeState) -> None:
        """Unmount a view nobody holds (``live`` only once ``live-ro`` is gone too)."""
        image, _ = self._view_image(volume_id, view)
        if view == LIVE_RO:
            await self._unmount(self.mount_dir(volume_id, LIVE_RO), None)
            if not state.views.get(LIVE):
                await self._unmount(self.mount_dir(volume_id, LIVE), image)
        elif view == LIVE:
            if not state.views.get(LIVE_RO):
                await self._unmount(self.mount_dir(volume_id, LIVE), image)
        else:
            await self._unmount(self.mount_dir(volume_id, view), image)
            if view.startswith("clone-"):
                await asyncio.to_thread(image.unlink, True)

    @contextlib.asynccontextmanager
    async def _live(self, volume_id: str, state: VolumeState) -> AsyncIterator[Path]:
        """The live file system mounted for the store's own use (under the volume's lock)."""
        held = bool(state.views.get(LIVE) or state.views.get(LIVE_RO))
        target = await self._ensure_view(volume_id, LIVE)
        try:
            yield target
        finally:
            if not held:
                await self._unmount(target, self.image(volume_id))

    # volumes ----------------------------------------------------------------------------------------

    async def create(self, volume_id: str, quota_bytes: int) -> None:
        self._check_ids(volume_id)
        size = _blocks(quota_bytes)
        async with self._lock(volume_id):
            image = self.image(volume_id)
            if image.exists():
                return
            await self._ensure_pool_room(size)
            tmp = image.with_name(image.name + ".tmp")
            await asyncio.to_thread(self._sparse_file, tmp, size)
            uid, gid = self.root_owner
            extended = f"{MKFS_EXT4_EXTENDED},root_owner={uid}:{gid}"
            try:
                await run([*MKFS_EXT4, extended, "-L", volume_id[:16], str(tmp)])
                await asyncio.to_thread(os.replace, tmp, image)
            finally:
                await asyncio.to_thread(tmp.unlink, True)
            await self._save(volume_id, VolumeState())

    async def delete(self, volume_id: str) -> None:
        self._check_ids(volume_id)
        async with self._lock(volume_id):
            try:
                state = await asyncio.to_thread(self._load, volume_id)
            except VolumeMissing:
                return
            if state.holders():
                raise VolumeBusy("the volume is attached: detach it first")
            for view in (LIVE_RO, LIVE):
                await self._unmount(self.mount_dir(volume_id, view), self.image(volume_id))
            await asyncio.to_thread(self._remove_files, volume_id)
        self._locks.pop(volume_id, None)

    def _remove_files(self, volume_id: str) -> None:
        self.image(volume_id).unlink(missing_ok=True)
        for sub in ("checkpoints", "clones"):
            shutil.rmtree(self.pool / sub / volume_id, ignore_errors=True)
        shutil.rmtree(self.root / "mnt" / volume_id, ignore_errors=True)
        self._state_file(volume_id).unlink(missing_ok=True)

    async def exists(self, volume_id: str) -> bool:
        return is_safe_id(volume_id) and await asyncio.to_thread(self.image(volume_id).exists)

    async def _statvfs(self, volume_id: str) -> os.statvfs_result:
        self._check_ids(volume_id)
        async with self._lock(volume_id):
            state = await asyncio.to_thread(self._load, volume_id)
            async with self._live(volume_id, state) as target:
                return await asyncio.to_thread(os.statvfs, target)

    async def usage_bytes(self, volume_id: str) -> int:
        st = await self._statvfs(volume_id)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    async def capacity_bytes(self, volume_id: str) -> int:
        st = await self._statvfs(volume_id)
        return st.f_blocks * st.f_frsize

    async def set_quota(self, volume_id: str, quota_bytes: int) -> None:
        self._check_ids(volume_id)
        size = _blocks(quota_bytes)
        async with self._lock(volume_id):
            state = await asyncio.to_thread(self._load, volume_id)
            image = self.image(volume_id)
            current = image.stat().st_size
            if size == current:
                return
            if size > current:
                await self._ensure_pool_room(size - current)
            if state.holders():
                if size < current:
                    raise VolumeBusy("a volume shrinks only while nobody has it attached")
                await self._grow_online(volume_id, size, current)
                return
            async with self._live(volume_id, state) as target:
                st = await asyncio.to_thread(os.statvfs, target)
            if (st.f_blocks - st.f_bfree) * st.f_frsize >= size:
                raise QuotaTooSmall()
            await self._resize_offline(image, size, current)

    async def _grow_online(self, volume_id: str, size: int, current: int) -> None:
        """Grow the mounted file system (ext4 online resize: needs CAP_SYS_RESOURCE)."""
        image = self.image(volume_id)
        await asyncio.to_thread(os.truncate, image, size)
        (device,) = (await self._devices_of(image))[:1]
        await run(["losetup", "-c", device])
        done = await run(["resize2fs", device], check=False)
        if done.returncode != 0:
            # The file system did not grow: the image goes back to its size (nothing was written there).
            await asyncio.to_thread(os.truncate, image, current)
            await run(["losetup", "-c", device], check=False)
            if "Permission denied" in done.stderr:
                raise VolumeBusy(
                    "this host cannot grow a volume while it is attached (online resize needs "
                    "CAP_SYS_RESOURCE): detach it first"
                )
            raise VolumeStoreFailed(f"resize2fs failed: {done.stderr.strip()[-200:]}")

    async def _resize_offline(self, image: Path, size: int, current: int) -> None:
        """Grow or shrink an unmounted file system (resize2fs wants a checked one)."""
        if size > current:
            await asyncio.to_thread(os.truncate, image, size)
        await run(["e2fsck", "-f", "-p", str(image)], check=False)
        done = await run(["resize2fs", str(image), f"{size // 1024}K"], check=False)
        if done.returncode != 0:
            if size > current:
                await asyncio.to_thread(os.truncate, image, current)
            if "No space left" in done.stderr or "too small" in done.stderr.lower():
                raise QuotaTooSmall()
            raise VolumeStoreFailed(f"resize2fs failed: {done.stderr.strip()[-200:]}")
        if size < current:
            await asyncio.to_thread(os.truncate, image, size)

    # checkpoints ------------------------------------------------------------------------------------

    async def checkpoint(self, volume_id: str, checkpoint_id: str) -> None:
        self._check_ids(volume_id, checkpoint_id)
        async with self._lock(volume_id):
            state = await asyncio.to_thread(self._load, volume_id)
            target = self.checkpoint_image(volume_id, checkpoint_id)
            if target.exists():
                return
            image = self.image(volume_id)
            await self._ensure_pool_room(image.stat().st_size)
            await asyncio.to_thread(target.parent.mkdir, exist_ok=True)
            async with self._live(volume_id, state) as live:
                # Frozen: every write so far is on the image and the journal is empty, so the copy is a
                # clean file system; writers wait (for as long as a reflink takes) rather than fail.
                await run(["fsfreeze", "-f", str(live)])
                try:
                    await asyncio.to_thread(self._copy, image, target)
                finally:
                    await run(["fsfreeze", "-u", str(live)])

    def _copy(self, src: Path, dst: Path) -> None:
        if self.use_reflink:
            try:
                reflink(src, dst)
                return
            except OSError as exc:
                dst.with_name(dst.name + ".tmp").unlink(missing_ok=True)
                if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL):
                    raise
                log.warning("volumes: the pool cannot reflink (%s): copying", exc)
        sparse_copy(src, dst)

    async def checkpoints(self, volume_id: str) -> list[str]:
        self._check_ids(volume_id)
        folder = self.pool / "checkpoints" / volume_id
        return sorted(p.stem for p in await asyncio.to_thread(lambda: list(folder.glob("*.img"))))

    async def delete_checkpoint(self, volume_id: str, checkpoint_id: str) -> None:
        self._check_ids(volume_id, checkpoint_id)
        async with self._lock(volume_id):
            state = await asyncio.to_thread(self._load, volume_id)
            if state.views.get(f"ck-{checkpoint_id}"):
                raise VolumeBusy("the checkpoint is attached: detach it first", code="checkpoint_attached")
            await self._unmount(
                self.mount_dir(volume_id, f"ck-{checkpoint_id}"),
                self.checkpoint_image(volume_id, checkpoint_id),
            )
            await asyncio.to_thread(self.checkpoint_image(volume_id, checkpoint_id).unlink, True)

    # attachments ------------------------------------------------------------------------------------

    async def attach(
        self, volume_id: str, checkpoint_id: str | None, *, read_only: bool, holder: str
    ) -> Path:
        self._check_ids(volume_id, *([checkpoint_id] if checkpoint_id is not None else []))
        async with self._lock(volume_id):
            state = await asyncio.to_thread(self._load, volume_id)
            if checkpoint_id is None:
                view = LIVE_RO if read_only else LIVE
            else:
                source = self.checkpoint_image(volume_id, checkpoint_id)
                if not await asyncio.to_thread(source.exists):
                    raise CheckpointMissing()
                if read_only:
                    view = f"ck-{checkpoint_id}"
                else:
                    view = f"clone-{holder_slug(holder)}-{checkpoint_id}"
                    clone = self._clone_image(volume_id, view)
                    if not await asyncio.to_thread(clone.exists):
                        await self._ensure_pool_room(source.stat().st_size)
                        await asyncio.to_thread(clone.parent.mkdir, exist_ok=True)
                        await asyncio.to_thread(self._copy, source, clone)
            try:
                path = await self._ensure_view(volume_id, view)
            except BaseException:
                if not state.views.get(view):
                    await self._drop_view(volume_id, view, state)
                raise
            holders = state.views.setdefault(view, [])
            if holder not in holders:
                holders.append(holder)
            await self._save(volume_id, state)
            return path

    async def detach(self, volume_id: str, holder: str) -> None:
        self._check_ids(volume_id)
        async with self._lock(volume_id):
            try:
                state = await asyncio.to_thread(self._load, volume_id)
            except VolumeMissing:
                return
            dropped, changed = [], False
            for view, holders in list(state.views.items()):
                if holder in holders:
                    holders.remove(holder)
                    changed = True
                    if not holders:
                        del state.views[view]
                        dropped.append(view)
            if not changed:
                return
            # Saved first: a crash mid-way leaves strays that ``start`` removes. Binds before what they bind.
            await self._save(volume_id, state)
            for view in sorted(dropped, key=lambda v: v != LIVE_RO):
                await self._drop_view(volume_id, view, state)

    async def holders(self, volume_id: str) -> set[str]:
        self._check_ids(volume_id)
        try:
            return (await asyncio.to_thread(self._load, volume_id)).holders()
        except VolumeMissing:
            return set()

    async def held(self) -> dict[str, set[str]]:
        """Every volume someone holds, with its holders."""
        found: dict[str, set[str]] = {}
        for state_file in sorted((self.root / "state").glob("*.json")):
            if is_safe_id(state_file.stem):
                holders = await self.holders(state_file.stem)
                if holders:
                    found[state_file.stem] = holders
        return found

    async def attachments(self, volume_id: str) -> dict[str, list[str]]:
        """View -> holders (for operators and tests)."""
        self._check_ids(volume_id)
        return dict((await asyncio.to_thread(self._load, volume_id)).views)


def _blocks(quota_bytes: int) -> int:
    """The image's size: the quota rounded down to whole blocks."""
    return quota_bytes - quota_bytes % BLOCK_BYTES
