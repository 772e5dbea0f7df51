"""The in-guest agent of a qemu VM: runs commands for the control plane (``POST /execute``).

It runs inside the VM as root, on the guest's own Python (standard library only: the image has nothing
else), and listens on every address of the guest on ``agent_port``. Only the host can reach the guest
(its network namespace holds nothing else), and every call must carry the VM's agent token: a first
one handed over through QEMU's fw_cfg (never on the kernel command line, which ``ps`` shows on the host),
then the VM's own, with its env and fresh entropy, through ``POST /configure``.

A command runs like the other drivers run it: its own process group, stdout and stderr in files (so a
background child that inherits them does not hold the call open), killed as a group at its timeout.
"""

from __future__ import annotations

import base64
import fcntl
import hmac
import io
import json
import os
import secrets
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO

CONFIG_PATH = Path("/sys/firmware/qemu_fw_cfg/by_name/opt/gateway/config/raw")
SCRATCH = Path("/run/agent")
MAX_BODY_BYTES = 4 * 1024 * 1024
# linux/random.h: _IO('R', 0x07)
RNDRESEEDCRNG = 0x5207
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
GUEST_HOME = "/home/vm"  # where commands run (qemu.GUEST_HOME)
# /spawn's frame types (gateway.orchestrator.drivers.agent_stream has the host's side).
FRAME_STDIN, FRAME_STDIN_END, FRAME_KILL = 0, 1, 9
FRAME_STDOUT, FRAME_STDERR, FRAME_EXIT = 0, 1, 2
FRAME_READ_BYTES = 65536
# The VM's own env (sent by /configure); each request may override it.
VM_ENV: dict[str, str] = {}


def run(request: dict) -> dict:
    """Run one command; the reply mirrors the host drivers' ExecResult."""
    argv = [str(a) for a in request["argv"]]
    cwd = str(request.get("cwd") or "/")
    given = {str(k): str(v) for k, v in (request.get("env") or {}).items()}
    env = {**BASE_ENV, "HOME": cwd, **VM_ENV, **given}
    timeout_s = float(request["timeout_s"])
    cap = max(0, int(request["max_output_bytes"]))
    token = secrets.token_hex(8)
    out_path, err_path = SCRATCH / f"{token}.out", SCRATCH / f"{token}.err"
    started = time.monotonic()
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd, process_group=0
                )
            except OSError as exc:
                return {"error": f"cannot start command: {exc}"}
        returncode, timed_out, cpu_s = _wait(proc, timeout_s)
        duration_s = time.monotonic() - started
        stdout, cut_out = _read_capped(out_path, cap)
        stderr, cut_err = _read_capped(err_path, cap)
    finally:
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)
    return {
        "stdout": base64.b64encode(stdout).decode(),
        "stderr": base64.b64encode(stderr).decode(),
        "exit_code": None if timed_out else (128 - returncode if returncode < 0 else returncode),
        "timed_out": timed_out,
        "truncated": cut_out or cut_err,
        "duration_s": duration_s,
        "cpu_s": cpu_s,
    }


