"""MetricsReader on real SQLite files: queries, time handling, change detection."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from session_buddy_realtime.data.connection import ThreadedReads
from session_buddy_realtime.data.reader import MAX_CACHED_ROWS, MetricsReader
from session_buddy_realtime.data.schema import SCHEMA_SQL, missing_tables
from session_buddy_realtime.data.source import SourceState
from session_buddy_realtime.protocol import format_timestamp, metrics_update_message
from tests.conftest import SERVER_MESSAGE, SkillsDB, iso


@pytest.fixture
async def reader(skills_db: SkillsDB) -> AsyncIterator[aiosqlite.Connection]:
    """A read-only connection to the test database, as the server opens it."""
    async with aiosqlite.connect(f"file:{skills_db.path}?mode=ro", uri=True) as db:
        yield db


class Clock:
    """A settable clock, so time-dependent results do not depend on the machine."""

    def __init__(self, moment: datetime) -> None:
        self.now = moment.timestamp()

    def __call__(self) -> float:
        return self.now


async def test_top_skills_are_the_ten_busiest_with_seed_fields(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """top_skills holds the ten skills with most invocations, busiest first, in percent."""
    ranked_db.record("skill-01", completed=False, count=2)
    snapshot = await MetricsReader(reader).read()
    names = [row["skill_name"] for row in snapshot.top_skills]
    assert names == [f"skill-{rank:02d}" for rank in range(1, 11)]
    first = snapshot.top_skills[0]
    assert first["total_invocations"] == 31
    assert first["completion_rate"] == pytest.approx(100 * 29 / 31, abs=0.01)
    assert first["avg_duration_seconds"] == 1.0


async def test_skill_with_nothing_completed_has_null_duration(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """avg_duration_seconds is null while no invocation of the skill has completed."""
    skills_db.record("never-done", completed=False, count=3)
    snapshot = await MetricsReader(reader).read({"never-done"})
    row = snapshot.skills["never-done"]
    assert row is not None
    assert row["avg_duration_seconds"] is None
    assert row["completion_rate"] == 0.0


async def test_rows_of_skills_below_the_top_ten_and_unknown_skills(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """A skill ranked 12th is read by name; an unknown skill reads as None."""
    source = MetricsReader(reader)
    snapshot = await source.read({"skill-12", "no-such-skill"})
    row = snapshot.skills["skill-12"]
    assert row is not None
    assert row["total_invocations"] == 18
    assert snapshot.skills["no-such-skill"] is None
    assert snapshot.data("skill-12")["top_skills"] == [row]
    assert snapshot.data("no-such-skill")["top_skills"] == []


async def test_table_anomalies_are_unresolved_rows_of_the_last_hour_as_times(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Recent unresolved rows count; old, resolved or only textually recent rows do not."""
    now = datetime.now(UTC)
    plus5 = timezone(timedelta(hours=5))
    minus5 = timezone(timedelta(hours=-5))
    skills_db.add_anomaly("recent-z", iso(now - timedelta(minutes=10)))
    skills_db.add_anomaly(
        "recent-space", (now - timedelta(minutes=20)).strftime("%Y-%m-%d %H:%M:%S")
    )
    # Written in UTC-5 it reads as text like 5 hours ago, but it is 30 minutes old.
    skills_db.add_anomaly(
        "recent-offset", (now - timedelta(minutes=30)).astimezone(minus5).isoformat()
    )
    # Written in UTC+5 it reads as text like the future, but it is 90 minutes old.
    skills_db.add_anomaly("old-offset", (now - timedelta(minutes=90)).astimezone(plus5).isoformat())
    skills_db.add_anomaly("old", iso(now - timedelta(hours=2)))
    skills_db.add_anomaly("resolved", iso(now - timedelta(minutes=5)), resolved_at=iso(now))
    snapshot = await MetricsReader(reader).read()
    found = {a["skill_name"] for a in snapshot.anomalies}
    assert found == {"recent-z", "recent-space", "recent-offset"}
    assert all(a["source"] == "table" for a in snapshot.anomalies)


