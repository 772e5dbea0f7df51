"""The host's side of the qemu guest agent's ``/spawn``: a program in the VM with streamed stdio.

After the HTTP reply's head, the connection carries frames both ways: a type byte, a 4-byte big-endian
length, the payload (``gateway.guest.agent.relay`` is the other side). Reading stops while the caller
has not taken what was read, so TCP's window is the back-pressure all the way into the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import Mapping, Sequence

from gateway.errors import DriverError
from gateway.subprocesses import STDERR_KEPT_BYTES

FRAME = struct.Struct(">BI")
# To the agent.
STDIN, STDIN_END, KILL = 0, 1, 9
# From the agent.
STDOUT, STDERR, EXIT = 0, 1, 2
MAX_FRAME_BYTES = 1 << 20
# Pieces of stdout read ahead of the caller.
READ_AHEAD = 16
MAX_HEAD_BYTES = 16384


class AgentProcess:
    """``VmProcess`` over one connection to the agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._stdout: asyncio.Queue[bytes] = asyncio.Queue(READ_AHEAD)
        self._stderr = bytearray()
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._demux())
        self._closed = False

    async def _demux(self) -> None:
        try:
            while True:
                kind, size = FRAME.unpack(await self._reader.readexactly(FRAME.size))
                if size > MAX_FRAME_BYTES:
                    raise DriverError("the VM's agent sent an oversized frame")
                payload = await self._reader.readexactly(size)
                if kind == STDOUT:
                    await self._stdout.put(payload)
                elif kind == STDERR:
                    self._stderr += payload
                    del self._stderr[:-STDERR_KEPT_BYTES]
                elif kind == EXIT:
                    self._exit.set_result(struct.unpack(">i", payload)[0])
                    return
        except (asyncio.IncompleteReadError, OSError, DriverError, struct.error):
            if not self._exit.done():
                self._exit.set_exception(DriverError("the connection to the VM's agent was lost"))
        finally:
            await self._stdout.put(b"")  # the end of stdout

    async def read(self) -> bytes:
        if self._stdout.empty() and self._task.done():
            return b""
        chunk = await self._stdout.get()
        if not chunk:
            self._stdout.put_nowait(b"")  # every later read sees the end too
        return chunk

    async def _send(self, kind: int, payload: bytes = b"") -> None:
        self._writer.write(FRAME.pack(kind, len(payload)) + payload)
        await self._writer.drain()

    async def write(self, data: bytes) -> None:
        for start in range(0, len(data), MAX_FRAME_BYTES):
            await self._send(STDIN, data[start : start + MAX_FRAME_BYTES])

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.write(FRAME.pack(STDIN_END, 0))

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def stderr_tail(self) -> bytes:
        return bytes(self._stderr)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._exit.done():
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write(FRAME.pack(KILL, 0))
        self._task.cancel()
        self._writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await self._writer.wait_closed()
        if not self._exit.done():
            self._exit.set_exception(DriverError("the command was killed"))


async def spawn(
    ip: str, port: int, token: str, argv: Sequence[str], env: Mapping[str, str], connect_timeout_s: float
) -> AgentProcess:
    """Start ``argv`` through the agent at ``ip:port``; DriverError when it refuses or cannot be reached."""
    body = json.dumps({"argv": list(argv), "env": dict(env)}).encode()
    head = (
        f"POST /spawn HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        async with asyncio.timeout(connect_timeout_s):
            reader, writer = await asyncio.open_connection(ip, port, limit=MAX_FRAME_BYTES + FRAME.size)
            writer.write(head + body)
            reply = await reader.readuntil(b"\r\n\r\n")
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise DriverError(f"the VM's agent cannot be reached: {exc or type(exc).__name__}") from None
    status_line = reply.split(b"\r\n", 1)[0].decode(errors="replace")
    if status_line.split()[1:2] != ["200"]:
        writer.close()
        raise DriverError(f"the VM's agent refused the command: {status_line}")
    return AgentProcess(reader, writer)
