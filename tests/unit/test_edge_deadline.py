"""Deadlines that move without re-creating timers: they fire once, at the latest deadline set.

The loop's clock is millisecond-grained, so times are compared with a few milliseconds of slack.
"""

from __future__ import annotations

import asyncio

from gateway.edge.deadline import Deadline


async def fired_at(setup) -> float:
    loop = asyncio.get_running_loop()
    fired = asyncio.Event()
    when: list[float] = []
    deadline = Deadline(loop, lambda: (when.append(loop.time()), fired.set()))
    start = loop.time()
    await setup(deadline)
    async with asyncio.timeout(5):
        await fired.wait()
    assert len(when) == 1
    return when[0] - start


async def test_moving_a_deadline_later_delays_it() -> None:
    async def setup(d: Deadline) -> None:
        d.start(0.05)
        d.start(0.3)

    assert await fired_at(setup) >= 0.25  # the later deadline, not the first one (0.05 s)


async def test_moving_a_deadline_earlier_is_exact() -> None:
    async def setup(d: Deadline) -> None:
        d.start(10)
        d.start(0.05)

    assert await fired_at(setup) < 5


async def test_a_stopped_deadline_never_fires_and_can_start_again() -> None:
    async def setup(d: Deadline) -> None:
        d.start(0.05)
        d.stop()
        assert not d.armed
        await asyncio.sleep(0.1)  # past the first deadline: it must not fire
        d.start(0.05)

    assert await fired_at(setup) >= 0.12  # 0.1 s pause + 0.05 s; the first one never fired


async def test_an_idle_deadline_counts_from_the_last_touch() -> None:
    async def setup(d: Deadline) -> None:
        d.start_idle(0.2)
        for _ in range(3):
            await asyncio.sleep(0.1)  # activity every 0.1 s keeps it from expiring
            d.touch()

    assert await fired_at(setup) >= 0.45  # last touch at 0.3 s + 0.2 s of silence