def _wait(proc: subprocess.Popen, timeout_s: float) -> tuple[int, bool, float]:
    """Wait for the command, its process group killed at the timeout: its status, whether it timed out,
    and the CPU seconds it used (user + system, with the children it waited for; wait4's usage, which
    ``Popen.wait`` would discard)."""
    timed_out = False
    pidfd = os.pidfd_open(proc.pid)
    try:
        # poll, not select: this agent's descriptors may be numbered past select's limit.
        waiter = select.poll()
        waiter.register(pidfd, select.POLLIN)
        if not waiter.poll(max(0, int(timeout_s * 1000))):
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        os.close(pidfd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, timed_out, usage.ru_utime + usage.ru_stime


def _read_capped(path: Path, cap: int) -> tuple[bytes, bool]:
    with open(path, "rb") as fh:
        return fh.read(cap), os.fstat(fh.fileno()).st_size > cap


class Handler(BaseHTTPRequestHandler):
    token = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the console is the operator's boot log, not a request log."""

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return True
        self._reply(401, {"error": "unauthorised"})
        return False

    def do_GET(self) -> None:
        if not self._authorised():
            return
        if self.path == "/health":
            self._reply(200, {"ok": True})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        if not self._authorised():
            return
        if self.path == "/spawn":
            self._spawn()
            return
        if self.path not in ("/execute", "/configure"):
            self._reply(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            self._reply(413, {"error": "body missing or too large"})
            return
        try:
            request = json.loads(self.rfile.read(length))
            reply = configure(request) if self.path == "/configure" else run(request)
        except (ValueError, KeyError, TypeError) as exc:
            self._reply(400, {"error": f"bad request: {exc}"})
            return
        self._reply(400 if "error" in reply else 200, reply)

    def _spawn(self) -> None:
        """A program with streamed stdio (files, terminals): after the reply's head the connection
        carries frames both ways (a type byte, a 4-byte big-endian length, the payload). In: stdin data,
        stdin end, kill. Out: stdout, stderr, and last the exit code (4 bytes, signed)."""
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            self._reply(413, {"error": "body missing or too large"})
            return
        try:
            request = json.loads(self.rfile.read(length))
            argv = [str(a) for a in request["argv"]]
            given = {str(k): str(v) for k, v in (request.get("env") or {}).items()}
        except (ValueError, KeyError, TypeError) as exc:
            self._reply(400, {"error": f"bad request: {exc}"})
            return
        env = {**BASE_ENV, "HOME": GUEST_HOME, **VM_ENV, **given}
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                cwd=GUEST_HOME, process_group=0,
            )  # fmt: skip
        except OSError as exc:
            self._reply(400, {"error": f"cannot start command: {exc}"})
            return
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/x-gateway-frames")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        relay(proc, self.rfile, self.wfile)


def relay(proc: subprocess.Popen[bytes], rfile: io.BufferedIOBase, wfile: io.BufferedIOBase) -> None:
    """Frames between the host's connection and a spawned program, until it exits."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin = proc.stdin
    lock = threading.Lock()

    def send(kind: int, payload: bytes) -> None:
        with lock:
            wfile.write(struct.pack(">BI", kind, len(payload)) + payload)
            wfile.flush()

    def pump(stream: IO[bytes], kind: int) -> None:
        try:
            while chunk := os.read(stream.fileno(), FRAME_READ_BYTES):
                send(kind, chunk)
        except OSError:
            pass

    def kill() -> None:
        if proc.poll() is not None:
            return  # reaped: its group id may be someone else's by now
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def feed() -> None:
        try:
            while True:
                head = rfile.read(5)
                if len(head) < 5:
                    kill()  # the host went away
                    return
                kind, size = struct.unpack(">BI", head)
                payload = rfile.read(size) if size else b""
                if kind == FRAME_STDIN:
                    stdin.write(payload)
                    stdin.flush()
                elif kind == FRAME_STDIN_END:
                    stdin.close()
                elif kind == FRAME_KILL:
                    kill()
        except (OSError, ValueError):
            kill()

    pumps = [threading.Thread(target=pump, args=(proc.stdout, FRAME_STDOUT), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, FRAME_STDERR), daemon=True)]  # fmt: skip
    for thread in pumps:
        thread.start()
    threading.Thread(target=feed, daemon=True).start()
    code = proc.wait()
    for thread in pumps:
        thread.join()
    try:
        send(FRAME_EXIT, struct.pack(">i", 128 - code if code < 0 else code))
    except OSError:
        pass


def configure(request: dict) -> dict:
    """What makes this VM itself, sent by the host once the agent answers (after a boot or a resume):
    its own token, its env, and fresh entropy. A resumed VM is a copy of a snapshot's memory, token and
    random state included, so every copy is told apart here before it runs anything."""
    token = str(request["token"])
    if len(token) < 32:
        return {"error": "token too short"}
    seed = base64.b64decode(request["seed"])
    if len(seed) < 32:
        return {"error": "seed too short"}
    with open("/dev/urandom", "wb") as pool:
        pool.write(seed)
        pool.flush()
        # Reseed the kernel's generator from the pool now, not at its next scheduled reseed.
        fcntl.ioctl(pool.fileno(), RNDRESEEDCRNG)
    VM_ENV.clear()
    VM_ENV.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
    Handler.token = token
    return {"ok": True}


def main() -> None:
    config = json.loads(CONFIG_PATH.read_bytes())
    SCRATCH.mkdir(parents=True, exist_ok=True)
    Handler.token = config["token"]
    server = ThreadingHTTPServer(("0.0.0.0", int(config["agent_port"])), Handler)
    server.daemon_threads = True
    print("gateway-agent: ready", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
