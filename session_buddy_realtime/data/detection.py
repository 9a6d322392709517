"""Live anomaly detection: z-scores of a recent window against a baseline window.

Pure functions over per-skill window statistics, which ``queries.py`` aggregates in
SQL. Two signals are checked for every skill with enough data in both windows:

* completion rate (``drop``): the recent rate against the baseline rate (smoothed as
  (completed + 1) / (count + 2)), with the binomial standard error of a recent sample
  of that size;
* duration (``spike``): the recent mean duration of completed invocations against the
  baseline mean, with the standard error of the mean.

A finding always holds finite numbers: statistics that overflow (a sum of squares past
the largest float) or hold infinity or NaN give no finding for that signal, since such a
value has no JSON form and NaN passes no threshold test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["DetectionSettings", "Finding", "WindowStats", "detect"]


@dataclass(frozen=True, slots=True)
class DetectionSettings:
    """Windows and thresholds of live detection (seconds, counts, z-score)."""

    recent_window: float = 300.0
    baseline_window: float = 86_400.0
    z_threshold: float = 3.0
    min_recent: int = 8
    min_baseline: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.recent_window < self.baseline_window:
            raise ValueError("need 0 < recent_window < baseline_window")
        if self.z_threshold <= 0:
            raise ValueError("z_threshold must be positive")
        if self.min_recent < 2 or self.min_baseline < 2:
            raise ValueError("min_recent and min_baseline must be at least 2")


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Counts and sums of one skill's invocations in the recent and baseline windows."""

    skill_name: str
    recent_count: int
    recent_completed: int
    recent_timed: int
    recent_duration_sum: float
    baseline_count: int
    baseline_completed: int
    baseline_timed: int
    baseline_duration_sum: float
    baseline_duration_sumsq: float
    last_recent_at: float
    """Unix time of the newest invocation in the recent window."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One anomaly found by live detection."""

    skill_name: str
    anomaly_type: Literal["drop", "spike"]
    metric: Literal["completion_rate", "avg_duration_seconds"]
    baseline_value: float
    observed_value: float
    deviation_score: float
    last_evidence_at: float


def detect(stats: list[WindowStats], settings: DetectionSettings) -> list[Finding]:
    """Return the findings whose z-score reaches the threshold, most severe first."""
    findings: list[Finding] = []
    for skill in stats:
        drop = _completion_drop(skill, settings)
        if drop is not None:
            findings.append(drop)
        spike = _duration_spike(skill, settings)
        if spike is not None:
            findings.append(spike)
    findings.sort(key=lambda f: (-f.deviation_score, f.skill_name, f.anomaly_type))
    return findings


def _completion_drop(skill: WindowStats, settings: DetectionSettings) -> Finding | None:
    if skill.recent_count < settings.min_recent or skill.baseline_count < settings.min_baseline:
        return None
    baseline = skill.baseline_completed / skill.baseline_count
    observed = skill.recent_completed / skill.recent_count
    # The baseline rate is smoothed (rule of succession) so that a perfect record still
    # has a finite error and a single failure after it is not flagged.
    p = (skill.baseline_completed + 1) / (skill.baseline_count + 2)
    if not 0.0 < p < 1.0:  # more completions than invocations: no binomial error
        return None
    stderr = math.sqrt(p * (1.0 - p) / skill.recent_count)
    z = (p - observed) / stderr
    return _finding(
        skill,
        settings,
        anomaly_type="drop",
        metric="completion_rate",
        baseline_value=round(baseline * 100.0, 2),
        observed_value=round(observed * 100.0, 2),
        z=z,
    )


def _duration_spike(skill: WindowStats, settings: DetectionSettings) -> Finding | None:
    n = skill.baseline_timed
    if skill.recent_timed < settings.min_recent or n < settings.min_baseline:
        return None
    mean = skill.baseline_duration_sum / n
    variance = max(skill.baseline_duration_sumsq - n * mean * mean, 0.0) / (n - 1)
    # Guard against a constant baseline (variance 0): 1 % of the mean, at least 1 ms.
    stdev = max(math.sqrt(variance), abs(mean) * 0.01, 0.001)
    observed = skill.recent_duration_sum / skill.recent_timed
    z = (observed - mean) / (stdev / math.sqrt(skill.recent_timed))
    return _finding(
        skill,
        settings,
        anomaly_type="spike",
        metric="avg_duration_seconds",
        baseline_value=round(mean, 3),
        observed_value=round(observed, 3),
        z=z,
    )


def _finding(
    skill: WindowStats,
    settings: DetectionSettings,
    *,
    anomaly_type: Literal["drop", "spike"],
    metric: Literal["completion_rate", "avg_duration_seconds"],
    baseline_value: float,
    observed_value: float,
    z: float,
) -> Finding | None:
    """The finding when ``z`` reaches the threshold and every number is finite, else None."""
    score = round(z, 2)
    numbers = (baseline_value, observed_value, score, skill.last_recent_at)
    # Written so that NaN (which compares False with everything) is refused too.
    if not (z >= settings.z_threshold and all(math.isfinite(n) for n in numbers)):
        return None
    return Finding(
        skill_name=skill.skill_name,
        anomaly_type=anomaly_type,
        metric=metric,
        baseline_value=baseline_value,
        observed_value=observed_value,
        deviation_score=score,
        last_evidence_at=skill.last_recent_at,
    )
