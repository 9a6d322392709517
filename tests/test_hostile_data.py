"""Hostile values written into the skills database by another process cost only themselves.

Every test writes through its own ``sqlite3`` connection to a real file, as a second
process would, then reads it with the real code: ``MetricsReader`` on a read-only
connection, or the whole server over a real socket.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiosqlite
import pytest

from session_buddy_realtime.data.queries import MAX_TEXT_LENGTH
from session_buddy_realtime.data.reader import MetricsReader
from session_buddy_realtime.data.source import MAX_ANOMALIES, MetricsSnapshot
from session_buddy_realtime.protocol import MAX_SKILL_NAME_LENGTH, encode, format_timestamp
from tests.conftest import (
    SERVER_MESSAGE,
    UNIT,
    Client,
    ClientFactory,
    ServerFactory,
    SkillsDB,
    iso,
    url_of,
)

MIB = 1 << 20
SMALL_FRAME = 16 * 1024
"""What a frame of these small test databases must stay under, whatever the hostile rows."""
BAD_DURATIONS: tuple[Any, ...] = (math.inf, 1e200, "slow", b"\x00\x01")
"""Durations no real invocation has: infinite, overflowing when squared, text, blob."""


@pytest.fixture
async def reader(skills_db: SkillsDB) -> AsyncIterator[aiosqlite.Connection]:
    """A read-only connection to the test database, as the server opens it."""
    async with aiosqlite.connect(f"file:{skills_db.path}?mode=ro", uri=True) as db:
        yield db


def invoke(db: SkillsDB, *rows: tuple[Any, datetime, Any, int]) -> None:
    """Insert (skill, at, duration, completed) rows of any values, on a connection of its own."""
    with db.connect() as writer:
        writer.executemany(
            "INSERT INTO skill_invocation (skill_name, invoked_at, session_id, completed, "
            "duration_seconds) VALUES (?, ?, 'hostile', ?, ?)",
            [(skill, iso(at), completed, duration) for skill, at, duration, completed in rows],
        )


def spike_history(db: SkillsDB, skill: str, now: datetime) -> None:
    """Hours of 1.0-1.4 s runs (mean 1.2), then ten 5.0 s runs; both windows get bad durations."""
    for i in range(30):
        db.record(skill, at=now - timedelta(minutes=30 + 3 * i), duration=1.0 + 0.1 * (i % 5))
    db.record(skill, at=now - timedelta(minutes=1), duration=5.0, count=10)
    for at in (now - timedelta(minutes=45), now - timedelta(seconds=30)):
        invoke(db, *((skill, at, value, 1) for value in BAD_DURATIONS))


def drop_history(db: SkillsDB, skill: Any, now: datetime) -> None:
    """Hours of successes, then ten failures: enough for a live 'drop' of ``skill``."""
    invoke(db, *((skill, now - timedelta(minutes=m), 1.0, 1) for m in range(30, 180, 5)))
    invoke(db, *[(skill, now - timedelta(minutes=1), None, 0)] * 10)


def assert_encodable(snapshot: MetricsSnapshot, skills: tuple[str, ...] = ()) -> list[int]:
    """Every payload encodes without NaN and validates; returns the encoded sizes."""
    json.dumps(snapshot.top_skills, allow_nan=False)
    json.dumps(snapshot.anomalies, allow_nan=False)
    json.dumps(snapshot.skills, allow_nan=False)
    sizes = []
    for skill in (None, *skills):
        message = snapshot.update(skill, format_timestamp())
        SERVER_MESSAGE.validate(message)
        sizes.append(len(encode(message).encode()))
    return sizes


async def test_bad_durations_are_skipped_and_the_other_invocations_still_count(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """inf, 1e200, text and blob durations are skipped; the good runs still make a finite spike."""
    now = datetime.now(UTC)
    spike_history(skills_db, "slowing", now)
    snapshot = await MetricsReader(reader).read({"slowing"})
    [spike] = [a for a in snapshot.data("slowing")["anomalies"] if a["anomaly_type"] == "spike"]
    assert (spike["baseline_value"], spike["observed_value"]) == (1.2, 5.0)
    assert math.isfinite(spike["deviation_score"])
    assert spike["deviation_score"] >= 3.0
    assert_encodable(snapshot, ("slowing",))


async def test_overflowing_baseline_alone_gives_no_non_finite_anomaly(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """A baseline made only of 1e200 s runs (its square overflows) yields no anomaly and encodes."""
    now = datetime.now(UTC)
    skills_db.record("huge", at=now - timedelta(hours=1), duration=1e200, count=30)
    skills_db.record("huge", at=now - timedelta(minutes=1), duration=1e200, count=10)
    snapshot = await MetricsReader(reader).read({"huge"})
    assert snapshot.data("huge")["anomalies"] == []
    assert_encodable(snapshot, ("huge",))


async def test_text_in_total_invocations_does_not_enter_the_top_ten(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Rows whose total is text, a blob or infinite neither enter nor reorder the top ten."""
    with ranked_db.connect() as writer:
        writer.executemany(
            "INSERT INTO skill_metrics (skill_name, total_invocations) VALUES (?, ?)",
            [("text-total", "lots"), ("blob-total", b"\xff"), ("inf-total", math.inf)],
        )
    snapshot = await MetricsReader(reader).read()
    assert [row["skill_name"] for row in snapshot.top_skills] == [
        f"skill-{rank:02d}" for rank in range(1, 11)
    ]
    assert_encodable(snapshot)


