"""The benchmarks still run end to end (smoke checks, not speed checks)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_support import needs_redis

BENCHMARK = Path(__file__).parent / "benchmarks" / "fanout.py"
SCALEOUT = Path(__file__).parent / "benchmarks" / "scaleout.py"
HANDSHAKES = Path(__file__).parent / "benchmarks" / "handshakes.py"


def _run(command: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a benchmark to its end; it must exit 0 (its stderr's end shown if not)."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.timeout(240)
def test_fanout_benchmark_smoke_run_prints_its_report() -> None:
    """`fanout.py --smoke` (N=50, one round) measures the three Python servers, and the
    Node.js `ws` peer where node and npm are installed (its packages installed on demand
    into a cache folder, about a minute the first time), and prints the table, the ratios,
    the stall comparison and every goal line; whether goals pass is not checked. Without
    Node.js the peer is skipped with one line and the rest runs as before."""
    result = _run([sys.executable, str(BENCHMARK), "--smoke"], timeout=230)
    report = result.stdout
    for kind in ("baseline", "ours", "floor"):
        assert f"    50 {kind}" in report, report
    assert "ratios" in report
    assert "one stuck client among the others" in report
    goals = [line for line in report.splitlines() if line.startswith(("  pass", "  short"))]
    assert len(goals) >= 5, report
    assert "Traceback" not in result.stderr
    if shutil.which("node") is None or shutil.which("npm") is None:
        assert "node peer skipped: " in report, report
        assert "    50 node" not in report, report
    elif "node peer skipped: " not in report:  # an install that failed says why, and skips
        assert "    50 node" in report, report
        assert "ours/node CPU/tick" in report, report
        # The peer sends the same update as ours: same shape, size within 1 %.
        same = re.search(r"node \d+ B \((-?[\d.]+) %, same shape\)", report)
        assert same is not None, report
        assert abs(float(same.group(1))) <= 1.0, report


@pytest.mark.timeout(120)
def test_handshake_benchmark_smoke_run_compares_two_trees(tmp_path: Path) -> None:
    """`handshakes.py` with this checkout named as a second tree measures both and the
    floor (50 clients, one round), and prints each against the first; the figures are
    not checked."""
    root = Path(__file__).resolve().parents[1]
    result = _run(
        [
            sys.executable,
            str(HANDSHAKES),
            f"--servers=ours,tree={root},floor",
            "--clients=50",
            "--rounds=1",
        ],
        timeout=110,
    )
    report = result.stdout
    assert "handshakes alone: 50 clients" in report, report
    for name in ("ours", "tree", "floor"):
        assert re.search(rf"^  {name} +[\d.]+ µs per handshake", report, re.MULTILINE), report
    assert "(against ours)" in report, report
    assert "Traceback" not in result.stderr


@needs_redis
@pytest.mark.timeout(120)
def test_scaleout_benchmark_smoke_run_prints_its_report() -> None:
    """`scaleout.py --smoke` (N=50, one round, its own redis-server) measures one process
    against two edges and the extra hop, and prints both tables; the figures are not
    checked."""
    result = _run([sys.executable, str(SCALEOUT), "--smoke"], timeout=110)
    report = result.stdout
    for setup in ("one process", "two edges"):
        assert f"    50  {setup}" in report, report
    assert "two edges / one process" in report, report
    assert "edge client receive - producer client receive, same update" in report, report
    assert "Redis pub/sub, one message, loopback" in report, report
    assert "Traceback" not in result.stderr
