"""Edge worker processes for ``gateway serve --workers N``: more cores for the data plane.

The serving process runs the control plane, the reaper and one edge; ``N - 1`` children run only an
edge (``gateway edge``) on the same address. Every listener sets SO_REUSEPORT, so the kernel spreads
new connections over the processes; all of them share Redis, so a route change reaches each one's
cache through pub/sub.

Children are plain ``subprocess.Popen`` processes (every descriptor above 2 closed, so none inherits
the data-folder lock or the listener), die with their parent (PR_SET_PDEATHSIG), are restarted with a
back-off when one exits on its own, and on stop get SIGTERM, drain like the parent, and are killed
only after the grace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping

from gateway import subprocesses

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
READY_LINE = "edge listening on"
STOP_MARGIN_S = 5.0  # beyond the drain grace, before a worker is killed
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


class WorkerStartError(RuntimeError):
    pass


class EdgeWorkers:
    """``count`` children running ``gateway edge`` with the given arguments and environment."""

    def __init__(self, count: int, edge_args: list[str], env: Mapping[str, str]) -> None:
        self.count = count
        self.argv = [sys.executable, "-m", "gateway", *edge_args]
        self.env = dict(env)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        """Start every worker and return once each one listens; raises WorkerStartError otherwise."""
        spawns = [asyncio.ensure_future(self._spawn(index)) for index in range(self.count)]
        try:
            self.procs = list(await asyncio.gather(*spawns))
        except BaseException:
            for spawn in spawns:
                if spawn.done() and not spawn.cancelled() and spawn.exception() is None:
                    self.procs.append(spawn.result())
                else:
                    spawn.cancel()
            await self.stop(0)
            raise
        loop = asyncio.get_running_loop()
        self._supervisors = [loop.create_task(self._supervise(i)) for i in range(self.count)]

    async def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        # From the loop's thread: PDEATHSIG follows the thread that forked, which must outlive the child.
        proc = subprocesses.popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, preexec_fn=subprocesses.die_with_parent
        )  # preexec_fn: the only way to set PDEATHSIG; the child runs nothing else before exec
        assert proc.stdout is not None
        ready = False
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                async for chunk in subprocesses.chunks(proc.stdout):
                    if READY_LINE.encode() in chunk:
                        ready = True
                        break
        except TimeoutError:
            proc.stdout.close()
            proc.kill()
            raise WorkerStartError(
                f"edge worker {index} did not listen within {READY_TIMEOUT_S:.0f} s"
            ) from None
        if not ready:  # its stdout ended first: it exited (the reason is on the shared stderr)
            proc.stdout.close()
            code = await subprocesses.wait(proc)
            raise WorkerStartError(f"edge worker {index} exited with code {code} while starting")
        log.info("edge worker %d started (pid %d)", index, proc.pid)
        return proc

    async def _supervise(self, index: int) -> None:
        failures = 0
        while not self._stopping:
            code = await _exited(self.procs[index])
            if self._stopping:
                return
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            failures += 1
            log.error("edge worker %d exited with code %s; restarting in %.1f s", index, code, delay)
            await asyncio.sleep(delay)
            try:
                self.procs[index] = await self._spawn(index)
            except WorkerStartError as exc:
                log.error("%s", exc)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM every worker (each drains within ``grace_s``); kill any still running after it."""
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                async with asyncio.timeout(grace_s + STOP_MARGIN_S):
                    await subprocesses.wait(proc)
            except TimeoutError:
                log.warning("edge worker (pid %d) did not stop in time; killing it", proc.pid)
                proc.kill()
                await subprocesses.wait(proc)
            if proc.stdout is not None:
                proc.stdout.close()


async def _exited(proc: subprocess.Popen[bytes]) -> int:
    """Wait for a worker to exit, reading and dropping what it still writes to stdout meanwhile (it logs
    to stderr, shared with ours). Its stdout stays open until then: a pipe closed after its ready line
    would make any later write fail with EPIPE and kill it (print() under PYTHONUNBUFFERED wrote the
    ready line's newline apart, and lost the first worker at start that way)."""
    assert proc.stdout is not None
    async for _ in subprocesses.chunks(proc.stdout):
        pass
    proc.stdout.close()
    return await subprocesses.wait(proc)
