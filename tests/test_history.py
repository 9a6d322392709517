"""The `history` and `skills` requests: parsed, answered from the database, cached, guarded."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from session_buddy_realtime.data.connection import ThreadedReads
from session_buddy_realtime.data.lookups import Lookups
from session_buddy_realtime.data.source import HistoryWindow, SourceState
from session_buddy_realtime.protocol import (
    ErrorCode,
    HistoryRequest,
    ProtocolError,
    SkillsRequest,
    parse_client_message,
)
from tests.conftest import UNIT, ClientFactory, ServerFactory, SkillsDB, iso, url_of, wait_until
from tests.fakes import FakeSource, skill_row

# A fixed "now" in the middle of a 10 s bucket: 2026-02-10T12:00:05Z.
NOW = datetime(2026, 2, 10, 12, 0, 5, tzinfo=UTC)
WINDOW = HistoryWindow.for_interval(1.0)


@pytest.fixture
async def lookups(skills_db: SkillsDB) -> AsyncIterator[Lookups]:
    """Lookups on the test database through a read-only connection, the clock at NOW."""
    reads = await ThreadedReads.open_read_only(skills_db.path, busy_timeout=1.0)
    yield Lookups(reads, clock=NOW.timestamp)
    await reads.close()


def _write(db: SkillsDB, skill: str, invoked_at: str, *, completed: bool = True) -> None:
    with db.connect() as connection:
        connection.execute(
            "INSERT INTO skill_invocation (skill_name, invoked_at, session_id, completed) "
            "VALUES (?, ?, 'test', ?)",
            (skill, invoked_at, int(completed)),
        )


def _counts(history: Any) -> dict[int, tuple[int, int]]:
    return {
        i: (n, c)
        for i, (n, c) in enumerate(zip(history.invocations, history.completed, strict=True))
        if n
    }


# Parsing


def test_history_and_skills_requests_parse() -> None:
    """history takes an optional skill (null: all); skills an optional query ("" if absent)."""
    assert parse_client_message('{"type": "history"}') == HistoryRequest(None)
    assert parse_client_message('{"type": "history", "skill": "a b"}') == HistoryRequest("a b")
    assert parse_client_message('{"type": "history", "skill_name": "x"}') == HistoryRequest("x")
    assert parse_client_message('{"type": "skills"}') == SkillsRequest("")
    assert parse_client_message('{"type": "skills", "query": null}') == SkillsRequest("")
    assert parse_client_message('{"type": "skills", "query": "py"}') == SkillsRequest("py")


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ({"type": "history", "skill": ""}, "must not be empty"),
        ({"type": "history", "skill": 7}, "'skill' must be a string"),
        ({"type": "skills", "query": 7}, "'query' must be a string"),
        ({"type": "skills", "query": " py"}, "'query' must not start or end"),
        ({"type": "skills", "query": "p\u200by"}, "U+200B"),
        ({"type": "skills", "query": "x" * 129}, "'query' is 129 characters"),
    ],
)
def test_bad_skills_and_queries_are_refused_like_skill_names(
    message: dict[str, Any], words: str
) -> None:
    """The skill of history and the query of skills follow the rules of skill names."""
    with pytest.raises(ProtocolError) as refused:
        parse_client_message(json.dumps(message))
    assert refused.value.code is ErrorCode.INVALID_SKILL
    assert words in refused.value.message


def test_the_window_follows_the_interval() -> None:
    """Buckets are max(10 s, the interval rounded up), over 600 s in whole buckets, aligned
    to multiples of the bucket, the last one holding now."""
    assert (WINDOW.bucket_seconds, WINDOW.buckets, WINDOW.seconds) == (10, 60, 600)
    assert HistoryWindow.for_interval(0.05).bucket_seconds == 10
    slow = HistoryWindow.for_interval(45.2)
    assert (slow.bucket_seconds, slow.buckets, slow.seconds) == (46, 14, 644)
    assert HistoryWindow.for_interval(3600).buckets == 1
    start = WINDOW.start(NOW.timestamp())
    assert start % 10 == 0
    assert start + WINDOW.seconds - 10 <= NOW.timestamp() < start + WINDOW.seconds


# History from the database


async def test_history_buckets_rows_written_at_known_times(
    skills_db: SkillsDB, lookups: Lookups
) -> None:
    """Each invocation lands in the bucket of its time, whatever the format (T or space,
    Z, an offset, no suffix, fractions); a bucket's start is inclusive; rows before the
    window or after now are left out; completions are counted apart."""
    start = datetime.fromtimestamp(WINDOW.start(NOW.timestamp()), UTC)
    assert start == datetime(2026, 2, 10, 11, 50, 10, tzinfo=UTC)
    last = start + timedelta(seconds=590)  # 12:00:00, the bucket holding NOW
    _write(skills_db, "a", iso(start))  # exactly the first bucket's start
    _write(skills_db, "a", iso(start - timedelta(milliseconds=1)))  # just before the window
    _write(skills_db, "b", (start + timedelta(seconds=15)).strftime("%Y-%m-%d %H:%M:%S"))
    tokyo = timezone(timedelta(hours=9))
    _write(skills_db, "b", (start + timedelta(seconds=25)).astimezone(tokyo).isoformat())
    # Written as the day before (2026-02-09 23:50:45-12:00), with a space.
    far_west = timezone(timedelta(hours=-12))
    _write(skills_db, "d", (start + timedelta(seconds=35)).astimezone(far_west).isoformat(" "))
    _write(skills_db, "c", (last + timedelta(seconds=4)).isoformat(), completed=False)
    _write(skills_db, "c", iso(last + timedelta(seconds=3)), completed=False)
    _write(skills_db, "c", iso(last + timedelta(seconds=20)))  # in the future: not counted
    _write(skills_db, "c", "not a time")

    history = await lookups.history(None, WINDOW, 40 * UNIT)
    assert (history.state, history.start) == (SourceState.OK, int(start.timestamp()))
    assert _counts(history) == {0: (1, 1), 1: (1, 1), 2: (1, 1), 3: (1, 1), 59: (2, 0)}
    one = await lookups.history("b", WINDOW, 40 * UNIT)
    assert _counts(one) == {1: (1, 1), 2: (1, 1)}
    reply = one.reply("2026-02-10T12:00:05.000Z")
    assert reply["buckets"][0] == {
        "start": "2026-02-10T11:50:10.000Z",
        "invocations": 0,
        "completed": 0,
    }
    assert len(reply["buckets"]) == 60
    assert (reply["bucket_seconds"], reply["window_seconds"]) == (10, 600)


async def test_history_is_cached_until_the_database_changes(
    skills_db: SkillsDB, lookups: Lookups
) -> None:
    """Asking again for an unchanged database runs no query (only the change check);
    after a write the history is computed again and shows it."""
    _write(skills_db, "a", iso(NOW - timedelta(seconds=30)))
    first = await lookups.history(None, WINDOW, 40 * UNIT)
    again = await lookups.history(None, WINDOW, 40 * UNIT)
    assert lookups.queries == 1
    assert again is first
    _write(skills_db, "a", iso(NOW - timedelta(seconds=30)))
    changed = await lookups.history(None, WINDOW, 40 * UNIT)
    assert lookups.queries == 2
    assert sum(changed.invocations) == 2


async def test_history_of_a_database_without_tables_says_so(tmp_path: Path) -> None:
    """A database that lacks skill_invocation gives empty buckets flagged missing_tables."""
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    reads = await ThreadedReads.open_read_only(path, busy_timeout=1.0)
    try:
        history = await Lookups(reads, clock=NOW.timestamp).history(None, WINDOW, 40 * UNIT)
    finally:
        await reads.close()
    assert history.state is SourceState.MISSING_TABLES
    assert "skill_invocation" in (history.message or "")
    assert sum(history.invocations) == 0
    assert len(history.invocations) == 60


# Skill search


async def test_skills_search_escapes_like_wildcards(skills_db: SkillsDB, lookups: Lookups) -> None:
    """'%', '_' and '\\' in a query match themselves only; letters match in any case; the
    most invoked come first; names no client could subscribe to are left out."""
    for name, count in [
        ("py_test", 3),
        ("pyXtest", 9),
        ("100% done", 2),
        ("1000 done", 5),
        ("back\\slash", 1),
        ("PyTest-Run", 7),
        ("py\u200btest", 8),
    ]:
        skills_db.record(name, count=count)

    async def names(query: str) -> list[str]:
        return (await lookups.skill_names(query, 20, 40 * UNIT)).names

    assert await names("_") == ["py_test"]
    assert await names("y_t") == ["py_test"]
    assert await names("%") == ["100% done"]
    assert await names("\\") == ["back\\slash"]
    assert await names("pytest") == ["PyTest-Run"]
    assert await names("PYTEST") == ["PyTest-Run"]
    assert await names("yXt") == ["pyXtest"]
    assert await names("") == [
        "pyXtest",
        "PyTest-Run",
        "1000 done",
        "py_test",
        "100% done",
        "back\\slash",
    ]


async def test_skills_search_returns_at_most_the_limit(
    skills_db: SkillsDB, lookups: Lookups
) -> None:
    """25 matching skills give the 20 most invoked."""
    for rank in range(25):
        skills_db.record(f"skill-{rank:02d}", count=30 - rank)
    found = await lookups.skill_names("skill", 20, 40 * UNIT)
    assert found.names == [f"skill-{rank:02d}" for rank in range(20)]


# Over a real socket


async def test_history_and_skills_over_the_websocket(
    skills_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """A client asks for history (all skills, and one) and for skill names, and gets
    replies that match the schema, with this minute's invocations in the last buckets."""
    now = datetime.now(UTC)
    skills_db.record("pytest-run", count=4, at=now - timedelta(seconds=1))
    skills_db.record("ruff-check", count=2, completed=False, at=now - timedelta(seconds=1))
    skills_db.record("pytest-run", count=3, at=now - timedelta(minutes=20))  # before the window
    server = await start_server()
    client = await open_client(url_of(server))
    await client.send_json({"type": "history"})
    history = await client.recv_type("history")
    assert history["skill"] is None
    assert (history["bucket_seconds"], history["window_seconds"]) == (10, 600)
    assert sum(b["invocations"] for b in history["buckets"]) == 6
    assert sum(b["completed"] for b in history["buckets"]) == 4
    assert sum(b["invocations"] for b in history["buckets"][-2:]) == 6
    assert history["source"]["state"] == "ok"
    await client.send_json({"type": "history", "skill": "ruff-check"})
    one = await client.recv_type("history")
    assert (one["skill"], sum(b["invocations"] for b in one["buckets"])) == ("ruff-check", 2)
    await client.send_json({"type": "skills", "query": "PY"})
    skills = await client.recv_type("skills")
    assert (skills["query"], skills["skills"]) == ("PY", ["pytest-run"])


