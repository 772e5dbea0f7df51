"""``./dev test``'s outer limit: run a command (pytest) for at most a number of seconds, then stop it and
everything it started, and say which test was running.

The per-test watchdog (``tests/watchdog.py``) ends a stuck test from inside pytest; this is what still
holds when that cannot: a hang outside any test (collection, the test-image build, session teardown) or a
process too broken to run its watchdog. The command runs in a process group of its own; past the limit
it gets SIGUSR1 (the watchdog's faulthandler dumps every thread's stack, even from a stuck process),
then the whole group gets SIGKILL. Ctrl-C and SIGTERM are passed on to the group. Processes of the group
that outlive the run are killed too.

Usage: ``python -m tests.outer_limit LIMIT_S COMMAND...``; exits with the command's status, or 124 when
the limit stopped it (as coreutils' ``timeout`` does).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.watchdog import FINISHED, STATUS_FILE_ENV

TIMED_OUT_EXIT = 124
DUMP_WAIT_S = 2.0
DUMP_GAP_S = 0.3  # between two processes' dumps
POLL_S = 0.2


def _statuses(path: Path) -> dict[int, str]:
    """What each pytest process of the run is doing (process id -> "running <test id>"...): the run's
    status file and its workers' (``<file>.<worker>``, tests/watchdog.py)."""
    found = {}
    for each in (path, *sorted(path.parent.glob(f"{path.name}.*"))):
        try:
            doing, pid = each.read_text().splitlines()[:2]
            found[int(pid)] = doing
        except (OSError, ValueError):
            continue
    return found


def _unfinished(statuses: dict[int, str]) -> str:
    """What the run was doing, for a message: the tests still running, else the first process's state."""
    running = [doing for doing in statuses.values() if doing.startswith("running ")]
    if running:
        return ", ".join(running)
    return next((doing for doing in statuses.values() if doing != FINISHED), "")


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def run(limit_s: float, argv: Sequence[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="outer-limit-") as tmp:
        status_file = Path(tmp) / "status"
        env = {**os.environ, STATUS_FILE_ENV: str(status_file)}
        # process_group=0: a group of its own, which can be killed whole; it stays in our session, so
        # it keeps the terminal for its output.
        proc = subprocess.Popen(list(argv), env=env, process_group=0)
        forward = {sig: signal.signal(sig, lambda s, _: _signal_group(proc.pid, s))
                   for sig in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
        try:
            deadline = time.monotonic() + limit_s
            while True:
                # Popen.wait polls with short sleeps: no wait here that a signal cannot interrupt.
                try:
                    code = proc.wait(timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    if time.monotonic() < deadline:
                        continue
                    return _stop(proc, limit_s, status_file)
                _kill_leftovers(proc.pid)
                doing = _unfinished(_statuses(status_file))
                if code != 0 and doing:
                    # It ended without finishing (the watchdog, its faulthandler backstop, a crash): say
                    # where, since a dump from a stuck process names no test.
                    print(f"outer limit: the run ended with status {code}; it was {doing}", file=sys.stderr)
                return code
        finally:
            for sig, handler in forward.items():
                signal.signal(sig, handler)


def _kill_leftovers(pgid: int) -> None:
    """Processes of the run's group that outlived it (a run ended by faulthandler, which kills nothing).
    Safe after the leader is reaped: Linux keeps a group's id out of use while the group has members."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return
    print(f"outer limit: killing processes the run left behind (process group {pgid})", file=sys.stderr)
    _signal_group(pgid, signal.SIGKILL)


def _stop(proc: subprocess.Popen[bytes], limit_s: float, status_file: Path) -> int:
    statuses = _statuses(status_file)
    doing = _unfinished(statuses) or "starting"
    print(
        f"\nouter limit: the test run is still going after {limit_s:g} s ({doing}); stacks follow, then "
        "it and every process of its group are killed",
        file=sys.stderr,
        flush=True,
    )
    # The watchdog's faulthandler dumps every thread's stack, in each pytest process (xdist's workers too).
    # Only processes still in the run's group: a worker's id may have been taken by another process since.
    # One at a time, so their dumps do not interleave on the shared stderr.
    for pid in sorted({proc.pid, *statuses}):
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == proc.pid:
                os.kill(pid, signal.SIGUSR1)
                time.sleep(DUMP_GAP_S)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(DUMP_WAIT_S)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()
    print(f"outer limit: killed after {limit_s:g} s; the run was {doing}", file=sys.stderr, flush=True)
    return TIMED_OUT_EXIT


def main(args: Sequence[str]) -> int:
    if len(args) < 2:
        print("usage: python -m tests.outer_limit LIMIT_S COMMAND...", file=sys.stderr)
        return 2
    return run(float(args[0]), args[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
