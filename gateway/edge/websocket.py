"""WebSocket frame boundaries and frame policy in a byte tunnel (pure).

The tunnel never buffers or changes frames; it reads each frame's header as it passes (RFC 6455 section
5.2), which costs a few operations per frame, so that
- on shutdown it can put a close frame between two frames instead of in the middle of one;
- a frame that breaks the protocol is stopped before it reaches the other side, with the close code to
  end the connection with: 1002 for a protocol error (a client frame without a mask, which section 5.1
  says a server must close on, a masked server frame, reserved bits or opcodes, a fragmented or long
  control frame, a continuation out of place), 1009 for a frame or a message (the sum of its fragments,
  counted, never reassembled) over its limit.

It also tells data frames from control frames for the idle clock: ``data_seen`` is set when a data frame
(text, binary, continuation) or part of its payload passed, never for ping, pong or close.
"""

from __future__ import annotations

import os
import struct
from typing import Final

MAX_HEADER_BYTES: Final = 14  # 2 + 8 (extended length) + 4 (mask)
OPCODE_CONTINUATION: Final = 0x0
OPCODE_TEXT: Final = 0x1
OPCODE_BINARY: Final = 0x2
OPCODE_CLOSE: Final = 0x8
OPCODE_PONG: Final = 0xA  # control opcodes: close, ping (0x9), pong
MAX_CONTROL_PAYLOAD: Final = 125
PROTOCOL_ERROR: Final = 1002
MESSAGE_TOO_BIG: Final = 1009


class FrameTracker:
    """Follows frame boundaries in one direction of a WebSocket connection, and checks each header."""

    __slots__ = (
        "_data_frame", "_header", "_in_message", "_message_bytes", "_need", "closed", "cut_mid_frame",
        "data_seen", "extensions", "masked", "max_frame", "max_message", "violation",
    )  # fmt: skip

    def __init__(
        self, *, masked: bool | None = None, max_frame: int = 0, max_message: int = 0, extensions: bool = True
    ) -> None:
        """``masked``: frames this way must (True: from a client) or must not (False: from a server) be
        masked; None: not checked. Limits of 0: none. ``extensions``: an extension was negotiated, so
        the reserved bits may be used (permessage-deflate sets RSV1)."""
        self.masked = masked
        self.max_frame = max_frame
        self.max_message = max_message
        self.extensions = extensions
        self._need = 0  # payload bytes left in the current frame
        self._header = b""  # a frame header split across reads
        self._in_message = False  # a fragmented data message is open (its final frame is to come)
        self._message_bytes = 0
        self.closed = False  # the edge sent its own close frame this way: nothing more is forwarded
        # (close code, reason) of the first frame that broke the policy; feed() stops before it.
        self.violation: tuple[int, bytes] | None = None
        self.cut_mid_frame = False
        self._data_frame = False  # the frame whose payload is passing is a data frame
        # A data frame's header or payload passed since the owner last cleared this (client activity).
        self.data_seen = False

    @property
    def at_boundary(self) -> bool:
        return self._need == 0 and not self._header

    def feed(self, data: bytes, stop_at_boundary: bool = False) -> int:
        """Follow ``data``; returns how many of its bytes were followed.

        With ``stop_at_boundary``, stops at the first frame boundary (at once if already at one), so
        the caller can forward ``data[:n]`` and then insert a frame. A frame header that breaks the
        policy sets ``violation`` and stops before that frame (the caller forwards ``data[:n]`` at most).
        """
        pos, end = 0, len(data)
        if self.violation is not None or (stop_at_boundary and self.at_boundary):
            return 0
        while pos < end:
            if self._need:
                take = min(self._need, end - pos)
                if self._data_frame:
                    self.data_seen = True
                self._need -= take
                pos += take
                if stop_at_boundary and not self._need:
                    return pos
                continue
            # The header is read where it lies: in data (no copy), or, split across reads, in what the
            # earlier reads left plus this one's start.
            held = self._header
            if held:
                header, at = held + data[pos : pos + MAX_HEADER_BYTES], 0
            else:
                header, at = data, pos
            available = len(header) - at
            if available < 2:
                self._header = header[at:]
                return end
            second = header[at + 1]
            length = second & 0x7F
            size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if second & 0x80 else 0)
            if available < size:
                self._header = header[at:]  # everything left in data is part of this header
                return end
            if length == 126:
                length = (header[at + 2] << 8) | header[at + 3]
            elif length == 127:
                length = int.from_bytes(header[at + 2 : at + 10], "big")
            first = header[at]
            violation = self._check(first, second & 0x80, length)
            if violation is not None:
                self.violation = violation
                # Earlier reads' part of this header was forwarded with them: then the other side
                # holds the start of a frame, and no close frame can follow it cleanly.
                self.cut_mid_frame = bool(self._header)
                return pos
            pos += size - len(held)
            self._header = b""
            self._need = length
            # Opcodes 0x0-0x7 are data (the reserved ones were refused above), 0x8-0xF control.
            self._data_frame = not first & 0x08
            if self._data_frame:
                self.data_seen = True
            if stop_at_boundary and not length:
                return pos
        return pos

    def _check(self, first: int, mask_bit: int, length: int) -> tuple[int, bytes] | None:
        opcode = first & 0x0F
        final = first & 0x80
        if self.masked is not None and bool(mask_bit) != self.masked:
            return PROTOCOL_ERROR, b"client frames are masked, server frames not (RFC 6455 5.1)"
        if first & 0x70 and not self.extensions:
            return PROTOCOL_ERROR, b"reserved bits set without an extension"
        if length >> 63:
            return PROTOCOL_ERROR, b"frame length out of range"
        if OPCODE_CLOSE <= opcode <= OPCODE_PONG:  # close, ping, pong
            if not final or length > MAX_CONTROL_PAYLOAD:
                return PROTOCOL_ERROR, b"control frames are final and at most 125 bytes"
            return None
        if opcode == OPCODE_CONTINUATION:
            if not self._in_message:
                return PROTOCOL_ERROR, b"continuation frame without a message"
        elif opcode == OPCODE_TEXT or opcode == OPCODE_BINARY:
            if self._in_message:
                return PROTOCOL_ERROR, b"new message inside a fragmented one"
            self._message_bytes = 0
        else:
            return PROTOCOL_ERROR, b"reserved opcode"
        if self.max_frame and length > self.max_frame:
            return MESSAGE_TOO_BIG, b"frame too big"
        self._message_bytes += length
        if self.max_message and self._message_bytes > self.max_message:
            return MESSAGE_TOO_BIG, b"message too big"
        self._in_message = not final
        return None


def close_frame(code: int, reason: bytes, *, masked: bool) -> bytes:
    """A final close frame; clients must mask what they send, servers must not (RFC 6455 5.1)."""
    payload = struct.pack("!H", code) + reason[:123]
    if not masked:
        return bytes((0x80 | OPCODE_CLOSE, len(payload))) + payload
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | OPCODE_CLOSE, 0x80 | len(payload))) + mask + body
