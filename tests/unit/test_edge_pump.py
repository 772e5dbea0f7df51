"""The body pump's buffers: they grow with a sender that fills them, are let go after a trickle, start
small again when the other side is behind, are never written over while held, and never reach past
the body. (Driven through the edge's own protocols over real transports in test_edge_protocol.py and
tests/integration/test_edge.py.)"""

from __future__ import annotations

import pytest

from gateway.edge.pump import PUMP_FIRST_BUFFER, PUMP_MAX_BUFFER, PUMP_SHORT_READ, BodyPump

# Every test here runs on each edge (the compiled one and the pure-Python one): tests/conftest.py.
pytestmark = pytest.mark.both_edges


class Owner:
    """What the pump's owner sees: the views it was given (copied at once), and whether it holds the
    last one (as a transport with a non-empty write buffer would)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.holds = False
        self.done = False

    def pumped(self, data: memoryview) -> None:
        self.received += data

    def pump_holds(self) -> bool:
        return self.holds

    def pump_done(self) -> None:
        self.done = True

    def connection_lost(self, exc: Exception | None) -> None: ...

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


def read(pump: BodyPump, nbytes: int, fill: int) -> memoryview:
    """One read of ``nbytes`` (at most the buffer offered) as the event loop does it."""
    buffer = pump.get_buffer(-1)
    nbytes = min(nbytes, len(buffer))
    buffer[:nbytes] = bytes([fill]) * nbytes
    pump.buffer_updated(nbytes)
    return buffer


def test_a_sender_that_fills_the_buffer_gets_a_bigger_one_up_to_the_largest() -> None:
    pump = BodyPump(Owner(), 100 * PUMP_MAX_BUFFER)
    sizes = [len(read(pump, PUMP_MAX_BUFFER, 1)) for _ in range(8)]
    expected, size = [], PUMP_FIRST_BUFFER
    for _ in range(8):
        expected.append(size)
        size = min(size * 2, PUMP_MAX_BUFFER)
    assert sizes == expected and sizes[-1] == PUMP_MAX_BUFFER
    again = read(pump, PUMP_MAX_BUFFER, 2)
    assert again.obj is read(pump, PUMP_MAX_BUFFER // 2, 3).obj  # the largest is kept and reused


def test_a_buffer_read_partly_is_reused_and_a_trickle_lets_it_go() -> None:
    pump = BodyPump(Owner(), 100 * PUMP_MAX_BUFFER)
    first = read(pump, PUMP_SHORT_READ, 1)
    assert read(pump, PUMP_SHORT_READ, 2).obj is first.obj  # not full, not short: kept
    read(pump, PUMP_SHORT_READ - 1, 3)
    assert pump.view is None  # between trickled reads the pump holds no buffer
    assert len(read(pump, 10, 4)) == PUMP_FIRST_BUFFER


def test_a_buffer_the_other_side_holds_is_never_reused_and_the_next_one_is_small() -> None:
    owner = Owner()
    pump = BodyPump(owner, 100 * PUMP_MAX_BUFFER)
    for _ in range(6):
        read(pump, PUMP_MAX_BUFFER, 1)
    held = read(pump, PUMP_MAX_BUFFER - 1, 2)
    assert len(held) == PUMP_MAX_BUFFER
    owner.holds = True
    after = read(pump, PUMP_MAX_BUFFER, 3)
    assert after.obj is not held.obj and len(after) == PUMP_FIRST_BUFFER
    assert bytes(held[: PUMP_MAX_BUFFER - 1]) == bytes([2]) * (PUMP_MAX_BUFFER - 1)  # not written over


def test_the_buffers_never_reach_past_the_body_and_the_owner_gets_every_byte_once() -> None:
    owner = Owner()
    body = 3 * PUMP_MAX_BUFFER + 12_345
    pump = BodyPump(owner, body)
    fills, left = [], body
    while left:
        buffer = pump.get_buffer(-1)
        assert 0 < len(buffer) <= left
        n = len(buffer) if len(fills) % 3 else len(buffer) // 2 + 1
        buffer[:n] = bytes([len(fills) % 251]) * n
        pump.buffer_updated(n)
        fills.append(n)
        left -= n
        assert owner.done is (left == 0)
    assert owner.received == b"".join(bytes([i % 251]) * n for i, n in enumerate(fills))
