"""Live anomaly detection: the z-score rules on window statistics."""

from __future__ import annotations

import dataclasses
import math

import pytest

from session_buddy_realtime.data.detection import DetectionSettings, Finding, WindowStats, detect


def stats(
    *,
    recent: tuple[int, int] = (10, 9),
    baseline: tuple[int, int] = (100, 90),
    recent_durations: list[float] | None = None,
    baseline_durations: list[float] | None = None,
) -> WindowStats:
    recent_durations = recent_durations or []
    baseline_durations = baseline_durations or []
    return WindowStats(
        skill_name="s",
        recent_count=recent[0],
        recent_completed=recent[1],
        recent_timed=len(recent_durations),
        recent_duration_sum=sum(recent_durations),
        baseline_count=baseline[0],
        baseline_completed=baseline[1],
        baseline_timed=len(baseline_durations),
        baseline_duration_sum=sum(baseline_durations),
        baseline_duration_sumsq=sum(d * d for d in baseline_durations),
        last_recent_at=1000.0,
    )


def test_usual_noise_is_not_an_anomaly() -> None:
    """A recent rate close to the baseline (9/10 against 90 %) finds nothing."""
    assert detect([stats()], DetectionSettings()) == []


def test_completion_drop_is_found_with_binomial_z_score() -> None:
    """2 of 10 completing against a 90 % baseline is a drop with the binomial z-score."""
    [finding] = detect([stats(recent=(10, 2))], DetectionSettings())
    smoothed = 91 / 102
    expected_z = (smoothed - 0.2) / math.sqrt(smoothed * (1 - smoothed) / 10)
    assert finding.anomaly_type == "drop"
    assert finding.metric == "completion_rate"
    assert finding.deviation_score == pytest.approx(expected_z, abs=0.01)
    assert (finding.baseline_value, finding.observed_value) == (90.0, 20.0)


def test_too_few_recent_invocations_are_ignored() -> None:
    """Below min_recent invocations nothing is flagged, however bad they look."""
    assert detect([stats(recent=(7, 0))], DetectionSettings(min_recent=8)) == []


def test_perfect_baseline_still_has_finite_error() -> None:
    """After a 100 % baseline one failure is ordinary and a run of failures is a drop."""
    settings = DetectionSettings()
    assert detect([stats(recent=(10, 9), baseline=(100, 100))], settings) == []
    [finding] = detect([stats(recent=(10, 3), baseline=(100, 100))], settings)
    assert math.isfinite(finding.deviation_score)


def test_duration_spike_is_found() -> None:
    """Completed runs far slower than the baseline mean are a duration spike."""
    baseline = [1.0 + 0.1 * (i % 5) for i in range(50)]
    [finding] = detect(
        [stats(recent_durations=[3.0] * 10, baseline_durations=baseline)], DetectionSettings()
    )
    assert finding.anomaly_type == "spike"
    assert finding.metric == "avg_duration_seconds"
    assert finding.observed_value == 3.0


def test_constant_baseline_duration_does_not_divide_by_zero() -> None:
    """A baseline with zero variance gives a finite score."""
    [finding] = detect(
        [stats(recent_durations=[2.0] * 10, baseline_durations=[1.0] * 30)], DetectionSettings()
    )
    assert math.isfinite(finding.deviation_score)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"recent_window": 0},
        {"recent_window": 100, "baseline_window": 50},
        {"z_threshold": 0},
        {"min_recent": 1},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    """Impossible windows or thresholds fail at construction."""
    with pytest.raises(ValueError, match=r"must|need"):
        DetectionSettings(**kwargs)  # type: ignore[arg-type]


def _all_finite(finding: Finding) -> bool:
    numbers = (
        finding.baseline_value,
        finding.observed_value,
        finding.deviation_score,
        finding.last_evidence_at,
    )
    return all(math.isfinite(n) for n in numbers)


@pytest.mark.parametrize(
    "skill",
    [
        # A baseline of 1e200 s: finite sums, but the square overflows (NaN variance).
        stats(recent_durations=[2.0] * 10, baseline_durations=[1e200] * 30),
        # An infinite recent duration: observed mean and z-score are infinite.
        stats(recent_durations=[1.0] * 9 + [math.inf], baseline_durations=[1.0] * 30),
        # An infinite baseline: mean infinite, variance NaN.
        stats(recent_durations=[2.0] * 10, baseline_durations=[1.0] * 29 + [math.inf]),
        # NaN sums, as from inf - inf.
        stats(recent_durations=[math.nan] * 10, baseline_durations=[math.nan] * 30),
    ],
    ids=["overflowing-baseline", "infinite-recent", "infinite-baseline", "nan"],
)
def test_non_finite_statistics_never_become_a_finding(skill: WindowStats) -> None:
    """Statistics that overflow or hold inf/NaN give no finding rather than a non-finite one."""
    findings = detect([skill], DetectionSettings())
    assert [f for f in findings if not _all_finite(f)] == []


def test_impossible_counts_give_no_finding_and_no_error() -> None:
    """More completions than invocations (no valid binomial error) is skipped, not raised."""
    assert detect([stats(recent=(10, 0), baseline=(20, 40))], DetectionSettings()) == []


def test_overflowing_skill_is_skipped_and_the_others_kept() -> None:
    """A skill with overflowing statistics is skipped while another skill's drop is still found."""
    bad = stats(recent_durations=[2.0] * 10, baseline_durations=[1e200] * 30)
    good = dataclasses.replace(stats(recent=(10, 1)), skill_name="g")
    findings = detect([bad, good], DetectionSettings())
    assert [(f.skill_name, f.anomaly_type) for f in findings] == [("g", "drop")]
