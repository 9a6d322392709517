"""The host's synchronous ``sqlite3.Connection`` (Session-Buddy's), shared with the server.

Session-Buddy 0.23's ``SkillsStorage`` opens its skills database with
``check_same_thread=False``, WAL and ``row_factory = sqlite3.Row``; the tests open theirs
the same way, on real files in ``tmp_path``, and read the stream through real sockets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from session_buddy_realtime import RealTimeMetricsServer, ServerStartError
from session_buddy_realtime.data.connection import ThreadedReads
from session_buddy_realtime.data.database import DatabaseSource
from tests.conftest import (
    INTERVAL,
    UNIT,
    ClientFactory,
    ServerFactory,
    SkillsDB,
    iso,
    update_where,
    url_of,
    wait_until,
)

_INSERT = (
    "INSERT INTO skill_invocation (skill_name, invoked_at, session_id, completed, "
    "duration_seconds) VALUES (?, ?, 'host', 1, 1.0)"
)


@contextlib.contextmanager
def session_buddy_connection(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection opened as Session-Buddy's ``SkillsStorage`` opens its own."""
    conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def host_records(conn: sqlite3.Connection, skill: str, count: int = 1) -> None:
    """Write invocations through the host's connection and commit, as SkillsStorage does."""
    conn.executemany(_INSERT, [(skill, iso(datetime.now(UTC)))] * count)
    conn.commit()


def top_names(update: dict[str, Any]) -> list[str]:
    return [row["skill_name"] for row in update["data"]["top_skills"]]


