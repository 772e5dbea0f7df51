"""Host-side helpers shared by the VM drivers: host commands, captured commands, detached inits, killing.

Everything that blocks runs as an asyncio subprocess or in a thread, so a driver never stalls the loop.
Processes are killed only after their identity is pinned (pidfd) and re-checked against the caller's
membership test (cgroup, namespace or environment marker), so a recycled PID is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import subprocesses as _spawn
from gateway.errors import DriverError
from gateway.orchestrator.drivers.base import ExecResult
from gateway.orchestrator.drivers.cpu_times import children_cpu_s

HOST_COMMAND_TIMEOUT_S = 15.0
INIT_START_TIMEOUT_S = 10.0
DESTROY_TIMEOUT_S = 10.0
# How long one kill round waits for SIGKILLed processes to exit before listing again.
KILL_SETTLE_S = 0.5
PROC_POLL_INTERVAL_S = 0.01
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SH = "/bin/sh"
# What a detached command's wrapper reports (a status line, then two lines of ``times``): far less.
WRAPPER_REPORT_BYTES = 512
VM_FILE = "vm.json"
HOME_DIR = "home"
# Captured output lives outside the VM's home so the user's files never show it.
RUN_DIR = "run"
# The VM init's own output (an image's program, QEMU), in RUN_DIR: what says why a VM stopped.
INIT_LOG = "init.log"
INIT_LOG_TAIL_BYTES = 600

_VM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Runs a command detached from the caller: the background child is reparented to init, so it outlives
# the gateway and leaves no asyncio transport whose garbage collection would kill it.
_LAUNCH_SCRIPT = '"$@" </dev/null 2>&1 & echo "pid $!"'
# The last step before the VM's init runs: report readiness on the launcher's pipe, then drop the pipe
# for the init's log file (its first argument).
_READY_SCRIPT = (
    'log=$1; shift; command -v "$1" >/dev/null || exit 127; echo ready; exec "$@" </dev/null >>"$log" 2>&1'
)
# Background cleanups must not be garbage-collected while a cancelled caller has already left.
_CLEANUPS: set[asyncio.Task[None]] = set()


@dataclass(frozen=True)
class HostResult:
    returncode: int
    stdout: str
    stderr: str


def is_vm_id(vm_id: str) -> bool:
    return _VM_ID_RE.fullmatch(vm_id) is not None


def check_vm_id(vm_id: str) -> str:
    """VM ids become path components and cgroup names, so only a safe alphabet is accepted."""
    if not is_vm_id(vm_id):
        raise DriverError(f"invalid VM id {vm_id!r}")
    return vm_id


def base_env(home: Path) -> dict[str, str]:
    """The minimal environment every VM process starts from; nothing leaks in from the gateway's."""
    return {"PATH": BASE_PATH, "HOME": str(home), "LANG": "C.UTF-8"}


