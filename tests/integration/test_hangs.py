"""A test run ends, whatever a test does (issue 17.8): child pytest runs on deliberately stuck tests.

- A handle a test leaves open on its event loop fails that test (uvloop's close used to wait for it for
  ever under ``filterwarnings = error``: the hang the issue saw).
- A test stuck where pytest-timeout cannot reach it (a native wait, with or without the GIL) is ended by
  the watchdog, which names it, dumps the stacks and kills the processes it started.
- ``./dev test``'s outer limit stops a run that goes on too long, with its whole process group, and says
  which test was running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 40.0
GONE_TIMEOUT_S = 10.0

INI = """[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

LEAKS_A_TRANSPORT = """
import asyncio
import socket

KEPT = []


async def test_leaves_a_connection_open():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    transport, _ = await asyncio.get_running_loop().create_connection(
        asyncio.Protocol, *listener.getsockname()
    )
    KEPT.append((transport, listener))  # still open when the test's loop closes


def test_the_next_test_runs():
    pass
"""

STUCK = """
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path


def start_child(**kwargs):
    child = subprocess.Popen(["sleep", "600"], **kwargs)
    Path("child.pid").write_text(str(child.pid))


def test_stuck_in_a_native_wait():
    start_child(start_new_session=True)  # like a test's gateway: a process group of its own
    # pytest-timeout's SIGALRM goes to another thread, so this read is never interrupted.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    read_end, _ = os.pipe()
    os.read(read_end, 1)


def test_stuck_holding_the_gil():
    start_child()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    ctypes.PyDLL(None).sleep(600)  # PyDLL keeps the GIL: no Python thread runs until it returns
"""


def child_env() -> dict[str, str]:
    # Not this run's status file, options or current test: the child is a run of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def write_project(folder: Path, conftest: str, **tests: str) -> None:
    (folder / "pytest.ini").write_text(INI)
    (folder / "conftest.py").write_text(conftest)
    for name, text in tests.items():
        (folder / f"{name}.py").write_text(text)


def run_child(folder: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        argv,
        cwd=folder,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,  # the run this test guards against would never end
    )
    return result, time.monotonic() - started


def pytest_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.watchdog", *args]


def assert_gone(pid: int) -> None:
    """The process is gone or a zombie waiting for an init that may never reap it (it runs nothing)."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs")


def test_a_handle_left_open_fails_its_test_instead_of_hanging_the_run(tmp_path: Path) -> None:
    conftest = (
        "from tests import event_loop\n\n\n"
        "def pytest_asyncio_loop_factories(config, item):\n"
        "    return {'uvloop': event_loop.new_event_loop}\n"
    )
    write_project(tmp_path, conftest, test_leak=LEAKS_A_TRANSPORT)
    result, _ = run_child(tmp_path, *pytest_argv("-q", "test_leak.py"))
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "1 error" in out and "2 passed" in out, out
    assert "ERROR test_leak.py::test_leaves_a_connection_open" in out, out
    assert "1 handle(s) still open" in out and "TCPTransport" in out, out


@pytest.mark.parametrize(
    ("test", "says"),
    [
        # The watchdog thread names the test itself.
        (
            "test_stuck_in_a_native_wait",
            "watchdog: test_stuck.py::test_stuck_in_a_native_wait is still running",
        ),
        # Only faulthandler's C thread can act; the status file names the test for ./dev's outer limit.
        ("test_stuck_holding_the_gil", "Timeout (0:00:03)!"),
    ],
)
def test_the_watchdog_ends_a_test_pytest_timeout_cannot_interrupt(
    tmp_path: Path, test: str, says: str
) -> None:
    write_project(tmp_path, "", test_stuck=STUCK)
    argv = pytest_argv("-q", "--timeout", "1", "-o", "hard_timeout_grace_s=1", f"test_stuck.py::{test}")
    # Under ./dev's supervisor, with a limit it does not reach: the run ends by the watchdog.
    result, took = run_child(tmp_path, sys.executable, "-m", "tests.outer_limit", "60", *argv)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert took < CHILD_TIMEOUT_S / 2, out
    assert says in out, out
    # Every thread's stack, the stuck test's line among them.
    assert 'test_stuck.py", line' in out and f"in {test}" in out, out
    # The outer supervisor saw the run end inside the test, and names it (faulthandler's dump cannot).
    assert "the run ended with status 1; it was " in out and f"test_stuck.py::{test}\n" in out, out
    assert_gone(int((tmp_path / "child.pid").read_text()))


def test_the_outer_limit_kills_the_run_and_its_group_and_names_the_test(tmp_path: Path) -> None:
    write_project(tmp_path, "", test_stuck=STUCK)
    # A per-test limit the outer one comes before.
    argv = pytest_argv("-q", "-o", "hard_timeout_grace_s=100", "test_stuck.py::test_stuck_holding_the_gil")
    result, took = run_child(tmp_path, sys.executable, "-m", "tests.outer_limit", "3", *argv)
    out = result.stdout + result.stderr
    assert result.returncode == 124, out
    assert took < CHILD_TIMEOUT_S / 2, out
    assert "outer limit: the test run is still going after 3 s" in out, out
    assert "killed after 3 s; the run was running test_stuck.py::test_stuck_holding_the_gil" in out, out
    # SIGUSR1 got the stacks out of the stuck process first.
    assert 'test_stuck.py", line' in out and "in test_stuck_holding_the_gil" in out, out
    assert_gone(int((tmp_path / "child.pid").read_text()))  # in pytest's process group: killed with it


def test_the_outer_limit_names_the_test_each_worker_runs_and_dumps_their_stacks(tmp_path: Path) -> None:
    """./dev test runs pytest-xdist workers: each one's test is named, and each one's stacks dumped."""
    write_project(
        tmp_path, "", test_stuck=STUCK, test_stuck_too=STUCK.replace('"child.pid"', '"child_too.pid"')
    )
    argv = pytest_argv(
        "-q", "-n", "2", "--dist", "loadfile", "-o", "hard_timeout_grace_s=100",
        "test_stuck.py::test_stuck_holding_the_gil", "test_stuck_too.py::test_stuck_holding_the_gil",
    )  # fmt: skip
    result, took = run_child(tmp_path, sys.executable, "-m", "tests.outer_limit", "8", *argv)
    out = result.stdout + result.stderr
    assert result.returncode == 124, out
    assert took < CHILD_TIMEOUT_S / 2, out
    killed = out[out.index("outer limit: killed after 8 s; the run was ") :]
    assert "running test_stuck.py::test_stuck_holding_the_gil" in killed, out
    assert "running test_stuck_too.py::test_stuck_holding_the_gil" in killed, out
    # Each worker's stacks, whole (one dump after the other): the stuck line of each file.
    assert 'test_stuck.py", line' in out and 'test_stuck_too.py", line' in out, out
    assert_gone(int((tmp_path / "child.pid").read_text()))
    assert_gone(int((tmp_path / "child_too.pid").read_text()))
