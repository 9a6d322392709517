"""The benchmarks still run end to end (smoke checks, not speed checks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_support import needs_redis

BENCHMARK = Path(__file__).parent / "benchmarks" / "fanout.py"
SCALEOUT = Path(__file__).parent / "benchmarks" / "scaleout.py"


@pytest.mark.timeout(240)
def test_fanout_benchmark_smoke_run_prints_its_report() -> None:
    """`fanout.py --smoke` (N=50, one round) measures all three servers and prints the
    table, the stall comparison and every goal line; whether goals pass is not checked."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--smoke"],
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout
    for kind in ("baseline", "ours", "floor"):
        assert f"    50 {kind}" in report, report
    assert "ratios" in report
    assert "one stuck client among the others" in report
    goals = [line for line in report.splitlines() if line.startswith(("  pass", "  short"))]
    assert len(goals) >= 5, report
    assert "Traceback" not in result.stderr


@needs_redis
@pytest.mark.timeout(120)
def test_scaleout_benchmark_smoke_run_prints_its_report() -> None:
    """`scaleout.py --smoke` (N=50, one round, its own redis-server) measures one process
    against two edges and the extra hop, and prints both tables; the figures are not
    checked."""
    result = subprocess.run(
        [sys.executable, str(SCALEOUT), "--smoke"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout
    for setup in ("one process", "two edges"):
        assert f"    50  {setup}" in report, report
    assert "two edges / one process" in report, report
    assert "edge client receive - producer client receive, same update" in report, report
    assert "Redis pub/sub, one message, loopback" in report, report
    assert "Traceback" not in result.stderr
