"""The event loop tests run on: uvloop (what ``gateway serve`` runs), closed so that a leak fails a test
instead of hanging the run.

Why a subclass: uvloop's ``Loop.close()`` walks the handles still open, warns (ResourceWarning) about each
and then closes it, and then runs the loop until every handle is closed. Under ``filterwarnings =
error`` the warning raises inside that walk (a C callback, so the exception is only printed as
unraisable) before the handle is closed; the loop then waits in epoll_pwait, with no timeout, for a
handle nobody will ever close, and nothing (pytest-timeout's SIGALRM included) gets the main thread out
of it (issue 17.8: the run stopped for 20 minutes in pytest-asyncio's runner teardown). Here the
warnings of the walk are only recorded, so uvloop closes every handle, and once the loop is closed they
are raised as one ResourceWarning naming each handle, which fails the test that leaked them.
"""

from __future__ import annotations

import sys
import warnings

import uvloop


class ClosingLoop(uvloop.Loop):  # type: ignore[misc]
    def close(self) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            super().close()
        leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        # dnspython's asyncio backend can lose a UDP query's transport when the query is cancelled while
        # its endpoint is being made (a race inside the library, seen in the DNS-01 propagation checks a
        # stopping gateway cancels): closed here like the rest and reported, but not failed on.
        tolerated = [leak for leak in leaks if "UDPTransport" in leak]
        for leak in tolerated:
            print(f"event loop: closed a leaked UDP transport (dnspython): {leak}", file=sys.stderr)
        left_open = [leak for leak in leaks if leak not in tolerated]
        others = [w for w in caught if not issubclass(w.category, ResourceWarning)]
        for w in others:  # not ours to judge: as they would have been without the recording
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        if left_open:
            warnings.warn(
                f"the event loop was closed with {len(left_open)} handle(s) still open (a transport, "
                f"server or timer the test did not close): {'; '.join(left_open)}",
                ResourceWarning,
                stacklevel=2,
            )


def new_event_loop() -> uvloop.Loop:
    return ClosingLoop()
