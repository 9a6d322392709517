"""The demo database and writer behind ``serve --demo``, in process, on real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from session_buddy_realtime import RealtimeError, RealTimeMetricsServer
from session_buddy_realtime.data.demo import (
    DEMO_APPLICATION_ID,
    DEMO_SKILLS,
    DemoWriter,
    prepare_demo_database,
)
from session_buddy_realtime.data.schema import REQUIRED_TABLES, SCHEMA_SQL
from tests.conftest import SERVER_MESSAGE, UNIT

DEMO_NAMES = {skill.name for skill in DEMO_SKILLS}


def query(path: Path, sql: str, *parameters: Any) -> list[Any]:
    """Run one read-only query on ``path`` through a connection of its own."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute(sql, parameters).fetchall()


def count(path: Path, table: str) -> int:
    return int(query(path, f"SELECT COUNT(*) FROM {table}")[0][0])  # noqa: S608


async def poll(predicate: Callable[[], bool], within: float) -> None:
    """Wait until ``predicate()`` holds, checking every ``UNIT``; fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - the writer has no event to wait on
            await asyncio.sleep(UNIT)


def foreign_database(path: Path) -> Path:
    """A skills database that someone else created (no demo mark), with one row."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(SCHEMA_SQL)
        db.execute(
            "INSERT INTO skill_invocation (skill_name, invoked_at, completed) "
            "VALUES ('real-skill', '2025-01-01T00:00:00Z', 1)"
        )
        db.commit()
    return path


