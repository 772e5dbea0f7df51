"""A terminal inside a VM: a shell on a real pseudo-terminal, relayed over stdin and stdout.

Runs in the VM like any command (``python3 -c <this file> COLS ROWS ARGV...``), standard library only.
The pty is the VM's own (its devpts), so line discipline, Ctrl-C (SIGINT to the foreground job), job
control and ``stty size`` behave as on any terminal. stdout carries the terminal's output as it comes;
stdin carries frames (a type byte, a 4-byte big-endian length, the payload): input bytes, a resize (two
big-endian 16-bit numbers, columns then rows), or hang up. The bridge exits with the shell's status.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import select
import signal
import struct
import sys
import termios

INPUT, RESIZE, HANGUP = 0, 2, 9
CHUNK = 65536
WAIT_POLL_S = 0.2


def set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def status_of(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def main() -> None:
    cols, rows = int(sys.argv[1]), int(sys.argv[2])
    argv = sys.argv[3:]
    pid, master = pty.fork()
    if pid == 0:
        os.environ.setdefault("TERM", "xterm-256color")
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"cannot start {argv[0]}: {exc.strerror}\r\n".encode())
            os._exit(127)
    set_size(master, cols, rows)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    pending = b""
    open_input = True
    exited = None
    while exited is None:
        readable = [master] + ([stdin] if open_input else [])
        try:
            ready, _, _ = select.select(readable, [], [], WAIT_POLL_S)
        except InterruptedError:
            continue
        if master in ready and not relay_output(master, stdout):
            break
        if open_input and stdin in ready:
            chunk = os.read(stdin, CHUNK)
            if not chunk:
                open_input = False  # the host went away: hang up, as a closed terminal does
                os.kill(pid, signal.SIGHUP)
                continue
            pending += chunk
            while len(pending) >= 5:
                kind, size = struct.unpack(">BI", pending[:5])
                if len(pending) < 5 + size:
                    break
                payload, pending = pending[5 : 5 + size], pending[5 + size :]
                if kind == INPUT:
                    _write_all(master, payload)
                elif kind == RESIZE and size == 4:
                    set_size(master, *struct.unpack(">HH", payload))
                elif kind == HANGUP:
                    os.kill(pid, signal.SIGHUP)
        # The shell may end while a background job still holds the terminal (no EIO then): its end is
        # the session's end.
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            exited = wait_status
    if exited is None:
        _, exited = os.waitpid(pid, 0)
    else:
        while select.select([master], [], [], 0)[0] and relay_output(master, stdout):
            pass  # what the shell wrote last
    sys.exit(status_of(exited))


def relay_output(master: int, stdout: int) -> bool:
    """Copy what the terminal has; False once nothing holds it any more."""
    try:
        data = os.read(master, CHUNK)
    except OSError as exc:
        if exc.errno != errno.EIO:  # EIO: every process holding the terminal has gone
            raise
        return False
    if data:
        _write_all(stdout, data)
    return bool(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    main()
