"""Bytes both ways between a VM's connection and the destination the egress proxy dialled.

Each direction reads only what the other side's transport can take (``drain`` is the back-pressure), an
end of one direction is passed on as a half-close (``write_eof``) while the other goes on, and a
connection quiet in both directions for ``idle_timeout_s`` is closed. Returns the bytes carried.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

READ_BYTES = 256 * 1024


@dataclass
class Carried:
    to_destination: int = 0
    to_vm: int = 0


async def splice(
    vm_reader: asyncio.StreamReader,
    vm_writer: asyncio.StreamWriter,
    dest_reader: asyncio.StreamReader,
    dest_writer: asyncio.StreamWriter,
    *,
    idle_timeout_s: float,
    first: bytes = b"",
) -> Carried:
    """Carry until both directions ended (or the idle timeout); ``first``: what the proxy already read
    from the VM (the hello it judged), sent ahead."""
    carried = Carried()
    loop = asyncio.get_running_loop()
    last_activity = loop.time()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        nonlocal last_activity
        try:
            while chunk := await reader.read(READ_BYTES):
                writer.write(chunk)
                await writer.drain()
                last_activity = loop.time()
                if up:
                    carried.to_destination += len(chunk)
                else:
                    carried.to_vm += len(chunk)
            if writer.can_write_eof():
                writer.write_eof()  # a half-close goes on as one
        except (ConnectionError, OSError):
            pass

    if first:
        dest_writer.write(first)
        carried.to_destination += len(first)
    up = asyncio.ensure_future(pump(vm_reader, dest_writer, True))
    down = asyncio.ensure_future(pump(dest_reader, vm_writer, False))
    try:
        pending = {up, down}
        while pending:
            wait_s = max(0.0, last_activity + idle_timeout_s - loop.time())
            _, pending = await asyncio.wait(pending, timeout=wait_s)
            if pending and loop.time() - last_activity >= idle_timeout_s:
                break  # quiet both ways for too long
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        for writer in (vm_writer, dest_writer):
            with contextlib.suppress(Exception):
                writer.close()
    return carried