async def test_history_needs_authentication(
    skills_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Before auth, history and skills get not_authenticated; after it, their replies."""
    server = await start_server(token="history-token-1")
    client = await open_client(url_of(server))
    for request in ({"type": "history"}, {"type": "skills", "query": "x"}):
        await client.send_json(request)
        error = await client.recv_type("error")
        assert error["code"] == "not_authenticated"
    await client.send_json({"type": "auth", "token": "history-token-1"})
    await client.recv_type("authenticated")
    await client.send_json({"type": "history"})
    assert (await client.recv_type("history"))["type"] == "history"


async def test_history_requests_count_against_the_rate_limit(
    skills_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """A burst of history requests over the limit gets one rate_limited error, and the
    requests over it are not answered."""
    server = await start_server(message_rate=1.0, message_burst=3)
    client = await open_client(url_of(server))
    for _ in range(5):
        await client.send_json({"type": "history"})
    kinds: list[str] = []
    while len(kinds) < 4:
        message = await client.recv()
        if message["type"] in ("history", "error"):
            kinds.append(message["type"] if message["type"] == "history" else message["code"])
    assert kinds == ["history", "history", "history", "rate_limited"]
    assert server.status()["rate_limited"] == 2


async def test_nothing_is_read_for_history_until_a_client_asks(
    skills_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """The history comes from the database when asked, not from states kept while idle:
    a server that ran with nobody connected has read nothing, yet its first history is
    complete."""
    skills_db.record("pytest-run", count=5, at=datetime.now(UTC) - timedelta(minutes=3))
    server = await start_server()
    assert server.status()["database"]["queries"] == 0
    client = await open_client(url_of(server))
    await client.send_json({"type": "history"})
    history = await client.recv_type("history")
    assert sum(b["invocations"] for b in history["buckets"]) == 5


async def test_the_fake_source_feeds_history_through_a_session(
    start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """A Source of one's own answers history and skills through the same seam."""
    source = FakeSource([skill_row("alpha", 5), skill_row("beta", 9)])
    source.history_rows = [(59, 4, 3)]
    server = await start_server(source=source)
    client = await open_client(url_of(server))
    await client.send_json({"type": "history", "skill": "alpha"})
    history = await client.recv_type("history")
    assert history["buckets"][-1]["invocations"] == 4
    await client.send_json({"type": "skills"})
    assert (await client.recv_type("skills"))["skills"] == ["beta", "alpha"]
    assert source.lookups == [("history", "alpha"), ("skills", "")]


async def test_stop_does_not_wait_for_a_history_that_never_comes(
    start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """stop() while a history request waits on a source that does not answer returns
    promptly: the request is cancelled, the client closed with 1001."""
    source = FakeSource([skill_row("alpha", 5)])
    source.lookup_gate = asyncio.Event()  # never set
    server = await start_server(source=source, close_timeout=4 * UNIT)
    client = await open_client(url_of(server))
    await client.send_json({"type": "history"})
    await wait_until(lambda: source.lookups == [("history", None)])
    began = time.monotonic()
    async with asyncio.timeout(20 * UNIT):
        await server.stop()
    assert time.monotonic() - began < 20 * UNIT
    await client.ws.wait_closed()
    assert client.ws.close_code == 1001
