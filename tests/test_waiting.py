"""A skills database that does not exist yet: the server starts, waits, and follows it.

Session-Buddy opens its database on demand and runs its migrations later, so the file
and its tables may appear only after the stream started. Real files in ``tmp_path``,
created by other processes or connections; real sockets on port 0.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from session_buddy_realtime import RealTimeMetricsServer, ServerStartError
from session_buddy_realtime.data.connection import ThreadedReads
from session_buddy_realtime.data.schema import SCHEMA_SQL
from tests.conftest import (
    INTERVAL,
    UNIT,
    ClientFactory,
    ServerFactory,
    SkillsDB,
    update_where,
    url_of,
    wait_until,
)

CREATE_WITHOUT_TABLES = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode = WAL")
db.execute("CREATE TABLE other_feature (id INTEGER PRIMARY KEY)")
db.close()
"""
MIGRATE_AND_RECORD = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.executescript(sys.argv[2])
db.execute(
    "INSERT INTO skill_invocation (skill_name, invoked_at, completed, duration_seconds) "
    "VALUES ('migrated', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 1, 1.5)"
)
db.close()
"""


async def run_python(script: str, *args: str) -> None:
    """Run ``script`` in another Python process and check that it succeeded."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", script, *args)
    async with asyncio.timeout(200 * UNIT):
        assert await process.wait() == 0


def in_state(state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda update: update["source"]["state"] == state


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def test_database_created_later_by_other_processes_is_followed(
    tmp_path: Path, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Started on a path that does not exist, the stream says 'waiting' with the absolute
    path; another process creating the file gives 'missing_tables', its migrations bring
    the data; deleting the file gives 'waiting' (gone) again, and a new file is streamed."""
    path = tmp_path / "later" / "skills.db"
    server = await start_server(db_path=path)
    client = await open_client(url_of(server))
    waiting = await update_where(client, in_state("waiting"))
    assert waiting["source"]["stale"] is True
    assert waiting["source"]["message"] == (
        f"waiting for the skills database at {path} (it does not exist yet)"
    )
    assert waiting["data"] == {"top_skills": [], "anomalies": []}
    assert server.status()["database"]["state"] == "waiting"
    assert not path.parent.exists()

    path.parent.mkdir()
    await run_python(CREATE_WITHOUT_TABLES, str(path))
    missing = await update_where(client, in_state("missing_tables"))
    assert "skill_metrics" in missing["source"]["message"]

    await run_python(MIGRATE_AND_RECORD, str(path), SCHEMA_SQL)
    flowing = await update_where(client, in_state("ok"))
    assert [row["skill_name"] for row in flowing["data"]["top_skills"]] == ["migrated"]
    assert server.status()["database"]["state"] == "ok"

    remove_database(path)
    gone = await update_where(client, in_state("waiting"))
    assert "gone" in gone["source"]["message"]
    assert str(path) in gone["source"]["message"]
    assert gone["data"] == flowing["data"], "the last good data is kept"
    assert server.status()["database"]["state"] == "waiting"

    SkillsDB(path).record("recreated", count=4)
    back = await update_where(client, in_state("ok"))
    assert [row["skill_name"] for row in back["data"]["top_skills"]] == ["recreated"]
    assert server.status()["errors"] == 0


async def test_python_api_on_a_missing_relative_path_comes_up_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RealTimeMetricsServer(db_path="missing.db").start() comes up as the plugin does:
    status and snapshot() say 'waiting' with the absolute path; nothing is created."""
    monkeypatch.chdir(tmp_path)
    async with RealTimeMetricsServer(host="127.0.0.1", port=0, db_path="missing.db") as server:
        assert server.running
        database = server.status()["database"]
        assert database["state"] == "waiting"
        assert str(tmp_path / "missing.db") in database["message"]
        snapshot = await server.snapshot("any-skill")
        assert snapshot["source"]["state"] == "waiting"
        assert snapshot["data"] == {"top_skills": [], "anomalies": []}
    assert not (tmp_path / "missing.db").exists()


async def test_waiting_costs_one_stat_per_read_and_no_connection_attempt(
    tmp_path: Path,
    start_server: ServerFactory,
    open_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the file is missing each read is one stat() of it and no connection is tried;
    a file that appears but is not SQLite is tried once (state 'error'), not on every tick,
    and again only when it changes."""
    path = tmp_path / "appears.db"  # not the fixture's skills.db
    opened: list[Path] = []
    stats: list[Path] = []
    original_open = ThreadedReads.open_read_only.__func__  # type: ignore[attr-defined]
    original_stat = Path.stat

    async def open_read_only(cls: type[ThreadedReads], at: Path, **kwargs: Any) -> Any:
        opened.append(at)
        return await original_open(cls, at, **kwargs)

    def stat(self: Path, **kwargs: Any) -> os.stat_result:
        if self == path:
            stats.append(self)
        return original_stat(self, **kwargs)

    monkeypatch.setattr(ThreadedReads, "open_read_only", classmethod(open_read_only))
    monkeypatch.setattr(Path, "stat", stat)
    server = await start_server(db_path=path)
    client = await open_client(url_of(server))
    await update_where(client, in_state("waiting"))
    start = server.status()["ticks"]
    stats.clear()
    await wait_until(lambda: server.status()["ticks"] >= start + 10)
    ticks = server.status()["ticks"] - start
    assert opened == []
    assert 10 <= len(stats) <= ticks + 2, (len(stats), ticks)

    path.write_bytes(b"not a database, " * 512)
    refused = await update_where(client, in_state("error"))
    assert "cannot open the skills database" in refused["source"]["message"]
    start = server.status()["ticks"]
    await wait_until(lambda: server.status()["ticks"] >= start + 10)
    assert opened == [path], "tried once, not once per tick"

    path.unlink()
    SkillsDB(path).record("good-at-last")
    good = await update_where(client, in_state("ok"))
    assert good["data"]["top_skills"][0]["skill_name"] == "good-at-last"
    assert len(opened) == 2


async def test_an_existing_file_that_is_not_sqlite_still_fails_at_start(tmp_path: Path) -> None:
    """Only a missing file is waited for: an existing non-SQLite file is a ServerStartError."""
    bogus = tmp_path / "skills.db"
    bogus.write_bytes(b"\x00garbage" * 512)
    server = RealTimeMetricsServer(
        host="127.0.0.1", port=0, db_path=bogus, update_interval=INTERVAL
    )
    with pytest.raises(ServerStartError, match=r"skills\.db"):
        await server.start()
    assert not server.running
