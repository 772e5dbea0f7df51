"""WebSocket frame boundaries in a byte tunnel: found exactly, however the bytes are split."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.edge.websocket import FrameTracker, close_frame

# Every test here runs on each edge (the compiled one and the pure-Python one): tests/conftest.py.
pytestmark = pytest.mark.both_edges


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


def header(first: int, size: int, *, masked: bool) -> bytes:
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = bytes((first, mask_bit | size))
    elif size < 65536:
        head = bytes((first, mask_bit | 126)) + struct.pack("!H", size)
    else:
        head = bytes((first, mask_bit | 127)) + struct.pack("!Q", size)
    return head + (b"\x01\x02\x03\x04" if masked else b"")


@pytest.mark.parametrize(
    ("stream", "from_client", "extensions", "violation"),
    [
        ([header(0x82, 5, masked=True)], True, False, None),
        ([header(0x82, 5, masked=False)], True, False, 1002),  # RFC 6455 5.1: the server must close
        ([header(0x82, 5, masked=True)], False, False, 1002),  # a masked server frame
        ([header(0x82, 5, masked=False)], False, False, None),
        ([header(0xC1, 5, masked=True)], True, False, 1002),  # RSV1 without an extension
        ([header(0xC1, 5, masked=True)], True, True, None),  # permessage-deflate sets RSV1
        ([header(0x89, 125, masked=True)], True, False, None),
        ([header(0x89, 126, masked=True)], True, False, 1002),
        ([header(0x09, 1, masked=True)], True, False, 1002),  # a fragmented ping
        ([header(0x80, 1, masked=True)], True, False, 1002),  # continuation of nothing
        ([header(0x83, 1, masked=True)], True, False, 1002),  # reserved opcode
        ([header(0x8B, 1, masked=True)], True, False, 1002),  # reserved control opcode
        ([header(0x01, 1, masked=True), header(0x81, 1, masked=True)], True, False, 1002),  # nested
        ([header(0x01, 1, masked=True), header(0x89, 0, masked=True), header(0x80, 1, masked=True)],
         True, False, None),  # a ping between fragments is allowed
        ([header(0x82, 1001, masked=True)], True, False, 1009),  # over max_frame (1000)
        ([header(0x02, 1000, masked=True), header(0x00, 1000, masked=True), header(0x80, 1001, masked=True)],
         True, False, 1009),  # 3001 bytes over max_message (3000), never held
    ],
)  # fmt: skip
def test_the_frame_policy(
    stream: list[bytes], from_client: bool, extensions: bool, violation: int | None
) -> None:
    tracker = FrameTracker(masked=from_client, max_frame=1000, max_message=3000, extensions=extensions)
    fed = 0
    for head in stream:
        size = head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", head[2:4])[0]
        elif size == 127:
            size = struct.unpack("!Q", head[2:10])[0]
        data = head + b"p" * size
        fed = tracker.feed(data)
        if tracker.violation is not None:
            break
    if violation is None:
        assert tracker.violation is None and tracker.at_boundary
    else:
        assert tracker.violation is not None and tracker.violation[0] == violation
        assert fed == 0  # stopped before the offending frame: none of it is forwarded


def test_a_violation_inside_a_read_cuts_after_the_good_frames() -> None:
    tracker = FrameTracker(masked=True)
    good = header(0x82, 3, masked=True) + b"abc"
    bad = header(0x82, 3, masked=False) + b"xyz"
    assert tracker.feed(good + bad) == len(good)
    assert tracker.violation is not None and not tracker.cut_mid_frame


# What the client sent -> whether it counts as the VM's activity (the idle clock): data frames do, control
# frames (ping, pong, close) never, however the bytes are split.
ACTIVITY_CASES = [
    ("a text frame", frame(b"hello", masked=True, opcode=0x1), True),
    ("a binary frame", frame(b"\x00" * 300, masked=True, opcode=0x2), True),
    ("an empty data frame", frame(b"", masked=True, opcode=0x1), True),
    ("a ping", frame(b"are you there", masked=True, opcode=0x9), False),
    ("a pong", frame(b"", masked=True, opcode=0xA), False),
    ("a close", frame(struct.pack("!H", 1000), masked=True, opcode=0x8), False),
    ("pings and pongs", frame(b"1", masked=True, opcode=0x9) + frame(b"1", masked=True, opcode=0xA), False),
    ("a ping, then data", frame(b"p", masked=True, opcode=0x9) + frame(b"d", masked=True, opcode=0x1), True),
]


@pytest.mark.parametrize(("case", "stream", "counts"), ACTIVITY_CASES, ids=[c[0] for c in ACTIVITY_CASES])
def test_only_data_frames_count_as_activity(case: str, stream: bytes, counts: bool) -> None:
    for split in range(len(stream) + 1):
        tracker = FrameTracker(masked=True)
        tracker.feed(stream[:split])
        tracker.feed(stream[split:])
        assert tracker.data_seen is counts, (case, split)


def test_a_big_data_frames_later_payload_counts_again_after_it_was_cleared() -> None:
    stream = frame(b"x" * 1000, masked=True, opcode=0x2)
    tracker = FrameTracker(masked=True)
    tracker.feed(stream[:20])
    assert tracker.data_seen
    tracker.data_seen = False  # (the tunnel clears it once it noted the activity)
    tracker.feed(stream[20:])
    assert tracker.data_seen  # more of the message: the client is still sending
    tracker.data_seen = False
    ping = frame(b"heartbeat", masked=True, opcode=0x9)
    tracker.feed(ping[:3])
    tracker.feed(ping[3:])
    assert not tracker.data_seen  # pings after it are not
