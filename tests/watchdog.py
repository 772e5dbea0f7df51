"""A hard time limit on each test that no stuck test escapes: a test run must end, not hang (issue 17.8).

pytest-timeout interrupts a test with SIGALRM, whose Python handler runs only once the main thread comes
back to the interpreter. A test stuck in a native wait (uvloop's ``Loop.close()`` in epoll_pwait, which
retries after every signal; a read with the signal taken by another thread) is never interrupted. So
around each test's setup, call and teardown this plugin arms two watchdogs that need nothing from the
main thread:

- a Python thread, at the test's pytest-timeout plus ``hard_timeout_grace_s``: it prints the test's id
  and every thread's stack, kills the processes the run started (each with its process group) and ends
  the run with ``os._exit(1)``. It runs whenever the main thread has released the GIL, which every
  blocking call does;
- faulthandler's C thread, one grace later, for a main thread stuck while holding the GIL: it dumps the
  stacks and exits (the test's id is then in the status file below).

pytest-timeout still reports every test it can interrupt; the watchdogs act only where it cannot. (Do not
also set pytest's ``faulthandler_timeout``: faulthandler has one timer, and this plugin uses it.)

For ``./dev test``'s outer limit (``tests/outer_limit.py``), the plugin keeps what the run is doing in the
file named by ``$PYTEST_WATCHDOG_STATUS_FILE`` ("running <test id>", "finished", then the process id on a
second line; each pytest-xdist worker in that name plus ``.<worker>``), and SIGUSR1 dumps every thread's
stack (faulthandler again: a stuck process still answers).

Loaded by ``tests/conftest.py``; ``-p tests.watchdog`` loads it into any other pytest run.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

STATUS_FILE_ENV = "PYTEST_WATCHDOG_STATUS_FILE"
GRACE_INI = "hard_timeout_grace_s"
DEFAULT_GRACE_S = 30.0
# A test without a pytest-timeout (disabled with 0) still gets a hard limit.
DEFAULT_LIMIT_S = 600.0
EXIT_CODE = 1
FINISHED = "finished"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        GRACE_INI,
        "seconds past a test's pytest-timeout after which the watchdog ends the whole run "
        f"(default {DEFAULT_GRACE_S:g})",
        default=str(DEFAULT_GRACE_S),
    )


def hard_limit_s(item: pytest.Item) -> float:
    """The test's pytest-timeout (marker, then --timeout, then the ini) plus the grace."""
    grace = float(item.config.getini(GRACE_INI))
    marker = item.get_closest_marker("timeout")
    timeout: object = None
    if marker is not None:
        timeout = marker.args[0] if marker.args else marker.kwargs.get("timeout")
    if timeout is None:
        timeout = item.config.getoption("timeout", None) or item.config.getini("timeout") or 0
    return (float(timeout) or DEFAULT_LIMIT_S) + grace  # type: ignore[arg-type]


class Watchdog:
    """One thread for the whole run; ``arm`` and ``disarm`` bracket each test."""

    def __init__(self, out_fd: int, status_file: Path | None, grace_s: float) -> None:
        self.out_fd = out_fd
        self._grace_s = grace_s
        self._status_file = status_file
        self._changed = threading.Condition()
        self._deadline: float | None = None
        self._nodeid = ""
        self._limit_s = 0.0
        self._stopping = False
        self._thread = threading.Thread(target=self._watch, name="test-watchdog", daemon=True)
        self._thread.start()

    def status(self, text: str) -> None:
        if self._status_file is not None:
            with contextlib.suppress(OSError):
                self._status_file.write_text(f"{text}\n{os.getpid()}\n")

    def arm(self, nodeid: str, limit_s: float) -> None:
        self.status(f"running {nodeid}")
        with self._changed:
            self._nodeid, self._limit_s = nodeid, limit_s
            self._deadline = time.monotonic() + limit_s
            self._changed.notify()
        # The backstop: a C thread, for a main thread that holds the GIL while it is stuck.
        faulthandler.dump_traceback_later(limit_s + self._grace_s, exit=True, file=self.out_fd)

    def disarm(self, nodeid: str) -> None:
        faulthandler.cancel_dump_traceback_later()
        with self._changed:
            self._deadline = None
            self._changed.notify()
        self.status(f"between tests (the last one: {nodeid})")

    def stop(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self._thread.join()

    def _watch(self) -> None:
        with self._changed:
            while not self._stopping:
                if self._deadline is None:
                    self._changed.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._changed.wait(left)
                    continue
                self._expire()

    def _expire(self) -> None:
        say = (
            f"\n\nwatchdog: {self._nodeid} is still running after {self._limit_s:g} s, past its "
            "pytest-timeout, which could not interrupt it (stuck in a native wait?). Its stacks, then the "
            "run ends; the processes it started are killed.\n"
        )
        os.write(self.out_fd, say.encode())
        faulthandler.dump_traceback(file=self.out_fd, all_threads=True)
        killed = kill_children()
        if killed:
            os.write(self.out_fd, f"watchdog: killed child processes {killed}\n".encode())
        self.status(f"killed by the watchdog in {self._nodeid}")
        os._exit(EXIT_CODE)


def children(pid: int) -> list[int]:
    """Direct children of a process (every thread's list)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(x) for x in (task / "children").read_text().split()]
    return found


def kill_children() -> list[int]:
    """SIGKILL this process's children, each with its process group when it leads one (a child started
    with ``start_new_session``, like a test's gateway, takes its own children along)."""
    me = os.getpid()
    own_group = os.getpgid(0)
    killed = []
    for pid in children(me):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group == pid and group != own_group:
                os.killpg(group, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


_WATCHDOG = pytest.StashKey[Watchdog]()


def status_file() -> Path | None:
    """This process's status file: the run's, or for a pytest-xdist worker the run's plus its name."""
    status = os.environ.get(STATUS_FILE_ENV)
    if not status:
        return None
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return Path(f"{status}.{worker}" if worker else status)


def pytest_configure(config: pytest.Config) -> None:
    # The real stderr, taken now: during a test pytest's capture points descriptor 2 at a temporary file.
    out_fd = os.dup(sys.__stderr__.fileno() if sys.__stderr__ is not None else 2)
    watchdog = Watchdog(out_fd, status_file(), float(config.getini(GRACE_INI)))
    watchdog.status("collecting (and building test images)")
    faulthandler.register(signal.SIGUSR1, file=out_fd, all_threads=True)
    config.stash[_WATCHDOG] = watchdog


def pytest_unconfigure(config: pytest.Config) -> None:
    watchdog = config.stash.get(_WATCHDOG, None)
    if watchdog is None:
        return
    faulthandler.unregister(signal.SIGUSR1)
    watchdog.stop()
    watchdog.status(FINISHED)
    os.close(watchdog.out_fd)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Outermost, so the limit covers setup, call and teardown (pytest-timeout's wrapper included)."""
    watchdog = item.config.stash[_WATCHDOG]
    watchdog.arm(item.nodeid, hard_limit_s(item))
    try:
        return (yield)
    finally:
        watchdog.disarm(item.nodeid)
