"""Volumes through the official SDK (issue 21, the store's half): every ``VolumesManager`` call, files
streamed both ways, quotas the kernel enforces, checkpoints, tenancy, and paths that try to get out.

Writes "from a VM" are made the way a VM's are: by another process writing into the directory
``attach`` hands out (what a driver mounts into the VM).
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from instavm import InstaVM

from gateway.volumes import local
from gateway.volumes.local import LocalVolumeStore
from tests.conftest import GatewayUnderTest
from tests.integration.test_sdk import http_error

IS_ROOT = os.geteuid() == 0
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not IS_ROOT, reason="volumes need root (loop devices, mounts)"),
]
MiB = 1 << 20


def client_for(gw: GatewayUnderTest, key: str | None = None) -> InstaVM:
    base_url = f"http://{gw.config.server.host}:{gw.config.server.port}"
    return InstaVM(key or gw.api_key, base_url=base_url, auto_start_session=False, timeout=120)


def status_of(exc: BaseException) -> int:
    return http_error(exc).response.status_code


def store_of(gw: GatewayUnderTest) -> LocalVolumeStore:
    volumes = gw.services.orchestrator.volumes
    assert volumes is not None
    assert isinstance(volumes.store, LocalVolumeStore)
    return volumes.store


def ours(data_dir: Path) -> tuple[list[str], list[str]]:
    """Mounts and loop devices under a test's data folder."""
    mounts = [
        line.split(" ")[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split(" ")[4].startswith(str(data_dir))
    ]
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "BACK-FILE"], capture_output=True, text=True).stdout
    return mounts, [line for line in loops.splitlines() if str(data_dir) in line]


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


def write_as_vm(directory: Path, name: str, size: int) -> subprocess.CompletedProcess[str]:
    """What a program in a VM does: write ``size`` bytes and sync them."""
    return subprocess.run(
        ["dd", "if=/dev/urandom", f"of={directory / name}", "bs=1M", f"count={size // MiB}", "conv=fsync"],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_every_volume_method_of_the_sdk(gw: GatewayUnderTest, tmp_path: Path) -> None:
    client = await call(client_for, gw)
    assert await call(client.volumes.list) == []
    vol = await call(client.volumes.create, "project", 64 * MiB)
    volume_id = vol["id"]
    assert vol["volume_id"] == volume_id and vol["name"] == "project" and vol["quota_bytes"] == 64 * MiB
    assert vol["used_bytes"] is not None and vol["used_bytes"] < MiB
    assert 48 * MiB < vol["capacity_bytes"] <= 64 * MiB  # the file system's overhead comes out of it
    assert vol["attached"] is False and vol["holders"] == [] and vol["created_at"]
    listed = await call(client.volumes.list, refresh_usage=True)
    assert [v["id"] for v in listed] == [volume_id] and listed[0]["usage_updated_at"]
    assert (await call(client.volumes.get, volume_id))["name"] == "project"
    renamed = await call(client.volumes.update, volume_id, name="work")
    assert renamed["name"] == "work" and renamed["quota_bytes"] == 64 * MiB
    grown = await call(client.volumes.update, volume_id, quota_bytes=128 * MiB)
    assert grown["quota_bytes"] == 128 * MiB and grown["capacity_bytes"] > 100 * MiB
    shrunk = await call(client.volumes.update, volume_id, quota_bytes=32 * MiB)
    assert shrunk["capacity_bytes"] < 32 * MiB

    for bad in (0, 1024, 2 << 40):
        status, body = await gw.request("POST", "/v1/volumes", json={"name": "x", "quota_bytes": bad})
        assert status == 422 and body["detail"][0]["loc"] == ["body", "quota_bytes"], bad
    status, body = await gw.request("POST", "/v1/volumes", json={"quota_bytes": 64 * MiB})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "name"]

    assert await call(client.volumes.delete, volume_id) == {"success": True}
    assert await call(client.volumes.list) == []
    with pytest.raises(Exception) as gone:
        await call(client.volumes.get, volume_id)
    assert status_of(gone.value) == 404


