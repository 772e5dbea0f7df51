"""A private redis-server for single-machine use: unix socket only, persistence on.

Started by ``gateway serve`` when no Redis URL is configured, and by the test fixtures. The caller
holds the data-folder lock, so a Redis still answering on our socket can only be an orphan of an
earlier gateway on this folder (killed before it could stop it); it is shut down (saving) first.
The child gets PR_SET_PDEATHSIG so it does not outlive a gateway killed with SIGKILL.

Synchronous on purpose (start and stop take milliseconds): async callers use ``asyncio.to_thread``,
and a session-scoped pytest fixture can use it without an event loop.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.exceptions import RedisError

from gateway import subprocesses

READY_TIMEOUT_S = 10.0
READY_POLL_S = 0.01
STOP_TIMEOUT_S = 10.0


class EmbeddedRedisError(RuntimeError):
    pass


class EmbeddedRedis:
    def __init__(self, folder: Path, binary: str = "redis-server") -> None:
        self.folder = folder
        self.binary = binary
        self.socket_path = folder / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def config_text(self) -> str:
        return "\n".join(
            [
                "port 0",  # no TCP listener at all
                f"unixsocket {self.socket_path}",
                "unixsocketperm 700",
                f"dir {self.folder}",
                "daemonize no",
                f"logfile {self.folder / 'redis.log'}",
                "appendonly yes",
                "appendfsync everysec",
                "save 60 1",
                "",
            ]
        )

    def _client(self, timeout_s: float) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=timeout_s)

    def _ping(self) -> bool:
        client = self._client(1.0)
        try:
            return bool(client.ping())
        except (RedisError, OSError):
            return False
        finally:
            client.close()

    def start(self) -> None:
        if shutil.which(self.binary) is None:
            raise EmbeddedRedisError(
                f"{self.binary} not found: install it (apt-get install redis-server) or set GATEWAY_REDIS_URL"
            )
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.socket_path.exists() and self._ping():
            client = self._client(STOP_TIMEOUT_S)
            with contextlib.suppress(RedisError, OSError):
                client.shutdown(save=True)  # an orphan of an earlier gateway on this folder
            client.close()
        config = self.folder / "redis.conf"
        config.write_text(self.config_text())
        self.process = subprocess.Popen(
            [self.binary, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=subprocesses.die_with_parent,
            # Its own session: Ctrl-C (SIGINT to the terminal's process group) must not stop Redis
            # while the gateway still drains requests; the gateway stops it last, and PDEATHSIG
            # still takes it down if the gateway dies.
            start_new_session=True,
        )
        # redis-server has no readiness signal besides answering; poll with a deadline.
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self.process = None
                raise EmbeddedRedisError(f"redis-server exited with {code}; see {self.folder / 'redis.log'}")
            if self._ping():
                return
            time.sleep(READY_POLL_S)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer within {READY_TIMEOUT_S} s")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # redis saves its data on SIGTERM
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
