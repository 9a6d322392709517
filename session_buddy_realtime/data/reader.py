"""Reading skill metrics and anomalies through one SQLite connection, re-querying only on change.

``MetricsReader`` reads through one ``ReadConnection`` (``connection.py``: the server's
own read-only one, or the host's, shared). It never writes, never changes the
connection's ``row_factory``, and re-runs its queries only when the database changed:
the change token combines ``PRAGMA data_version`` (commits by other connections) with
the connection's ``total_changes`` (writes made through this very connection, which
``data_version`` does not report).

What it holds is bounded whatever the database and the clients do: per-skill rows kept
between reads are capped (``MAX_CACHED_ROWS``, beyond the top skills and the skills of
the read), and a snapshot keeps at most ``MAX_ANOMALIES`` anomalies per skill, so a
one-skill frame is no larger than the all-skills one.

All text is read as bytes and decoded by ``queries`` (never through the connection's
``text_factory``, which stays the host's), so invalid UTF-8 costs only its row or field.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import aiosqlite

from session_buddy_realtime.data.connection import (
    ChangeToken,
    Parameters,
    ReadConnection,
    change_token,
    read_connection,
)
from session_buddy_realtime.data.detection import DetectionSettings, Finding, WindowStats, detect
from session_buddy_realtime.data.queries import (
    ANOMALY_WINDOW,
    MAX_TABLE_ANOMALIES,
    TABLE_ANOMALIES_SQL,
    TOP_SKILLS_LIMIT,
    TOP_SQL,
    WINDOW_STATS_SQL,
    date_prefix,
    julian_day,
    named_rows_sql,
    severity,
    shown_name,
    skill_row,
    table_anomaly,
    text_or_none,
    unix_time,
)
from session_buddy_realtime.data.schema import failure_state
from session_buddy_realtime.data.source import MAX_ANOMALIES, MetricsSnapshot, SourceState
from session_buddy_realtime.protocol import format_timestamp

__all__ = ["MAX_CACHED_ROWS", "MetricsReader"]

logger = logging.getLogger(__name__)

_IN_CHUNK: Final = 500
MAX_CACHED_ROWS: Final = 1024
"""Per-skill rows kept between reads, beyond the top skills and the skills of the read."""
# What a read can raise: SQLite's errors, and ValueError from a closed connection.
_READ_ERRORS: Final = (sqlite3.Error, ValueError)
_T = TypeVar("_T")
_MAX_WIDENING: Final = 16


@dataclass(slots=True)
class _Anomaly:
    payload: dict[str, Any]
    expires_at: float
    skill_name: str


@dataclass(slots=True)
class _Cache:
    token: ChangeToken | None = None
    top: list[dict[str, Any]] = field(default_factory=list)
    rows: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    table_anomalies: list[_Anomaly] = field(default_factory=list)
    live_anomalies: list[_Anomaly] = field(default_factory=list)
    as_of: str | None = None


class MetricsReader:
    """Reads top skills, per-skill rows and anomalies, re-querying only on change.

    Args:
        db: An open connection (an ``aiosqlite.Connection`` is wrapped). It is only read,
            and its ``row_factory`` is left as is.
        detection: Windows and thresholds of live anomaly detection.
        clock: Returns the current Unix time; tests pass a fixed clock.
    """

    def __init__(
        self,
        db: ReadConnection | aiosqlite.Connection,
        *,
        detection: DetectionSettings | None = None,
        clock: Any = time.time,
    ) -> None:
        self._db = read_connection(db)
        self._detection = detection or DetectionSettings()
        self._clock = clock
        self._lock = asyncio.Lock()
        self._cache = _Cache()
        self._live_since: dict[tuple[str, str], str] = {}
        self._state = SourceState.OK
        self._message: str | None = None
        self.queries = 0
        """Number of data queries run (change checks not counted)."""
        self.refreshes = 0
        """Number of full refreshes (the database had changed)."""

    @property
    def has_data(self) -> bool:
        """True once a read has succeeded (there is last good data to serve)."""
        return self._cache.as_of is not None

    def has_rows(self, skills: Set[str]) -> bool:
        """True when the rows of ``skills`` have been read (found or not)."""
        return all(name in self._cache.rows for name in skills)

    @property
    def cached_rows(self) -> int:
        """Number of per-skill rows held between reads (bounded; see ``MAX_CACHED_ROWS``)."""
        return len(self._cache.rows)

    @property
    def state(self) -> SourceState:
        """Health after the last read."""
        return self._state

    @property
    def message(self) -> str | None:
        """What is wrong, when ``state`` is not ``ok``."""
        return self._message

    async def read(self, skills: Set[str] = frozenset()) -> MetricsSnapshot:
        """Return the current metrics, including the rows of ``skills``.

        Queries run only when the database changed since the last read, or for skills
        not read before. On a database error the last good data is returned with
        ``state`` saying what is wrong; the error is logged once, not on every read.
        """
        async with self._lock:
            now = self._clock()
            try:
                token = await change_token(self._db)
            except _READ_ERRORS as exc:
                failures: list[Exception] = [exc]
            else:
                failures = await self._refresh(token, skills, now)
            if failures:
                await self._fail(failures[0])
            else:
                self._set_state(SourceState.OK, None)
            return self._snapshot(skills, now)

    async def _refresh(self, token: ChangeToken, skills: Set[str], now: float) -> list[Exception]:
        # Each part reads one table and keeps its last good value when it fails, so a
        # missing skill_anomalies table does not hide the top skills.
        cache = self._cache
        full = token != cache.token or self._state is not SourceState.OK
        parts: list[Callable[[], Awaitable[None]]]
        if full:
            parts = [
                lambda: self._refresh_skills(skills),
                lambda: self._refresh_table_anomalies(now),
                lambda: self._refresh_live_anomalies(now),
            ]
        else:
            parts = [lambda: self._fetch_named_rows(self._rows_with_room(skills), skills)]
        failures: list[Exception] = []
        for part in parts:
            try:
                await part()
            except _READ_ERRORS as exc:
                failures.append(exc)
        if full and not failures:
            cache.token = token
            cache.as_of = format_timestamp(datetime.fromtimestamp(now, UTC))
            self.refreshes += 1
        return failures

    async def _refresh_skills(self, skills: Set[str]) -> None:
        top = await self._fetch_first(TOP_SQL, {}, skill_row, TOP_SKILLS_LIMIT)
        rows: dict[str, dict[str, Any] | None] = {row["skill_name"]: row for row in top}
        await self._fetch_named_rows(rows, skills)
        self._cache.top, self._cache.rows = top, rows

    def _rows_with_room(self, skills: Set[str]) -> dict[str, dict[str, Any] | None]:
        # Every distinct skill ever subscribed would otherwise stay cached until the
        # database changes. Past the cap only the top skills and this read's skills
        # stay; the others are read again (one query) if asked for again.
        cache = self._cache
        missing = sum(1 for name in skills if name not in cache.rows)
        if missing and len(cache.rows) + missing > MAX_CACHED_ROWS:
            top = {row["skill_name"] for row in cache.top}
            cache.rows = {
                name: row for name, row in cache.rows.items() if name in top or name in skills
            }
        return cache.rows

    async def _refresh_table_anomalies(self, now: float) -> None:
        self._cache.table_anomalies = await self._fetch_table_anomalies(now)

    async def _refresh_live_anomalies(self, now: float) -> None:
        self._cache.live_anomalies = await self._fetch_live_anomalies(now)

    async def _fetch(self, sql: str, parameters: Parameters) -> list[tuple[Any, ...]]:
        # Rows are plain tuples whatever the host set on its connection (a cursor of the
        # connection's own with the default row factory).
        return await self._db.fetchall(sql, parameters)

    async def _fetch_first(
        self,
        sql: str,
        parameters: dict[str, Any],
        convert: Callable[[Sequence[Any]], _T | None],
        count: int,
    ) -> list[_T]:
        # The first ``count`` rows that ``convert`` accepts, of a query ending in
        # "LIMIT :limit". Python alone refuses some rows (text that is not UTF-8); so that
        # they take no good row's place, the query runs again with twice the limit until
        # it has ``count`` or there are no more rows (one query while there are none), up
        # to _MAX_WIDENING times the limit: past that, bad rows cost the good ones their
        # place, rather than the server its memory.
        limit = count
        while True:
            self.queries += 1
            result = await self._fetch(sql, {**parameters, "limit": limit})
            kept = [item for row in result if (item := convert(row)) is not None]
            if len(kept) >= count or len(result) < limit or limit >= count * _MAX_WIDENING:
                return kept[:count]
            limit *= 2

    async def _fetch_named_rows(
        self, rows: dict[str, dict[str, Any] | None], skills: Iterable[str]
    ) -> None:
        wanted = sorted(name for name in skills if name not in rows)
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            self.queries += 1
            result = await self._fetch(named_rows_sql(len(chunk)), chunk)
            # A stored name equal to a requested one has its bytes: it always decodes.
            found = {row["skill_name"]: row for row in map(skill_row, result) if row is not None}
            for name in chunk:
                rows[name] = found.get(name)

    async def _fetch_table_anomalies(self, now: float) -> list[_Anomaly]:
        since = now - ANOMALY_WINDOW
        parameters = {"prefix": date_prefix(since), "since": julian_day(since)}
        found = await self._fetch_first(
            TABLE_ANOMALIES_SQL, parameters, table_anomaly, MAX_TABLE_ANOMALIES
        )
        return [
            _Anomaly(payload=payload, expires_at=expires_at, skill_name=payload["skill_name"])
            for payload, expires_at in found
        ]

    async def _fetch_live_anomalies(self, now: float) -> list[_Anomaly]:
        settings = self._detection
        baseline_start = now - settings.baseline_window
        self.queries += 1
        result = await self._fetch(
            WINDOW_STATS_SQL,
            {
                "prefix": date_prefix(baseline_start),
                "baseline": julian_day(baseline_start),
                "recent": julian_day(now - settings.recent_window),
                "min_recent": settings.min_recent,
            },
        )
        stats = [
            WindowStats(
                skill_name=name,
                recent_count=int(row[1] or 0),
                recent_completed=int(row[2] or 0),
                recent_timed=int(row[3] or 0),
                recent_duration_sum=float(row[4] or 0.0),
                baseline_count=int(row[5] or 0),
                baseline_completed=int(row[6] or 0),
                baseline_timed=int(row[7] or 0),
                baseline_duration_sum=float(row[8] or 0.0),
                baseline_duration_sumsq=float(row[9] or 0.0),
                last_recent_at=unix_time(float(row[10])) if row[10] is not None else now,
            )
            for row in result
            if (name := shown_name(text_or_none(row[0]))) is not None
        ]
        findings = detect(stats, settings)
        stamp = format_timestamp(datetime.fromtimestamp(now, UTC))
        # A finding keeps the time it was first seen for as long as it stays active.
        active = {(f.skill_name, f.anomaly_type) for f in findings}
        self._live_since = {k: v for k, v in self._live_since.items() if k in active}
        return [self._live_anomaly(f, stamp) for f in findings]

    def _live_anomaly(self, finding: Finding, stamp: str) -> _Anomaly:
        detected_at = self._live_since.setdefault((finding.skill_name, finding.anomaly_type), stamp)
        return _Anomaly(
            payload={
                "skill_name": finding.skill_name,
                "detected_at": detected_at,
                "anomaly_type": finding.anomaly_type,
                "deviation_score": finding.deviation_score,
                "baseline_value": finding.baseline_value,
                "observed_value": finding.observed_value,
                "metric": finding.metric,
                "source": "live",
            },
            expires_at=finding.last_evidence_at + self._detection.recent_window,
            skill_name=finding.skill_name,
        )

    async def _fail(self, exc: Exception) -> None:
        self._set_state(*await failure_state(self._db, exc))

    def _set_state(self, state: SourceState, message: str | None) -> None:
        if (state, message) == (self._state, self._message):
            return
        if state is SourceState.OK:
            logger.info("skills database readable again")
        else:
            logger.warning("%s (serving the last good data until it recovers)", message)
        self._state, self._message = state, message

    def cached(
        self, skills: Set[str], state: SourceState | None = None, message: str | None = None
    ) -> MetricsSnapshot:
        """The last good data without touching the database, optionally flagged ``state``."""
        snapshot = self._snapshot(skills, self._clock())
        if state is not None:
            snapshot.state, snapshot.message = state, message
        return snapshot

    def use_connection(self, db: ReadConnection | aiosqlite.Connection) -> None:
        """Read through ``db`` from now on (the file was replaced); the next read refreshes."""
        self._db = read_connection(db)
        self._cache.token = None

    def _snapshot(self, skills: Set[str], now: float) -> MetricsSnapshot:
        cache = self._cache
        anomalies = [
            a.payload for a in (*cache.live_anomalies, *cache.table_anomalies) if a.expires_at > now
        ]
        anomalies.sort(key=severity)
        # A one-skill frame carries all of that skill's anomalies: keep each skill's
        # MAX_ANOMALIES most severe. The all-skills frame's first MAX_ANOMALIES are the
        # same as before, since none of them can be past its own skill's limit.
        seen: Counter[str] = Counter()
        kept = []
        for anomaly in anomalies:
            seen[anomaly["skill_name"]] += 1
            if seen[anomaly["skill_name"]] <= MAX_ANOMALIES:
                kept.append(anomaly)
        return MetricsSnapshot(
            top_skills=cache.top,
            skills={name: cache.rows.get(name) for name in skills},
            anomalies=kept,
            state=self._state,
            message=self._message,
            as_of=cache.as_of,
        )
