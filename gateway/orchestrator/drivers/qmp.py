"""A minimal QMP client (QEMU's JSON control socket): commands, file descriptors, nothing else.

Blocking on purpose: a QMP exchange is a few short lines on a local socket, and handing over a file
descriptor (``getfd``) needs SCM_RIGHTS, which asyncio's streams do not offer. Callers run it in a thread.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

CONNECT_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 30.0
CONNECT_RETRY_S = 0.01


class QmpError(Exception):
    """QEMU refused a command, or its control socket failed."""


class Qmp:
    def __init__(self, path: Path, *, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        deadline = time.monotonic() + connect_timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise QmpError(f"QEMU's control socket {path} did not open: {exc}") from None
                time.sleep(CONNECT_RETRY_S)
        sock.settimeout(REPLY_TIMEOUT_S)
        self._sock = sock
        self._lines = sock.makefile("rb")
        try:
            self._read()  # the greeting
            self.call("qmp_capabilities")
        except BaseException as exc:
            # A QEMU that dies (or hangs up) right after accepting must not leak the socket, and its
            # reset is a QMP failure like any other (callers turn those into a DriverError).
            self.close()
            if isinstance(exc, OSError):
                raise QmpError(f"QEMU's control socket {path} failed: {exc}") from exc
            raise

    def close(self) -> None:
        self._lines.close()
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> dict[str, Any]:
        line = self._lines.readline()
        if not line:
            raise QmpError("QEMU closed its control socket")
        return json.loads(line)

    def call(self, command: str, fds: list[int] | None = None, **arguments: Any) -> Any:
        """Run a command and return its ``return`` value; events that arrive meanwhile are skipped."""
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        data = json.dumps(message).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self._sock, [data], fds)
            else:
                self._sock.sendall(data)
            while True:
                reply = self._read()
                if "event" in reply:
                    continue
                if "error" in reply:
                    raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
                return reply.get("return")
        except OSError as exc:
            raise QmpError(f"{command}: {exc}") from exc
