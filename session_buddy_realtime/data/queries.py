"""The SQL this package runs on Session-Buddy's skills database, and how its rows are read.

Pure text and pure functions: the queries, and the conversions that turn a row into a
protocol object, where a bad value (NaN, infinity, text in a number column) costs only
that value.

The queries skip what no frame can carry, so that every frame has a bounded size: a
``skill_name`` that is not text, is over ``MAX_SKILL_NAME_LENGTH`` characters or holds a
control character (every query, in SQL; for the live window statistics SQL bounds the
bytes and ``shown_name`` checks the one row per skill); a ``total_invocations`` that is
not a 64-bit number (top skills); a ``detected_at`` or
``anomaly_type`` that is not such text of at most ``MAX_TEXT_LENGTH`` characters (table
anomalies); a duration that is not a number within ``MAX_DURATION_SECONDS`` (live
detection: the invocation still counts, its duration does not). ``last_invoked`` past
those bounds reads as null.

Text that is not UTF-8 (another process may store any bytes as TEXT) would make Python's
``sqlite3`` fail the whole query while fetching the row, and SQL cannot tell it apart. So
every text that reaches a frame is selected as its stored bytes (``CAST(... AS BLOB)``,
numbers' columns too when they hold text) and decoded here: a row whose name does not
decode is skipped (``skill_row`` and ``table_anomaly`` return None), any other such text
reads as null, or skips the anomaly when the protocol requires it (time, type).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from session_buddy_realtime.protocol import MAX_SKILL_NAME_LENGTH

__all__ = [
    "ANOMALY_WINDOW",
    "MAX_DURATION_SECONDS",
    "MAX_TABLE_ANOMALIES",
    "MAX_TEXT_LENGTH",
    "NAME_OK",
    "SKILL_COLUMNS",
    "SKILL_SEARCH_SQL",
    "TABLE_ANOMALIES_SQL",
    "TOP_SKILLS_LIMIT",
    "TOP_SQL",
    "WINDOW_STATS_SQL",
    "date_prefix",
    "float_or_none",
    "history_parameters",
    "history_sql",
    "int_or_zero",
    "julian_day",
    "like_pattern",
    "named_rows_sql",
    "severity",
    "shown_name",
    "skill_row",
    "table_anomaly",
    "text_or_none",
    "unix_time",
]

TOP_SKILLS_LIMIT: Final = 10
ANOMALY_WINDOW: Final = 3600.0
"""Seconds for which an unresolved row of ``skill_anomalies`` is reported."""
MAX_TABLE_ANOMALIES: Final = 500
MAX_TEXT_LENGTH: Final = 64
"""Characters at most of the other text fields that reach a frame (times, anomaly types)."""
MAX_DURATION_SECONDS: Final = 1e9
"""Durations beyond this many seconds (about 31.7 years) are not counted by live detection."""
_UNIX_EPOCH_JULIAN_DAY: Final = 2440587.5
# C0 and C1 control characters, NUL included.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
# The same in SQL but for NUL: U+0001-U+001F and U+007F-U+009F (GLOB ranges are by code
# point; a NUL cannot be written in a pattern, so instr() looks for it).
_CONTROL_GLOB: Final = (
    "('*[' || char(1) || '-' || char(31) || char(127) || '-' || char(159) || ']*')"
)


def _bounded_text(column: str, limit: int) -> str:
    """SQL that is true when ``column`` is text of at most ``limit`` characters, no controls.

    ``length()`` counts characters only up to a NUL, so text holding one is refused (else
    a NUL followed by a megabyte would pass); so is text with a C0 or C1 control
    character, which no client can subscribe to and which a terminal would interpret.
    """
    return (
        f"(typeof({column}) = 'text' AND length({column}) <= {limit} "
        f"AND instr({column}, char(0)) = 0 AND NOT {column} GLOB {_CONTROL_GLOB})"
    )


def _as_stored(column: str) -> str:
    """SQL that selects ``column`` as stored, but text as its bytes (see ``text_or_none``)."""
    return f"CASE WHEN typeof({column}) = 'text' THEN CAST({column} AS BLOB) ELSE {column} END"


NAME_OK: Final = _bounded_text("skill_name", MAX_SKILL_NAME_LENGTH)
"""The rows every query reads: a text ``skill_name`` that a frame can carry."""
# A count SQLite ranks as a number: text and blobs sort above every number, and an
# infinite real would outrank every real skill (and read as 0).
_TOTAL_OK: Final = (
    "typeof(total_invocations) IN ('integer', 'real') "
    "AND total_invocations BETWEEN -9223372036854775808 AND 9223372036854775807"
)
# Text as its bytes, decoded by skill_row. last_invoked: numbers are shown as text, as
# before; over-long text and blobs read as NULL. No column is aliased "skill_name", so
# that ORDER BY and GROUP BY keep meaning the stored column (and its index).
SKILL_COLUMNS: Final = (
    "CAST(skill_name AS BLOB), "
    + ", ".join(
        _as_stored(column)
        for column in (
            "total_invocations",
            "completed_invocations",
            "completion_rate",
            "avg_duration_seconds",
        )
    )
    + ", CASE WHEN typeof(last_invoked) IN ('integer', 'real') THEN last_invoked "
    f"WHEN {_bounded_text('last_invoked', MAX_TEXT_LENGTH)} "
    "THEN CAST(last_invoked AS BLOB) END"
)
TOP_SQL: Final = (
    f"SELECT {SKILL_COLUMNS} FROM skill_metrics "  # noqa: S608
    f"WHERE {NAME_OK} AND {_TOTAL_OK} "
    "ORDER BY total_invocations DESC, skill_name LIMIT :limit"
)


def named_rows_sql(count: int) -> str:
    """The ``skill_metrics`` rows (``SKILL_COLUMNS``) of ``count`` names bound in order."""
    marks = ",".join("?" for _ in range(count))
    return (
        f"SELECT {SKILL_COLUMNS} FROM skill_metrics "  # noqa: S608
        f"WHERE skill_name IN ({marks}) AND {NAME_OK}"
    )


# The text prefilter uses the index (ISO values of any style share the date prefix);
# the julianday() comparison then compares times as times, whatever the separator or
# time-zone suffix.
TABLE_ANOMALIES_SQL: Final = f"""
SELECT CAST(skill_name AS BLOB), CAST(detected_at AS BLOB), CAST(anomaly_type AS BLOB),
       {_as_stored("baseline_value")}, {_as_stored("observed_value")},
       {_as_stored("deviation_score")}, julianday(detected_at) AS detected_jd
