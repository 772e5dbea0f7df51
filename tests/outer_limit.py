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
POLL_S = 0.2


def _status(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


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
                doing = _status(status_file)
                if code != 0 and doing and doing != FINISHED:
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
    doing = _status(status_file) or "starting"
    print(
        f"\nouter limit: the test run is still going after {limit_s:g} s ({doing}); stacks follow, then "
        "it and every process of its group are killed",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGUSR1)  # the watchdog's faulthandler dumps every thread's stack
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