async def test_files_round_trip_streamed_both_ways(gw: GatewayUnderTest, tmp_path: Path) -> None:
    client = await call(client_for, gw)
    volume_id = (await call(client.volumes.create, "files", 64 * MiB))["id"]
    data = os.urandom(5 * MiB + 123)
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    up = await call(client.volumes.upload_file, volume_id, str(local), "/models/v1/blob.bin")
    assert up["success"] and up["path"] == "models/v1/blob.bin" and up["size"] == len(data)
    await call(client.volumes.upload_file, volume_id, str(local), "notes/a.txt")

    listed = await call(client.volumes.list_files, volume_id)
    assert [(e["path"], e["type"]) for e in listed] == [
        ("models", "directory"),
        ("models/v1", "directory"),
        ("models/v1/blob.bin", "file"),
        ("notes", "directory"),
        ("notes/a.txt", "file"),
    ]
    assert listed[2]["size"] == len(data)
    assert [e["path"] for e in await call(client.volumes.list_files, volume_id, prefix="models/v1/b")] == [
        "models/v1/blob.bin"
    ]
    assert [e["path"] for e in await call(client.volumes.list_files, volume_id, recursive=False)] == [
        "models",
        "notes",
    ]
    assert len(await call(client.volumes.list_files, volume_id, limit=2)) == 2

    got = await call(client.volumes.download_file, volume_id, "models/v1/blob.bin")
    assert got["size"] == len(data) and base64.b64decode(got["content"]) == data
    saved = tmp_path / "back.bin"
    await call(client.volumes.download_file, volume_id, "models/v1/blob.bin", local_path=str(saved))
    assert saved.read_bytes() == data
    async with gw.http.get(
        f"{gw.url}/v1/volumes/{volume_id}/files/download",
        params={"path": "models/v1/blob.bin"},
        headers=gw.auth,
    ) as resp:
        assert resp.status == 200 and resp.content_length == len(data)
        assert await resp.read() == data

    with pytest.raises(Exception) as exists:
        await call(client.volumes.upload_file, volume_id, str(local), "notes/a.txt")
    assert status_of(exists.value) == 409
    local.write_bytes(b"second")
    await call(client.volumes.upload_file, volume_id, str(local), "notes/a.txt", overwrite=True)
    assert base64.b64decode(
        (await call(client.volumes.download_file, volume_id, "notes/a.txt"))["content"]
    ) == (b"second")

    with pytest.raises(Exception) as not_empty:
        await call(client.volumes.delete_file, volume_id, "notes")
    assert status_of(not_empty.value) == 409
    await call(client.volumes.delete_file, volume_id, "notes/a.txt")
    await call(client.volumes.delete_file, volume_id, "notes")
    with pytest.raises(Exception) as missing:
        await call(client.volumes.download_file, volume_id, "notes/a.txt")
    assert status_of(missing.value) == 404
    with pytest.raises(Exception) as directory:
        await call(client.volumes.download_file, volume_id, "models")
    assert status_of(directory.value) == 409
    assert [e["path"] for e in await call(client.volumes.list_files, volume_id)] == [
        "models",
        "models/v1",
        "models/v1/blob.bin",
    ]
    usage = (await call(client.volumes.get, volume_id))["used_bytes"]
    assert usage >= len(data)  # measured after each write through the API
    # The API's own attachments are gone with their requests: nothing holds the volume.
    assert await store_of(gw).holders(volume_id) == set()


async def test_the_quota_stops_a_writer_with_enospc_and_nothing_else(
    gw: GatewayUnderTest, tmp_path: Path
) -> None:
    client = await call(client_for, gw)
    volume_id = (await call(client.volumes.create, "small", 16 * MiB))["id"]
    other_id = (await call(client.volumes.create, "neighbour", 16 * MiB))["id"]
    keep = tmp_path / "keep.txt"
    keep.write_bytes(b"precious")
    await call(client.volumes.upload_file, volume_id, str(keep), "keep.txt")
    await call(client.volumes.upload_file, other_id, str(keep), "keep.txt")

    store = store_of(gw)
    root = await store.attach(volume_id, None, read_only=False, holder="vm-test")
    try:
        full = await asyncio.to_thread(write_as_vm, root, "big.bin", 64 * MiB)
        assert full.returncode != 0 and "No space left on device" in full.stderr
        assert (root / "keep.txt").read_bytes() == b"precious"
        # The API's view: the volume is attached (409 on delete), its holder named.
        vol = await call(client.volumes.get, volume_id, refresh_usage=True)
        assert vol["attached"] is True and vol["holders"] == ["vm-test"]
        assert vol["used_bytes"] > vol["capacity_bytes"] - MiB
        with pytest.raises(Exception) as busy:
            await call(client.volumes.delete, volume_id)
        assert status_of(busy.value) == 409
        # An upload past the quota through the API: 413 (quota_exceeded), and nothing half-written is left.
        big = tmp_path / "big2.bin"
        big.write_bytes(os.urandom(4 * MiB))
        with pytest.raises(Exception) as full_api:
            await call(client.volumes.upload_file, volume_id, str(big), "big2.bin")
        assert status_of(full_api.value) == 413
        assert not any(p.name.startswith(".upload-") for p in root.iterdir())
        assert not (root / "big2.bin").exists()
        os.unlink(root / "big.bin")
    finally:
        await store.detach(volume_id, "vm-test")
    # Neighbours are untouched; the volume works again once space is freed.
    got = await call(client.volumes.download_file, other_id, "keep.txt")
    assert base64.b64decode(got["content"]) == b"precious"
    await call(client.volumes.upload_file, volume_id, str(big), "big2.bin")
    await call(client.volumes.delete, volume_id)
    await call(client.volumes.delete, other_id)


