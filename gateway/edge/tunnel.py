"""An upgraded connection (a WebSocket, or any protocol after a ``101``): both directions and their flow
control, owned by one object.

Bytes pass unchanged. For a WebSocket each direction's frame headers are followed and checked as they
pass (``websocket.FrameTracker``): a frame that breaks the protocol or a size limit is stopped and both
peers get a close frame with its code; on shutdown a close frame (1001) is put between two frames.
What the client sends is its VM's activity (the idle clock): WebSocket data frames only (pings and
pongs keep no VM up), or any bytes of another protocol; nothing the VM sends counts.
Flow control is mutual: the VM's side not taking more pauses reading from the client, and the client's
side not taking more pauses reading from the VM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .exchange import Exchange
from .observe import ACTIVITY_TUNNEL, ACTIVITY_WEBSOCKET
from .upstream import UpstreamConnection
from .websocket import MESSAGE_TOO_BIG, FrameTracker, close_frame

if TYPE_CHECKING:
    # The client connection a tunnel belongs to. A type-only import: the compiled edge calls it
    # directly (a typing.Protocol here made every call and attribute read a generic Python one).
    from .protocol import EdgeProtocol

GOING_AWAY: Final = 1001
SHUTTING_DOWN: Final = b"gateway shutting down"


class Tunnel:
    __slots__ = ("conn", "exchange", "frames", "owner")

    def __init__(
        self,
        owner: EdgeProtocol,
        exchange: Exchange,
        conn: UpstreamConnection,
        *,
        websocket: bool,
        extensions: bool,
        max_frame: int,
        max_message: int,
    ) -> None:
        """``websocket``: frames are followed and checked; ``extensions``: the VM accepted one (its
        reserved bits may be used); limits of 0: none. The client's activity is noted on the
        exchange's VM (``Exchange.vm_use``)."""
        self.owner = owner
        self.exchange = exchange
        self.conn = conn
        # (from the client, to the VM; from the VM, to the client)
        self.frames: tuple[FrameTracker, FrameTracker] | None = None
        if websocket:
            self.frames = (
                FrameTracker(
                    masked=True, max_frame=max_frame, max_message=max_message, extensions=extensions
                ),
                FrameTracker(
                    masked=False, max_frame=max_frame, max_message=max_message, extensions=extensions
                ),
            )
        conn.tunnel = self

    # bytes ----------------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        conn = self.conn
        frames = self.frames
        if frames is not None and not self._follow(0, data, conn.write):
            return
        exchange = self.exchange
        exchange.sent_bytes += len(data)
        use = exchange.vm_use
        if use is not None:
            if frames is None:
                use.active = ACTIVITY_TUNNEL
            else:
                to_vm = frames[0]
                if to_vm.data_seen:
                    to_vm.data_seen = False
                    use.active = ACTIVITY_WEBSOCKET
        conn.write(data)
        self.owner.activity()
        if not conn.can_write:
            self.owner.pause_reading()  # resumed by the VM's side draining (upstream_writable)

    def from_vm(self, data: bytes) -> None:
        transport = self.owner.transport
        if transport is None:
            return
        if self.frames is not None and not self._follow(1, data, transport.write):
            return
        self.exchange.bytes_out += len(data)
        transport.write(data)  # a full client buffer pauses the VM's side (client_paused)
        self.owner.activity()

    def client_paused(self) -> None:
        self.conn.pause_reading()

    def client_resumed(self) -> None:
        self.conn.resume_reading()

    # ending ---------------------------------------------------------------------------------------

    def shut_down(self) -> None:
        """The gateway is stopping: a WebSocket gets a close frame (1001, going away) each way at the next
        frame boundary, then the peers close; any other tunnel is closed at once."""
        transport = self.owner.transport
        if transport is None:
            return
        if self.frames is None:
            transport.close()
            return
        for frames, to_vm in zip(self.frames, (True, False), strict=True):
            if frames.at_boundary and not frames.closed:
                self._send_close(frames, to_vm=to_vm)

    def close(self) -> None:
        """The client side is gone: so is the VM's."""
        self.conn.close()

    def _follow(self, direction: int, data: bytes, write: Callable[[bytes], None]) -> bool:
        """WebSocket bookkeeping for one direction (0: to the VM, 1: to the client). False when the
        caller must not forward ``data``: after the edge's close frame, after a frame that broke the
        policy, or because it was forwarded up to a frame boundary here and a close frame put after it
        (draining)."""
        assert self.frames is not None
        frames = self.frames[direction]
        if frames.closed:
            return False
        draining = self.owner.draining
        cut = frames.feed(data, stop_at_boundary=draining)
        if frames.violation is not None:
            write(data[:cut])  # the frames before the offending one
            self._end_websocket(*frames.violation)
            return False
        if draining and frames.at_boundary:
            write(data[:cut])
            self._send_close(frames, to_vm=direction == 0)
            return False
        return True

    def _end_websocket(self, code: int, reason: bytes) -> None:
        """A frame broke the protocol or a size limit: it goes nowhere, both peers get a close frame with
        the code (where their side is at a frame boundary), and both connections close. The client's
        side closes gracefully: it may be in the middle of sending a big frame."""
        assert self.frames is not None
        for frames, to_vm in zip(self.frames, (True, False), strict=True):
            if not frames.closed and frames.at_boundary and not frames.cut_mid_frame:
                self._send_close(frames, to_vm=to_vm, code=code, reason=reason)
            frames.closed = True
        # For the access log: why the edge ended this tunnel.
        self.exchange.code = "websocket_too_big" if code == MESSAGE_TOO_BIG else "websocket_protocol_error"
        self.conn.close()
        self.owner.close_after_answer()

    def _send_close(
        self,
        frames: FrameTracker,
        *,
        to_vm: bool,
        code: int = GOING_AWAY,
        reason: bytes = b"gateway shutting down",
    ) -> None:
        frames.closed = True
        frame = close_frame(code, reason, masked=to_vm)
        if to_vm:
            self.conn.write(frame)
        elif self.owner.transport is not None:
            self.owner.transport.write(frame)
