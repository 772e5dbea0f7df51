"""bench/edge_hot_path.py, tiny, on each edge: it drives the edge's own classes, so a change of their
signatures breaks it; this keeps it running (it prints its figure and checks the hot path was taken)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "edge_hot_path.py"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("implementation", ["compiled", "pure"])
@pytest.mark.parametrize("access_log", ["text", "json", "off"])
def test_a_tiny_run_prints_its_figure_on_the_hot_path(implementation: str, access_log: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--requests", "300", "--rounds", "1", "--edge", implementation,
         "--access-log", access_log],
        capture_output=True, text=True, timeout=50, cwd=BENCH.parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(
        rf"\d+\.\d+ us per request .*access log {access_log}, {implementation} edge", done.stdout
    )
    assert "cached routes 100%, pooled connections 100%" in done.stdout, done.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("implementation", ["compiled", "pure"])
def test_a_tiny_websocket_run_prints_its_figure(implementation: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--requests", "300", "--rounds", "1", "--edge", implementation,
         "--websocket"],
        capture_output=True, text=True, timeout=50, cwd=BENCH.parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    figure = rf"\d+\.\d+ us per WebSocket round trip .*{implementation} edge"
    assert re.search(figure, done.stdout), done.stdout