async def test_checkpoints_keep_old_content_read_only_and_as_private_clones(
    gw: GatewayUnderTest, tmp_path: Path
) -> None:
    client = await call(client_for, gw)
    volume_id = (await call(client.volumes.create, "db", 32 * MiB))["id"]
    src = tmp_path / "state.txt"
    src.write_bytes(b"version 1")
    await call(client.volumes.upload_file, volume_id, str(src), "state.txt")
    ck = await call(client.volumes.create_checkpoint, volume_id, name="before migration")
    assert ck["volume_id"] == volume_id and ck["name"] == "before migration" and ck["created_at"]
    unnamed = await call(client.volumes.create_checkpoint, volume_id)
    assert unnamed["name"] is None
    listed = await call(client.volumes.list_checkpoints, volume_id)
    assert [c["id"] for c in listed] == [ck["id"], unnamed["id"]]
    src.write_bytes(b"version 2")
    await call(client.volumes.upload_file, volume_id, str(src), "state.txt", overwrite=True)

    store = store_of(gw)
    live = await store.attach(volume_id, None, read_only=False, holder="vm-live")
    old_ro = await store.attach(volume_id, ck["id"], read_only=True, holder="vm-ro")
    clone = await store.attach(volume_id, ck["id"], read_only=False, holder="vm-clone")
    live_ro = await store.attach(volume_id, None, read_only=True, holder="vm-reader")
    try:
        assert (live / "state.txt").read_bytes() == b"version 2"
        assert (old_ro / "state.txt").read_bytes() == b"version 1"
        assert (clone / "state.txt").read_bytes() == b"version 1"
        assert (live_ro / "state.txt").read_bytes() == b"version 2"
        for read_only in (old_ro, live_ro):
            with pytest.raises(OSError) as refused:
                (read_only / "new.txt").write_bytes(b"x")
            assert refused.value.errno == 30  # EROFS: the kernel says no
        (clone / "state.txt").write_bytes(b"clone's own")
        assert (live / "state.txt").read_bytes() == b"version 2"
        assert (old_ro / "state.txt").read_bytes() == b"version 1"
        with pytest.raises(Exception) as busy:
            await call(client.volumes.delete_checkpoint, volume_id, ck["id"])
        assert status_of(busy.value) == 409
        assert await store.holders(volume_id) == {"vm-live", "vm-ro", "vm-clone", "vm-reader"}
    finally:
        for holder in ("vm-live", "vm-ro", "vm-clone", "vm-reader"):
            await store.detach(volume_id, holder)
    # The clone was the holder's alone: gone with it, and the volume never saw its write.
    assert not any((store.pool / "clones" / volume_id).glob("*.img"))
    got = await call(client.volumes.download_file, volume_id, "state.txt")
    assert base64.b64decode(got["content"]) == b"version 2"
    assert await call(client.volumes.delete_checkpoint, volume_id, ck["id"]) == {"success": True}
    assert [c["id"] for c in await call(client.volumes.list_checkpoints, volume_id)] == [unnamed["id"]]
    with pytest.raises(Exception) as missing:
        await call(client.volumes.delete_checkpoint, volume_id, ck["id"])
    assert status_of(missing.value) == 404
    await call(client.volumes.delete, volume_id)  # its checkpoints go with it
    assert not (store.pool / "checkpoints" / volume_id).exists()


