"""An edge's report of what it has open per VM (gateway/edge/server.report_open): how long it holds, and
when it is sent."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

from gateway.edge.server import OPEN_REPORT_FLUSHES, OPEN_REPORT_MIN_S, report_open


class RecordingSink:
    def __init__(self) -> None:
        self.reports: list[tuple[str, dict[str, tuple[int, int]], float]] = []

    async def report_open(
        self, edge_id: str, open_counts: Mapping[str, tuple[int, int]], ttl_s: float
    ) -> None:
        self.reports.append((edge_id, dict(open_counts), ttl_s))


async def test_a_report_outlives_a_late_flush_and_is_sent_while_anything_is_open() -> None:
    edge = SimpleNamespace(instance_id="edge-1", open_reported=False)
    sink = RecordingSink()
    # A short flush interval: the report must not lapse because one flush came late (a busy loop).
    await report_open(edge, sink, {"vm-a": (2, 1)}, 0.1)  # type: ignore[arg-type]
    assert sink.reports == [("edge-1", {"vm-a": (2, 1)}, OPEN_REPORT_MIN_S)]
    await report_open(edge, sink, {}, 0.1)  # type: ignore[arg-type]  # once more: nothing open now
    await report_open(edge, sink, {}, 0.1)  # type: ignore[arg-type]  # and then not again
    assert [counts for _, counts, _ in sink.reports] == [{"vm-a": (2, 1)}, {}]
    await report_open(edge, sink, {"vm-b": (1, 0)}, 60.0)  # type: ignore[arg-type]
    assert sink.reports[-1][2] == 60.0 * OPEN_REPORT_FLUSHES
