"""Volumes bench (the store's half of issue 21): checkpoint and mount times for a volume full of data.

Makes a ``LocalVolumeStore`` in a temporary data folder, a volume of ``--mib`` MiB plus room for the
file system, fills it with ``--mib`` MiB of random bytes (written and fsynced as a VM would), then times:
create, attach (mount) and detach (flush and unmount) of the volume, a checkpoint (fsfreeze + reflink on
the XFS pool) while the volume is attached, attaching that checkpoint read-only and as a private
read-write clone, and, for comparison, the same checkpoint as a full sparse copy (what a pool without
reflinks would do). It prints how much the pool's file holds on the host disk before and after the
checkpoints (shared blocks are counted once). Everything it mounts is released, and the folder removed,
on the way out (also on failure or Ctrl-C). Needs root (loop devices).

Then, in a VM of each of ``--drivers`` (netns, qemu), sequential write and read MiB/s of ``--io-mib`` MiB
through a volume against the VM's own root file system.

    .venv/bin/python bench/volumes.py [--mib 1024] [--rounds 5] [--drivers netns,qemu] [--io-mib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.volumes.local import LocalVolumeStore, sparse_copy

MiB = 1 << 20
# The quota over the data: ext4's own journal and tables come out of the quota.
FS_ROOM, FS_ROOM_BYTES = 1.1, 16 * MiB
TIME_LIMIT_S = 600.0


def on_disk_mib(path: Path) -> float:
    return os.stat(path).st_blocks * 512 / MiB


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await fn()
    return (time.perf_counter() - started) * 1000


def fill(directory: Path, mib: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/urandom", f"of={directory / 'data.bin'}", "bs=4M", f"count={mib // 4}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    return mib / (time.perf_counter() - started)


def line(name: str, samples: list[float]) -> str:
    best, median = min(samples), statistics.median(samples)
    return f"  {name:<48} median {median:9.1f} ms   best {best:9.1f} ms   ({len(samples)} runs)"


async def bench(mib: int, rounds: int, drivers: list[str], io_mib: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="volbench-"))
    store = LocalVolumeStore(folder / "volumes")
    try:
        t_start = await timed(store.start)
        quota = int(mib * MiB * FS_ROOM) + FS_ROOM_BYTES
        t_create = await timed(lambda: store.create("bench", quota))
        root = await store.attach("bench", None, read_only=False, holder="bench-vm")
        rate = await asyncio.to_thread(fill, root, mib)
        pool_before = on_disk_mib(store.pool_image)
        print(f"volume: {quota / MiB:.0f} MiB quota, {mib} MiB of random data written at {rate:.0f} MiB/s")
        print(f"  store start (pool made and mounted)           {t_start:9.1f} ms")
        print(f"  create (sparse image + mkfs.ext4)             {t_create:9.1f} ms")

        checkpoints: list[float] = []
        for i in range(rounds):
            checkpoints.append(await timed(lambda i=i: store.checkpoint("bench", f"c{i}")))
        pool_after = on_disk_mib(store.pool_image)
        await store.detach("bench", "bench-vm")

        attach, detach = [], []
        for _ in range(rounds):
            attach.append(
                await timed(lambda: store.attach("bench", None, read_only=False, holder="bench-vm"))
            )
            detach.append(await timed(lambda: store.detach("bench", "bench-vm")))
        ro, clone, clone_drop = [], [], []
        for i in range(rounds):
            ro.append(await timed(lambda i=i: store.attach("bench", f"c{i}", read_only=True, holder="ro")))
            await store.detach("bench", "ro")
            clone.append(
                await timed(lambda i=i: store.attach("bench", f"c{i}", read_only=False, holder="rw"))
            )
            clone_drop.append(await timed(lambda: store.detach("bench", "rw")))
        copies = []
        image = store.image("bench")
        for i in range(min(rounds, 3)):
            target = store.pool / "checkpoints" / "bench" / f"copy{i}.img"
            started = time.perf_counter()
            await asyncio.to_thread(sparse_copy, image, target)
            copies.append((time.perf_counter() - started) * 1000)
            await asyncio.to_thread(target.unlink)

        print(line("checkpoint, attached (fsfreeze + reflink)", checkpoints))
        print(line("checkpoint as a full sparse copy (no reflink)", copies))
        print(line("attach the volume (loop device + mount)", attach))
        print(line("detach the volume (flush + unmount)", detach))
        print(line("attach a checkpoint read-only", ro))
        print(line("attach a checkpoint read-write (reflink clone)", clone))
        print(line("detach that clone (unmount + delete)", clone_drop))
        print(
            f"  pool on the host disk: {pool_before:.0f} MiB with the volume, {pool_after:.0f} MiB after "
            f"{rounds} checkpoints (blocks shared, not copied)"
        )
        for kind in drivers:
            await in_vm(store, folder, kind, io_mib)
    finally:
        await store.release_all()
        shutil.rmtree(folder, ignore_errors=True)


DD = re.compile(r"(\d+) bytes .* copied, ([0-9.]+) s")


def dd_mib_s(output: str) -> float:
    """MiB/s from dd's last line (bytes copied, seconds)."""
    found = DD.search(output)
    if found is None:
        raise RuntimeError(f"no figures in dd's output: {output!r}")
    return int(found.group(1)) / MiB / float(found.group(2))


