"""Commands run in the background (``POST /execute_async``), their results kept in Redis.

An execution is answered at once with its id and runs in this gateway process as the execute use case
(booting the session's VM if it has none). Its record lives in Redis: any gateway process answers it,
and a restarted one still does. A record belongs to the key that made it. Whatever way a run ends, its
record ends ``completed`` or ``failed``: a command whose VM dies fails with the reason, and one whose
gateway process stopped or died is failed by the next start (``recover``), never left pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence

from gateway.errors import GatewayError, NotFound
from gateway.orchestrator.model import (
    EXECUTION_COMPLETED,
    EXECUTION_FAILED,
    EXECUTION_PENDING,
    EXECUTION_RUNNING,
    ExecutionRecord,
)
from gateway.orchestrator.service import Orchestrator, VmParams

log = logging.getLogger(__name__)

ID_PREFIX = "exec-"
# A runner says it is alive every RUNNER_BEAT_S; one silent for RUNNER_TTL_S is dead.
RUNNER_BEAT_S = 5.0
RUNNER_TTL_S = 20


class Executions:
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator
        self.store = orchestrator.store
        # This process, as the runner of what it starts: unique per process start.
        self.runner = secrets.token_hex(8)
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def start(
        self, owner: str, session_id: str | None, argv: Sequence[str], timeout_s: float | None, language: str
    ) -> ExecutionRecord:
        """Record the execution and start it; the record as it is now (pending)."""
        if session_id is None:
            session_id = (await self.orchestrator.create_session(owner, VmParams())).session_id
        else:
            await self.orchestrator.check_execution_room(owner, session_id)  # NotFound, TooManyRequests
        # Alive before the record names this runner, so no other process's recover takes it for dead.
        await self.store.mark_runner_alive(self.runner, RUNNER_TTL_S)
        rec = ExecutionRecord(
            execution_id=ID_PREFIX + secrets.token_hex(12),
            owner=owner,
            session_id=session_id,
            status=EXECUTION_PENDING,
            created_at=time.time(),
            language=language,
            runner=self.runner,
        )
        await self.store.put_execution(rec)
        task = asyncio.get_running_loop().create_task(self._run(rec, argv, timeout_s), name=rec.execution_id)
        self._tasks[rec.execution_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(rec.execution_id, None))
        return rec

    async def _run(self, rec: ExecutionRecord, argv: Sequence[str], timeout_s: float | None) -> None:
        rec.status, rec.started_at = EXECUTION_RUNNING, time.time()
        try:
            await self.store.put_execution(rec)
            _, vm, result = await self.orchestrator.execute(rec.owner, rec.session_id, argv, timeout_s)
        except asyncio.CancelledError:
            await asyncio.shield(self._fail(rec, "the gateway stopped while the command ran"))
            raise
        except GatewayError as exc:
            await self._fail(rec, exc.message)
            return
        except Exception as exc:
            log.exception("execution %s failed", rec.execution_id)
            await self._fail(rec, f"internal error: {type(exc).__name__}")
            return
        rec.vm_id = vm.vm_id
        rec.status, rec.completed_at = EXECUTION_COMPLETED, time.time()
        for name, value in result.reported().items():
            setattr(rec, name, value)
        await self.store.put_execution(rec)

    async def _fail(self, rec: ExecutionRecord, error: str) -> None:
        rec.status, rec.error, rec.completed_at = EXECUTION_FAILED, error, time.time()
        with contextlib.suppress(GatewayError):  # Redis away: the next start fails it again
            await self.store.put_execution(rec)

    async def get(self, owner: str, execution_id: str) -> ExecutionRecord:
        rec = await self.store.get_execution(execution_id) if execution_id.startswith(ID_PREFIX) else None
        if rec is None or rec.owner != owner:
            raise NotFound("Execution not found", code="execution_not_found")
        return rec

    async def keep_alive(self) -> None:
        """While this process runs: say it is alive while it runs executions, and fail what dead runners
        left (every gateway process does, the first time at start; a runner silent for RUNNER_TTL_S is
        dead). Only a process with executions writes its key: an idle gateway leaves Redis as it is."""
        while True:
            await asyncio.sleep(RUNNER_BEAT_S)
            await self.beat()

    async def beat(self) -> None:
        """Say this runner is alive (while it runs executions), and fail what dead runners left; Redis
        away: next time."""
        with contextlib.suppress(GatewayError):
            if self._tasks:
                await self.store.mark_runner_alive(self.runner, RUNNER_TTL_S)
            await self.recover()

    async def recover(self) -> None:
        """Fail the executions whose runner is gone (a restart, a crash); never a live runner's."""
        running = await self.store.running_executions()
        alive = await self.store.live_runners(set(running.values()))
        for execution_id, runner in running.items():
            if runner == self.runner or runner in alive:
                continue
            rec = await self.store.get_execution(execution_id)
            if rec is None:
                await self.store.forget_running_execution(execution_id)  # its record is gone already
                continue
            await self._fail(rec, "the gateway restarted while the command ran")

    async def close(self) -> None:
        """Stop what runs here; each ends failed (the gateway stopped), and this runner is gone."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(GatewayError):
            await self.store.forget_runner(self.runner)
