"""bench/egress.py, tiny: it prints its figures, and leaves no namespace, veth or nftables table behind,
neither after a run nor when it is stopped in the middle (SIGTERM)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nftables"),
]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "egress.py"
NAMESPACES = ("bench-eg-client", "bench-eg-server")
VETHS = ("begh0", "begs0")
TABLE = "gateway_beg"


def leftovers() -> list[str]:
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=15).stdout

    found = [n for n in out("ip", "netns", "list").split() if n in NAMESPACES]
    links = out("ip", "-br", "link")
    found += [v for v in VETHS if f"{v}@" in links or f"{v} " in links]
    found += [TABLE] if f" {TABLE}\n" in out("nft", "list", "tables") + "\n" else []
    return found


@pytest.mark.timeout(120)
def test_a_tiny_run_prints_figures_and_cleans_up() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--size-mib", "8", "--seconds", "0.5", "--rounds", "1"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        if line.strip():
            rows.setdefault(line.split()[0], line.split()[1:])  # (the first table's rows)
    for path in ("direct", "proxy"):
        mib_s, conn_s, p50, p99 = (float(x) for x in rows[path][:4])
        assert mib_s > 0 and conn_s > 0 and 0 < p50 <= p99, done.stdout
    assert len(rows["proxy/direct"]) == 4, done.stdout
    assert "cidr allowed" in done.stdout  # the proxy path went through the proxy
    assert leftovers() == []


@pytest.mark.timeout(120)
def test_stopped_in_the_middle_it_still_cleans_up() -> None:
    with subprocess.Popen(
        [sys.executable, str(BENCH), "--size-mib", "100000", "--seconds", "30"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while len(leftovers()) < len(NAMESPACES) + len(VETHS) + 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1)  # a download under way
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "CancelledError" in err, err  # stopped by the signal, not by something else
    assert leftovers() == []
