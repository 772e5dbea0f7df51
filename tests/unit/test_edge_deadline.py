"""Deadlines that move without re-creating timers: they fire once, at the latest deadline set.

``Deadline`` only asks its loop for ``time()`` and ``call_at()``, so these tests drive it with a manual
clock: no sleeps, and the same answer on a loaded machine (a real-time version of the idle test once
failed in CI when a 0.1 s sleep overslept the 0.2 s limit).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import pytest

from gateway.edge.deadline import Deadline

# Every test here runs on each edge (the compiled one and the pure-Python one): tests/conftest.py.
pytestmark = pytest.mark.both_edges


class _Handle:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self._when = when
        self.callback = callback
        self.cancelled = False

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """The part of an event loop a Deadline uses, with time moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, _Handle]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle(when, callback)
        heapq.heappush(self._timers, (when, next(self._order), handle))
        return handle

    def advance_to(self, t: float) -> None:
        """Run every timer due by ``t`` in time order, as the loop would."""
        while self._timers and self._timers[0][0] <= t:
            when, _, handle = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not handle.cancelled:
                handle.callback()
        self.now = t

    @property
    def live_timers(self) -> int:
        return sum(not h.cancelled for _, _, h in self._timers)


def deadline_on(clock: ManualClock) -> tuple[Deadline, list[float]]:
    fired: list[float] = []
    return Deadline(clock, lambda: fired.append(clock.time())), fired  # type: ignore[arg-type]


def test_moving_a_deadline_later_delays_it_with_one_timer() -> None:
    clock = ManualClock()
    d, fired = deadline_on(clock)
    d.start(0.05)
    d.start(0.3)
    assert clock.live_timers == 1  # moved, not re-created
    clock.advance_to(0.29)
    assert fired == []
    clock.advance_to(1)
    assert fired == [0.3]


def test_moving_a_deadline_earlier_is_exact() -> None:
    clock = ManualClock()
    d, fired = deadline_on(clock)
    d.start(10)
    d.start(0.05)
    clock.advance_to(20)
    assert fired == [0.05]


def test_a_stopped_deadline_never_fires_and_can_start_again() -> None:
    clock = ManualClock()
    d, fired = deadline_on(clock)
    d.start(0.05)
    d.stop()
    assert not d.armed
    clock.advance_to(0.1)  # past the first deadline: it must not fire
    assert fired == []
    d.start(0.05)
    assert d.armed
    clock.advance_to(1)
    assert fired == [pytest.approx(0.15)]


def test_an_idle_deadline_counts_from_the_last_touch() -> None:
    clock = ManualClock()
    d, fired = deadline_on(clock)
    d.start_idle(0.2)
    for t in (0.1, 0.2, 0.3):  # activity every 0.1 s keeps it from expiring
        clock.advance_to(t)
        d.touch()
    clock.advance_to(0.49)
    assert fired == []
    clock.advance_to(1)
    assert fired == [0.5]  # last touch at 0.3 s + 0.2 s of silence


def test_a_zero_timeout_never_fires() -> None:
    clock = ManualClock()
    d, fired = deadline_on(clock)
    d.start(0)
    d.start_idle(0)
    clock.advance_to(100)
    assert fired == [] and not d.armed
