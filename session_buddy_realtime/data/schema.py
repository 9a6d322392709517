"""The subset of Session-Buddy's skills schema that this package reads.

The server only reads these tables; it creates them only in a database that the demo
(or a test) creates itself. Column names and meanings match Session-Buddy's:
``completion_rate`` is a percentage (0-100) and ``avg_duration_seconds`` is NULL until
an invocation completes.
"""

from __future__ import annotations

import sqlite3
from typing import Final

import aiosqlite

from session_buddy_realtime.data.connection import ReadConnection, read_connection
from session_buddy_realtime.data.source import SourceState

__all__ = ["REQUIRED_TABLES", "SCHEMA_SQL", "create_schema", "failure_state", "missing_tables"]

REQUIRED_TABLES: Final = ("skill_invocation", "skill_metrics", "skill_anomalies")

SCHEMA_SQL: Final = """
CREATE TABLE IF NOT EXISTS skill_invocation (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    skill_name TEXT NOT NULL,
    invoked_at TEXT NOT NULL,
    session_id TEXT,
    workflow_path TEXT,
    completed INTEGER NOT NULL DEFAULT 0 CHECK (completed IN (0, 1)),
    duration_seconds REAL,
    error_type TEXT
);
CREATE INDEX IF NOT EXISTS idx_skill_invocation_invoked_at
    ON skill_invocation (invoked_at);
CREATE INDEX IF NOT EXISTS idx_skill_invocation_skill
    ON skill_invocation (skill_name, invoked_at);

CREATE TABLE IF NOT EXISTS skill_metrics (
    skill_name TEXT PRIMARY KEY,
    total_invocations INTEGER NOT NULL DEFAULT 0,
    completed_invocations INTEGER NOT NULL DEFAULT 0,
    abandoned_invocations INTEGER NOT NULL DEFAULT 0,
    total_duration_seconds REAL NOT NULL DEFAULT 0,
    avg_duration_seconds REAL,
    completion_rate REAL NOT NULL DEFAULT 0,
    first_invoked TEXT,
    last_invoked TEXT,
    last_updated TEXT
);
CREATE INDEX IF NOT EXISTS idx_skill_metrics_total
    ON skill_metrics (total_invocations DESC);

CREATE TABLE IF NOT EXISTS skill_anomalies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    skill_name TEXT NOT NULL,
    detected_at TEXT NOT NULL,
    anomaly_type TEXT NOT NULL CHECK (anomaly_type IN ('drop', 'spike', 'pattern_shift')),
    baseline_value REAL,
    observed_value REAL,
    deviation_score REAL,
    resolved_at TEXT
);
CREATE INDEX IF NOT EXISTS idx_skill_anomalies_detected_at
    ON skill_anomalies (detected_at);

-- skill_metrics follows skill_invocation, as in Session-Buddy. The average duration
-- is over completed invocations, so it stays NULL until one completes.
CREATE TRIGGER IF NOT EXISTS trg_skill_invocation_metrics
AFTER INSERT ON skill_invocation
BEGIN
    INSERT INTO skill_metrics (
        skill_name, total_invocations, completed_invocations, abandoned_invocations,
        total_duration_seconds, avg_duration_seconds, completion_rate,
        first_invoked, last_invoked, last_updated
    ) VALUES (
        NEW.skill_name, 1, NEW.completed, 1 - NEW.completed,
        CASE WHEN NEW.completed = 1 THEN COALESCE(NEW.duration_seconds, 0) ELSE 0 END,
        CASE WHEN NEW.completed = 1 THEN NEW.duration_seconds END,
        NEW.completed * 100.0,
        NEW.invoked_at, NEW.invoked_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
    )
    ON CONFLICT (skill_name) DO UPDATE SET
        total_invocations = total_invocations + 1,
        completed_invocations = completed_invocations + excluded.completed_invocations,
        abandoned_invocations = abandoned_invocations + excluded.abandoned_invocations,
        total_duration_seconds = total_duration_seconds + excluded.total_duration_seconds,
        avg_duration_seconds = CASE
            WHEN completed_invocations + excluded.completed_invocations > 0
            THEN (total_duration_seconds + excluded.total_duration_seconds)
                 / (completed_invocations + excluded.completed_invocations)
        END,
        completion_rate = 100.0 * (completed_invocations + excluded.completed_invocations)
                          / (total_invocations + 1),
        last_invoked = CASE
            WHEN last_invoked IS NULL OR excluded.last_invoked > last_invoked
            THEN excluded.last_invoked ELSE last_invoked
        END,
        last_updated = excluded.last_updated;
END;
"""


async def create_schema(db: aiosqlite.Connection) -> None:
    """Create the tables, indexes and trigger (idempotent) and commit."""
    await db.executescript(SCHEMA_SQL)
    await db.commit()


async def missing_tables(db: ReadConnection | aiosqlite.Connection) -> list[str]:
    """Return the required tables that ``db`` lacks, in a stable order (``db`` only read)."""
    placeholders = ",".join("?" for _ in REQUIRED_TABLES)
    rows = await read_connection(db).fetchall(
        f"SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "  # noqa: S608
        f"AND name IN ({placeholders})",
        REQUIRED_TABLES,
    )
    present = {row[0] for row in rows}
    return [name for name in REQUIRED_TABLES if name not in present]


async def failure_state(db: ReadConnection, exc: Exception) -> tuple[SourceState, str]:
    """What a failed read means: ``missing_tables`` naming them when that is the cause
    (the host has not created its tables yet), otherwise ``error`` with SQLite's message."""
    if isinstance(exc, sqlite3.OperationalError) and "no such" in str(exc):
        try:
            absent = await missing_tables(db)
        except (sqlite3.Error, ValueError):
            absent = []
        if absent:
            return SourceState.MISSING_TABLES, (
                f"the skills database lacks table(s): {', '.join(absent)}"
            )
    return SourceState.ERROR, f"database error: {exc}"
