"""WebSocket frame boundaries in a byte tunnel: found exactly, however the bytes are split."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given
from hypothesis import strategies as st

from gateway.edge.websocket import FrameTracker, close_frame


def frame(payload: bytes, *, masked: bool, opcode: int = 0x2) -> bytes:
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head = bytes((0x80 | opcode, mask_bit | length))
    elif length < 65536:
        head = bytes((0x80 | opcode, mask_bit | 126)) + struct.pack("!H", length)
    else:
        head = bytes((0x80 | opcode, mask_bit | 127)) + struct.pack("!Q", length)
    return head + (b"\x01\x02\x03\x04" if masked else b"") + payload


payloads = st.lists(st.sampled_from([0, 1, 125, 126, 127, 300, 65535, 65536, 70000]), min_size=1, max_size=6)


@given(sizes=payloads, masked=st.booleans(), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_boundaries_are_found_wherever_the_stream_is_split(
    sizes: list[int], masked: bool, cuts: list[int]
) -> None:
    frames = [frame(b"p" * size, masked=masked) for size in sizes]
    stream = b"".join(frames)
    ends = set()
    position = 0
    for f in frames:
        position += len(f)
        ends.add(position)
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    tracker = FrameTracker()
    offset = 0
    for start, end in itertools.pairwise(points):
        piece = stream[start:end]
        while piece:
            # Stopping at each boundary finds exactly the frame ends, in order.
            consumed = tracker.feed(piece, stop_at_boundary=True)
            if consumed == 0:
                consumed = tracker.feed(piece[:1])  # at a boundary already: step past it
            offset += consumed
            piece = piece[consumed:]
            if tracker.at_boundary:
                assert offset in ends or offset == 0
            else:
                assert offset not in ends
    assert tracker.at_boundary and offset == len(stream)


def test_a_header_split_byte_by_byte_is_followed() -> None:
    data = frame(b"x" * 70000, masked=True) + frame(b"", masked=True)
    tracker = FrameTracker()
    for i in range(14):
        assert tracker.feed(data[i : i + 1]) == 1
        assert not tracker.at_boundary
    assert tracker.feed(data[14 : 14 + 70000], stop_at_boundary=True) == 70000
    assert tracker.at_boundary


def test_close_frames_follow_rfc_6455() -> None:
    plain = close_frame(1001, b"bye", masked=False)
    assert plain == b"\x88\x05" + struct.pack("!H", 1001) + b"bye"
    masked = close_frame(1001, b"bye", masked=True)
    assert masked[0] == 0x88 and masked[1] == 0x80 | 5
    mask, body = masked[2:6], masked[6:]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(body)) == struct.pack("!H", 1001) + b"bye"
    tracker = FrameTracker()
    assert tracker.feed(masked + plain) == len(masked + plain) and tracker.at_boundary
