"""Background loops (the reaper, the route-event and certificate followers): one way to stop them."""

from __future__ import annotations

import asyncio

STOP_TIMEOUT_S = 2.0


async def stop_loop(task: asyncio.Task[None] | None, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Cancel a background loop and wait for it to end, at most ``timeout_s``.

    The caller sets its loop's stopping flag first: redis-py's ``get_message`` can swallow a
    cancellation (it returns None), so a loop that waits on Redis ends by its flag as well.
    """
    if task is not None:
        task.cancel()
        await asyncio.wait([task], timeout=timeout_s)
