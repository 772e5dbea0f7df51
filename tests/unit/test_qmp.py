"""The QMP client against a fake QEMU on a unix socket: what it does when the other side misbehaves."""

from __future__ import annotations

import gc
import socket
import threading
from pathlib import Path

import pytest

from gateway.orchestrator.drivers.qmp import Qmp, QmpError


def test_a_socket_that_closes_before_its_greeting_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()

        def hang_up() -> None:
            conn, _ = server.accept()
            conn.close()

        thread = threading.Thread(target=hang_up)
        thread.start()
        with pytest.raises(QmpError, match="closed"):
            Qmp(path)
        thread.join()
    # The client's socket was closed, not left to the garbage collector (an unclosed socket warns, and
    # warnings are errors in this suite).
    gc.collect()


def test_a_reset_during_the_greeting_is_a_qmp_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (Seen when a QEMU died under the client: ConnectionResetError escaped as a bare OSError.)
    path = tmp_path / "qmp.sock"

    def reset(self: Qmp) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(Qmp, "_read", reset)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        with pytest.raises(QmpError, match="reset by peer"):
            Qmp(path)
    gc.collect()