FROM skill_anomalies
WHERE (resolved_at IS NULL OR resolved_at = '')
  AND detected_at >= :prefix
  AND julianday(detected_at) >= :since
  AND {NAME_OK}
  AND {_bounded_text("detected_at", MAX_TEXT_LENGTH)}
  AND {_bounded_text("anomaly_type", MAX_TEXT_LENGTH)}
ORDER BY detected_jd DESC
LIMIT :limit
"""  # noqa: S608
# A duration counts only when it is a number within MAX_DURATION_SECONDS: infinity,
# values whose square overflows, text and blobs are left out (the invocation itself
# still counts for the completion rate), so sums and squares over any number of rows
# stay finite. BETWEEN alone refuses text, blobs and NULL (SQLite orders them above
# every number), and unlike abs() it never raises (abs() does on the smallest integer).
_DURATION: Final = (
    f"CASE WHEN duration_seconds BETWEEN -{MAX_DURATION_SECONDS:.0f} "
    f"AND {MAX_DURATION_SECONDS:.0f} THEN duration_seconds END"
)
# Per invocation only a cheap name check (text, at most 4 bytes a character); the exact
# one, NAME_OK's, is shown_name() on the one row per skill; groups are of the stored
# text, the bytes are selected for text_or_none(). "LIMIT -1" keeps SQLite from
# flattening the subquery into the aggregate, which would evaluate julianday() and the
# duration test again for every use; kept apart, the date prefilter drives the
# invoked_at index instead of a scan of all history. Results are the same either way.
WINDOW_STATS_SQL: Final = f"""
SELECT CAST(skill_name AS BLOB),
       SUM(jd >= :recent),
       SUM(jd >= :recent AND completed = 1),
       SUM(jd >= :recent AND completed = 1 AND duration IS NOT NULL),
       TOTAL(CASE WHEN jd >= :recent AND completed = 1 THEN duration END),
       SUM(jd < :recent),
       SUM(jd < :recent AND completed = 1),
       SUM(jd < :recent AND completed = 1 AND duration IS NOT NULL),
       TOTAL(CASE WHEN jd < :recent AND completed = 1 THEN duration END),
       TOTAL(CASE WHEN jd < :recent AND completed = 1 THEN duration * duration END),
       MAX(CASE WHEN jd >= :recent THEN jd END)
