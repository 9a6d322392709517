"""Invalid UTF-8 stored as TEXT by another process costs only the value that holds it.

Python's ``sqlite3`` cannot decode such text and would fail the whole query while
fetching the row. Every test writes through its own ``sqlite3`` connection to a real
file, as a second process would (``CAST(? AS TEXT)`` of raw bytes), then reads it with
the real code: ``MetricsReader`` on a read-only connection, or the server over a socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiosqlite
import pytest

from session_buddy_realtime.data.queries import MAX_TABLE_ANOMALIES
from session_buddy_realtime.data.reader import MetricsReader
from session_buddy_realtime.data.source import SourceState
from tests.conftest import UNIT, ClientFactory, ServerFactory, SkillsDB, iso, url_of
from tests.test_hostile_data import assert_encodable, drop_history, recv_frames

BAD_UTF8 = (b"\xff", b"caf\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"ok\x80")
"""Byte strings that are not UTF-8: a stray byte, a cut sequence, a surrogate, overlong."""
TOP_TEN = [f"skill-{rank:02d}" for rank in range(1, 11)]


@pytest.fixture
async def reader(skills_db: SkillsDB) -> AsyncIterator[aiosqlite.Connection]:
    """A read-only connection to the test database, as the server opens it."""
    async with aiosqlite.connect(f"file:{skills_db.path}?mode=ro", uri=True) as db:
        yield db


def rename(db: SkillsDB, placeholder: str, raw: bytes) -> None:
    """Give ``placeholder``'s rows in all three tables the name ``raw``, stored as TEXT."""
    with db.connect() as writer:
        for table in ("skill_invocation", "skill_metrics", "skill_anomalies"):
            writer.execute(
                f"UPDATE {table} SET skill_name = CAST(? AS TEXT) "  # noqa: S608
                "WHERE skill_name = ?",
                (raw, placeholder),
            )


def set_text(db: SkillsDB, table: str, column: str, raw: bytes, skill: str) -> None:
    """Store ``raw`` as TEXT in ``column`` of ``skill``'s rows of ``table``."""
    with db.connect() as writer:
        writer.execute("PRAGMA ignore_check_constraints = ON")
        writer.execute(
            f"UPDATE {table} SET {column} = CAST(? AS TEXT) "  # noqa: S608
            "WHERE skill_name = ?",
            (raw, skill),
        )


def hostile_names(db: SkillsDB, now: datetime) -> None:
    """Undecodable names: a live drop, a table anomaly and the top ranks (25 of them)."""
    for i, raw in enumerate(BAD_UTF8):
        placeholder = f"placeholder-{i}"
        drop_history(db, placeholder, now)
        db.add_anomaly(placeholder, iso(now), score=9.0)
        rename(db, placeholder, raw)
    with db.connect() as writer:
        writer.execute("UPDATE skill_metrics SET total_invocations = 1000000 WHERE rowid > 12")
        writer.executemany(
            "INSERT INTO skill_metrics (skill_name, total_invocations) "
            "VALUES (CAST(? AS TEXT), 1000000)",
            [(raw + f"-{n}".encode(),) for raw in BAD_UTF8 for n in range(4)],
        )


