"""qemu driver bench: boot-to-ready, snapshot and restore-to-ready times of real microVMs, via the API.

Runs ``gateway serve`` with ``vms.driver = "qemu"`` as a user would (its own process, embedded Redis,
loopback only; control_plane.py's ``served_gateway``), then for each of N rounds, one after another:

- boot (boot templates off): ``POST /v1/vms`` with ``snapshot_on_terminate`` until its answer
  (``active``: the guest's kernel booted and its agent answers), then a first ``POST /execute``
  (``true``) round trip;
- snapshot: ``DELETE /v1/vms/<id>`` until its answer (the migration stream written, the VM destroyed);
- restore: ``POST /v1/vms`` with that ``snapshot_id`` until ``active``, and a first execute;
- template (a second gateway, boot templates on, after one create that saves the template): ``POST
  /v1/vms`` of the same shape until ``active``, and a first execute;

and prints the median and p90 of each, the snapshot size, and the accelerator (KVM or TCG).

    .venv/bin/python bench/qemu_vms.py [--rounds 5] [--memory-mb 512] [--vcpus 1] [--image NAME]
        [--images-dir DIR] [--boot-image-dir DIR]

VMs run on image ``--image`` (image_variant; default: the default image). Each gateway builds what it
lacks in its own data folder (the image about a minute, its disk and the boot image seconds) unless
``--images-dir`` and ``--boot-image-dir`` name built ones (e.g. the test caches).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import aiohttp
from control_plane import percentile, remove_bench_host_state, served_gateway


async def timed(client: aiohttp.ClientSession, method: str, url: str, **kwargs: object) -> tuple[float, dict]:
    started = time.perf_counter()
    async with client.request(method, url, **kwargs) as resp:  # type: ignore[arg-type]
        body = await resp.json(content_type=None) if resp.status != 204 else {}
        if resp.status >= 300:
            raise RuntimeError(f"{method} {url} -> {resp.status}: {body}")
    return time.perf_counter() - started, body


ROWS = {
    "boot": "boot to ready (kernel boot, create answered)",
    "boot_exec": "then first execute",
    "template": "create from the shape's boot template",
    "template_exec": "then first execute",
    "snapshot": "kill with snapshot",
    "restore": "restore to ready (create answered)",
    "restore_exec": "then first execute",
}


async def create_and_run(
    client: aiohttp.ClientSession, url: str, body: dict, rows: dict[str, list[float]], row: str
) -> dict:
    took, vm = await timed(client, "POST", f"{url}/v1/vms", json=body)
    rows[row].append(took)
    run = {"session_id": vm["session_id"], "language": "bash", "command": "true"}
    rows[f"{row}_exec"].append((await timed(client, "POST", f"{url}/execute", json=run))[0])
    return vm


async def bench(args: argparse.Namespace) -> tuple[dict[str, list[float]], list[int], str]:
    rows: dict[str, list[float]] = {k: [] for k in ROWS}
    sizes: list[int] = []
    accel = "?"
    shape = {"memory_mb": args.memory_mb, "vcpu_count": args.vcpus, "image_variant": args.image}
    timeout = aiohttp.ClientTimeout(total=300)
    settings: dict[str, str] = {}
    if args.images_dir:
        settings["GATEWAY_IMAGES_DIR"] = args.images_dir
    if args.boot_image_dir:
        settings["GATEWAY_QEMU_IMAGE_DIR"] = args.boot_image_dir
    # Cold boots: templates off, so every create boots the kernel.
    cold = {**settings, "GATEWAY_QEMU_BOOT_TEMPLATES": "false"}
    async with served_gateway("qemu", settings=cold) as (url, key):
        async with aiohttp.ClientSession(headers={"X-API-Key": key}, timeout=timeout) as client:
            for _ in range(args.rounds):
                vm = await create_and_run(client, url, {**shape, "snapshot_on_terminate": True}, rows, "boot")
                _, view = await timed(client, "GET", f"{url}/v1/vms/{vm['vm_id']}")
                accel = view["accel"]
                rows["snapshot"].append((await timed(client, "DELETE", f"{url}/v1/vms/{vm['vm_id']}"))[0])
                _, ended = await timed(client, "GET", f"{url}/v1/vms/{vm['vm_id']}")
                snapshot_id = ended["snapshot_id"]
                _, snap = await timed(client, "GET", f"{url}/v1/snapshots/{snapshot_id}")
                sizes.append(snap["size_bytes"])
                restored = await create_and_run(client, url, {"snapshot_id": snapshot_id}, rows, "restore")
                await timed(client, "DELETE", f"{url}/v1/vms/{restored['vm_id']}")
                await timed(client, "DELETE", f"{url}/v1/snapshots/{snapshot_id}")
    # Templates on (the default): the first create of the shape boots and saves it; the rest resume it.
    async with served_gateway("qemu", settings=settings) as (url, key):
        async with aiohttp.ClientSession(headers={"X-API-Key": key}, timeout=timeout) as client:
            warm_up = await create_and_run(client, url, shape, {"warm": [], "warm_exec": []}, "warm")
            await timed(client, "DELETE", f"{url}/v1/vms/{warm_up['vm_id']}")
            for _ in range(args.rounds):
                vm = await create_and_run(client, url, shape, rows, "template")
                await timed(client, "DELETE", f"{url}/v1/vms/{vm['vm_id']}")
    return rows, sizes, accel


def report(args: argparse.Namespace, rows: dict[str, list[float]], sizes: list[int], accel: str) -> None:
    print(
        f"qemu microVMs on image {args.image}, accelerator {accel}, {args.vcpus} vCPU, {args.memory_mb} MiB, "
        f"{args.rounds} rounds"
    )
    print(f"{'':44} {'median':>10} {'p90':>10}")
    for key, label in ROWS.items():
        values = rows[key]
        print(
            f"{label:44} {statistics.median(values) * 1000:>8.0f}ms {percentile(values, 0.9) * 1000:>8.0f}ms"
        )
    print(f"{'snapshot size':44} {statistics.median(sizes) / 2**20:>8.0f}MiB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="boots and restores (default: %(default)s)")
    parser.add_argument("--memory-mb", type=int, default=512, help="guest memory (default: %(default)s)")
    parser.add_argument("--vcpus", type=int, default=1, help="guest vCPUs (default: %(default)s)")
    parser.add_argument("--image", default="default", help="image_variant (default: %(default)s)")
    parser.add_argument("--images-dir", help="built root file system images (images.dir)")
    parser.add_argument("--boot-image-dir", help="a built qemu boot image (qemu.image_dir)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the qemu driver needs root")
    os.chdir(Path(__file__).resolve().parent.parent)
    try:
        report(args, *asyncio.run(bench(args)))
    finally:
        remove_bench_host_state()


if __name__ == "__main__":
    main()