FROM (
    SELECT skill_name, completed, {_DURATION} AS duration, julianday(invoked_at) AS jd
    FROM skill_invocation
    WHERE invoked_at >= :prefix
      AND typeof(skill_name) = 'text'
      AND length(CAST(skill_name AS BLOB)) <= {4 * MAX_SKILL_NAME_LENGTH}
    LIMIT -1
)
WHERE jd >= :baseline
GROUP BY skill_name
HAVING SUM(jd >= :recent) >= :min_recent
"""  # noqa: S608


# Skill names containing a pattern (LIKE: ASCII letters in any case; "%", "_" and "\\"
# escaped by like_pattern), ranked as the top skills are, counts that are not numbers last.
SKILL_SEARCH_SQL: Final = f"""
SELECT CAST(skill_name AS BLOB) FROM skill_metrics
WHERE {NAME_OK} AND skill_name LIKE :pattern ESCAPE '\\'
ORDER BY ({_TOTAL_OK}) DESC, total_invocations DESC, skill_name
LIMIT :limit
"""  # noqa: S608
# Invocations per bucket. strftime('%s') reads a time as a time (T or space, fraction,
# Z or an offset) to whole Unix seconds, exact for buckets of whole seconds. The text
# prefilter keeps the invoked_at index in use over the window's start less 14 hours (the
# largest offset a stored time can carry): times written with a T from :since_t on, and
# those written with a space on that first day from :since_s (a space sorts before T).
# No "LIMIT -1" here: flattened, the time test runs on the index alone and only rows in
# the window are read from the table (16 ms instead of 70 on 60,000 rows in range).
_HISTORY_SQL: Final = """
SELECT (t - :start) / :bucket, COUNT(*), SUM(completed = 1)
FROM (
    SELECT CAST(strftime('%s', invoked_at) AS INTEGER) AS t, completed
    FROM skill_invocation
    WHERE (invoked_at >= :since_t OR (invoked_at >= :since_s AND invoked_at < :day_t)){skill}
)
WHERE t >= :start AND t < :end
GROUP BY 1
"""
_MAX_OFFSET: Final = 14 * 3600


def history_sql(*, one_skill: bool) -> str:
    """The history query, for all skills or for the one bound as ``:skill``."""
    return _HISTORY_SQL.format(skill="\n      AND skill_name = :skill" if one_skill else "")


def history_parameters(skill: str | None, start: int, bucket: int, buckets: int) -> dict[str, Any]:
    """The parameters of ``history_sql``: ``buckets`` buckets of ``bucket`` s from ``start``."""
    lower = datetime.fromtimestamp(start - _MAX_OFFSET, UTC)
    parameters: dict[str, Any] = {
        "start": start,
        "end": start + bucket * buckets,
        "bucket": bucket,
        "since_t": lower.strftime("%Y-%m-%dT%H:%M:%S"),
        "since_s": lower.strftime("%Y-%m-%d %H:%M:%S"),
        "day_t": lower.strftime("%Y-%m-%dT"),
    }
    if skill is not None:
        parameters["skill"] = skill
    return parameters


def like_pattern(query: str) -> str:
    """A LIKE pattern (with ``ESCAPE '\\'``) matching names that contain ``query`` as it is."""
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def shown_name(value: Any) -> str | None:
    """``value`` if it is a skill name that a frame may carry (what ``NAME_OK`` selects)."""
    if (
        isinstance(value, str)
        and len(value) <= MAX_SKILL_NAME_LENGTH
        and _CONTROL.search(value) is None
    ):
        return value
    return None


def text_or_none(value: Any) -> str | None:
    """Text selected as its bytes, decoded; None for NULL and for bytes that are not UTF-8.

    A number (``last_invoked`` may hold one) is shown as its text, as before.
    """
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None if value is None else str(value)


def skill_row(row: Sequence[Any]) -> dict[str, Any] | None:
    """A ``skill_metrics`` row (``SKILL_COLUMNS``) as a ``top_skills`` entry.

    None when the name is not UTF-8: such a skill can be neither shown nor subscribed to.
    """
    raw_name, total, completed, rate, avg_duration, last_invoked = row
    name = text_or_none(raw_name)
    if name is None:
        return None
    return {
        "skill_name": name,
        "total_invocations": int_or_zero(total),
        "completion_rate": float_or_none(rate) or 0.0,
        "avg_duration_seconds": float_or_none(avg_duration, digits=3),
        "completed_invocations": int_or_zero(completed),
        "last_invoked": text_or_none(last_invoked),
    }


def table_anomaly(row: Sequence[Any]) -> tuple[dict[str, Any], float] | None:
    """A ``TABLE_ANOMALIES_SQL`` row as an anomaly and the Unix time it expires at.

    None when its name, time or type is not UTF-8 (the protocol requires all three).
    """
    # The query selects only text for these three, so each is bytes here.
    raw_name, raw_time, raw_kind, baseline, observed, score, detected_jd = row
    try:
        name, detected_at, kind = raw_name.decode(), raw_time.decode(), raw_kind.decode()
    except UnicodeDecodeError:
        return None
    payload = {
        "skill_name": name,
        "detected_at": detected_at,
        "anomaly_type": kind,
        "deviation_score": float_or_none(score),
        "baseline_value": float_or_none(baseline),
        "observed_value": float_or_none(observed),
        "source": "table",
    }
    return payload, unix_time(float(detected_jd)) + ANOMALY_WINDOW


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