def exit_code(returncode: int) -> int:
    """Popen reports a signal as -N; report it the way a shell does (128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


async def run_host(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: bytes | None = None,
    timeout_s: float = HOST_COMMAND_TIMEOUT_S,
) -> HostResult:
    """Run a short host command (``ip ...``); with ``check`` a failure becomes a DriverError naming it."""
    shown = " ".join(argv)
    try:
        proc = _spawn.popen(
            list(argv),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        raise DriverError(f"cannot run `{shown}`: {exc}") from exc
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await _spawn.communicate(proc, input)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        if isinstance(exc, TimeoutError):
            await _spawn.wait(proc)
            raise DriverError(f"`{shown}` timed out after {timeout_s} s") from None
        _spawn.reap_in_background(proc)
        raise
    finally:
        _spawn.close_pipes(proc)
    result = HostResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise DriverError(f"`{shown}` failed (exit {result.returncode}): {detail}")
    return result


def _create_file(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def _read_capped(path: Path, max_bytes: int) -> tuple[bytes, bool]:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        return fh.read(max_bytes), size > max_bytes


async def run_captured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    scratch_dir: Path,
    timeout_s: float,
    max_output_bytes: int,
) -> ExecResult:
    """Run argv in its own process group with stdout/stderr in files, and wait for argv only.

    Files, not pipes: a background child that inherits them (``server &``) must not keep the call open.
    On timeout (or cancellation) the whole process group is killed; what was written is still returned.
    """
    token = secrets.token_hex(8)
    out_path, err_path = scratch_dir / f"{token}.out", scratch_dir / f"{token}.err"
    started = time.monotonic()
    try:
        try:
            out_fd, err_fd = _create_file(out_path), _create_file(err_path)
            try:
                proc = _spawn.popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out_fd,
                    stderr=err_fd,
                    env=dict(env),
                    cwd=cwd,
                    process_group=0,
                )
            finally:
                os.close(out_fd)
                os.close(err_fd)
        except OSError as exc:
            raise DriverError(f"cannot start command in VM: {exc}") from exc
        timed_out = False
        try:
            async with asyncio.timeout(timeout_s):
                returncode, cpu_s = await _spawn.wait_with_cpu(proc)
        except TimeoutError:
            timed_out = True
            kill_process_group(proc.pid)
            returncode, cpu_s = await _spawn.wait_with_cpu(proc)
        except BaseException:
            kill_process_group(proc.pid)
            _spawn.reap_in_background(proc)
            raise
        duration_s = time.monotonic() - started
        cap = max(0, max_output_bytes)
        stdout, cut_out = await asyncio.to_thread(_read_capped, out_path, cap)
        stderr, cut_err = await asyncio.to_thread(_read_capped, err_path, cap)
    finally:
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)
    return ExecResult(
        stdout=stdout,
        stderr=stderr,
        exit_code=None if timed_out else exit_code(returncode),
        timed_out=timed_out,
        truncated=cut_out or cut_err,
        duration_s=duration_s,
        cpu_s=cpu_s,
    )


async def run_captured_detached(
    launch: Sequence[str],
    *,
    pid_file: Path,
    scratch_dir: Path,
    timeout_s: float,
    max_output_bytes: int,
    is_member: Callable[[int], bool],
) -> ExecResult:
    """Like ``run_captured``, for a command a runtime starts and leaves running (``runc exec --detach``).

    ``launch`` is run with stdout/stderr on files and a third file as descriptor 3, where the command's
    wrapper writes its exit status, then what ``times`` says (its CPU); it returns once the command
    runs, its PID in ``pid_file``. The command is awaited by PID (it is not our child) and its process
    group killed on timeout, once ``is_member`` confirms the PID is still the command's.
    """
    token = secrets.token_hex(8)
    out_path, err_path, rc_path = (scratch_dir / f"{token}.{n}" for n in ("out", "err", "rc"))
    started = time.monotonic()
    try:
        try:
            fds = [_create_file(path) for path in (out_path, err_path, rc_path)]
            try:
                # The status file becomes descriptor 3 of the runtime, which hands it on to the command.
                argv = [SH, "-c", 'exec "$@" 3>>"$0"', str(rc_path), *launch]
                proc = _spawn.popen(argv, stdin=subprocess.DEVNULL, stdout=fds[0], stderr=fds[1])
            finally:
                for fd in fds:
                    os.close(fd)
        except OSError as exc:
            raise DriverError(f"cannot start command in VM: {exc}") from exc
        try:
            async with asyncio.timeout(HOST_COMMAND_TIMEOUT_S):
                launched = await _spawn.wait(proc)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            _spawn.reap_in_background(proc)
            raise
        if launched != 0:
            detail = (await asyncio.to_thread(_read_capped, err_path, INIT_LOG_TAIL_BYTES))[0]
            raise DriverError(f"cannot start command in VM: {detail.decode(errors='replace').strip()}")
        pid = int((await asyncio.to_thread(_read_capped, pid_file, 32))[0])
        timed_out = False
        try:
            async with asyncio.timeout(timeout_s):
                await _spawn.wait_exit(pid)
        except BaseException as exc:
            timed_out = isinstance(exc, TimeoutError)
            if is_member(pid):
                kill_process_group(pid)
            if not timed_out:
                raise
        duration_s = time.monotonic() - started
        cap = max(0, max_output_bytes)
        stdout, cut_out = await asyncio.to_thread(_read_capped, out_path, cap)
        stderr, cut_err = await asyncio.to_thread(_read_capped, err_path, cap)
        report = (await asyncio.to_thread(_read_capped, rc_path, WRAPPER_REPORT_BYTES))[0]
    finally:
        for path in (out_path, err_path, rc_path):
            path.unlink(missing_ok=True)
    status, _, times = report.decode("ascii", "replace").partition("\n")
    return ExecResult(
        stdout=stdout,
        stderr=stderr,
        # No status: the command's wrapper was killed (timeout, or by the VM's own processes).
        exit_code=None if timed_out else (int(status) if status.strip().isdigit() else 137),
        timed_out=timed_out,
        truncated=cut_out or cut_err,
        duration_s=duration_s,
        cpu_s=children_cpu_s(times),
    )


async def run_logged(argv: Sequence[str], *, log_path: Path, what: str) -> None:
    """Run a short host command whose output goes to a VM's log file (a runtime that hands its stdio
    on to the VM's init); on failure, DriverError with what the log ends with."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        proc = _spawn.popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True
        )
    except OSError as exc:
        raise DriverError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    finally:
        os.close(fd)
    try:
        async with asyncio.timeout(HOST_COMMAND_TIMEOUT_S):
            returncode = await _spawn.wait(proc)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        _spawn.reap_in_background(proc)
        raise
    if returncode != 0:
        raise DriverError(f"{what} failed: {log_tail(log_path) or f'exit {returncode}'}")