async def test_server_streams_through_the_hosts_sync_connection(
    skills_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """On the host's sqlite3.Connection the stream shows rows the host writes through it and
    rows another connection commits; the host writes while the server runs, and after
    stop() the connection is open, still has row_factory sqlite3.Row and was never written."""
    with session_buddy_connection(skills_db.path) as conn:
        host_records(conn, "before-start", 2)
        server = await start_server(db=conn, db_path=None)
        assert server.status()["database"]["shared_connection"] is True
        client = await open_client(url_of(server))
        first = await update_where(client, lambda u: u["source"]["state"] == "ok")
        assert top_names(first) == ["before-start"]

        host_records(conn, "host-wrote", 5)
        seen = await update_where(client, lambda u: top_names(u)[:1] == ["host-wrote"])
        assert seen["data"]["top_skills"][0]["total_invocations"] == 5

        skills_db.record("other-connection", count=9)
        seen = await update_where(client, lambda u: top_names(u)[:1] == ["other-connection"])
        assert top_names(seen) == ["other-connection", "host-wrote", "before-start"]

        assert conn.row_factory is sqlite3.Row
        changes = conn.total_changes
        await server.stop()
        assert conn.total_changes == changes, "the server wrote nothing"
        assert conn.row_factory is sqlite3.Row
        row = conn.execute("SELECT COUNT(*) AS n FROM skill_invocation").fetchone()
        assert isinstance(row, sqlite3.Row)
        assert row["n"] == 16
        host_records(conn, "after-stop")


async def test_rows_of_a_rolled_back_host_transaction_leave_the_stream(
    skills_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Rows the host writes in a transaction show while it is open (the host's own view) and
    are gone from the stream once it rolls back, although a rollback moves neither
    data_version nor total_changes."""
    with session_buddy_connection(skills_db.path) as conn:
        host_records(conn, "kept", 2)
        server = await start_server(db=conn, db_path=None)
        client = await open_client(url_of(server))
        await update_where(client, lambda u: top_names(u) == ["kept"])

        conn.executemany(_INSERT, [("phantom", iso(datetime.now(UTC)))] * 5)  # opens one
        assert conn.in_transaction
        await update_where(client, lambda u: top_names(u) == ["phantom", "kept"])
        conn.rollback()
        after = await update_where(client, lambda u: "phantom" not in top_names(u))
        assert top_names(after) == ["kept"]
        await server.stop()


async def test_reads_run_off_the_event_loop_on_one_daemon_thread(
    skills_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Every statement the server runs on the host's connection runs on one daemon thread
    of its own (not the event loop's), which is gone after stop()."""
    skills_db.record("traced", count=3)
    statements: list[tuple[threading.Thread, str]] = []
    before = set(threading.enumerate())
    with session_buddy_connection(skills_db.path) as conn:
        conn.set_trace_callback(lambda sql: statements.append((threading.current_thread(), sql)))
        server = await start_server(db=conn, db_path=None)
        client = await open_client(url_of(server))
        await update_where(client, lambda u: top_names(u) == ["traced"])
        ours = {thread for thread, _ in statements}
        assert len(ours) == 1
        [thread] = ours
        assert thread is not threading.current_thread()
        assert thread.daemon
        started = set(threading.enumerate()) - before
        assert started == {thread}, "no other thread, and nothing the interpreter waits for"
        await server.stop()
        await wait_until(lambda: not thread.is_alive())
        assert set(threading.enumerate()) <= before


async def test_host_use_waits_for_no_more_than_one_query(
    skills_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a server read is held between two of its queries, the host writes, commits and
    reads through the shared connection at once: the server holds nothing (no statement,
    transaction or lock) across queries, so the host never waits for more than one."""
    skills_db.record("seed")
    held, release = asyncio.Event(), asyncio.Event()
    original = ThreadedReads.fetchall

    async def fetchall(self: ThreadedReads, sql: str, parameters: Any = ()) -> Any:
        rows = await original(self, sql, parameters)
        if sql == "PRAGMA data_version" and not release.is_set():
            held.set()
            await release.wait()  # the read is in progress: one query done, more to come
        return rows

    with session_buddy_connection(skills_db.path) as conn:
        server = await start_server(db=conn, db_path=None)
        monkeypatch.setattr(ThreadedReads, "fetchall", fetchall)
        client = await open_client(url_of(server))
        async with asyncio.timeout(40 * UNIT):
            await held.wait()

        def host_work() -> int:
            host_records(conn, "while-held", 3)
            count: int = conn.execute("SELECT COUNT(*) FROM skill_invocation").fetchone()[0]
            return count

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # Bounded: a host blocked behind the held read would never finish.
            assert pool.submit(host_work).result(timeout=40 * UNIT) == 4
        assert not conn.in_transaction, "the server left no transaction open"
        release.set()
        seen = await update_where(client, lambda u: top_names(u)[:1] == ["while-held"])
        assert seen["source"]["state"] == "ok"
        await server.stop()


async def test_host_keeps_using_its_connection_while_the_server_ticks(
    skills_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """At a 50 ms interval with a dashboard reading, 200 host write-and-read cycles through
    the shared connection (from a host thread and from the event loop, as Session-Buddy
    does) all complete, and the stream ends up showing what they wrote."""
    with session_buddy_connection(skills_db.path) as conn:
        server = await start_server(db=conn, db_path=None, update_interval=INTERVAL / 2)
        client = await open_client(url_of(server))
        await client.recv_type("metrics_update")
        ticks = server.status()["ticks"]

        def host_cycles(skill: str, cycles: int) -> None:
            for _ in range(cycles):
                host_records(conn, skill)
                conn.execute("SELECT * FROM skill_metrics").fetchall()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            worker = pool.submit(host_cycles, "from-a-thread", 150)
            async with asyncio.timeout(400 * UNIT):
                await asyncio.wrap_future(worker)
        for _ in range(50):
            host_cycles("from-the-loop", 1)
            await asyncio.sleep(0)  # let the server's tick run in between
        # Earlier updates may still be queued: wait for the one with every write.
        seen = await update_where(
            client, lambda u: [r["total_invocations"] for r in u["data"]["top_skills"]] == [150, 50]
        )
        assert top_names(seen) == ["from-a-thread", "from-the-loop"]
        assert server.status()["ticks"] > ticks
        assert server.status()["errors"] == 0
        await server.stop()


async def test_thread_bound_or_closed_host_connection_fails_at_start(
    skills_db: SkillsDB,
) -> None:
    """A host connection opened with check_same_thread=True, or closed, is refused at start
    with a ServerStartError saying what is needed; nothing is left running."""
    bound = sqlite3.connect(skills_db.path)
    try:
        server = RealTimeMetricsServer(host="127.0.0.1", port=0, db=bound)
        with pytest.raises(ServerStartError, match="check_same_thread=False"):
            await server.start()
        assert not server.running
    finally:
        bound.close()
    closed = sqlite3.connect(skills_db.path, check_same_thread=False)
    closed.close()
    server = RealTimeMetricsServer(host="127.0.0.1", port=0, db=closed)
    with pytest.raises(ServerStartError, match="closed"):
        await server.start()
    assert not server.running


@pytest.mark.parametrize("db", ["skills.db", Path("skills.db"), object()], ids=repr)
def test_anything_else_as_db_is_refused_naming_what_is_accepted(db: object) -> None:
    """A db that is neither an aiosqlite nor a sqlite3 connection is a TypeError naming both."""
    pattern = r"aiosqlite\.Connection or sqlite3\.Connection"
    with pytest.raises(TypeError, match=pattern):
        RealTimeMetricsServer(db=db)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=pattern):
        DatabaseSource(Path("skills.db"), db=db)  # type: ignore[arg-type]


async def test_the_servers_own_connection_runs_on_a_daemon_thread(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """On db_path, every thread the server starts is a daemon (nothing the interpreter
    waits for at exit), and none is left after stop()."""
    before = set(threading.enumerate())
    server = await start_server()
    client = await open_client(url_of(server))
    await update_where(client, lambda u: u["source"]["state"] == "ok")
    started = set(threading.enumerate()) - before
    assert started, "the connection has a thread of its own"
    assert all(thread.daemon for thread in started), started
    await server.stop()
    await wait_until(lambda: set(threading.enumerate()) <= before)


_SLOW_QUERY = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000000) "
    "SELECT count(*) FROM n"
)
"""Runs for minutes: only an interrupt ends it early."""


async def test_closing_the_servers_own_connection_interrupts_a_running_query(
    skills_db: SkillsDB,
) -> None:
    """close() of a connection the server opened interrupts a query that would run for
    minutes, returns within a bound, and leaves no thread behind."""
    before = set(threading.enumerate())
    reads = await ThreadedReads.open_read_only(skills_db.path, busy_timeout=1.0)
    query = asyncio.create_task(reads.fetchall(_SLOW_QUERY))
    await wait_until(lambda: reads.running)  # the query runs on the thread
    assert not query.done()
    async with asyncio.timeout(40 * UNIT):
        await reads.close()
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        await query
    await wait_until(lambda: set(threading.enumerate()) <= before)
