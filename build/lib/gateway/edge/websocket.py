"""WebSocket frame boundaries in a byte tunnel (pure), so the edge can end a tunnel cleanly.

The tunnel never parses or changes frames; it only follows their lengths (RFC 6455 section 5.2), which
costs a few operations per frame, so that on shutdown it can put a close frame between two frames
instead of in the middle of one.
"""

from __future__ import annotations

import os
import struct

MAX_HEADER_BYTES = 14  # 2 + 8 (extended length) + 4 (mask)
OPCODE_CLOSE = 0x8


class FrameTracker:
    """Follows frame boundaries in one direction of a WebSocket connection."""

    __slots__ = ("_header", "_need", "closed")

    def __init__(self) -> None:
        self._need = 0  # payload bytes left in the current frame
        self._header = b""  # a frame header split across reads
        self.closed = False  # the edge sent its own close frame this way: nothing more is forwarded

    @property
    def at_boundary(self) -> bool:
        return self._need == 0 and not self._header

    def feed(self, data: bytes, stop_at_boundary: bool = False) -> int:
        """Follow ``data``; returns how many of its bytes were followed.

        With ``stop_at_boundary``, stops at the first frame boundary (at once if already at one), so
        the caller can forward ``data[:n]`` and then insert a frame.
        """
        pos, end = 0, len(data)
        if stop_at_boundary and self.at_boundary:
            return 0
        while pos < end:
            if self._need:
                take = min(self._need, end - pos)
                self._need -= take
                pos += take
                if stop_at_boundary and not self._need:
                    return pos
                continue
            header = self._header + data[pos : pos + MAX_HEADER_BYTES]
            if len(header) < 2:
                self._header = header
                return end
            length = header[1] & 0x7F
            size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if header[1] & 0x80 else 0)
            if len(header) < size:
                self._header = header  # everything left in data is part of this header
                return end
            if length == 126:
                length = int.from_bytes(header[2:4], "big")
            elif length == 127:
                length = int.from_bytes(header[2:10], "big")
            pos += size - len(self._header)
            self._header = b""
            self._need = length
            if stop_at_boundary and not length:
                return pos
        return pos


def close_frame(code: int, reason: bytes, *, masked: bool) -> bytes:
    """A final close frame; clients must mask what they send, servers must not (RFC 6455 5.1)."""
    payload = struct.pack("!H", code) + reason[:123]
    if not masked:
        return bytes((0x80 | OPCODE_CLOSE, len(payload))) + payload
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | OPCODE_CLOSE, 0x80 | len(payload))) + mask + body