async def spawn_detached(
    prefix: Sequence[str],
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    timeout_s: float = INIT_START_TIMEOUT_S,
) -> tuple[int, int]:
    """Start ``prefix + command`` as a long-lived process that is not our child; return (pid, start ticks).

    ``prefix`` may be wrappers that ``exec`` the rest (cgroup join, ``ip netns exec``); the PID stays the
    same through every exec. Returns once ``command`` is about to run, i.e. every wrapper succeeded.
    """
    argv = [SH, "-c", _LAUNCH_SCRIPT, "gateway-launch", *prefix, SH, "-c", _READY_SCRIPT, "gateway-vm-init"]
    argv += [str(log_path), *command]
    pid: int | None = None
    lines: list[bytes] = []
    try:
        proc = _spawn.popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        raise DriverError(f"cannot start VM init: {exc}") from exc
    try:
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                # EOF comes when the launcher exited and the init dropped the pipe (or died).
                output = b""
                async for chunk in _spawn.chunks(proc.stdout):
                    output += chunk
                    *complete, output = output.split(b"\n")
                    for line in complete:
                        if line.startswith(b"pid ") and pid is None:
                            pid = int(line[4:])  # known early, so a timeout below can still kill it
                        else:
                            lines.append(line.rstrip())
                if output:
                    lines.append(output.rstrip())
                await _spawn.wait(proc)
        except TimeoutError:
            raise DriverError(f"VM init did not start within {timeout_s} s") from None
        ticks = start_ticks(pid) if pid is not None else None
        if b"ready" not in lines or pid is None or ticks is None:
            detail = b"; ".join(x for x in lines if x != b"ready").decode(errors="replace")
            raise DriverError(f"VM init failed to start: {detail or 'exited'}")
        return pid, ticks
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        if pid is not None:
            # Still pinned: it is our launcher's child, and only just started.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _spawn.reap_in_background(proc)
        raise
    finally:
        _spawn.close_pipes(proc)


def init_log_tail(vm_dir: Path | None) -> str:
    """The end of a VM init's output in its work folder, on one line ('' when there is none)."""
    return log_tail(vm_dir / RUN_DIR / INIT_LOG) if vm_dir is not None else ""


def log_tail(path: Path) -> str:
    """The end of a log file, on one line ('' when there is none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - INIT_LOG_TAIL_BYTES))
            tail = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in tail.splitlines() if line.strip())


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat, or None when gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    return fields[0].decode(), int(fields[19])


def start_ticks(pid: int) -> int | None:
    """Start time of a running (non-zombie) process, or None."""
    stat = proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return None
    return stat[1]


def is_running(pid: int, ticks: int | None = None) -> bool:
    """True when pid runs and, given ticks, is the same process that was recorded (not a recycled PID)."""
    current = start_ticks(pid)
    return current is not None and (ticks is None or current == ticks)


def list_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def kill_process_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process group we created (its leader's PID is its id); gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_if_member(pid: int, is_member: Callable[[int], bool], sig: int = signal.SIGKILL) -> None:
    """Pin the process with a pidfd, re-check membership, then signal exactly that process."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, PermissionError):
        return
    try:
        if is_member(pid):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


async def _wait_exited(pids: Iterable[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        pending = {pid for pid in pending if is_running(pid)}
        if pending:
            await asyncio.sleep(PROC_POLL_INTERVAL_S)


async def kill_until_gone(
    candidates: Callable[[], Awaitable[Iterable[int]]],
    is_member: Callable[[int], bool],
    *,
    timeout_s: float = DESTROY_TIMEOUT_S,
) -> bool:
    """SIGKILL every member process until a listing comes back empty; False if some survive the deadline.

    Listing again after each round catches children forked while the previous round was being killed.
    """
    deadline = time.monotonic() + timeout_s
    me = os.getpid()
    while True:
        live = [pid for pid in set(await candidates()) if pid != me and is_running(pid)]
        if not live:
            return True
        if time.monotonic() >= deadline:
            return False
        for pid in live:
            kill_if_member(pid, is_member)
        await _wait_exited(live, min(KILL_SETTLE_S, max(0.0, deadline - time.monotonic())))


async def remove_tree(path: Path) -> None:
    """Remove a VM's work folder (possibly large) off the loop."""
    await asyncio.to_thread(shutil.rmtree, path, True)


def read_json(path: Path) -> dict[str, Any]:
    """A small JSON record, or {} when missing or unreadable (half-made VMs have none)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write atomically, so a crash never leaves a torn record for sweep to misread; readable by the
    gateway's user only (a qemu VM's record holds its agent token, which runs commands in the VM)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # (a stale temporary file keeps its old mode through O_CREAT)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data, sort_keys=True))
    tmp.replace(path)


def as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def run_cleanup(cleanup: Coroutine[Any, Any, None]) -> None:
    """Run a cleanup to completion even if the caller is cancelled again while waiting for it."""
    task = asyncio.ensure_future(cleanup)
    _CLEANUPS.add(task)
    task.add_done_callback(_CLEANUPS.discard)
    await asyncio.shield(task)