async def test_another_keys_volume_is_a_404(gw: GatewayUnderTest, tmp_path: Path) -> None:
    mine = await call(client_for, gw)
    volume_id = (await call(mine.volumes.create, "mine", 16 * MiB))["id"]
    ck_id = (await call(mine.volumes.create_checkpoint, volume_id))["id"]
    other = await call(client_for, gw, await gw.new_key())
    assert await call(other.volumes.list) == []
    src = tmp_path / "f"
    src.write_bytes(b"x")
    attempts: list[tuple[Any, tuple[Any, ...]]] = [
        (other.volumes.get, (volume_id,)),
        (other.volumes.update, (volume_id, "stolen")),
        (other.volumes.delete, (volume_id,)),
        (other.volumes.list_checkpoints, (volume_id,)),
        (other.volumes.create_checkpoint, (volume_id,)),
        (other.volumes.delete_checkpoint, (volume_id, ck_id)),
        (other.volumes.list_files, (volume_id,)),
        (other.volumes.upload_file, (volume_id, str(src), "f")),
        (other.volumes.download_file, (volume_id, "f")),
        (other.volumes.delete_file, (volume_id, "f")),
        (mine.volumes.get, ("vol-00000000000000000000",)),
        (mine.volumes.get, ("../../etc",)),
    ]
    for fn, args in attempts:
        with pytest.raises(Exception) as refused:
            await call(fn, *args)
        assert status_of(refused.value) == 404, fn
    assert (await call(mine.volumes.get, volume_id))["name"] == "mine"
    status, _ = await gw.request("GET", "/v1/volumes", anonymous=True)
    assert status == 401


async def test_paths_that_climb_out_and_symlinks_are_refused(gw: GatewayUnderTest, tmp_path: Path) -> None:
    client = await call(client_for, gw)
    volume_id = (await call(client.volumes.create, "paths", 16 * MiB))["id"]
    src = tmp_path / "f"
    src.write_bytes(b"payload")
    for bad in ("../escape", "a/../../escape", "..", "a/..", "/", ""):
        status, body = await _upload(gw, volume_id, bad, b"payload")
        assert status in (400, 422), (bad, status, body)
    # A leading / is the volume's root: nothing outside is touched.
    await call(client.volumes.upload_file, volume_id, str(src), "/etc/hosts")
    assert (await call(client.volumes.list_files, volume_id, prefix="etc/"))[0]["path"] == "etc/hosts"
    assert b"payload" not in await asyncio.to_thread(Path("/etc/hosts").read_bytes)

    # What a VM may plant: links out of the volume (and in it).
    store = store_of(gw)
    root = await store.attach(volume_id, None, read_only=False, holder="vm-evil")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"host secret")
    try:
        os.symlink(outside, root / "out")
        os.symlink(outside / "secret", root / "secret")
        os.symlink("etc", root / "inside")
        os.mkfifo(root / "fifo")
    finally:
        await store.detach(volume_id, "vm-evil")
    for path in ("secret", "out/secret", "inside/hosts"):
        status, body = await gw.request(
            "POST", f"/v1/volumes/{volume_id}/files/download", json={"path": path}
        )
        assert status == 409 and body["code"] == "symlink_refused", (path, body)
        status, _ = await gw.request("GET", f"/v1/volumes/{volume_id}/files/download", params={"path": path})
        assert status == 409
    status, body = await gw.request("POST", f"/v1/volumes/{volume_id}/files/download", json={"path": "fifo"})
    assert status == 409 and body["code"] == "not_a_regular_file"  # and it did not hang on the FIFO
    for path in ("out/new", "inside/new"):
        status, body = await _upload(gw, volume_id, path, b"planted")
        assert status == 409 and body["code"] == "symlink_refused", (path, body)
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    # Overwriting a link replaces the link itself, never what it points to.
    status, _ = await _upload(gw, volume_id, "secret", b"replaced", overwrite=True)
    assert status == 200 and (outside / "secret").read_bytes() == b"host secret"
    types = {e["path"]: e["type"] for e in await call(client.volumes.list_files, volume_id)}
    assert types["out"] == "symlink" and types["inside"] == "symlink" and "out/secret" not in types
    status, _ = await gw.request("DELETE", f"/v1/volumes/{volume_id}/files", params={"path": "out"})
    assert status == 204 and (outside / "secret").exists()
    status, body = await gw.request("GET", f"/v1/volumes/{volume_id}/files", params={"prefix": "../"})
    assert status == 400 and body["code"] == "invalid_path"


async def _upload(
    gw: GatewayUnderTest, volume_id: str, path: str, data: bytes, overwrite: bool = False
) -> tuple[int, Any]:
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("path", path)
    form.add_field("overwrite", str(overwrite).lower())
    form.add_field("file", data, filename="f")
    return await gw.request("POST", f"/v1/volumes/{volume_id}/files/upload", data=form)


