"""The server never keeps its host alive: a host that never calls stop() still exits.

Each test runs a real Python process that plays a host which forgets its shutdown hook:
it starts the server (on its own ``db_path``, or on a synchronous host connection opened
as Session-Buddy opens it), prints the URL, and waits forever. The test reads the stream,
then sends SIGINT or SIGTERM and waits, bounded, for the process to exit. Before the
server's connection had a daemon thread of its own, the interpreter waited at exit on
aiosqlite's (non-daemon) thread, and the process ignored both signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.conftest import UNIT, Client, SkillsDB

EXIT = 200 * UNIT
"""Time allowed for the process to exit after the signal (10 s)."""

HOST = """
import asyncio, json, signal, sqlite3, sys
from session_buddy_realtime import RealTimeMetricsServer

mode, path = sys.argv[1], sys.argv[2]

async def main():
    # As a host does (uvicorn, FastMCP): SIGTERM ends the main task, then the
    # interpreter exits normally, joining every non-daemon thread.
    task = asyncio.current_task()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    if mode == "sync":
        # As SkillsStorage opens it (the file is WAL already, unless a test says not).
        db = sqlite3.connect(path, check_same_thread=False)
        db.row_factory = sqlite3.Row
        server = RealTimeMetricsServer("127.0.0.1", 0, db=db, update_interval=0.05)
    else:
        server = RealTimeMetricsServer("127.0.0.1", 0, path, update_interval=0.05)
    await server.start()
    print(json.dumps({"url": server.urls[0]}), flush=True)
    await asyncio.Event().wait()  # never stop(), never close the connection

asyncio.run(main())
"""

Host = Callable[[str, Path], Awaitable[tuple[asyncio.subprocess.Process, str]]]


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    """Start host processes; any still running at teardown is killed."""
    started: list[asyncio.subprocess.Process] = []

    async def _start(mode: str, path: Path) -> tuple[asyncio.subprocess.Process, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            HOST,
            mode,
            str(path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(process)
        assert process.stdout is not None
        async with asyncio.timeout(200 * UNIT):
            line = await process.stdout.readline()
        assert line, "the host printed no URL"
        url: str = json.loads(line)["url"]
        return process, url

    yield _start
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_until(url: str, state: str) -> dict[str, Any]:
    """Connect to the stream and return the first update whose source is in ``state``."""
    async with connect(url, open_timeout=40 * UNIT, close_timeout=4 * UNIT) as ws:
        client = Client(ws)
        async with asyncio.timeout(200 * UNIT):
            while True:
                update = await client.recv_type("metrics_update")
                if update["source"]["state"] == state:
                    return update


async def exits_after(process: asyncio.subprocess.Process, signum: int) -> int:
    """Send ``signum`` and return the exit status; fail if the process outlives ``EXIT``."""
    process.send_signal(signum)
    try:
        async with asyncio.timeout(EXIT):
            _, stderr = await process.communicate()
    except TimeoutError:
        pytest.fail(f"the host ignored {signal.Signals(signum).name}: still running after {EXIT} s")
    assert b"Exception in thread" not in stderr, stderr.decode()
    return process.returncode if process.returncode is not None else -1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("mode", ["path", "sync"])
async def test_host_that_never_stops_the_server_exits_on_a_signal(
    host: Host, skills_db: SkillsDB, mode: str, signum: int
) -> None:
    """With the stream running and read (on db_path, or on the host's sqlite3 connection),
    a host that never calls stop() exits promptly on SIGINT and on SIGTERM."""
    skills_db.record("alive", count=3)
    process, url = await host(mode, skills_db.path)
    update = await read_until(url, "ok")
    assert update["data"]["top_skills"][0]["skill_name"] == "alive"
    await exits_after(process, signum)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Any:
    """Hold the write lock of a rollback-journal database (readers wait on it)."""
    db = sqlite3.connect(path, isolation_level=None, timeout=40 * UNIT)
    try:
        db.execute("BEGIN EXCLUSIVE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("mode", ["path", "sync"])
async def test_host_exits_while_a_read_is_stuck_on_another_process_lock(
    host: Host, skills_db: SkillsDB, mode: str, signum: int
) -> None:
    """While the server's read waits on a lock held by another process (the stream says
    busy), a host that never calls stop() still exits promptly on the signal."""
    skills_db.record("alive", count=3)
    with skills_db.connect() as db:
        assert db.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    process, url = await host(mode, skills_db.path)
    await read_until(url, "ok")
    with exclusive_lock(skills_db.path):
        await read_until(url, "busy")  # a read is running, stuck on the lock
        await exits_after(process, signum)
