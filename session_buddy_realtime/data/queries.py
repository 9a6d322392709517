"""The SQL this package runs on Session-Buddy's skills database, and how its rows are read.

Pure text and pure functions: the queries, and the conversions that turn a row into a
protocol object, where a bad value (NaN, infinity, text in a number column) costs only
that value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

__all__ = [
    "ANOMALY_WINDOW",
    "MAX_TABLE_ANOMALIES",
    "SKILL_COLUMNS",
    "TABLE_ANOMALIES_SQL",
    "TOP_SKILLS_LIMIT",
    "TOP_SQL",
    "WINDOW_STATS_SQL",
    "date_prefix",
    "float_or_none",
    "int_or_zero",
    "julian_day",
    "severity",
    "skill_row",
    "unix_time",
]

TOP_SKILLS_LIMIT: Final = 10
ANOMALY_WINDOW: Final = 3600.0
"""Seconds for which an unresolved row of ``skill_anomalies`` is reported."""
MAX_TABLE_ANOMALIES: Final = 500
_UNIX_EPOCH_JULIAN_DAY: Final = 2440587.5

SKILL_COLUMNS: Final = (
    "skill_name, total_invocations, completed_invocations, completion_rate, "
    "avg_duration_seconds, last_invoked"
)
TOP_SQL: Final = (
    f"SELECT {SKILL_COLUMNS} FROM skill_metrics "  # noqa: S608
    "ORDER BY total_invocations DESC, skill_name LIMIT ?"
)
# The text prefilter uses the index (ISO values of any style share the date prefix);
# the julianday() comparison then compares times as times, whatever the separator or
# time-zone suffix.
TABLE_ANOMALIES_SQL: Final = """
SELECT skill_name, detected_at, anomaly_type, baseline_value, observed_value,
       deviation_score, julianday(detected_at) AS detected_jd
FROM skill_anomalies
WHERE (resolved_at IS NULL OR resolved_at = '')
  AND detected_at >= :prefix
  AND julianday(detected_at) >= :since
ORDER BY detected_jd DESC
LIMIT :limit
"""
WINDOW_STATS_SQL: Final = """
SELECT skill_name,
       SUM(jd >= :recent),
       SUM(jd >= :recent AND completed = 1),
       SUM(jd >= :recent AND completed = 1 AND duration_seconds IS NOT NULL),
       TOTAL(CASE WHEN jd >= :recent AND completed = 1 THEN duration_seconds END),
       SUM(jd < :recent),
       SUM(jd < :recent AND completed = 1),
       SUM(jd < :recent AND completed = 1 AND duration_seconds IS NOT NULL),
       TOTAL(CASE WHEN jd < :recent AND completed = 1 THEN duration_seconds END),
       TOTAL(CASE WHEN jd < :recent AND completed = 1
                  THEN duration_seconds * duration_seconds END),
       MAX(CASE WHEN jd >= :recent THEN jd END)
FROM (
    SELECT skill_name, completed, duration_seconds, julianday(invoked_at) AS jd
    FROM skill_invocation
    WHERE invoked_at >= :prefix
)
WHERE jd >= :baseline
GROUP BY skill_name
HAVING SUM(jd >= :recent) >= :min_recent
"""


def skill_row(row: Sequence[Any]) -> dict[str, Any]:
    """A ``skill_metrics`` row (``SKILL_COLUMNS``) as a ``top_skills`` entry."""
    name, total, completed, rate, avg_duration, last_invoked = row
    return {
        "skill_name": str(name),
        "total_invocations": int_or_zero(total),
        "completion_rate": float_or_none(rate) or 0.0,
        "avg_duration_seconds": float_or_none(avg_duration, digits=3),
        "completed_invocations": int_or_zero(completed),
        "last_invoked": None if last_invoked is None else str(last_invoked),
    }


def severity(anomaly: dict[str, Any]) -> tuple[float, str]:
    """Sort key of anomalies: most severe first."""
    # Some detectors store drops as negative deviations: severity is the magnitude.
    score = anomaly["deviation_score"]
    return (-(abs(score) if score is not None else -1.0), anomaly["skill_name"])


def float_or_none(value: Any, digits: int = 2) -> float | None:
    """A finite number rounded to ``digits``, or None for anything else."""
    # NaN and infinity can be stored in SQLite but have no JSON form: read them as null.
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return round(number, digits) if math.isfinite(number) else None


def int_or_zero(value: Any) -> int:
    """An integer, or 0 for anything that is not one."""
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def julian_day(seconds: float) -> float:
    """Unix time to a Julian day number, as SQLite's ``julianday()`` returns."""
    return seconds / 86400.0 + _UNIX_EPOCH_JULIAN_DAY


def unix_time(day: float) -> float:
    """A Julian day number to Unix time."""
    return (day - _UNIX_EPOCH_JULIAN_DAY) * 86400.0


def date_prefix(seconds: float) -> str:
    """The date prefix that the text prefilter of the queries compares with."""
    # One day earlier than the cutoff, so that any time-zone offset stays inside.
    return (datetime.fromtimestamp(seconds, UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
