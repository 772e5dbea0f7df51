"""Bytes both ways between a VM's connection and the destination the egress proxy dialled.

Each direction reads only what the other side can take (back-pressure), an end of one direction is
passed on as a half-close while the other goes on, and a connection quiet in both directions for
``idle_timeout_s`` is closed. Returns the bytes carried.

A direction starts on the streams (reads of ``READ_BYTES``, ``write``, ``drain``, ``write_eof``). Once
it has carried ``KERNEL_AFTER_BYTES`` between plain sockets (every connection spliced here: the ones
whose TLS the proxy opens, to vault hosts, carry their bytes in ``intercept``), the kernel moves the
rest: ``splice(2)`` from the source socket into a pipe and from the pipe into the sink, so no byte is
copied into Python (bench/egress.py: the proxy's CPU per GiB downloaded fell from about 0.8 s to 0.3 s).
The pipe is then the direction's only buffer (``PIPE_BYTES``), and the source is read only while the
sink takes what the pipe holds; the end of the source is passed on as ``shutdown(SHUT_WR)``. At the
switch the source's transport stops reading and what its reader already holds is written ahead and
flushed, so the order of bytes is kept. Small exchanges never switch: setting up the pipe costs more
than it saves for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

READ_BYTES = 256 * 1024
# A direction that has carried this much is moved by the kernel from then on (setting that up costs a
# few syscalls: not worth it for a small request or answer).
KERNEL_AFTER_BYTES = READ_BYTES
# One pipe per direction: what a direction holds between its two sockets (beside their kernel buffers).
PIPE_BYTES = 256 * 1024
# Moves in a row without waiting before other tasks get a turn (a fast pair must not starve the rest).
MOVES_BEFORE_YIELD = 16
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


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

    def moved(up: bool, count: int) -> None:
        nonlocal last_activity
        last_activity = loop.time()
        if up:
            carried.to_destination += count
        else:
            carried.to_vm += count

    async def pump(
        reader: asyncio.StreamReader, source: asyncio.StreamWriter, sink: asyncio.StreamWriter, up: bool
    ) -> None:
        """``reader`` (whose writer is ``source``) to ``sink``: through the streams, then by the kernel
        once the direction carries bulk."""
        raw: list[socket.socket] = []
        try:
            carried_here, kernel_at = 0, float(KERNEL_AFTER_BYTES)
            while True:
                if carried_here >= kernel_at:
                    raw = _raw_sockets(source, sink)
                    if raw:
                        break
                    kernel_at = math.inf  # (TLS, or closing: the streams to the end)
                chunk = await reader.read(READ_BYTES)
                if not chunk:
                    if sink.can_write_eof():
                        sink.write_eof()  # a half-close goes on as one
                    return
                sink.write(chunk)
                await sink.drain()
                moved(up, len(chunk))
                carried_here += len(chunk)
            # (a stream's transport reads too; uvloop's is not registered as a ReadTransport)
            cast(asyncio.Transport, source.transport).pause_reading()  # the kernel reads it from here
            early = _take_buffered(reader)
            if early:
                sink.write(early)
                moved(up, len(early))
            await _flushed(sink)
            await _move(raw[0], raw[1], lambda count: moved(up, count))
        except (ConnectionError, OSError):
            pass
        finally:
            for sock in raw:
                sock.close()  # (a duplicate: the connection stays until its writer is closed)

    if first:
        dest_writer.write(first)
        carried.to_destination += len(first)
    up = asyncio.ensure_future(pump(vm_reader, vm_writer, dest_writer, True))
    down = asyncio.ensure_future(pump(dest_reader, dest_writer, vm_writer, False))
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


def _raw_sockets(*writers: asyncio.StreamWriter) -> list[socket.socket]:
    """Duplicates of the writers' sockets when the kernel can move the bytes (plain stream sockets, no
    TLS, neither transport closing); else none."""
    if not hasattr(os, "splice"):
        return []
    fds = []
    for writer in writers:
        sock = writer.get_extra_info("socket")
        if (
            writer.transport.is_closing()
            or writer.get_extra_info("sslcontext") is not None
            or sock is None
            or sock.type != socket.SOCK_STREAM
        ):
            return []
        fds.append(sock.fileno())
    duplicates = []
    try:
        for fd in fds:
            duplicate = socket.socket(fileno=os.dup(fd))
            duplicates.append(duplicate)
            duplicate.setblocking(False)
    except OSError:
        for duplicate in duplicates:
            duplicate.close()
        return []
    return duplicates


def _take_buffered(reader: asyncio.StreamReader) -> bytes:
    """What the reader already holds (it read it before its transport stopped reading). StreamReader has
    no public way to take its buffer without waiting when it is empty, hence its ``_buffer``."""
    buffer: bytearray = vars(reader)["_buffer"]
    taken = bytes(buffer)
    buffer.clear()
    return taken


async def _flushed(writer: asyncio.StreamWriter) -> None:
    """Until the transport has sent everything written to it (the kernel writes after it, in order)."""
    if writer.transport.get_write_buffer_size():
        writer.transport.set_write_buffer_limits(high=0)  # drain() now waits for an empty buffer
        await writer.drain()


async def _move(source: socket.socket, sink: socket.socket, moved: Callable[[int], None]) -> None:
    """``source`` to ``sink`` through a pipe, until ``source`` ends (then a half-close of ``sink``)."""
    pipe_out, pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # (the default, 64 KiB, works too)
            fcntl.fcntl(pipe_in, _F_SETPIPE_SZ, PIPE_BYTES)
        in_pipe = 0
        ended = False
        moves = 0
        while not ended or in_pipe:
            progressed = sink_full = False
            if not ended:
                try:
                    count = os.splice(source.fileno(), pipe_in, PIPE_BYTES, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    pass  # nothing to read, or the pipe is full
                else:
                    ended = count == 0
                    in_pipe += count
                    progressed = True
            if in_pipe:
                try:
                    count = os.splice(pipe_out, sink.fileno(), in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    sink_full = True
                else:
                    in_pipe -= count
                    moved(count)
                    progressed = True
            if progressed:
                moves += 1
                if moves % MOVES_BEFORE_YIELD == 0:
                    await asyncio.sleep(0)
            elif sink_full:
                await _ready(sink, writable=True)  # back-pressure: the source waits meanwhile
            else:
                await _ready(source, writable=False)
        sink.shutdown(socket.SHUT_WR)  # a half-close goes on as one
    finally:
        os.close(pipe_out)
        os.close(pipe_in)


async def _ready(sock: socket.socket, *, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    woken = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    fd = sock.fileno()
    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await woken
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
