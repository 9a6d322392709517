"""The fan-out benchmark still runs end to end (a smoke check, not a speed check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parent / "benchmarks" / "fanout.py"


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