async def in_vm(store: LocalVolumeStore, folder: Path, kind: str, mib: int) -> None:
    """Sequential write (fdatasync at the end) and read (caches dropped, host and VM) of ``mib`` MiB in a
    VM of ``kind``: through a volume, then on the VM's own root file system."""
    from gateway.orchestrator.drivers.base import Mount
    from tests.integration.test_volume_mounts import started, vm

    await store.create("io", int(mib * MiB * FS_ROOM) + FS_ROOM_BYTES)
    root = await store.attach("io", None, read_only=False, holder="io-vm")
    try:
        async with started(folder / kind, kind) as driver, vm(driver, 3, Mount(root, "/vol")) as guest:

            async def run(command: str) -> str:
                result = await driver.execute(
                    guest.info.vm_id, guest.info.handle, ["sh", "-c", command],
                    env={}, timeout_s=600, max_output_bytes=65536,
                )  # fmt: skip
                return result.stdout.decode() + result.stderr.decode()

            figures = {}
            for where, path in (("volume", "/vol/io"), ("VM's root", "/root/io")):
                write = await run(f"dd if=/dev/zero of={path} bs=1M count={mib} conv=fdatasync 2>&1")
                await asyncio.to_thread(drop_host_caches)
                await run("echo 3 > /proc/sys/vm/drop_caches 2>/dev/null")  # (a qemu guest's own cache)
                read = await run(f"dd if={path} of=/dev/null bs=1M 2>&1; rm -f {path}")
                figures[where] = (dd_mib_s(write), dd_mib_s(read))
        print(f"in a {kind} VM, {mib} MiB sequential (MiB/s):  write    read")
        for where, (w, r) in figures.items():
            print(f"  {where:<40} {w:8.0f} {r:8.0f}")
    finally:
        await store.detach("io", "io-vm")
        await store.delete("io")


def drop_host_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=1024, help="data in the volume (MiB, a multiple of 4)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--drivers", default="netns,qemu", help="VMs to measure I/O in (default netns,qemu; '' for none)"
    )
    parser.add_argument("--io-mib", type=int, default=1024, help="sequential I/O size in a VM (MiB)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/volumes.py needs root (loop devices and mounts)")
    drivers = [d for d in args.drivers.split(",") if d]
    asyncio.run(asyncio.wait_for(bench(args.mib, args.rounds, drivers, args.io_mib), TIME_LIMIT_S))


if __name__ == "__main__":
    main()
