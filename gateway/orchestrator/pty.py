"""Terminals in VMs: a shell on a real pty inside the VM (``gateway.guest.pty_bridge``), its output kept
in a short scrollback and sent to whoever is attached.

A terminal lives in the control-plane process that made it: it ends with that process (its shell gets a
hang-up), and with its VM. Its output is read all the time, attached or not, so a shell never blocks on
a terminal nobody watches; what was missed is the last ``SCROLLBACK_BYTES``, replayed on attach.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import Conflict, GatewayError, NotFound, TooManyRequests, Unsupported, VmNotRunning
from gateway.orchestrator.drivers.base import VmProcess, VmSpawn
from gateway.orchestrator.model import VM_ACTIVE, VmRecord
from gateway.orchestrator.service import Orchestrator
from gateway.state.records import ACTIVITY_API

log = logging.getLogger(__name__)

BRIDGE_SOURCE = (Path(__file__).resolve().parents[1] / "guest" / "pty_bridge.py").read_text()
INPUT, RESIZE, HANGUP = 0, 2, 9
SCROLLBACK_BYTES = 64 * 1024
MAX_PER_VM = 16
TERMINAL_RETRY_AFTER_S = 5
# An ended terminal is still shown (its exit code) this long.
ENDED_KEPT_S = 600.0
# Output pieces a viewer may be behind before it is dropped (the shell goes on).
VIEWER_QUEUE = 256
DEFAULT_SHELL = ("/bin/bash", "-il")
HANGUP_GRACE_S = 2.0
# Typing in a terminal is its VM's activity (the idle clock), written at most this often per terminal.
INPUT_ACTIVITY_EVERY_S = 1.0


class TooManyTerminals(TooManyRequests):
    """A VM's terminals are all taken; one frees when a shell exits or is killed (Retry-After: a guess)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="too_many_terminals", retry_after=TERMINAL_RETRY_AFTER_S)


@dataclass
class Terminal:
    pty_id: str
    owner: str
    session_id: str
    vm_id: str
    cols: int
    rows: int
    argv: tuple[str, ...]
    created_at: float
    process: VmProcess
    scrollback: bytearray = field(default_factory=bytearray)
    viewers: set[asyncio.Queue[bytes | None]] = field(default_factory=set)
    exit_code: int | None = None
    ended_at: float | None = None
    pump: asyncio.Task[None] | None = None
    input_noted_at: float = 0.0  # (monotonic) when its input was last written down as activity

    @property
    def alive(self) -> bool:
        return self.ended_at is None

    async def send(self, kind: int, payload: bytes = b"") -> None:
        await self.process.write(struct.pack(">BI", kind, len(payload)) + payload)

    async def _pump(self) -> None:
        try:
            while chunk := await self.process.read():
                self.scrollback += chunk
                del self.scrollback[:-SCROLLBACK_BYTES]
                for queue in list(self.viewers):
                    if queue.full():  # a viewer this far behind is dropped; the shell goes on
                        self.viewers.discard(queue)
                        while not queue.empty():
                            queue.get_nowait()
                        queue.put_nowait(None)
                    else:
                        queue.put_nowait(chunk)
            code: int | None = await self.process.wait()
        except GatewayError as exc:
            log.info("terminal %s of VM %s ended: %s", self.pty_id, self.vm_id, exc)
            code = None
        self.exit_code, self.ended_at = code, time.time()
        await self.process.aclose()
        for queue in list(self.viewers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)