async def test_rows_without_a_text_name_are_skipped_in_every_query(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """NULL and blob skill names are in no top row, no table anomaly and no live anomaly."""
    now = datetime.now(UTC)
    blob = b"blob-skill"
    with ranked_db.connect() as writer:
        writer.executemany(
            "INSERT INTO skill_metrics (skill_name, total_invocations) VALUES (?, 1000000)",
            [(None,), (blob,)],
        )
        writer.execute(
            "INSERT INTO skill_anomalies (skill_name, detected_at, anomaly_type, "
            "deviation_score) VALUES (?, ?, 'drop', 9.0)",
            (blob, iso(now)),
        )
    drop_history(ranked_db, blob, now)
    snapshot = await MetricsReader(reader).read()
    assert [row["skill_name"] for row in snapshot.top_skills] == [
        f"skill-{rank:02d}" for rank in range(1, 11)
    ]
    assert snapshot.anomalies == []
    assert_encodable(snapshot)


async def test_over_long_names_are_skipped_in_every_query(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Names over 128 characters (also one hiding behind a NUL) never reach a frame; 128 do."""
    now = datetime.now(UTC)
    longest = "L" * MAX_SKILL_NAME_LENGTH
    too_long = ["M" * (MAX_SKILL_NAME_LENGTH + 1), "H" * MIB, "nul\x00" + "N" * MIB]
    with ranked_db.connect() as writer:
        writer.executemany(
            "INSERT INTO skill_metrics (skill_name, total_invocations) VALUES (?, 1000000)",
            [(name,) for name in (longest, *too_long)],
        )
        writer.executemany(
            "INSERT INTO skill_anomalies (skill_name, detected_at, anomaly_type, "
            "deviation_score) VALUES (?, ?, 'drop', 9.0)",
            [(name, iso(now)) for name in (longest, *too_long)],
        )
    # Live detection: one over by one character, one whose NUL hides 200 more.
    for name in (too_long[0], "nul\x00" + "N" * 200):
        drop_history(ranked_db, name, now)
    snapshot = await MetricsReader(reader).read({longest, too_long[0]})
    names = [row["skill_name"] for row in snapshot.top_skills]
    assert names == [longest] + [f"skill-{rank:02d}" for rank in range(1, 10)]
    assert [a["skill_name"] for a in snapshot.anomalies] == [longest]
    assert snapshot.skills[longest] is not None
    assert snapshot.skills[too_long[0]] is None
    assert max(assert_encodable(snapshot, (longest,))) < SMALL_FRAME


async def test_over_long_text_fields_are_skipped_or_shown_as_null(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """A huge last_invoked reads as null; anomalies with a huge detected_at or type are skipped."""
    now = datetime.now(UTC)
    skills_db.record("kept", at=now)
    skills_db.record("long-time", at=now)
    skills_db.record("blob-time", at=now)
    stamp = iso(now - timedelta(minutes=1))
    with skills_db.connect() as writer:
        # Another tool's schema may not check anomaly_type: write as such a tool would.
        writer.execute("PRAGMA ignore_check_constraints = ON")
        writer.execute(
            "UPDATE skill_metrics SET last_invoked = ? WHERE skill_name = 'long-time'",
            (stamp + " " * MIB,),
        )
        writer.execute(
            "UPDATE skill_metrics SET last_invoked = ? WHERE skill_name = 'blob-time'",
            (b"\x00" * MIB,),
        )
        writer.executemany(
            "INSERT INTO skill_anomalies (skill_name, detected_at, anomaly_type, "
            "deviation_score) VALUES (?, ?, ?, 5.0)",
            [
                ("kept", stamp, "drop"),
                # julianday() accepts trailing spaces: this one is recent, and 1 MiB long.
                ("spaced-time", stamp + " " * MIB, "drop"),
                ("long-type", stamp, "x" * MIB),
                ("just-over", stamp, "y" * (MAX_TEXT_LENGTH + 1)),
            ],
        )
    snapshot = await MetricsReader(reader).read({"long-time", "blob-time", "kept"})
    long_row, blob_row, kept = (
        snapshot.skills[name] for name in ("long-time", "blob-time", "kept")
    )
    assert long_row is not None
    assert long_row["last_invoked"] is None
    assert blob_row is not None
    assert blob_row["last_invoked"] is None
    assert kept is not None
    assert kept["last_invoked"] == iso(now)
    assert [(a["skill_name"], a["detected_at"]) for a in snapshot.anomalies] == [("kept", stamp)]
    assert max(assert_encodable(snapshot, ("long-time", "kept"))) < SMALL_FRAME


async def test_text_with_control_characters_never_reaches_a_frame(
    ranked_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Names, times and types with C0/C1 controls (terminal escapes, tabs) are skipped or null."""
    now = datetime.now(UTC)
    stamp = iso(now)
    hostile = ["\x1b]0;owned\x07", "tab\tname", "csi\x9b31m", "del\x7f"]
    with ranked_db.connect() as writer:
        writer.execute("PRAGMA ignore_check_constraints = ON")
        writer.executemany(
            "INSERT INTO skill_metrics (skill_name, total_invocations) VALUES (?, 1000000)",
            [(name,) for name in hostile],
        )
        writer.execute(
            "UPDATE skill_metrics SET last_invoked = ? WHERE skill_name = 'skill-01'",
            (stamp + "\n",),
        )
        writer.executemany(
            "INSERT INTO skill_anomalies (skill_name, detected_at, anomaly_type, "
            "deviation_score) VALUES (?, ?, ?, 5.0)",
            [
                *((name, stamp, "drop") for name in hostile),
                ("skill-02", stamp + "\t", "drop"),
                ("skill-03", stamp, "drop\x1b[2J"),
                ("skill-04", stamp, "drop"),
            ],
        )
    drop_history(ranked_db, hostile[0], now)
    snapshot = await MetricsReader(reader).read({"tab\tname"})
    assert [row["skill_name"] for row in snapshot.top_skills] == [
        f"skill-{rank:02d}" for rank in range(1, 11)
    ]
    assert snapshot.skills["tab\tname"] is None
    assert snapshot.top_skills[0]["last_invoked"] is None
    assert [a["skill_name"] for a in snapshot.anomalies] == ["skill-04"]
    assert_encodable(snapshot)


async def test_largest_frame_the_database_can_cause_is_under_64_kib(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """Rows at every bound (4-byte characters, extreme numbers) and past them stay under 64 KiB."""
    now = datetime.now(UTC)
    stamp = iso(now)
    wide = "\U0001f600"  # four bytes in UTF-8, the longest JSON form let through
    names = [wide * (MAX_SKILL_NAME_LENGTH - 4) + f"{i:04d}" for i in range(60)]
    extreme = -1.7976931348623157e308
    with skills_db.connect() as writer:
        writer.execute("PRAGMA ignore_check_constraints = ON")
        # Far past the bounds, and ranking first if they counted.
        past = [(name + wide * (MIB // 4), 2**62) for name in names[:3]]
        for i, name in enumerate(names):
            writer.executemany(
                "INSERT INTO skill_metrics (skill_name, total_invocations, "
                "completed_invocations, completion_rate, avg_duration_seconds, "
                "last_invoked) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (candidate, total, -(2**63), extreme, extreme, wide * MAX_TEXT_LENGTH)
                    for candidate, total in [(name, -(2**63) + i), *past[i : i + 1]]
                ],
            )
            for _ in range(60 if i == 0 else 1):
                writer.execute(
                    "INSERT INTO skill_anomalies (skill_name, detected_at, anomaly_type, "
                    "baseline_value, observed_value, deviation_score) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        stamp.ljust(MAX_TEXT_LENGTH),
                        wide * MAX_TEXT_LENGTH,
                        extreme,
                        extreme,
                        extreme,
                    ),
                )
    snapshot = await MetricsReader(reader).read({names[0]})
    assert len(snapshot.data(None)["anomalies"]) == MAX_ANOMALIES
    assert len(snapshot.data(names[0])["anomalies"]) == MAX_ANOMALIES
    assert max(assert_encodable(snapshot, (names[0],))) < 64 * 1024


async def test_one_skill_frame_holds_at_most_fifty_anomalies(
    skills_db: SkillsDB, reader: aiosqlite.Connection
) -> None:
    """A skill with hundreds of stored anomalies gets its 50 most severe, as all skills do."""
    now = datetime.now(UTC)
    with skills_db.connect() as writer:
        writer.executemany(
            "INSERT INTO skill_anomalies (skill_name, detected_at, anomaly_type, "
            "deviation_score) VALUES ('noisy', ?, 'spike', ?)",
            [(iso(now - timedelta(seconds=i)), float(i)) for i in range(300)],
        )
    snapshot = await MetricsReader(reader).read({"noisy"})
    scores = [a["deviation_score"] for a in snapshot.data("noisy")["anomalies"]]
    assert scores == [float(i) for i in range(299, 299 - MAX_ANOMALIES, -1)]
    assert snapshot.data(None)["anomalies"] == snapshot.data("noisy")["anomalies"]


async def recv_frames(client: Client, count: int, kind: str) -> list[dict[str, Any]]:
    """Receive ``count`` messages of ``kind``; every frame is valid, small and no error."""
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(80 * UNIT):
        while len(received) < count:
            raw = await client.ws.recv()
            assert isinstance(raw, str)
            assert len(raw.encode()) < SMALL_FRAME, len(raw)
            message = json.loads(raw)
            SERVER_MESSAGE.validate(message)
            assert message["type"] != "error", message
            if message["type"] == kind:
                received.append(message)
    return received


async def test_hostile_database_keeps_every_client_updated_over_a_real_socket(
    skills_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Amid inf, 1e200, NULL and 1 MiB names, every client gets small valid updates, no error."""
    now = datetime.now(UTC)
    spike_history(skills_db, "slowing", now)
    for rank in range(1, 5):
        skills_db.record(f"steady-{rank}", at=now - timedelta(hours=1), count=10 * rank)
    huge = "H" * MIB
    drop_history(skills_db, huge, now)
    with skills_db.connect() as writer:
        writer.execute(
            "INSERT INTO skill_metrics (skill_name, total_invocations) VALUES (NULL, 1000000)"
        )
        writer.execute(
            "INSERT INTO skill_metrics (skill_name, total_invocations, last_invoked) "
            "VALUES ('odd-time', 1, ?)",
            ("T" * MIB,),
        )
        writer.execute(
            "INSERT INTO skill_anomalies (skill_name, detected_at, anomaly_type, "
            "deviation_score) VALUES (?, ?, 'drop', ?)",
            (huge, iso(now), math.inf),
        )
    server = await start_server()
    everyone = await open_client(url_of(server))
    one = await open_client(url_of(server))
    await one.send_json({"type": "subscribe", "skill": "slowing"})
    [confirmed] = await recv_frames(one, 1, "subscription_confirmed")
    assert confirmed["skill"] == "slowing"
    assert confirmed["known"] is True
    for message in await recv_frames(one, 3, "metrics_update"):
        assert message["skill"] == "slowing"
        [row] = message["data"]["top_skills"]
        assert row["skill_name"] == "slowing"
        [spike] = message["data"]["anomalies"]
        assert (spike["source"], spike["anomaly_type"]) == ("live", "spike")
        assert (spike["baseline_value"], spike["observed_value"]) == (1.2, 5.0)
    # A write after the start, still through another connection, is followed.
    invoke(skills_db, ("late", datetime.now(UTC), math.inf, 1))
    for message in await recv_frames(everyone, 3, "metrics_update"):
        names = [row["skill_name"] for row in message["data"]["top_skills"]]
        assert "None" not in names
        assert huge not in names
        assert {a["skill_name"] for a in message["data"]["anomalies"]} == {"slowing"}
    async with asyncio.timeout(80 * UNIT):
        while True:
            [message] = await recv_frames(everyone, 1, "metrics_update")
            if "late" in [row["skill_name"] for row in message["data"]["top_skills"]]:
                break
    status = server.status()
    assert status["errors"] == 0, status["last_error"]
