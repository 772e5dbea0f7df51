"""Files in a session's VM: upload and download, streamed through a helper that runs inside the VM.

The helper (``gateway.guest.files``) runs as the VM's own user in the VM's own view of its files, so a
path can only ever name something of that VM: the host's files are not in it (the isolated drivers), or
lie outside the root the helper confines itself to (the development driver). Bytes stream through
without being held: an upload is written to the helper's stdin as it arrives (waiting while the pipe is
full), a download read from its stdout as the client takes it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import DriverError, GatewayError, Unsupported
from gateway.images.store import HOST_FILES_DRIVERS
from gateway.orchestrator.drivers.base import VmProcess, VmSpawn
from gateway.orchestrator.service import Orchestrator

HELPER_SOURCE = (Path(__file__).resolve().parents[1] / "guest" / "files.py").read_text()
# Bytes per frame written to the helper: what it holds at once.
FRAME_BYTES = 256 * 1024
MAX_HEADER_BYTES = 8192


class FileRefused(GatewayError):
    """What the helper in the VM refused, with its status (400 bad path, 403, 404, 409, 507)."""

    code = "file_refused"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status  # (the instance's, over the class's)


@dataclass
class Download:
    """A file being read from a VM: its size and path (from the VM), then its bytes. ``close`` it."""

    size: int
    path: str
    process: VmProcess
    buffered: bytes

    async def chunks(self) -> AsyncIterator[bytes]:
        """Exactly ``size`` bytes, or DriverError when the file ended early."""
        left = self.size
        if self.buffered:
            piece, self.buffered = self.buffered[:left], b""
            left -= len(piece)
            yield piece
        while left > 0:
            chunk = await self.process.read()
            if not chunk:
                raise DriverError(f"the file ended {left} bytes short of its size (it shrank while read)")
            piece = chunk[:left]
            left -= len(piece)
            yield piece

    async def close(self) -> None:
        await self.process.aclose()


class VmFiles:
    """The files use cases, on the orchestrator's sessions and driver."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    async def _spawn(self, owner: str, session_id: str, op: str, path: str) -> VmProcess:
        driver = self.orchestrator.driver
        if not isinstance(driver, VmSpawn):
            raise Unsupported(f"the {driver.name!r} VM driver cannot stream files")
        session, vm = await self.orchestrator.running_vm(owner, session_id)
        # A development VM shares the host's files: its own are its working folder ("."), nothing above.
        root = "." if driver.name in HOST_FILES_DRIVERS else "/"
        argv = ["python3", "-c", HELPER_SOURCE, op, path, root]
        return await driver.spawn(vm.vm_id, vm.handle, argv, env=vm.command_env(session.env))

    async def upload(
        self, owner: str, session_id: str, path: str, data: AsyncIterator[bytes]
    ) -> dict[str, object]:
        """Write ``data`` to ``path`` in the session's VM; the helper's answer ({size, path})."""
        process = await self._spawn(owner, session_id, "write", path)
        try:
            try:
                async for chunk in data:
                    for start in range(0, len(chunk), FRAME_BYTES):
                        piece = chunk[start : start + FRAME_BYTES]
                        await process.write(len(piece).to_bytes(4, "big") + piece)
                await process.write(b"\0\0\0\0")  # the end: commit
            except (BrokenPipeError, ConnectionResetError):
                pass  # the helper refused early (a bad path): its answer says why
            process.close_stdin()
            answer = await _header(process)
            await process.wait()
            return answer
        finally:
            await process.aclose()

    async def download(self, owner: str, session_id: str, path: str) -> Download:
        process = await self._spawn(owner, session_id, "read", path)
        try:
            process.close_stdin()
            buffered = b""
            while b"\n" not in buffered:
                chunk = await process.read()
                if not chunk:
                    break
                buffered += chunk
                if b"\n" not in buffered and len(buffered) > MAX_HEADER_BYTES:
                    raise DriverError("the file helper in the VM answered garbage")
            line, _, rest = buffered.partition(b"\n")
            answer = _parse(line, process)
            size = answer.get("size")
            if not isinstance(size, int):
                raise DriverError("the file helper in the VM answered garbage")
            return Download(size=size, path=str(answer["path"]), process=process, buffered=rest)
        except BaseException:
            await process.aclose()
            raise


async def _header(process: VmProcess) -> dict[str, object]:
    line = b""
    while not line.endswith(b"\n") and len(line) <= MAX_HEADER_BYTES:
        chunk = await process.read()
        if not chunk:
            break
        line += chunk
    return _parse(line.split(b"\n", 1)[0], process)


def _parse(line: bytes, process: VmProcess) -> dict[str, object]:
    try:
        answer = json.loads(line)
    except ValueError:
        said = process.stderr_tail().decode(errors="replace").strip()[-500:]
        raise DriverError(f"the file helper in the VM failed: {said or 'no answer'}") from None
    if not isinstance(answer, dict):
        raise DriverError("the file helper in the VM answered garbage")
    if "error" in answer:
        raise FileRefused(int(answer.get("status") or 400), str(answer["error"]))
    return answer