class Terminals:
    """The terminals of this control-plane process, by id, each kept to its owner."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator
        self._terminals: dict[str, Terminal] = {}

    async def create(
        self,
        owner: str,
        *,
        session_id: str | None,
        vm_id: str | None,
        cols: int,
        rows: int,
        argv: Sequence[str] | None,
        pty_id: str | None = None,
    ) -> Terminal:
        driver = self.orchestrator.driver
        if not isinstance(driver, VmSpawn):
            raise Unsupported(f"the {driver.name!r} VM driver has no terminals")
        vm, env = await self._vm(owner, session_id, vm_id)
        self._forget_ended()
        if sum(1 for t in self._terminals.values() if t.vm_id == vm.vm_id and t.alive) >= MAX_PER_VM:
            raise TooManyTerminals(f"a VM has at most {MAX_PER_VM} terminals: end one first")
        pty_id = pty_id or "pty-" + secrets.token_hex(8)
        if pty_id in self._terminals:
            raise Conflict(f"terminal {pty_id} exists already", code="pty_exists")
        command = tuple(argv or DEFAULT_SHELL)
        process = await driver.spawn(
            vm.vm_id, vm.handle, ["python3", "-c", BRIDGE_SOURCE, str(cols), str(rows), *command], env=env
        )
        terminal = Terminal(pty_id, owner, vm.session_id, vm.vm_id, cols, rows, command, time.time(), process)
        terminal.pump = asyncio.get_running_loop().create_task(terminal._pump(), name=f"terminal {pty_id}")
        self._terminals[pty_id] = terminal
        return terminal

    async def _vm(
        self, owner: str, session_id: str | None, vm_id: str | None
    ) -> tuple[VmRecord, dict[str, str]]:
        """The running VM the terminal goes into, and its session's env (what commands there get)."""
        if session_id is not None:
            session, vm = await self.orchestrator.running_vm(owner, session_id)
            return vm, vm.command_env(session.env)
        assert vm_id is not None
        vm = await self.orchestrator.get_vm(owner, vm_id)
        if vm.status != VM_ACTIVE:
            raise VmNotRunning(f"VM {vm_id} is {vm.status}")
        owning = await self.orchestrator.get_session(owner, vm.session_id)
        return vm, vm.command_env(owning.env if owning else {})

    def get(
        self, owner: str, pty_id: str, *, session_id: str | None = None, vm_id: str | None = None
    ) -> Terminal:
        """The owner's terminal in that session or VM; NotFound for anything else (another key's too)."""
        terminal = self._terminals.get(pty_id)
        if (
            terminal is None
            or terminal.owner != owner
            or (session_id is not None and terminal.session_id != session_id)
            or (vm_id is not None and terminal.vm_id != vm_id)
        ):
            raise NotFound("PTY session not found", code="pty_not_found")
        return terminal

    def list(self, owner: str, *, session_id: str | None = None, vm_id: str | None = None) -> list[Terminal]:
        self._forget_ended()
        return sorted(
            (
                t
                for t in self._terminals.values()
                if t.owner == owner
                and (session_id is None or t.session_id == session_id)
                and (vm_id is None or t.vm_id == vm_id)
            ),
            key=lambda t: t.created_at,
        )

    async def resize(self, terminal: Terminal, cols: int, rows: int) -> None:
        if terminal.alive:
            await terminal.send(RESIZE, struct.pack(">HH", cols, rows))
            terminal.cols, terminal.rows = cols, rows

    async def write(self, terminal: Terminal, data: bytes) -> None:
        if terminal.alive and data:
            with contextlib.suppress(OSError):
                await terminal.send(INPUT, data)
            now = time.monotonic()
            if now - terminal.input_noted_at >= INPUT_ACTIVITY_EVERY_S:
                terminal.input_noted_at = now
                with contextlib.suppress(GatewayError):  # (a lost note must not end the terminal)
                    await self.orchestrator.store.mark_active({terminal.vm_id: ACTIVITY_API}, time.time())

    async def kill(self, terminal: Terminal) -> None:
        """End it: the shell is hung up and, if it lingers, killed with its bridge."""
        if terminal.alive and terminal.pump is not None:
            with contextlib.suppress(OSError):
                await terminal.send(HANGUP)
            # A shell ends on its hang-up; one that does not is killed with its bridge.
            _, lingering = await asyncio.wait([terminal.pump], timeout=HANGUP_GRACE_S)
            if lingering:
                await terminal.process.aclose()
                await asyncio.wait([terminal.pump])  # it records the end
        self._terminals.pop(terminal.pty_id, None)

    async def attach(self, terminal: Terminal) -> AsyncIterator[bytes]:
        """The scrollback, then the output as it comes, until the terminal ends."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(VIEWER_QUEUE)
        if terminal.scrollback:
            queue.put_nowait(bytes(terminal.scrollback))
        if not terminal.alive:
            queue.put_nowait(None)
        else:
            terminal.viewers.add(queue)
        try:
            while (chunk := await queue.get()) is not None:
                yield chunk
        finally:
            terminal.viewers.discard(queue)

    async def wait_ended(self, terminal: Terminal) -> int | None:
        if terminal.pump is not None:
            await asyncio.wait([terminal.pump])
        return terminal.exit_code

    def _forget_ended(self) -> None:
        cutoff = time.time() - ENDED_KEPT_S
        for pty_id, terminal in list(self._terminals.items()):
            if terminal.ended_at is not None and terminal.ended_at < cutoff:
                del self._terminals[pty_id]

    async def close(self) -> None:
        """The control plane stops: every terminal's shell is hung up."""
        for terminal in list(self._terminals.values()):
            await self.kill(terminal)
