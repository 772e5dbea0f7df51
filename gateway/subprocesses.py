"""Child processes for VMs and host commands: spawned by the standard library, awaited on the loop.

Why not ``asyncio.create_subprocess_exec``: uvloop (the gateway's loop) does not implement
``close_fds``, so a child inherits every inheritable descriptor of the gateway, among them the loop's
own socketpairs for other children's stdio. A VM's init then holds the launcher's pipe open (the read
never sees EOF) and could reach descriptors no VM may see. ``subprocess.Popen`` closes every descriptor
above 2 in the child. Waiting uses a pidfd (Linux >= 5.3): it works on any event loop and needs neither
a child watcher nor a thread per child.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from typing import IO, Any

READ_CHUNK = 65536
PR_SET_PDEATHSIG = 1
# Strong references: the loop keeps only weak ones to tasks.
_REAPING: set[asyncio.Task[int]] = set()


def die_with_parent() -> None:
    """``preexec_fn`` for children that must not outlive the gateway, even one killed with SIGKILL.

    Runs in the child between fork and exec. The signal follows the *thread* that forked: spawn from
    one that outlives the child (the loop's own).
    """
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` with every descriptor above 2 closed in the child (never overridable)."""
    return subprocess.Popen(argv, close_fds=True, **kwargs)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def wait(proc: subprocess.Popen[bytes]) -> int:
    """Wait for the child to exit (and reap it); cancellable, and the child keeps running if cancelled."""
    if proc.poll() is not None:
        return proc.returncode
    pidfd = os.pidfd_open(proc.pid)
    try:
        while proc.poll() is None:
            await _readable(pidfd)
    finally:
        os.close(pidfd)
    return proc.returncode


async def wait_with_cpu(proc: subprocess.Popen[bytes]) -> tuple[int, float | None]:
    """Like ``wait``, and the CPU seconds the child used (user + system, with the children it waited
    for), from ``wait4``; None when it was reaped already and its usage is gone."""
    if proc.returncode is not None:
        return proc.returncode, None
    pidfd = os.pidfd_open(proc.pid)
    try:
        while True:
            await _readable(pidfd)  # readable once the child exited: then WNOHANG reaps it
            try:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # noqa: ASYNC222 - never blocks
            except ChildProcessError:  # reaped by someone else meanwhile: its usage is gone
                return await wait(proc), None
            if pid:
                break
    finally:
        os.close(pidfd)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


async def wait_exit(pid: int) -> None:
    """Wait until a process that is not our child exits (a pidfd: no reaping, no polling)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await _readable(pidfd)
    finally:
        os.close(pidfd)


def reap_in_background(proc: subprocess.Popen[bytes]) -> None:
    """Reap a child that was just killed, without making a cancelled caller wait for it."""
    task = asyncio.get_running_loop().create_task(wait(proc))
    _REAPING.add(task)
    task.add_done_callback(_REAPING.discard)


async def chunks(stream: IO[bytes]) -> AsyncIterator[bytes]:
    """Yield what a child writes to a pipe until every writer closed it, without blocking the loop."""
    fd = stream.fileno()
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            await _readable(fd)
            continue
        if not chunk:
            return
        yield chunk


async def read_to_end(stream: IO[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks(stream)])


async def communicate(proc: subprocess.Popen[bytes], input: bytes | None = None) -> tuple[bytes, bytes]:
    """Feed ``input`` (small: it must fit the pipe buffer), then collect stdout and stderr and reap."""
    if proc.stdin is not None:
        with proc.stdin:
            if input:
                proc.stdin.write(input)
    out, err = await asyncio.gather(_read_if_piped(proc.stdout), _read_if_piped(proc.stderr))
    await wait(proc)
    return out, err


async def _read_if_piped(stream: IO[bytes] | None) -> bytes:
    return b"" if stream is None else await read_to_end(stream)


def close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


STDERR_KEPT_BYTES = 65536
STDERR_DRAIN_S = 1.0


class PipeProcess:
    """A child with stdin and stdout as non-blocking pipes, read and written on the loop (``VmProcess``).

    ``kill`` is how to stop it (the child itself, or what it started in a VM); ``cleanup`` runs once it
    is reaped. stderr is drained by a task into a bounded tail, so a chatty child never blocks on it.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        *,
        kill: Any = None,
        cleanup: Any = None,
    ) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self._stdin = proc.stdin.fileno()
        self._stdout = proc.stdout.fileno()
        os.set_blocking(self._stdin, False)
        os.set_blocking(self._stdout, False)
        self._kill = kill or (lambda: proc.kill())
        self._cleanup = cleanup
        self._stderr = bytearray()
        self._stderr_task = asyncio.get_running_loop().create_task(self._drain_stderr())
        self._closed = False
        self._waiters: set[asyncio.Future[None]] = set()

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for chunk in chunks(self.proc.stderr):
            self._stderr += chunk
            del self._stderr[:-STDERR_KEPT_BYTES]

    async def read(self) -> bytes:
        while not self._closed:
            try:
                return os.read(self._stdout, READ_CHUNK)
            except BlockingIOError:
                await self._until_ready(self._stdout, writing=False)
        return b""  # closed by aclose while waiting: its descriptor is gone

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._closed or self.proc.stdin is None or self.proc.stdin.closed:
                raise BrokenPipeError("the command's stdin is closed")
            try:
                sent = os.write(self._stdin, view)
            except BlockingIOError:
                await self._until_ready(self._stdin, writing=True)
                continue
            view = view[sent:]

    async def _until_ready(self, fd: int, *, writing: bool) -> None:
        """Like ``_readable``/``_writable``, woken by ``aclose`` too (a closed descriptor never is)."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._waiters.add(ready)

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        (loop.add_writer if writing else loop.add_reader)(fd, wake)
        try:
            await ready
        finally:
            self._waiters.discard(ready)
            if not self._closed:
                (loop.remove_writer if writing else loop.remove_reader)(fd)

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    async def wait(self) -> int:
        code = await wait(self.proc)
        # stderr ends with the child, unless something it started still holds it: not waited for long.
        await asyncio.wait([self._stderr_task], timeout=STDERR_DRAIN_S)
        return 128 - code if code < 0 else code

    def stderr_tail(self) -> bytes:
        return bytes(self._stderr)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._stdout)
        loop.remove_writer(self._stdin)
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_result(None)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                self._kill()
        try:
            await wait(self.proc)
        finally:
            self._stderr_task.cancel()
            await asyncio.wait([self._stderr_task])  # its reader is off the descriptor before it closes
            close_pipes(self.proc)
            if self._cleanup is not None:
                self._cleanup()