async def test_attachments_and_writes_survive_a_gateway_restart(gateway_factory: Any, tmp_path: Path) -> None:
    gw: GatewayUnderTest = await gateway_factory("process")
    client = await call(client_for, gw)
    volume_id = (await call(client.volumes.create, "durable", 32 * MiB))["id"]
    root = await store_of(gw).attach(volume_id, None, read_only=False, holder="vm-long")
    wrote = await asyncio.to_thread(write_as_vm, root, "data.bin", 2 * MiB)
    assert wrote.returncode == 0, wrote.stderr
    written = (root / "data.bin").read_bytes()
    await gw.stop()  # VMs and their mounts go on without the gateway

    again: GatewayUnderTest = await gateway_factory("process")
    status, vol = await again.request("GET", f"/v1/volumes/{volume_id}", key=gw.api_key)
    assert status == 200 and vol["holders"] == ["vm-long"]
    store = store_of(again)
    assert await store.attach(volume_id, None, read_only=False, holder="vm-long") == root  # the same mount
    assert (root / "data.bin").read_bytes() == written
    await store.detach(volume_id, "vm-long")
    mounts, _ = ours(tmp_path)
    assert not any("/mnt/" in m for m in mounts)
    async with again.http.get(
        f"{again.url}/v1/volumes/{volume_id}/files/download", params={"path": "data.bin"}, headers=gw.auth
    ) as resp:
        assert await resp.read() == written


async def test_the_store_reconciles_and_releases_everything(tmp_path: Path) -> None:
    """A store started over mounts a dead process left: held views kept, strays and their loop devices
    released; ``release_all`` leaves no mount or loop device behind."""
    root = tmp_path / "data" / "volumes"
    first = LocalVolumeStore(root)
    try:
        await first.start()
        await first.create("v1", 16 * MiB)
        await first.create("v2", 16 * MiB)
        held = await first.attach("v1", None, read_only=False, holder="vm-1")
        (held / "f").write_bytes(b"kept")
        await first.checkpoint("v1", "c1")
        await first.attach("v1", "c1", read_only=False, holder="vm-2")
        # A stray: v2 mounted by hand, as a process killed between its mount and its state file would.
        stray = first.mount_dir("v2", "live")
        await first._ensure_view("v2", "live")
        second = LocalVolumeStore(root)
        await second.start()
        assert not await second.is_mounted(stray)
        assert await second.is_mounted(held) and (held / "f").read_bytes() == b"kept"
        assert await second.holders("v1") == {"vm-1", "vm-2"}
        _, loops = ours(tmp_path)
        assert not any("v2.img" in line for line in loops)
        assert sum("v1.img" in line for line in loops) == 1  # one device per image, never two
        await second.delete("v2")
    finally:
        await LocalVolumeStore(root).release_all()
    mounts, loops = ours(tmp_path)
    assert mounts == [] and loops == []


async def test_a_loop_device_cleared_between_its_lookup_and_the_mount_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device left bound to a volume's image by a deferred detach (``losetup -d`` while another process
    had it open) vanishes when that process lets go, which may fall between the store finding it and
    mounting it: the store then mounts through a fresh device instead of failing."""
    root = tmp_path / "data" / "volumes"
    store = LocalVolumeStore(root)
    try:
        await store.start()
        await store.create("v1", 16 * MiB)
        image = store.image("v1")
        device = (await local.run(["losetup", "--find", "--show", str(image)])).stdout.strip()
        holder = os.open(device, os.O_RDONLY)  # another process's probe, say
        await local.run(["losetup", "-d", device])  # deferred: the device stays bound
        assert device in await store._devices_of(image)
        real_run = local.run

        async def let_go_before_the_mount(argv: list[str], *, check: bool = True) -> Any:
            nonlocal holder
            if argv[0] == "mount" and holder >= 0:
                os.close(holder)  # the prober lets go: the kernel completes the detach
                holder = -1
                for _ in range(500):
                    if device not in await store._devices_of(image):
                        break
                    await asyncio.sleep(0.01)
            return await real_run(argv, check=check)

        monkeypatch.setattr(local, "run", let_go_before_the_mount)
        held = await store.attach("v1", None, read_only=False, holder="vm-1")
        (held / "f").write_bytes(b"written")
        assert await store.is_mounted(held) and (held / "f").read_bytes() == b"written"
        assert len(await store._devices_of(image)) == 1
    finally:
        monkeypatch.undo()
        await LocalVolumeStore(root).release_all()
    mounts, loops = ours(tmp_path)
    assert mounts == [] and loops == []


def test_the_bench_runs_small_and_leaves_nothing() -> None:
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(repo / "bench" / "volumes.py"), "--mib", "16", "--rounds", "1",
         "--drivers", "netns", "--io-mib", "8"],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "checkpoint, attached (fsfreeze + reflink)" in done.stdout
    assert "in a netns VM, 8 MiB sequential" in done.stdout, done.stdout
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "BACK-FILE"], capture_output=True, text=True).stdout
    assert "volbench-" not in loops and "volbench-" not in Path("/proc/self/mountinfo").read_text()