async def test_undecodable_names_are_skipped_in_every_query(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Rows named with invalid UTF-8 are in no top slot, anomaly or row; the read stays ok."""
    hostile_names(ranked_db, datetime.now(UTC))
    snapshot = await MetricsReader(reader).read({"skill-12"})
    assert (snapshot.state, snapshot.message) == (SourceState.OK, None)
    assert [row["skill_name"] for row in snapshot.top_skills] == TOP_TEN
    assert snapshot.anomalies == []
    row = snapshot.skills["skill-12"]
    assert row is not None
    assert row["total_invocations"] == 18
    assert_encodable(snapshot, ("skill-12",))


async def test_undecodable_text_fields_read_as_null_and_cost_only_their_anomaly(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Invalid UTF-8 in last_invoked or a number reads as null; in anomaly_type it drops the row."""
    now = datetime.now(UTC)
    for skill in ("skill-01", "skill-02", "skill-03"):
        ranked_db.add_anomaly(skill, iso(now - timedelta(minutes=1)), score=4.0)
    set_text(ranked_db, "skill_metrics", "last_invoked", b"2024\xff", "skill-01")
    set_text(ranked_db, "skill_metrics", "completion_rate", b"\xc3", "skill-02")
    set_text(ranked_db, "skill_metrics", "avg_duration_seconds", b"\xff", "skill-02")
    set_text(ranked_db, "skill_metrics", "completed_invocations", b"\xff", "skill-02")
    set_text(ranked_db, "skill_anomalies", "anomaly_type", b"drop\xff", "skill-01")
    set_text(ranked_db, "skill_anomalies", "detected_at", iso(now).encode() + b"\xff", "skill-02")
    set_text(ranked_db, "skill_anomalies", "deviation_score", b"\xff", "skill-03")
    set_text(ranked_db, "skill_anomalies", "baseline_value", b"\xed\xa0\x80", "skill-03")
    snapshot = await MetricsReader(reader).read({"skill-01"})
    assert snapshot.state is SourceState.OK
    rows = {row["skill_name"]: row for row in snapshot.top_skills}
    assert list(rows) == TOP_TEN
    assert rows["skill-01"]["last_invoked"] is None
    assert rows["skill-03"]["last_invoked"] is not None
    assert (rows["skill-02"]["completion_rate"], rows["skill-02"]["avg_duration_seconds"]) == (
        0.0,
        None,
    )
    assert rows["skill-02"]["completed_invocations"] == 0
    assert snapshot.skills["skill-01"] == rows["skill-01"]
    [anomaly] = snapshot.anomalies
    assert anomaly["skill_name"] == "skill-03"
    assert (anomaly["deviation_score"], anomaly["baseline_value"]) == (None, None)
    assert anomaly["observed_value"] == 40.0
    assert_encodable(snapshot, ("skill-01",))


async def test_undecodable_anomalies_take_no_place_of_good_ones(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """More undecodable anomalies than the query's limit, all newer, leave the good one served."""
    now = datetime.now(UTC)
    skills_db.add_anomaly("older-good", iso(now - timedelta(minutes=30)), score=2.0)
    with skills_db.connect() as writer:
        writer.executemany(
            "INSERT INTO skill_anomalies (skill_name, detected_at, anomaly_type, "
            "deviation_score) VALUES (CAST(? AS TEXT), ?, 'spike', 9.0)",
            [
                (BAD_UTF8[i % 5], iso(now - timedelta(seconds=i)))
                for i in range(2 * MAX_TABLE_ANOMALIES + 10)
            ],
        )
    source = MetricsReader(reader)
    snapshot = await source.read()
    assert snapshot.state is SourceState.OK
    assert [a["skill_name"] for a in snapshot.anomalies] == ["older-good"]


async def test_subscribed_row_with_undecodable_text_is_read_by_name(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """A skill below the top ten, first asked for later, reads with last_invoked null."""
    set_text(ranked_db, "skill_metrics", "last_invoked", b"\xff", "skill-12")
    source = MetricsReader(reader)
    await source.read()
    snapshot = await source.read({"skill-12"})
    assert snapshot.state is SourceState.OK
    row = snapshot.skills["skill-12"]
    assert row is not None
    assert (row["total_invocations"], row["last_invoked"]) == (18, None)
    assert source.refreshes == 1


async def test_the_host_connections_text_factory_is_neither_needed_nor_changed(
    skills_db: SkillsDB,
) -> None:
    """A host connection whose text_factory returns bytes reads the same names, left as set."""
    now = datetime.now(UTC)
    drop_history(skills_db, "flaky", now)
    skills_db.add_anomaly("stored", iso(now))
    async with aiosqlite.connect(skills_db.path) as shared:
        shared.text_factory = bytes
        snapshot = await MetricsReader(shared).read({"flaky"})
        assert shared.text_factory is bytes
    assert snapshot.state is SourceState.OK
    assert [row["skill_name"] for row in snapshot.top_skills] == ["flaky"]
    assert {(a["skill_name"], a["source"]) for a in snapshot.anomalies} == {
        ("flaky", "live"),
        ("stored", "table"),
    }
    assert_encodable(snapshot, ("flaky",))


async def test_undecodable_text_in_every_table_keeps_clients_updated_over_a_real_socket(
    skills_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Amid invalid UTF-8 in all three tables, both clients get fresh 'ok' updates, no error."""
    now = datetime.now(UTC)
    hostile_names(skills_db, now)
    drop_history(skills_db, "watched", now)
    for rank in range(1, 4):
        skills_db.record(f"steady-{rank}", at=now - timedelta(hours=1), count=10 * rank)
    skills_db.add_anomaly("steady-1", iso(now), score=3.0)
    skills_db.add_anomaly("steady-2", iso(now), score=3.0)
    set_text(skills_db, "skill_anomalies", "anomaly_type", b"\xff", "steady-2")
    set_text(skills_db, "skill_metrics", "last_invoked", b"\xff", "steady-3")
    server = await start_server()
    everyone = await open_client(url_of(server))
    one = await open_client(url_of(server))
    await one.send_json({"type": "subscribe", "skill": "watched"})
    [confirmed] = await recv_frames(one, 1, "subscription_confirmed")
    assert confirmed["known"] is True
    for message in await recv_frames(one, 3, "metrics_update"):
        assert message["source"]["state"] == "ok", message["source"]
        [row] = message["data"]["top_skills"]
        assert row["skill_name"] == "watched"
        [drop] = message["data"]["anomalies"]
        assert (drop["source"], drop["anomaly_type"]) == ("live", "drop")
    for message in await recv_frames(everyone, 3, "metrics_update"):
        assert message["source"]["state"] == "ok", message["source"]
        names = {row["skill_name"] for row in message["data"]["top_skills"]}
        assert names == {"watched", "steady-1", "steady-2", "steady-3"}
        assert {a["skill_name"] for a in message["data"]["anomalies"]} == {"watched", "steady-1"}
    # Later writes, a bad name among them, are followed.
    first_as_of = message["source"]["as_of"]
    skills_db.record("late")
    skills_db.record("late-bad")
    rename(skills_db, "late-bad", b"late\xff")
    async with asyncio.timeout(80 * UNIT):
        while True:
            [message] = await recv_frames(everyone, 1, "metrics_update")
            assert message["source"]["state"] == "ok", message["source"]
            if "late" in [row["skill_name"] for row in message["data"]["top_skills"]]:
                break
    assert message["source"]["as_of"] != first_as_of
    [update] = await recv_frames(one, 1, "metrics_update")
    assert update["source"]["state"] == "ok"
    status = server.status()
    assert status["errors"] == 0, status["last_error"]
