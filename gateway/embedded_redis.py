"""A private redis-server for single-machine use: unix socket only, persistence on, restarted when it dies.

Started by ``gateway serve`` when no Redis URL is configured, and by the test fixtures. The caller
holds the data-folder lock, so a Redis still answering on our socket can only be an orphan of an
earlier gateway on this folder (killed before it could stop it); it is shut down (saving) first.
The child gets PR_SET_PDEATHSIG so it does not outlive a gateway killed with SIGKILL.

Start and stop are synchronous (they take milliseconds): async callers use ``asyncio.to_thread``, and a
session-scoped pytest fixture can use them without an event loop.

``RedisSupervisor`` keeps it running (issue 17.4: a redis-server killed by the OOM killer used to stay a
zombie, and every app URL answered 503 until someone restarted the gateway). It waits for the child's
exit on a pidfd (``subprocesses.wait``): readable the moment the child exits, on any event loop, with no
child watcher (asyncio's are deprecated and uvloop has its own) and no thread parked in waitpid, and the
wait reaps it. Then it starts redis-server again on the same folder, socket and append-only file, with
an exponential back-off capped at ``RESTART_MAX_DELAY_S`` so a server that cannot start does not spin,
and never once the gateway is stopping (its own stop, or a SIGTERM sent to every process of the service
at once, as systemd does). The Redis clients reconnect by themselves once it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from gateway import subprocesses
from gateway.background import stop_loop

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 10.0
READY_POLL_S = 0.01
STOP_TIMEOUT_S = 10.0
# Restarts of this process's embedded redis-server by outcome ("restarted", "failed"), for gateway.metrics.
RESTARTS: dict[str, int] = {}


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
        # One try per call: redis-py's default retries a refused connection with back-off for about
        # 5 s, and the callers poll with deadlines of their own (a stale socket must fail at once).
        return redis.Redis(
            unix_socket_path=str(self.socket_path), socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )

    def _ping(self) -> bool:
        client = self._client(1.0)
        try:
            return bool(client.ping())
        except (RedisError, OSError):
            return False
        finally:
            client.close()

    def start(self) -> None:
        """Start redis-server and return once it answers. Call it from a thread that outlives the child
        (PDEATHSIG follows the thread that spawned it): the loop's own."""
        proc = self.spawn()
        # redis-server has no readiness signal besides answering; poll with a deadline.
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive(proc)
            if self._ping():
                return
            time.sleep(READY_POLL_S)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer within {READY_TIMEOUT_S} s")

    async def restart(self) -> None:
        """Start it again on the same folder, socket and data (its append-only file) after it died:
        spawned on the calling thread (the loop's, for PDEATHSIG), then awaited without blocking the loop."""
        proc = self.spawn()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive(proc)
            if await asyncio.to_thread(self._ping):
                return
            await asyncio.sleep(READY_POLL_S)
        await asyncio.to_thread(self.stop)
        raise EmbeddedRedisError(f"redis-server did not answer within {READY_TIMEOUT_S} s")

    def _check_alive(self, proc: subprocess.Popen[bytes]) -> None:
        code = proc.poll()
        if code is not None:
            self.process = None
            raise EmbeddedRedisError(f"redis-server exited with {code}; see {self.folder / 'redis.log'}")

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start redis-server without waiting for it to answer."""
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
        return self.process

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


@dataclass(frozen=True)
class Backoff:
    """How long to wait before each restart attempt (pure).

    The first attempt comes after ``first_s`` (a crash or an OOM kill is no reason to wait), then
    ``min_s`` doubling up to ``max_s``; a server that ran ``stable_s`` without dying starts the schedule
    over, so one crash a day never waits, and a server that dies at once is tried at most every max_s.
    """

    first_s: float = 0.0
    min_s: float = 0.25
    max_s: float = 30.0
    stable_s: float = 60.0

    def delays(self) -> Iterator[float]:
        yield self.first_s
        delay = self.min_s
        while True:
            yield delay
            delay = min(delay * 2, self.max_s)


class RedisSupervisor:
    """Restarts an EmbeddedRedis that exits while the gateway runs (see the module docstring).

    ``start`` begins watching the server ``redis`` runs now. ``stopping`` says the gateway is stopping
    (its signal handler sets it; ``stop`` sets it too, then waits for the supervision to end): from then
    on an exit is the gateway's own doing or part of its shutdown, never restarted. Not thread-safe: one
    loop.
    """

    def __init__(
        self,
        redis: EmbeddedRedis,
        stopping: asyncio.Event | None = None,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.redis = redis
        self.stopping = stopping or asyncio.Event()
        self.backoff = backoff
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="embedded-redis-supervisor")

    async def stop(self) -> None:
        self.stopping.set()
        await stop_loop(self._task)

    async def _run(self) -> None:
        delays = self.backoff.delays()
        while not self.stopping.is_set():
            proc = self.redis.process
            if proc is None:  # stopped by someone else (the tests' fixtures): nothing to watch
                return
            started = time.monotonic()
            code = await subprocesses.wait(proc)  # (reaps it: no zombie)
            if self.stopping.is_set():
                return
            if time.monotonic() - started >= self.backoff.stable_s:
                delays = self.backoff.delays()
            self.redis.process = None
            log.error(
                "embedded redis-server (pid %d) %s; restarting it on the same data (%s; its log: %s)",
                proc.pid,
                _how_it_ended(code),
                self.redis.folder,
                self.redis.folder / "redis.log",
            )
            await self._restart(delays)

    async def _restart(self, delays: Iterator[float]) -> None:
        """Try until it answers (or the gateway stops), waiting more after each failure."""
        while True:
            delay = next(delays)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return
            try:
                await self.redis.restart()
            except (EmbeddedRedisError, OSError) as exc:
                RESTARTS["failed"] = RESTARTS.get("failed", 0) + 1
                log.error("restarting the embedded redis-server failed: %s; trying again with back-off", exc)
                continue
            RESTARTS["restarted"] = RESTARTS.get("restarted", 0) + 1
            pid = self.redis.process.pid if self.redis.process else "?"
            log.warning("embedded redis-server restarted (pid %s) on %s", pid, self.redis.socket_path)
            return


def _how_it_ended(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"
