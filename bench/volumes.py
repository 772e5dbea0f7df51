"""Volumes bench (the store's half of issue 21): checkpoint and mount times for a volume full of data.

Makes a ``LocalVolumeStore`` in a temporary data folder, a volume of ``--mib`` MiB plus room for the
file system, fills it with ``--mib`` MiB of random bytes (written and fsynced as a VM would), then times:
create, attach (mount) and detach (flush and unmount) of the volume, a checkpoint (fsfreeze + reflink on
the XFS pool) while the volume is attached, attaching that checkpoint read-only and as a private
read-write clone, and, for comparison, the same checkpoint as a full sparse copy (what a pool without
reflinks would do). It prints how much the pool's file holds on the host disk before and after the
checkpoints (shared blocks are counted once). Everything it mounts is released, and the folder removed,
on the way out (also on failure or Ctrl-C). Needs root (loop devices).

    .venv/bin/python bench/volumes.py [--mib 1024] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
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


async def bench(mib: int, rounds: int) -> None:
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
    finally:
        await store.release_all()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=1024, help="data in the volume (MiB, a multiple of 4)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/volumes.py needs root (loop devices and mounts)")
    asyncio.run(asyncio.wait_for(bench(args.mib, args.rounds), TIME_LIMIT_S))


if __name__ == "__main__":
    main()