async def test_anomalies_are_ordered_most_severe_first_and_filtered_per_skill(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """The all-skills list is sorted by deviation score; a skill view keeps only its own."""
    now = datetime.now(UTC)
    skills_db.add_anomaly("mild", iso(now - timedelta(minutes=1)), score=1.5)
    skills_db.add_anomaly("severe", iso(now - timedelta(minutes=2)), score=6.0)
    skills_db.add_anomaly("unscored", iso(now - timedelta(minutes=3)), score=None)
    snapshot = await MetricsReader(reader).read({"mild"})
    assert [a["skill_name"] for a in snapshot.anomalies] == ["severe", "mild", "unscored"]
    assert [a["skill_name"] for a in snapshot.data("mild")["anomalies"]] == ["mild"]


async def test_table_anomaly_ages_out_without_a_new_query(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """An anomaly leaves the stream once it is an hour old, with no query needed."""
    now = datetime.now(UTC)
    skills_db.add_anomaly("aging", iso(now - timedelta(minutes=50)))
    clock = Clock(now)
    source = MetricsReader(reader, clock=clock)
    assert [a["skill_name"] for a in (await source.read()).anomalies] == ["aging"]
    queries = source.queries
    clock.now += 11 * 60
    assert (await source.read()).anomalies == []
    assert source.queries == queries


def _live_history(db: SkillsDB, now: datetime) -> None:
    for minute in range(30, 180, 3):
        db.record("flaky", at=now - timedelta(minutes=minute), duration=2.0)
    db.record("flaky", at=now - timedelta(minutes=1), completed=False, count=10)


async def test_live_detection_flags_a_recent_completion_drop(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Ten failures in the last minutes after hours of success show as a live 'drop'."""
    now = datetime.now(UTC)
    _live_history(skills_db, now)
    snapshot = await MetricsReader(reader).read({"flaky"})
    [anomaly] = snapshot.data("flaky")["anomalies"]
    assert anomaly["source"] == "live"
    assert anomaly["anomaly_type"] == "drop"
    assert anomaly["metric"] == "completion_rate"
    assert anomaly["baseline_value"] == 100.0
    assert anomaly["observed_value"] == 0.0
    assert anomaly["deviation_score"] >= 3.0


async def test_live_anomaly_keeps_its_first_detection_time_then_expires(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """A live anomaly keeps detected_at while active and leaves after the recent window."""
    now = datetime.now(UTC)
    _live_history(skills_db, now)
    clock = Clock(now)
    source = MetricsReader(reader, clock=clock)
    first = (await source.read()).anomalies[0]["detected_at"]
    skills_db.record("other", at=now)
    clock.now += 30
    second = await source.read()
    assert second.anomalies[0]["detected_at"] == first
    clock.now += 6 * 60
    assert (await source.read()).anomalies == []


async def test_no_requery_until_another_connection_commits(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Reads while the database is unchanged run no data query; a commit elsewhere does."""
    skills_db.record("a")
    source = MetricsReader(reader)
    await source.read()
    queries, refreshes = source.queries, source.refreshes
    for _ in range(5):
        await source.read()
    assert (source.queries, source.refreshes) == (queries, refreshes)
    skills_db.record("b")
    snapshot = await source.read()
    assert source.refreshes == refreshes + 1
    assert {row["skill_name"] for row in snapshot.top_skills} == {"a", "b"}


async def test_new_subscribed_skill_is_read_without_a_full_refresh(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """A skill asked for the first time costs one row query, not a refresh."""
    source = MetricsReader(reader)
    await source.read()
    refreshes, queries = source.refreshes, source.queries
    snapshot = await source.read({"skill-11"})
    assert snapshot.skills["skill-11"] is not None
    assert (source.refreshes, source.queries) == (refreshes, queries + 1)


async def test_writes_through_the_same_connection_are_seen(skills_db: SkillsDB) -> None:
    """Writes made on the shared connection itself trigger a refresh (data_version misses them)."""
    async with aiosqlite.connect(skills_db.path) as shared:
        source = MetricsReader(shared)
        assert (await source.read()).top_skills == []
        await shared.execute(
            "INSERT INTO skill_invocation (skill_name, invoked_at, completed, duration_seconds) "
            "VALUES ('same-conn', ?, 1, 1.0)",
            (iso(datetime.now(UTC)),),
        )
        await shared.commit()
        snapshot = await source.read()
        assert [row["skill_name"] for row in snapshot.top_skills] == ["same-conn"]


async def test_host_row_factory_is_left_alone(ranked_db: SkillsDB) -> None:
    """Reading through a connection with a dict row factory works and leaves it set."""

    def as_dict(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
        return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}

    async with aiosqlite.connect(ranked_db.path) as shared:
        shared.row_factory = as_dict  # type: ignore[assignment]
        snapshot = await MetricsReader(shared).read({"skill-12"})
        assert len(snapshot.top_skills) == 10
        assert shared.row_factory is as_dict
        async with shared.execute("SELECT skill_name FROM skill_metrics LIMIT 1") as cursor:
            assert isinstance(await cursor.fetchone(), dict)


async def test_sync_connection_reads_like_aiosqlite_and_is_left_as_it_was(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Through a host's sqlite3.Connection (row_factory sqlite3.Row, read on our thread) the
    reader returns what it returns through aiosqlite, sees the host's own uncommitted and
    committed writes, and leaves the row factory, the transaction state and the connection
    as they were."""
    expected = await MetricsReader(reader).read({"skill-12"})
    host = sqlite3.connect(ranked_db.path, check_same_thread=False)
    host.row_factory = sqlite3.Row
    shared = await ThreadedReads.shared(host)
    try:
        source = MetricsReader(shared)
        snapshot = await source.read({"skill-12"})
        assert snapshot.top_skills == expected.top_skills
        assert snapshot.skills == expected.skills
        assert not await missing_tables(shared)
        host.execute(
            "INSERT INTO skill_invocation (skill_name, invoked_at, completed, duration_seconds) "
            "VALUES ('through-the-host', ?, 1, 1.0)",
            (iso(datetime.now(UTC)),),
        )
        host.executemany(
            "INSERT INTO skill_invocation (skill_name, invoked_at, completed) VALUES (?, ?, 1)",
            [("through-the-host", iso(datetime.now(UTC)))] * 40,
        )
        seen = await source.read()  # total_changes moved: data_version alone misses it
        assert seen.top_skills[0]["skill_name"] == "through-the-host"
        assert host.in_transaction, "the host's own transaction is its own"
        host.commit()
        assert (await source.read()).top_skills[0]["total_invocations"] == 41
    finally:
        await shared.close()
    assert host.row_factory is sqlite3.Row
    assert isinstance(host.execute("SELECT 1 AS one").fetchone(), sqlite3.Row)
    host.close()


async def test_missing_tables_are_reported_then_recovered(tmp_path: Path) -> None:
    """A database without the tables reads as 'missing_tables' naming them, until created."""
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as reader:
        source = MetricsReader(reader)
        snapshot = await source.read()
        assert snapshot.state is SourceState.MISSING_TABLES
        assert snapshot.message is not None
        assert "skill_metrics" in snapshot.message
        assert snapshot.source()["stale"] is True
        with contextlib.closing(sqlite3.connect(path)) as writer:
            writer.executescript(SCHEMA_SQL)
        snapshot = await source.read()
        assert snapshot.state is SourceState.OK
        assert snapshot.source() == {
            "state": "ok",
            "stale": False,
            "as_of": snapshot.as_of,
            "message": None,
        }


async def test_error_keeps_the_last_good_data(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """When the table disappears the last good rows are still served, flagged stale."""
    source = MetricsReader(reader)
    good = await source.read()
    with ranked_db.connect() as writer:
        writer.execute("DROP TABLE skill_metrics")
    broken = await source.read()
    assert broken.state is SourceState.MISSING_TABLES
    assert broken.top_skills == good.top_skills
    assert broken.as_of == good.as_of


async def test_non_finite_numbers_read_as_null(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Infinity stored in SQLite comes out as null, so every frame stays valid JSON."""
    ranked_db.add_anomaly("skill-01", iso(datetime.now(UTC)), score=float("inf"))
    with ranked_db.connect() as db:
        db.execute(
            "UPDATE skill_metrics SET avg_duration_seconds = 1e999 WHERE skill_name = 'skill-02'"
        )
    snapshot = await MetricsReader(reader).read()
    row = next(r for r in snapshot.top_skills if r["skill_name"] == "skill-02")
    assert row["avg_duration_seconds"] is None
    assert snapshot.anomalies[0]["deviation_score"] is None
    SERVER_MESSAGE.validate(
        metrics_update_message(
            timestamp=format_timestamp(),
            skill=None,
            data=snapshot.data(None),
            source=snapshot.source(),
        )
    )


async def test_negative_deviation_counts_by_magnitude(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """A drop stored with a negative score ranks by its size, before milder ones."""
    now = datetime.now(UTC)
    skills_db.add_anomaly("mild", iso(now - timedelta(minutes=1)), score=2.0)
    skills_db.add_anomaly("negative-severe", iso(now - timedelta(minutes=2)), score=-4.0)
    snapshot = await MetricsReader(reader).read()
    assert [a["skill_name"] for a in snapshot.anomalies] == ["negative-severe", "mild"]


async def test_missing_anomaly_table_keeps_the_top_skills(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Without skill_anomalies the top skills are still served, and the state names the table."""
    with ranked_db.connect() as db:
        db.execute("DROP TABLE skill_anomalies")
    snapshot = await MetricsReader(reader).read()
    assert snapshot.state is SourceState.MISSING_TABLES
    assert snapshot.message is not None
    assert "skill_anomalies" in snapshot.message
    assert "skill_metrics" not in snapshot.message
    assert len(snapshot.top_skills) == 10


async def test_subscription_cache_is_bounded_and_keeps_the_rows_asked_for(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Thousands of distinct subscribed skills stay under the cache cap; each read has its rows."""
    source = MetricsReader(reader)
    await source.read()
    for i in range(2 * MAX_CACHED_ROWS):
        snapshot = await source.read({f"ghost-{i}", "skill-12"})
        assert set(snapshot.skills) == {f"ghost-{i}", "skill-12"}
        assert snapshot.skills[f"ghost-{i}"] is None
        row = snapshot.skills["skill-12"]
        assert row is not None
        assert row["total_invocations"] == 18
        assert source.cached_rows <= MAX_CACHED_ROWS
    assert source.refreshes == 1


async def test_a_read_larger_than_the_cache_cap_still_has_all_its_rows(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """When one read asks for more skills than the cap, all of them are in its snapshot."""
    source = MetricsReader(reader)
    await source.read({"ghost-a"})
    many = {f"ghost-{i}" for i in range(MAX_CACHED_ROWS + 100)} | {"skill-11", "skill-12"}
    snapshot = await source.read(many)
    assert set(snapshot.skills) == many
    known = {name for name, row in snapshot.skills.items() if row is not None}
    assert known == {"skill-11", "skill-12"}
    snapshot = await source.read({"ghost-b", "skill-12"})
    assert snapshot.skills["skill-12"] is not None
    assert source.cached_rows <= MAX_CACHED_ROWS
