"""Shared fixtures: real SQLite files, real servers on port 0, real WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from websockets.asyncio.client import ClientConnection, connect

from session_buddy_realtime import RealTimeMetricsServer
from session_buddy_realtime.data.schema import SCHEMA_SQL
from session_buddy_realtime.protocol import load_schema

NO_SKIP = os.environ.get("REALTIME_TESTS_NO_SKIP") == "1"
"""Set by CI: a test that would skip (an external program is missing) fails instead."""

UNIT = 0.05
"""Base time unit of the tests, in seconds; every timeout is a multiple of it."""
INTERVAL = 0.1
"""Broadcast interval of the test servers."""

_SCHEMA = load_schema()
SERVER_MESSAGE = jsonschema.Draft202012Validator(
    {"$defs": _SCHEMA["$defs"], "$ref": "#/$defs/server_message"}
)
CLIENT_MESSAGE = jsonschema.Draft202012Validator(
    {"$defs": _SCHEMA["$defs"], "$ref": "#/$defs/client_message"}
)


def iso(moment: datetime) -> str:
    """Session-Buddy style timestamp: ISO 8601 with 'T' and 'Z'."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SkillsDB:
    """A real skills database file, written through its own connection like a host."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self.connect() as db:
            db.execute("PRAGMA journal_mode = WAL")
            db.executescript(SCHEMA_SQL)

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """An autocommit connection, closed on exit."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def record(
        self,
        skill: str,
        *,
        completed: bool = True,
        duration: float | None = 1.0,
        at: datetime | None = None,
        count: int = 1,
    ) -> None:
        moment = at or datetime.now(UTC)
        rows = [
            (skill, iso(moment), "test", int(completed), duration if completed else None)
            for _ in range(count)
        ]
        with self.connect() as db:
            db.executemany(
                "INSERT INTO skill_invocation (skill_name, invoked_at, session_id, completed, "
                "duration_seconds) VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    def add_anomaly(
        self,
        skill: str,
        detected_at: str,
        *,
        anomaly_type: str = "drop",
        score: float | None = 2.5,
        resolved_at: str | None = None,
    ) -> None:
        with self.connect() as db:
            db.execute(
                "INSERT INTO skill_anomalies (skill_name, detected_at, anomaly_type, "
                "baseline_value, observed_value, deviation_score, resolved_at) "
                "VALUES (?, ?, ?, 90.0, 40.0, ?, ?)",
                (skill, detected_at, anomaly_type, score, resolved_at),
            )


@pytest.fixture
def skills_db(tmp_path: Path) -> SkillsDB:
    """An empty skills database with Session-Buddy's schema subset."""
    return SkillsDB(tmp_path / "skills.db")


@pytest.fixture
def ranked_db(skills_db: SkillsDB) -> SkillsDB:
    """Twelve skills, 'skill-01' busiest; 'skill-12' ranks 12th, below the top 10."""
    base = datetime.now(UTC) - timedelta(hours=2)
    for rank in range(1, 13):
        skills_db.record(f"skill-{rank:02d}", at=base, count=30 - rank, duration=float(rank))
    return skills_db


class Client:
    """A WebSocket client that checks every frame it receives against the schema."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send_json(self, message: Any) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = 40 * UNIT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            raw = await self.ws.recv()
        assert isinstance(raw, str), "server frames are text"
        message = json.loads(raw)
        SERVER_MESSAGE.validate(message)
        return message  # type: ignore[no-any-return]

    async def recv_type(self, kind: str, timeout: float = 40 * UNIT) -> dict[str, Any]:
        """Receive until a message of type ``kind`` arrives (all frames validated)."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.recv(timeout)
                if message["type"] == kind:
                    return message


ClientFactory = Callable[..., Awaitable[Client]]


async def update_where(
    client: Client, predicate: Callable[[dict[str, Any]], bool], timeout: float = 100 * UNIT
) -> dict[str, Any]:
    """Receive updates until one matches ``predicate`` (bounded)."""
    async with asyncio.timeout(timeout):
        while True:
            update = await client.recv_type("metrics_update")
            if predicate(update):
                return update


@pytest.fixture
async def open_client() -> AsyncIterator[ClientFactory]:
    """Open clients to a server URL; each has received its ``connected`` message."""
    opened: list[ClientConnection] = []

    async def _open(url: str, **kwargs: Any) -> Client:
        ws = await connect(url, open_timeout=40 * UNIT, close_timeout=4 * UNIT, **kwargs)
        opened.append(ws)
        client = Client(ws)
        welcome = await client.recv()
        assert welcome["type"] == "connected"
        return client

    yield _open
    for ws in opened:
        await ws.close()


ServerFactory = Callable[..., Awaitable[RealTimeMetricsServer]]


@pytest.fixture
async def start_server(skills_db: SkillsDB) -> AsyncIterator[ServerFactory]:
    """Start servers on 127.0.0.1, port 0, reading ``skills_db``; stopped afterwards."""
    started: list[RealTimeMetricsServer] = []

    async def _start(**kwargs: Any) -> RealTimeMetricsServer:
        kwargs.setdefault("db_path", skills_db.path)
        kwargs.setdefault("update_interval", INTERVAL)
        server = RealTimeMetricsServer(host="127.0.0.1", port=0, **kwargs)
        await server.start()
        started.append(server)
        return server

    yield _start
    for server in started:
        await server.stop()


def url_of(server: RealTimeMetricsServer) -> str:
    return server.urls[0]


@pytest.fixture
def free_port() -> int:
    """A port that was free a moment ago (for tests that need a fixed number)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def wait_until(condition: Callable[[], bool], timeout: float = 60 * UNIT) -> None:
    """Wait for a condition that the event loop will make true; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - polls state of other tasks, bounded
            await asyncio.sleep(UNIT / 5)


async def raw_websocket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that completes the handshake and then does only what the test does (it
    answers no ping by itself)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 40 * UNIT)
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real ``redis-server`` on a free loopback port (``tests/redis_support.py``)."""
    from tests.redis_support import HAVE_REDIS, running_redis

    if not HAVE_REDIS:
        pytest.skip("needs redis-server (Debian package redis-server)")
    with running_redis(tmp_path) as server:
        yield server


SESSION_BUDDY_PYTHON = (3, 13)
"""Session-Buddy 0.23 installs on this Python and later only."""
NEEDS_SESSION_BUDDY = "needs Session-Buddy"
"""Start of the skip reason of tests that run only beside a real Session-Buddy."""


def _allowed_skip(report: pytest.TestReport) -> bool:
    # Below Python 3.13 Session-Buddy cannot be installed; CI runs these tests in its
    # Python 3.13 environment, where the skip is a failure again.
    reason = str(report.longrepr)
    return NEEDS_SESSION_BUDDY in reason and sys.version_info < SESSION_BUDDY_PYTHON


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under REALTIME_TESTS_NO_SKIP=1, report every skip as a failure.

    Except, below Python 3.13, the tests that need Session-Buddy (see ``_allowed_skip``).
    """
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if NO_SKIP and report.skipped and not hasattr(report, "wasxfail") and not _allowed_skip(report):
        report.outcome = "failed"
        report.longrepr = f"skipped under REALTIME_TESTS_NO_SKIP=1: {report.longrepr}"