async def test_prepare_creates_a_day_of_history(tmp_path: Path) -> None:
    """A new demo database has the schema, the demo mark and a plausible day of history."""
    path = tmp_path / "nested" / "demo.db"
    now = datetime.now(UTC)

    assert await prepare_demo_database(path, rng=random.Random(1), now=now) is True

    tables = {row[0] for row in query(path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert set(REQUIRED_TABLES) <= tables
    assert query(path, "PRAGMA application_id") == [(DEMO_APPLICATION_ID,)]
    invocations = count(path, "skill_invocation")
    assert 3000 < invocations < 4000, "about one invocation every 25 s for 24 h"
    first, last = query(path, "SELECT MIN(invoked_at), MAX(invoked_at) FROM skill_invocation")[0]
    assert now - timedelta(hours=24) <= datetime.fromisoformat(first) < now - timedelta(hours=23)
    assert now - timedelta(hours=1) < datetime.fromisoformat(last) <= now

    metrics = query(
        path, "SELECT skill_name, total_invocations, completion_rate FROM skill_metrics"
    )
    names = {name for name, _, _ in metrics}
    assert len(names) >= 24, "a few dozen demo skills"
    assert names <= DEMO_NAMES
    assert sum(total for _, total, _ in metrics) == invocations
    rates = [rate for _, _, rate in metrics]
    assert all(0.0 <= rate <= 100.0 for rate in rates)
    assert max(rates) - min(rates) > 20, "some skills fail much more than others"
    assert count(path, "skill_anomalies") == 0, "anomalies come from the writer's bursts"


async def test_prepare_again_keeps_recent_history(tmp_path: Path) -> None:
    """Preparing an existing, up-to-date demo database adds nothing and returns False."""
    path = tmp_path / "demo.db"
    await prepare_demo_database(path, rng=random.Random(1))
    before = count(path, "skill_invocation")

    assert await prepare_demo_database(path, rng=random.Random(2)) is False

    assert count(path, "skill_invocation") == before


async def test_prepare_tops_up_stale_history(tmp_path: Path) -> None:
    """A demo database last written hours ago gets history from then to now, not a new day."""
    path = tmp_path / "demo.db"
    start = datetime.now(UTC)
    await prepare_demo_database(path, rng=random.Random(1), now=start)
    before = count(path, "skill_invocation")
    (latest,) = query(path, "SELECT MAX(invoked_at) FROM skill_invocation")[0]

    later = start + timedelta(hours=3)
    assert await prepare_demo_database(path, rng=random.Random(2), now=later) is False

    added = count(path, "skill_invocation") - before
    assert 300 < added < 600, "about three hours at one invocation every 25 s"
    [(new_first,)] = query(
        path, "SELECT MIN(invoked_at) FROM skill_invocation WHERE id > ?", before
    )
    assert datetime.fromisoformat(new_first) >= datetime.fromisoformat(latest)


async def test_prepare_refuses_a_database_it_did_not_create(tmp_path: Path) -> None:
    """An existing SQLite file without the demo mark is refused by path and left untouched."""
    path = foreign_database(tmp_path / "skills.db")
    before = path.read_bytes()

    with pytest.raises(RealtimeError, match="not created by --demo") as caught:
        await prepare_demo_database(path)

    assert str(path) in str(caught.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["skills.db"], "no journal or WAL file left behind"


async def test_writer_refuses_a_database_it_did_not_create(tmp_path: Path) -> None:
    """``DemoWriter.run`` checks the demo mark too, before writing anything."""
    path = foreign_database(tmp_path / "skills.db")
    before = path.read_bytes()
    writer = DemoWriter(path, rng=random.Random(1), pace=0.01, first_burst=0.0)

    with pytest.raises(RealtimeError, match="not created by --demo"):
        async with asyncio.timeout(40 * UNIT):
            await writer.run()

    assert writer.invocations == 0
    assert path.read_bytes() == before


async def test_writer_burst_shows_as_live_and_table_anomaly(tmp_path: Path) -> None:
    """A burst of failures is detected live as a "drop" and filed in skill_anomalies,
    both visible in the server's snapshot; ``stop()`` then ends the writer promptly."""
    path = tmp_path / "demo.db"
    await prepare_demo_database(path, rng=random.Random(1))
    history = count(path, "skill_invocation")
    writer = DemoWriter(path, rng=random.Random(1), pace=0.01, first_burst=0.0, burst_every=1000)
    task = asyncio.create_task(writer.run())
    try:
        # The burst (14 failures, 0.15-0.35 s apart) ends with its skill_anomalies row.
        await poll(lambda: task.done() or count(path, "skill_anomalies") > 0, 200 * UNIT)
        assert not task.done(), task
        assert writer.bursts == 1
        [(skill, kind, observed, resolved_at)] = query(
            path,
            "SELECT skill_name, anomaly_type, observed_value, resolved_at FROM skill_anomalies",
        )
        assert (kind, observed, resolved_at) == ("drop", 0.0, None)
        assert skill in {s.name for s in DEMO_SKILLS[:8]}, "bursts hit a busy skill"
        burst = query(
            path,
            "SELECT completed FROM skill_invocation WHERE id > ? AND session_id = 'demo-live' "
            "AND skill_name = ? ORDER BY id LIMIT 14",
            history,
            skill,
        )
        assert burst == [(0,)] * 14

        async with RealTimeMetricsServer(host="127.0.0.1", port=0, db_path=path) as server:
            update = await server.snapshot()
            one_skill = await server.snapshot(skill)
    finally:
        writer.stop()
        async with asyncio.timeout(20 * UNIT):
            await task

    SERVER_MESSAGE.validate(update)
    SERVER_MESSAGE.validate(one_skill)
    anomalies = update["data"]["anomalies"]
    live = [a for a in anomalies if a["skill_name"] == skill and a["source"] == "live"]
    table = [a for a in anomalies if a["skill_name"] == skill and a["source"] == "table"]
    assert [a["anomaly_type"] for a in live] == ["drop"]
    assert live[0]["metric"] == "completion_rate"
    assert live[0]["deviation_score"] >= 3.0
    assert live[0]["observed_value"] < live[0]["baseline_value"]
    assert [a["anomaly_type"] for a in table] == ["drop"]
    assert {a["source"] for a in one_skill["data"]["anomalies"]} == {"live", "table"}
    assert writer.invocations > 14


async def test_writer_stop_interrupts_a_long_wait(tmp_path: Path) -> None:
    """``stop()`` ends ``run()`` at once even when the next write is a minute away."""
    path = tmp_path / "demo.db"
    await prepare_demo_database(path, rng=random.Random(1))
    writer = DemoWriter(path, rng=random.Random(1), pace=60.0, first_burst=600.0)
    task = asyncio.create_task(writer.run())
    try:
        await poll(lambda: task.done() or writer.invocations > 0, 40 * UNIT)
    finally:
        writer.stop()
        async with asyncio.timeout(10 * UNIT):
            await task

    assert writer.invocations == 1
    assert writer.bursts == 0
    [(session,)] = query(path, "SELECT session_id FROM skill_invocation ORDER BY id DESC LIMIT 1")
    assert session == "demo-live"


async def test_writer_commits_each_invocation_for_other_connections(tmp_path: Path) -> None:
    """Each invocation is committed on its own, so a reader sees them while the writer runs."""
    path = tmp_path / "demo.db"
    await prepare_demo_database(path, rng=random.Random(1))
    before = count(path, "skill_invocation")
    writer = DemoWriter(path, rng=random.Random(3), pace=0.01, first_burst=600.0)
    task = asyncio.create_task(writer.run())
    try:
        async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as reader:
            async with asyncio.timeout(40 * UNIT):
                while True:
                    async with reader.execute("SELECT COUNT(*) FROM skill_invocation") as cur:
                        row = await cur.fetchone()
                    assert row is not None
                    if row[0] >= before + 5:
                        break
                    await asyncio.sleep(UNIT)
    finally:
        writer.stop()
        async with asyncio.timeout(10 * UNIT):
            await task
    assert count(path, "skill_invocation") == before + writer.invocations
