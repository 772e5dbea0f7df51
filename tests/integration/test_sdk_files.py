"""Files through the official SDK (``upload_file``, ``download_file``) and the raw download, on every
driver; and what code in a VM can try with them: paths out of the VM, symlinks, special files, a cut
upload (issue 19.3)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from instavm import InstaVM
from instavm.exceptions import ForbiddenError, InstaVMError

from tests.conftest import GatewayUnderTest
from tests.integration.test_sdk import http_error, sdk
from tests.qemu_env import qemu_missing

IS_ROOT = os.geteuid() == 0
DRIVERS = [
    pytest.param("process", id="process"),
    pytest.param(
        "netns", id="netns", marks=[pytest.mark.root, pytest.mark.skipif(not IS_ROOT, reason="needs root")]
    ),
    pytest.param(
        "qemu",
        id="qemu",
        marks=[
            pytest.mark.root,
            pytest.mark.slow,
            pytest.mark.skipif(qemu_missing() is not None, reason=qemu_missing() or ""),
        ],
    ),
]


async def start(gateway_factory: Any, driver: str) -> GatewayUnderTest:
    if driver == "qemu":
        return await gateway_factory("qemu", vms={"driver": "qemu", "boot_timeout_s": 120})
    return await gateway_factory(driver)


async def sh(client: InstaVM, command: str) -> str:
    result = await asyncio.to_thread(client.execute, command, language="bash")
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


async def refused(call: Any, *args: Any) -> tuple[int, str]:
    """The status and message of an SDK call that the gateway refused."""
    with pytest.raises(InstaVMError) as caught:
        await asyncio.to_thread(call, *args)
    if isinstance(caught.value, ForbiddenError):
        return 403, str(caught.value)
    response = http_error(caught.value).response
    return response.status_code, response.json()["detail"]


@pytest.fixture(params=DRIVERS)
async def vm_client(request: pytest.FixtureRequest, gateway_factory: Any) -> tuple[GatewayUnderTest, InstaVM]:
    gw = await start(gateway_factory, request.param)
    return gw, await asyncio.to_thread(sdk, gw)


async def test_upload_and_download_round_trip_the_bytes(
    vm_client: tuple[GatewayUnderTest, InstaVM], tmp_path: Path
) -> None:
    gw, client = vm_client
    data = os.urandom(3 * 1024 * 1024 + 7)  # several frames and pipe buffers, and not a multiple of 3
    local = tmp_path / "data.bin"
    local.write_bytes(data)
    sent = await asyncio.to_thread(client.upload_file, str(local), "project/in/data.bin")
    assert sent["size"] == len(data) and sent["path"].endswith("/project/in/data.bin")
    # The VM's own programs see the same bytes (the parents were made).
    seen = await sh(client, "sha256sum project/in/data.bin")
    assert seen.split()[0] == hashlib.sha256(data).hexdigest()

    got = await asyncio.to_thread(client.download_file, "project/in/data.bin")
    assert got["size"] == len(data) and got["content"] == data
    saved = tmp_path / "back.bin"
    await asyncio.to_thread(client.download_file, "project/in/data.bin", str(saved))
    assert saved.read_bytes() == data

    # The raw form, for files too large for JSON: the bytes, with their length.
    url = f"{gw.url}/v1/sessions/{client.session_id}/files"
    async with gw.http.get(
        url, params={"path": "project/in/data.bin"}, headers={"X-API-Key": gw.api_key}
    ) as resp:
        assert resp.status == 200 and resp.content_length == len(data)
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert await resp.read() == data

    # An empty file, replacing the other in place. (Read raw: the SDK takes an empty ``content`` for
    # "none" and returns the whole JSON answer instead.)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    await asyncio.to_thread(client.upload_file, str(empty), "project/in/data.bin")
    async with gw.http.get(
        url, params={"path": "project/in/data.bin"}, headers={"X-API-Key": gw.api_key}
    ) as resp:
        assert resp.status == 200 and await resp.read() == b""


async def test_paths_are_the_vms_own_and_special_files_are_refused(
    vm_client: tuple[GatewayUnderTest, InstaVM], tmp_path: Path
) -> None:
    _, client = vm_client
    await sh(client, "mkdir -p dir && mkfifo pipe && echo secret-of-the-vm > mine")
    cases = {
        "../../etc/passwd": (400, "'..'"),
        "dir/../mine": (400, "'..'"),
        "/proc/self/environ": (403, "/proc"),
        "/sys/kernel/notes": (403, "/sys"),
        "/dev/zero": (403, "/dev"),
        "dir": (409, "not a regular file"),
        "pipe": (409, "not a regular file"),  # a FIFO: refused at once, never read (it would block)
        "missing": (404, "no such file"),
    }
    for path, (status, says) in cases.items():
        got = await refused(client.download_file, path)
        assert got[0] == status and says in got[1], (path, got)
    local = tmp_path / "x"
    local.write_bytes(b"x")
    for path, status in (("../x", 400), ("/proc/x", 403), ("dir", 409), ("pipe", 409), ("mine/below", 409)):
        got = await refused(client.upload_file, str(local), path)
        assert got[0] == status, (path, got)
    assert (await asyncio.to_thread(client.download_file, "mine"))["content"] == b"secret-of-the-vm\n"


async def test_a_symlink_planted_in_the_vm_never_reaches_a_host_file(
    vm_client: tuple[GatewayUnderTest, InstaVM], tmp_path: Path
) -> None:
    """Code in the VM points links at the host's files (a host file made for the test, the gateway's data
    folder): a download through them gives the VM's own file or a refusal, never the host's bytes, and an
    upload over a link replaces the link, never the host file it named."""
    gw, client = vm_client
    host_file = tmp_path / "host-secret"
    host_file.write_bytes(b"host-only-bytes")
    data_dir = gw.config.data_path
    await sh(client, f"ln -s {host_file} to-host && ln -s {data_dir} to-data && ln -s / to-root")
    for path in ("to-host", f"to-data/{host_file.name}", "to-root/etc/hostname"):
        try:
            got = await asyncio.to_thread(client.download_file, path)
        except InstaVMError:
            continue  # refused (the development driver: outside the VM's folder; or no such file in the VM)
        assert b"host-only-bytes" not in got["content"]
        if gw.config.vms.driver == "process":
            pytest.fail(f"{path}: the development driver's VM reached outside its own folder")
    local = tmp_path / "payload"
    local.write_bytes(b"overwritten")
    await asyncio.to_thread(client.upload_file, str(local), "to-host")
    assert host_file.read_bytes() == b"host-only-bytes"
    assert await sh(client, "test -L to-host || echo replaced") == "replaced\n"


async def test_a_cut_upload_leaves_nothing_and_the_gateway_keeps_serving(
    vm_client: tuple[GatewayUnderTest, InstaVM],
) -> None:
    gw, client = vm_client
    boundary = "cut-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="session_id"\r\n\r\n{client.session_id}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="remote_path"\r\n\r\nhalf.bin\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="half.bin"\r\n\r\n'
    ).encode()
    declared = len(head) + 8 * 1024 * 1024
    _, writer = await asyncio.open_connection(gw.config.server.host, gw.config.server.port)
    writer.write(
        (
            f"POST /upload HTTP/1.1\r\nHost: api\r\nX-API-Key: {gw.api_key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {declared}\r\n\r\n"
        ).encode()
        + head
        + os.urandom(1024 * 1024)
    )
    await writer.drain()
    writer.close()  # 7 MiB short
    await writer.wait_closed()

    async def settled() -> str:
        # The helper notices the end of its input and removes its temporary file; wait for that.
        while True:
            listing = await sh(client, "ls -A")
            if "half.bin" not in listing:
                return listing
            await asyncio.sleep(0.1)

    listing = await asyncio.wait_for(settled(), 30)
    assert "half.bin" not in listing
    local_ok = await asyncio.to_thread(client.execute, "print('still serving')")
    assert local_ok["stdout"] == "still serving\n"


async def test_files_keep_tenants_apart_and_validate(gw: GatewayUnderTest, tmp_path: Path) -> None:
    client = await asyncio.to_thread(sdk, gw)
    await sh(client, "echo mine > f")
    other = InstaVM(await gw.new_key(), base_url=client.base_url, auto_start_session=False)
    other.session_id = client.session_id
    local = tmp_path / "x"
    local.write_bytes(b"x")
    assert (await refused(other.download_file, "f"))[0] == 404
    assert (await refused(other.upload_file, str(local), "f"))[0] == 404
    assert (await asyncio.to_thread(client.download_file, "f"))["content"] == b"mine\n"

    headers = {"X-API-Key": gw.api_key}
    async with gw.http.post(gw.url + "/download", data={"filename": "f"}, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 422 and body["detail"][0]["loc"] == ["body", "session_id"]
    form = aiohttp.FormData()
    form.add_field("file", b"x", filename="x")
    form.add_field("session_id", client.session_id)
    async with gw.http.post(gw.url + "/upload", data=form, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 422 and {tuple(d["loc"]) for d in body["detail"]} == {
            ("body", "session_id"),
            ("body", "remote_path"),
        }
    async with gw.http.post(gw.url + "/upload", json={"x": 1}, headers=headers) as resp:
        assert resp.status == 415
    async with gw.http.get(f"{gw.url}/v1/sessions/{client.session_id}/files", headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 422 and body["detail"][0]["loc"] == ["query", "path"]
