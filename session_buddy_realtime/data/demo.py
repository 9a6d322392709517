"""A demo skills database that keeps moving, for ``serve --demo``.

The demo writes through its own connection, as Session-Buddy would: it creates the
database (and marks it as a demo one), seeds a day of history, then keeps recording
invocations, with a burst of failures or of slow runs now and then, so that the stream
moves and anomalies appear within a minute. It refuses to write into a database it did
not create.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import aiosqlite

from session_buddy_realtime.data.schema import create_schema
from session_buddy_realtime.errors import RealtimeError

__all__ = [
    "DEFAULT_DEMO_DB_PATH",
    "DEMO_SKILLS",
    "DemoSkill",
    "DemoWriter",
    "prepare_demo_database",
]

logger = logging.getLogger(__name__)

DEFAULT_DEMO_DB_PATH: Final = Path(".session-buddy/demo-skills.db")
# Marks a database as created by the demo ("SBRD"), so the writer never touches another.
DEMO_APPLICATION_ID: Final = 0x53425244
_HISTORY: Final = timedelta(hours=24)
_INSERT_SQL: Final = (
    "INSERT INTO skill_invocation (skill_name, invoked_at, session_id, workflow_path, "
    "completed, duration_seconds, error_type) VALUES (?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class DemoSkill:
    """A made-up skill: how often it runs, how often it completes, how long it takes."""

    name: str
    weight: float
    success_rate: float
    mean_seconds: float


DEMO_SKILLS: Final[tuple[DemoSkill, ...]] = (
    DemoSkill("pytest-run", 14, 0.93, 18.0),
    DemoSkill("ruff-check", 13, 0.97, 1.4),
    DemoSkill("git-commit", 11, 0.95, 3.2),
    DemoSkill("mypy-check", 9, 0.86, 9.5),
    DemoSkill("code-review", 8, 0.82, 42.0),
    DemoSkill("refactor-module", 7, 0.74, 65.0),
    DemoSkill("write-tests", 7, 0.79, 55.0),
    DemoSkill("debug-failure", 6, 0.68, 80.0),
    DemoSkill("docs-update", 5, 0.94, 12.0),
    DemoSkill("dependency-audit", 5, 0.9, 7.5),
    DemoSkill("crackerjack-run", 5, 0.88, 35.0),
    DemoSkill("session-checkpoint", 4, 0.99, 0.8),
    DemoSkill("search-codebase", 4, 0.98, 2.1),
    DemoSkill("explain-code", 4, 0.97, 6.0),
    DemoSkill("pr-description", 3, 0.92, 9.0),
    DemoSkill("changelog-entry", 3, 0.95, 4.0),
    DemoSkill("benchmark-run", 3, 0.7, 120.0),
    DemoSkill("profile-hotspot", 2, 0.75, 95.0),
    DemoSkill("docker-build", 2, 0.8, 150.0),
    DemoSkill("migration-plan", 2, 0.77, 70.0),
    DemoSkill("api-design", 2, 0.85, 48.0),
    DemoSkill("security-scan", 2, 0.91, 25.0),
    DemoSkill("lint-fix", 2, 0.96, 3.0),
    DemoSkill("type-annotate", 2, 0.83, 30.0),
    DemoSkill("release-notes", 1.5, 0.93, 14.0),
    DemoSkill("sql-optimize", 1.5, 0.72, 60.0),
    DemoSkill("log-triage", 1.5, 0.87, 20.0),
    DemoSkill("flaky-test-hunt", 1.2, 0.55, 140.0),
    DemoSkill("ci-fix", 1.2, 0.64, 90.0),
    DemoSkill("env-setup", 1, 0.9, 40.0),
    DemoSkill("schema-migrate", 1, 0.8, 33.0),
    DemoSkill("i18n-extract", 0.8, 0.95, 8.0),
    DemoSkill("perf-regression", 0.8, 0.6, 110.0),
    DemoSkill("accessibility-audit", 0.6, 0.9, 28.0),
    DemoSkill("license-check", 0.5, 0.99, 2.5),
    DemoSkill("onboarding-guide", 0.4, 0.96, 16.0),
)


async def prepare_demo_database(
    path: Path, *, rng: random.Random | None = None, now: datetime | None = None
) -> bool:
    """Create the demo database at ``path`` if missing; top up its history if old.

    Returns True when the file was created. Raises ``RealtimeError`` when ``path``
    exists but was not created by the demo.
    """
    rng = rng or random.Random()
    now = now or datetime.now(UTC)
    created = not path.exists()  # noqa: ASYNC240 - one stat before any I/O
    if not created and not path.is_file():  # noqa: ASYNC240
        raise RealtimeError(f"cannot prepare demo database {path}: not a regular file")
    try:
        return await _prepare(path, created, rng, now)
    except (OSError, sqlite3.Error) as exc:
        raise RealtimeError(f"cannot prepare demo database {path}: {exc}") from exc


async def _prepare(path: Path, created: bool, rng: random.Random, now: datetime) -> bool:
    if created:
        path.parent.mkdir(parents=True, exist_ok=True)
    async with aiosqlite.connect(path) as db:
        if created:
            await db.execute(f"PRAGMA application_id = {DEMO_APPLICATION_ID}")
            await db.execute("PRAGMA journal_mode = WAL")
            await create_schema(db)
        else:
            await _require_demo_database(db, path)
        latest = await _latest_invocation(db)
        if latest is None or now - latest > timedelta(hours=1):
            start = now - _HISTORY if latest is None else max(latest, now - _HISTORY)
            count = await _seed_history(db, rng, start, now)
            logger.info("demo: seeded %d invocations since %s", count, start.isoformat())
    return created


async def _require_demo_database(db: aiosqlite.Connection, path: Path) -> None:
    async with db.execute("PRAGMA application_id") as cursor:
        row = await cursor.fetchone()
    if row is None or row[0] != DEMO_APPLICATION_ID:
        raise RealtimeError(
            f"{path} exists and was not created by --demo; refusing to write demo data "
            f"into it (pass --db with a new file name, or omit --demo to serve it as is)"
        )


async def _latest_invocation(db: aiosqlite.Connection) -> datetime | None:
    async with db.execute("SELECT MAX(invoked_at) FROM skill_invocation") as cursor:
        row = await cursor.fetchone()
    if row is None or row[0] is None:
        return None
    return datetime.fromisoformat(str(row[0]))


async def _seed_history(
    db: aiosqlite.Connection, rng: random.Random, start: datetime, end: datetime
) -> int:
    # About one invocation every 25 seconds, spread over the period like a working day.
    span = (end - start).total_seconds()
    count = int(span / 25)
    moments = sorted(start + timedelta(seconds=rng.uniform(0, span)) for _ in range(count))
    rows = [
        _invocation(rng, _pick_skill(rng), moment, session=f"demo-{i // 40:04d}")
        for i, moment in enumerate(moments)
    ]
    await db.executemany(_INSERT_SQL, rows)
    await db.commit()
    return len(rows)


def _pick_skill(rng: random.Random, skills: Sequence[DemoSkill] = DEMO_SKILLS) -> DemoSkill:
    """Pick a skill, weighted by how often it runs."""
    return rng.choices(skills, weights=[s.weight for s in skills])[0]


def _invocation(
    rng: random.Random,
    skill: DemoSkill,
    moment: datetime,
    *,
    session: str,
    fail: bool = False,
    slow: float = 1.0,
) -> tuple[str, str, str, str, int, float | None, str | None]:
    completed = not fail and rng.random() < skill.success_rate
    duration = rng.lognormvariate(0.0, 0.35) * skill.mean_seconds * slow
    error = (
        None
        if completed
        else rng.choice(("timeout", "test_failure", "tool_error", "abandoned", "context_overflow"))
    )
    return (
        skill.name,
        moment.isoformat(),
        session,
        f"demo/{skill.name}",
        int(completed),
        round(duration, 3) if completed else None,
        error,
    )


class DemoWriter:
    """Keeps recording invocations into the demo database until stopped.

    Args:
        path: A database made by ``prepare_demo_database``.
        rng: Source of randomness (seeded in tests).
        pace: Mean seconds between invocations.
        first_burst: Seconds until the first burst of failures.
        burst_every: Mean seconds between bursts.
    """

    def __init__(
        self,
        path: Path,
        *,
        rng: random.Random | None = None,
        pace: float = 0.6,
        first_burst: float = 12.0,
        burst_every: float = 45.0,
    ) -> None:
        self.path = path
        self.invocations = 0
        self.bursts = 0
        self._rng = rng or random.Random()
        self._pace = pace
        self._first_burst = first_burst
        self._burst_every = burst_every
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask ``run()`` to finish after the current write."""
        self._stop.set()

    async def run(self) -> None:
        """Write until ``stop()``; each invocation is committed on its own."""
        loop = asyncio.get_running_loop()
        next_burst = loop.time() + self._first_burst
        async with aiosqlite.connect(self.path) as db:
            await _require_demo_database(db, self.path)
            while not self._stop.is_set():
                if loop.time() >= next_burst:
                    await self._burst(db)
                    next_burst = loop.time() + self._rng.uniform(0.7, 1.3) * self._burst_every
                else:
                    await self._record(db, _pick_skill(self._rng))
                if await self._wait(self._rng.expovariate(1.0 / self._pace)):
                    break

    async def _wait(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        return self._stop.is_set()

    async def _record(
        self, db: aiosqlite.Connection, skill: DemoSkill, *, fail: bool = False, slow: float = 1.0
    ) -> None:
        row = _invocation(
            self._rng, skill, datetime.now(UTC), session="demo-live", fail=fail, slow=slow
        )
        await db.execute(_INSERT_SQL, row)
        await db.commit()
        self.invocations += 1

    async def _burst(self, db: aiosqlite.Connection) -> None:
        # Alternate failures (a completion "drop") and slow runs (a duration "spike") of
        # one of the busier skills, then file it in skill_anomalies the way a
        # Session-Buddy detector would, and resolve what was filed a while ago.
        skill = self._rng.choice(DEMO_SKILLS[:8])
        failing = self.bursts % 2 == 0
        self.bursts += 1
        logger.info("demo: burst of %s for %s", "failures" if failing else "slow runs", skill.name)
        for _ in range(14):
            await self._record(db, skill, fail=failing, slow=1.0 if failing else 6.0)
            if await self._wait(self._rng.uniform(0.15, 0.35)):
                return
        now = datetime.now(UTC)
        baseline = skill.success_rate * 100 if failing else skill.mean_seconds
        observed = 0.0 if failing else skill.mean_seconds * 6
        await db.execute(
            "INSERT INTO skill_anomalies (skill_name, detected_at, anomaly_type, "
            "baseline_value, observed_value, deviation_score) VALUES (?, ?, ?, ?, ?, ?)",
            (
                skill.name,
                now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "drop" if failing else "spike",
                round(baseline, 2),
                round(observed, 2),
                round(self._rng.uniform(2.5, 4.5), 2),
            ),
        )
        await db.execute(
            "UPDATE skill_anomalies SET resolved_at = ? WHERE resolved_at IS NULL "
            "AND julianday(detected_at) < julianday(?)",
            (now.isoformat(), (now - timedelta(minutes=3)).isoformat()),
        )
        await db.commit()
