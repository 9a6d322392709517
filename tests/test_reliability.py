"""Reliability: database faults, contained failures, hostile sockets, and a protocol fuzz.

Every test runs a real server on 127.0.0.1 port 0 over a real SQLite file, and (except for
the fuzz) keeps a healthy WebSocket client reading throughout: the point of each fault is
that *this* client keeps getting a ``metrics_update`` on every tick while something else
goes wrong. "On cadence" is checked the way tests/test_server.py does it: the updates the
healthy client received are counted against ``status()["ticks"]`` over the episode, plus
a loose bound on the longest silence (many intervals), never a tight wall-clock figure.

Hostile clients use raw sockets and hand-built frames (see ``RawClient``): a masked client
frame is FIN+opcode, ``0x80 | length`` (with 126/127 extended lengths), a 4-byte mask and
the masked payload.

The fuzz (``test_fuzz_client_messages_over_one_connection``) is a plain synchronous test,
not itself ``@given``: inside it, the server and one WebSocket client run on an event loop
in a background thread (``_LoopThread``), and a nested ``@given`` function sends each
generated frame through that one connection with ``asyncio.run_coroutine_threadsafe``.
This keeps Hypothesis out of pytest-asyncio's machinery (no async ``@given``, no
function-scoped fixture reused across examples), and every example, shrinking included,
goes through the same long-lived connection, as a real client's messages do. The server
gets a one-hour interval, so no broadcast interleaves with the replies, and a rate limit
too high to interfere. The replies a frame must get come from the package's own parser
(``parse_client_message``, fuzzed as a pure function in tests/test_protocol.py): this
test checks that the server turns each outcome into exactly those frames on the wire,
valid against the schema, with documented error codes, no internal error, and accepted
skill names that pass an independent check. (How deep JSON may nest before it counts as
invalid depends on the parsing thread's stack, so for deeply nested frames
``invalid_json`` is accepted too.) If an example breaks the connection, the next example
reconnects (and the failure is reported by Hypothesis as usual), so shrinking still works
on a live connection. The number of examples comes from ``REALTIME_FUZZ_EXAMPLES``
(default 200, quick in CI); a long run is::

    REALTIME_FUZZ_EXAMPLES=20000 pytest tests/test_reliability.py -k fuzz -s

With ``-s`` the test prints how many inputs went through the connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import operator
import os
import shutil
import socket
import sqlite3
import threading
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

from session_buddy_realtime import RealTimeMetricsServer
from session_buddy_realtime.data.reader import MetricsReader
from session_buddy_realtime.data.schema import SCHEMA_SQL
from session_buddy_realtime.protocol import (
    Auth,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    parse_client_message,
)
from session_buddy_realtime.stream.hub import Hub
from tests.conftest import (
    INTERVAL,
    SERVER_MESSAGE,
    UNIT,
    Client,
    ClientFactory,
    ServerFactory,
    SkillsDB,
    iso,
    url_of,
    wait_until,
)

T = TypeVar("T")

LONGEST_SILENCE = 20 * UNIT
"""The longest gap between two updates a healthy client may see during any fault."""


# Helpers


class Stream:
    """Reads every frame a healthy client receives, in the background, and keeps them."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.updates: list[dict[str, Any]] = []
        self.arrivals: list[float] = []
        self.replies: list[dict[str, Any]] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.client.recv(timeout=200 * UNIT)
            if message["type"] == "metrics_update":
                self.updates.append(message)
                self.arrivals.append(time.monotonic())
            else:
                self.replies.append(message)

    def check(self) -> None:
        """Raise whatever stopped the reader (a closed connection, an invalid frame)."""
        if self._task.done():
            self._task.result()
            raise AssertionError("the healthy client stopped reading")

    async def until(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        since: int | None = None,
        timeout: float = 60 * UNIT,
    ) -> dict[str, Any]:
        """Wait for an update (from index ``since``, default: from now on) that matches."""
        start = len(self.updates) if since is None else since
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            self.check()
            found.extend(u for u in self.updates[start:] if predicate(u))
            return bool(found)

        await wait_until(seen, timeout)
        return found[0]

    async def reply(self, kind: str, *, since: int = 0) -> dict[str, Any]:
        """Wait for a non-update message of type ``kind`` (from index ``since``)."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            self.check()
            found.extend(m for m in self.replies[since:] if m["type"] == kind)
            return bool(found)

        await wait_until(seen)
        return found[0]

    async def more(self, count: int) -> list[dict[str, Any]]:
        """Wait for ``count`` more updates and return them."""
        start = len(self.updates)

        def arrived() -> bool:
            self.check()
            return len(self.updates) >= start + count

        await wait_until(arrived)
        return self.updates[start : start + count]

    def longest_silence(self, since: int) -> float:
        """The longest gap between consecutive updates from index ``since`` on."""
        arrivals = self.arrivals[max(since - 1, 0) :]
        return max((b - a for a, b in itertools.pairwise(arrivals)), default=0.0)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def watch() -> AsyncIterator[Callable[[Client], Stream]]:
    """Start a background reader on a client; cancelled at teardown."""
    streams: list[Stream] = []

    def _watch(client: Client) -> Stream:
        stream = Stream(client)
        streams.append(stream)
        return stream

    yield _watch
    for stream in streams:
        await stream.stop()


class Cadence:
    """Counts ticks and a stream's updates from a starting point."""

    def __init__(self, server: RealTimeMetricsServer, stream: Stream) -> None:
        self.server = server
        self.stream = stream
        self.ticks = server.status()["ticks"]
        self.index = len(stream.updates)

    async def kept(self, *, at_least: int) -> int:
        """Wait for ``at_least`` ticks since the start (at most 200 units), then assert the
        stream got an update for each tick but the one in flight, with no long silence.

        Returns the number of ticks counted.
        """
        await wait_until(
            lambda: self.server.status()["ticks"] - self.ticks >= at_least, timeout=200 * UNIT
        )
        ticks: int = self.server.status()["ticks"] - self.ticks

        def caught_up() -> bool:
            self.stream.check()
            return len(self.stream.updates) - self.index >= ticks - 1

        await wait_until(caught_up, timeout=40 * UNIT)
        assert self.stream.longest_silence(self.index) < LONGEST_SILENCE
        return ticks


async def healthy_stream(
    server: RealTimeMetricsServer,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
    first: str = "skill-01",
) -> tuple[Stream, dict[str, Any]]:
    """A healthy all-skills client, and its first good update (busiest skill ``first``)."""
    stream = watch(await open_client(url_of(server)))
    good = await stream.until(
        lambda u: u["source"]["state"] == "ok" and _top_name(u) == first, since=0
    )
    return stream, good


def _top_name(update: dict[str, Any]) -> str | None:
    top = update["data"]["top_skills"]
    return top[0]["skill_name"] if top else None


def _record_rows(skill: str, count: int) -> list[tuple[str, str, str, int, float]]:
    return [(skill, iso(datetime.now(UTC)), "test", 1, 1.0)] * count


_INSERT = (
    "INSERT INTO skill_invocation (skill_name, invoked_at, session_id, completed, "
    "duration_seconds) VALUES (?, ?, ?, ?, ?)"
)


def _rollback_journal(db: SkillsDB) -> None:
    """Switch a SkillsDB (WAL by default) back to the rollback journal."""
    with db.connect() as conn:
        assert conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"


_SIDECARS = ("-wal", "-shm", "-journal")


def _remove_database(path: Path, *, only_sidecars: bool = False) -> None:
    """Delete a database file with its -wal, -shm and -journal (or only those)."""
    for suffix in _SIDECARS if only_sidecars else ("", *_SIDECARS):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


# 1. Database faults


def _hold_exclusive_lock(
    path: Path, locked: threading.Event, release: threading.Event, skill: str
) -> None:
    """Take the write lock, insert ``skill`` as the busiest, hold until released, commit."""
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        db.execute("BEGIN EXCLUSIVE")
        db.executemany(_INSERT, _record_rows(skill, 100))
        locked.set()
        assert release.wait(timeout=30), "the test never released the lock"
        db.execute("COMMIT")
    finally:
        db.close()


async def test_database_locked_by_a_writer_keeps_the_stream_going(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While a writer holds an exclusive lock for 2 s, updates keep coming every tick
    flagged busy/error and stale with the last good data, the warning is logged once,
    and the writer's data appears as 'ok' after the commit without any restart."""
    caplog.set_level(logging.INFO, logger="session_buddy_realtime")
    _rollback_journal(ranked_db)
    server = await start_server(update_interval=INTERVAL)
    stream, good = await healthy_stream(server, open_client, watch)
    locked, release = threading.Event(), threading.Event()
    writer = asyncio.create_task(
        asyncio.to_thread(_hold_exclusive_lock, ranked_db.path, locked, release, "the-writer")
    )
    try:
        await wait_until(locked.is_set)
        locked_at = time.monotonic()
        cadence = Cadence(server, stream)
        first_busy = await stream.until(lambda u: u["source"]["state"] in {"busy", "error"})
        busy_from = stream.updates.index(first_busy)
        await wait_until(lambda: time.monotonic() - locked_at >= 40 * UNIT)
        during = stream.updates[busy_from:]
        await cadence.kept(at_least=5)
    finally:
        release.set()
        await writer
    for update in during:
        assert update["source"]["state"] in {"busy", "error"}
        assert update["source"]["stale"] is True
        assert update["source"]["message"]
        assert update["data"]["top_skills"] == good["data"]["top_skills"]
    recovered = await stream.until(
        lambda u: u["source"]["state"] == "ok" and _top_name(u) == "the-writer"
    )
    assert recovered["source"]["stale"] is False
    slow_warnings = [r for r in caplog.records if "taking longer" in r.getMessage()]
    assert len(slow_warnings) == 1
    assert len(during) > 3  # so "once" means once for many busy ticks
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) <= 2
    assert server.status()["errors"] == 0


async def test_dropped_table_is_reported_and_recovers_when_recreated(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
) -> None:
    """DROP TABLE skill_metrics gives 'missing_tables' naming it with the last good data;
    recreating the schema brings 'ok' and new data back, on cadence throughout."""
    server = await start_server()
    stream, good = await healthy_stream(server, open_client, watch)
    cadence = Cadence(server, stream)
    with ranked_db.connect() as db:
        db.execute("DROP TABLE skill_metrics")
    missing = await stream.until(lambda u: u["source"]["state"] == "missing_tables")
    assert missing["source"]["stale"] is True
    assert "skill_metrics" in missing["source"]["message"]
    assert missing["data"]["top_skills"] == good["data"]["top_skills"]
    assert server.status()["database"]["state"] == "missing_tables"
    for update in await stream.more(3):
        assert update["source"] == missing["source"]
        assert update["data"] == missing["data"]
    with ranked_db.connect() as db:
        db.executescript(SCHEMA_SQL)
    ranked_db.record("after-recreate", count=3)
    recovered = await stream.until(
        lambda u: u["source"]["state"] == "ok" and _top_name(u) == "after-recreate"
    )
    assert recovered["source"]["stale"] is False
    assert [row["skill_name"] for row in recovered["data"]["top_skills"]] == ["after-recreate"]
    await cadence.kept(at_least=3)
    assert server.status()["errors"] == 0


async def test_deleted_file_is_reported_and_a_new_file_is_followed(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
) -> None:
    """Deleting the open database gives 'waiting' saying the file is gone (last good data
    kept); a new database created at the same path is picked up without a restart."""
    server = await start_server()
    stream, good = await healthy_stream(server, open_client, watch)
    cadence = Cadence(server, stream)
    _remove_database(ranked_db.path)
    gone = await stream.until(lambda u: u["source"]["state"] == "waiting")
    assert gone["source"]["stale"] is True
    assert "gone" in gone["source"]["message"]
    assert str(ranked_db.path) in gone["source"]["message"]
    assert server.status()["database"]["state"] == "waiting"
    assert gone["data"]["top_skills"] == good["data"]["top_skills"]
    for update in await stream.more(3):
        assert update["source"] == gone["source"]
        assert update["data"] == gone["data"]
    SkillsDB(ranked_db.path).record("born-again", count=5)
    recovered = await stream.until(
        lambda u: u["source"]["state"] == "ok" and _top_name(u) == "born-again"
    )
    assert [row["skill_name"] for row in recovered["data"]["top_skills"]] == ["born-again"]
    await cadence.kept(at_least=3)
    assert server.status()["errors"] == 0


async def test_file_replaced_by_atomic_rename_is_followed(
    tmp_path: Path,
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
) -> None:
    """A new database renamed over the open one (a restore from backup, after writes
    made while serving) is streamed from the next tick on, without a restart."""
    server = await start_server()
    stream, _ = await healthy_stream(server, open_client, watch)
    cadence = Cadence(server, stream)
    ranked_db.record("written-while-serving", count=40)
    await stream.until(lambda u: _top_name(u) == "written-while-serving")
    replacement = SkillsDB(tmp_path / "replacement.db")
    replacement.record("restored", count=7)
    # A -wal/-shm belongs to the file it was written for: SQLite would overlay the old
    # -wal on the restored file, so a restore removes them first (the old connection
    # keeps its unlinked copies until the server closes it).
    _remove_database(ranked_db.path, only_sidecars=True)
    os.replace(replacement.path, ranked_db.path)
    recovered = await stream.until(
        lambda u: u["source"]["state"] == "ok" and _top_name(u) == "restored"
    )
    assert [row["skill_name"] for row in recovered["data"]["top_skills"]] == ["restored"]
    assert recovered["data"]["top_skills"][0]["total_invocations"] == 7
    for update in await stream.more(3):
        assert update["data"] == recovered["data"]
        assert update["source"]["state"] == "ok"
    await cadence.kept(at_least=3)
    assert server.status()["errors"] == 0


async def test_corrupted_file_is_an_error_until_a_good_copy_is_restored(
    tmp_path: Path,
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
) -> None:
    """Garbage written over the header and middle of the open file gives 'error' with the
    last good data; renaming a good copy over it brings 'ok' and its data back."""
    _rollback_journal(ranked_db)  # so that every read re-checks the file header
    good_copy = tmp_path / "good-copy.db"
    shutil.copyfile(ranked_db.path, good_copy)
    with contextlib.closing(sqlite3.connect(good_copy, isolation_level=None)) as db:
        db.executemany(_INSERT, _record_rows("from-backup", 50))
    server = await start_server()
    stream, good = await healthy_stream(server, open_client, watch)
    cadence = Cadence(server, stream)
    size = ranked_db.path.stat().st_size
    with ranked_db.path.open("r+b") as damaged:
        damaged.write(b"\xde\xad\xbe\xef" * 32)  # the 100-byte header and then some
        damaged.seek(size // 2)
        damaged.write(b"\x00garbage\xff" * 64)
    broken = await stream.until(lambda u: u["source"]["state"] == "error")
    assert broken["source"]["stale"] is True
    assert broken["source"]["message"].startswith("database error: ")
    assert broken["data"]["top_skills"] == good["data"]["top_skills"]
    for update in await stream.more(3):
        assert update["source"] == broken["source"]
        assert update["data"] == broken["data"]
    os.replace(good_copy, ranked_db.path)
    recovered = await stream.until(
        lambda u: u["source"]["state"] == "ok" and _top_name(u) == "from-backup"
    )
    assert recovered["source"]["stale"] is False
    await cadence.kept(at_least=3)
    assert server.status()["errors"] == 0


class SlowReads:
    """Wraps MetricsReader.read: reads wait while held, and overlapping reads are counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.released = asyncio.Event()
        self.released.set()
        self.active = 0
        self.most_active = 0
        self.calls = 0
        original = MetricsReader.read

        async def read(source: MetricsReader, skills: Any = frozenset()) -> Any:
            self.calls += 1
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            try:
                await self.released.wait()
                return await original(source, skills)
            finally:
                self.active -= 1

        monkeypatch.setattr(MetricsReader, "read", read)

    def hold(self) -> None:
        self.released.clear()

    def release(self) -> None:
        self.released.set()


async def _hold_a_slow_read(
    server: RealTimeMetricsServer, stream: Stream, slow: SlowReads, ticks: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Hold reads for ``ticks`` ticks; return the updates meanwhile and counter deltas."""
    start = server.status()
    calls = slow.calls
    slow.hold()
    try:
        first_busy = await stream.until(lambda u: u["source"]["state"] == "busy")
        busy_from = stream.updates.index(first_busy)
        await wait_until(
            lambda: server.status()["ticks"] >= start["ticks"] + ticks, timeout=200 * UNIT
        )
        during = stream.updates[busy_from:]
        end = server.status()
        reads_started = slow.calls - calls
    finally:
        slow.release()
    deltas = {
        "ticks": end["ticks"] - start["ticks"],
        "ticks_skipped": end["ticks_skipped"] - start["ticks_skipped"],
        "reads_started": reads_started,
    }
    return during, deltas


async def test_slow_query_keeps_cadence_with_one_read_in_flight(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read slower than the interval (held for 6 ticks) never overlaps another read,
    ticks keep their slots and clients get 'busy' stale updates; then 'ok' again."""
    slow = SlowReads(monkeypatch)
    interval = 0.3  # the read deadline (0.2 s) fits in a tick
    server = await start_server(update_interval=interval)
    stream, good = await healthy_stream(server, open_client, watch)
    cadence = Cadence(server, stream)
    during, deltas = await _hold_a_slow_read(server, stream, slow, ticks=6)
    assert deltas["ticks"] >= 6
    assert deltas["ticks_skipped"] <= 1
    assert deltas["reads_started"] == 1  # the held read is reused, not restarted
    assert len(during) >= 4
    for update in during:
        assert update["source"]["state"] == "busy"
        assert update["source"]["stale"] is True
        assert update["data"]["top_skills"] == good["data"]["top_skills"]
    ranked_db.record("after-the-stall", count=100)
    recovered = await stream.until(
        lambda u: u["source"]["state"] == "ok" and _top_name(u) == "after-the-stall"
    )
    assert recovered["source"]["stale"] is False
    await cadence.kept(at_least=6)
    assert slow.most_active == 1
    assert server.status()["errors"] == 0


async def test_slow_query_keeps_cadence_at_a_short_interval(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At a 0.1 s interval a held read does not cost tick slots either ("never wait
    longer than the tick allows", DatabaseSource.read)."""
    slow = SlowReads(monkeypatch)
    server = await start_server(update_interval=INTERVAL)
    stream, _ = await healthy_stream(server, open_client, watch)
    _, deltas = await _hold_a_slow_read(server, stream, slow, ticks=8)
    assert deltas["ticks_skipped"] <= 1


# 2. Containment


def _fail_once_in_deliver(monkeypatch: pytest.MonkeyPatch, armed: list[bool]) -> None:
    original = Hub._deliver

    def deliver(self: Hub[Any], *args: Any) -> None:
        if armed and armed.pop():
            raise RuntimeError("injected fault in delivery")
        original(self, *args)

    monkeypatch.setattr(Hub, "_deliver", deliver)


def _fail_once_in_read(monkeypatch: pytest.MonkeyPatch, armed: list[bool]) -> None:
    original = MetricsReader.read

    async def read(self: MetricsReader, skills: Any = frozenset()) -> Any:
        if armed and armed.pop():
            raise RuntimeError("injected fault in read")
        return await original(self, skills)

    monkeypatch.setattr(MetricsReader, "read", read)


@pytest.mark.parametrize(
    "inject", [_fail_once_in_deliver, _fail_once_in_read], ids=["deliver", "read"]
)
async def test_a_failing_tick_is_contained(
    inject: Callable[[pytest.MonkeyPatch, list[bool]], None],
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tick that raises is counted in errors/last_error; the broadcaster carries on,
    the next ticks deliver and the client's connection is unaffected."""
    armed: list[bool] = []
    inject(monkeypatch, armed)
    server = await start_server()
    stream, _ = await healthy_stream(server, open_client, watch)
    cadence = Cadence(server, stream)
    armed.append(True)
    await wait_until(lambda: server.status()["errors"] >= 1)
    status = server.status()
    assert status["errors"] == 1
    assert "injected fault" in status["last_error"]
    assert "broadcast tick" in status["last_error"]
    after = len(stream.updates)
    await stream.until(lambda u: u["source"]["state"] == "ok", since=after)
    await wait_until(lambda: len(stream.updates) >= after + 5)
    await stream.client.send_json({"type": "ping"})
    await stream.reply("pong")
    ticks = await cadence.kept(at_least=5)
    assert len(stream.updates) - cadence.index >= ticks - 2  # one tick lost, no more
    assert server.status()["errors"] == 1
    assert server.status()["client_count"] == 1


# 3. Hostile sockets


def client_frame(
    opcode: int, payload: bytes, *, announced: int | None = None, fin: bool = True
) -> bytes:
    """One masked client frame (FIN set unless ``fin`` is False); ``announced`` overrides
    the length field."""
    length = len(payload) if announced is None else announced
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + length.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class RawClient:
    """A hand-rolled WebSocket client over an asyncio stream: frames go out as built."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.texts: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        async with asyncio.timeout(40 * UNIT):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, frame: bytes) -> None:
        self.writer.write(frame)
        await self.writer.drain()

    async def read_frame(self) -> tuple[int, bytes]:
        async with asyncio.timeout(40 * UNIT):
            first, second = await self.reader.readexactly(2)
            assert not second & 0x80, "server frames are not masked"
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(await self.reader.readexactly(2), "big")
            elif length == 127:
                length = int.from_bytes(await self.reader.readexactly(8), "big")
            return first & 0x0F, await self.reader.readexactly(length)

    async def read_text(self, kind: str) -> dict[str, Any]:
        """Read frames until a text message of type ``kind`` (all validated)."""
        while True:
            opcode, payload = await self.read_frame()
            assert opcode == OP_TEXT, (opcode, payload)
            message: dict[str, Any] = json.loads(payload.decode("utf-8"))
            SERVER_MESSAGE.validate(message)
            self.texts.append(message)
            if message["type"] == kind:
                return message

    async def read_close(self) -> tuple[int, str]:
        """Read frames until the server's close frame; return its code and reason."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == OP_CLOSE:
                return int.from_bytes(payload[:2], "big"), payload[2:].decode()
            if opcode == OP_TEXT:
                message = json.loads(payload.decode("utf-8"))
                SERVER_MESSAGE.validate(message)
                self.texts.append(message)

    async def at_eof(self) -> bool:
        """True once the server has closed the TCP connection."""
        async with asyncio.timeout(60 * UNIT):
            with contextlib.suppress(ConnectionResetError):
                while await self.reader.read(65536):
                    pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def raw_client() -> AsyncIterator[Callable[[int], Coroutine[Any, Any, RawClient]]]:
    """Open hand-rolled WebSocket clients to a port; closed at teardown."""
    opened: list[RawClient] = []

    async def _open(port: int) -> RawClient:
        client = await RawClient.open(port)
        opened.append(client)
        return client

    yield _open
    for client in opened:
        await client.close()


RawFactory = Callable[[int], Coroutine[Any, Any, RawClient]]


async def test_invalid_utf8_text_frame_closes_only_that_connection_with_1007(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
    raw_client: RawFactory,
) -> None:
    """A text frame that is not UTF-8 gets its connection closed with 1007 and dropped
    after close_timeout (the peer never closes its side), while the healthy client keeps
    its cadence and no internal error is recorded."""
    server = await start_server(close_timeout=0.2)
    stream, _ = await healthy_stream(server, open_client, watch)
    cadence = Cadence(server, stream)
    raw = await raw_client(server.port)
    await raw.read_text("connected")
    await raw.send(client_frame(OP_TEXT, b'{"type": "ping", "x": "\xff\xfe\xc3\x28"}'))
    code, _ = await raw.read_close()
    assert code == 1007
    assert await raw.at_eof()
    await wait_until(lambda: server.status()["connections"] == 1)
    await cadence.kept(at_least=5)
    assert server.status()["errors"] == 0


async def test_a_message_in_fragments_with_a_ping_between_them_is_answered(
    start_server: ServerFactory, raw_client: RawFactory
) -> None:
    """A text message sent as three fragments, with a ping frame between the first two, is
    read as one message (a ``pong`` message comes back) and the ping gets its pong frame."""
    server = await start_server(update_interval=60.0)
    raw = await raw_client(server.port)
    await raw.read_text("connected")
    await raw.send(
        client_frame(OP_TEXT, b'{"type"', fin=False)
        + client_frame(OP_PING, b"between")
        + client_frame(OP_CONT, b': "pi', fin=False)
        + client_frame(OP_CONT, b'ng"}')
    )
    assert await raw.read_frame() == (OP_PONG, b"between")
    await raw.read_text("pong")
    assert server.status()["errors"] == 0


async def test_invalid_utf8_split_across_fragments_closes_with_1007(
    start_server: ServerFactory, raw_client: RawFactory
) -> None:
    """A fragmented text message whose UTF-8 is invalid only once joined (a sequence cut by
    the fragment boundary, then broken) is closed with 1007, like a single frame."""
    server = await start_server(update_interval=60.0, close_timeout=0.2)
    raw = await raw_client(server.port)
    await raw.read_text("connected")
    await raw.send(
        client_frame(OP_TEXT, b'{"type": "ping", "x": "\xe2', fin=False)
        + client_frame(OP_CONT, b'\x28\xa1"}')
    )
    code, _ = await raw.read_close()
    assert code == 1007
    await wait_until(lambda: server.status()["connections"] == 0)


async def test_binary_frame_gets_unsupported_frame_and_the_connection_stays(
    start_server: ServerFactory, raw_client: RawFactory
) -> None:
    """A binary frame is answered with an 'unsupported_frame' error; a ping then works."""
    server = await start_server(update_interval=60.0)
    raw = await raw_client(server.port)
    await raw.read_text("connected")
    await raw.send(client_frame(OP_BINARY, b'{"type": "ping"}'))
    error = await raw.read_text("error")
    assert error["code"] == "unsupported_frame"
    await raw.send(client_frame(OP_TEXT, b'{"type": "ping"}'))
    await raw.read_text("pong")
    assert server.status()["client_count"] == 1
    assert server.status()["errors"] == 0


async def test_frame_header_announcing_10_mb_closes_with_1009_at_once(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
    raw_client: RawFactory,
) -> None:
    """A header announcing a 10 MB payload (only 16 bytes of it ever sent) is refused with
    1009 and the server half-closes, without waiting for (or buffering) the payload."""
    server = await start_server()
    stream, _ = await healthy_stream(server, open_client, watch)
    cadence = Cadence(server, stream)
    raw = await raw_client(server.port)
    await raw.read_text("connected")
    await raw.send(client_frame(OP_TEXT, b'{"type": "ping",', announced=10 * 1024 * 1024))
    code, reason = await raw.read_close()
    assert code == 1009
    assert "10485760" in reason
    assert await raw.at_eof()
    await raw.close()  # a well-behaved peer closes its side once it sees EOF
    await wait_until(lambda: server.status()["connections"] == 1)
    await cadence.kept(at_least=3)
    assert server.status()["errors"] == 0


async def test_a_peer_that_keeps_its_socket_after_1009_is_dropped_within_close_timeout(
    ranked_db: SkillsDB, start_server: ServerFactory, raw_client: RawFactory
) -> None:
    """After a 1009, a peer that never closes its side is dropped within close_timeout."""
    close_timeout = 0.2
    server = await start_server(close_timeout=close_timeout)
    raw = await raw_client(server.port)
    await raw.read_text("connected")
    await raw.send(client_frame(OP_TEXT, b'{"type": "ping",', announced=10 * 1024 * 1024))
    assert (await raw.read_close())[0] == 1009
    await wait_until(lambda: server.status()["connections"] == 0, timeout=40 * UNIT)


async def _read_until_closed(client: Client, into: list[dict[str, Any]]) -> None:
    while True:
        into.append(await client.recv())


async def test_ping_flood_gets_one_rate_limited_error_then_1008(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
) -> None:
    """500 pings sent as fast as possible (defaults: 10/s, bursts of 20) get a burst of
    pongs and nothing more (messages over the limit are never answered), one
    'rate_limited' error and a 1008 close; the healthy client keeps its cadence."""
    server = await start_server()
    stream, _ = await healthy_stream(server, open_client, watch)
    cadence = Cadence(server, stream)
    flooder = await open_client(url_of(server))
    ping = json.dumps({"type": "ping"})
    began = time.monotonic()
    with contextlib.suppress(ConnectionClosed):  # the server may close before the end
        for _ in range(500):
            await flooder.ws.send(ping)
    received: list[dict[str, Any]] = []
    with pytest.raises(ConnectionClosed) as closed:
        await _read_until_closed(flooder, received)
    elapsed = time.monotonic() - began
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason == "message rate limit exceeded"
    errors = [m for m in received if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["rate_limited"]
    pongs = sum(m["type"] == "pong" for m in received)
    assert 20 <= pongs <= 20 + 10 * elapsed + 1, "only what the bucket allowed was answered"
    assert server.status()["rate_limited"] >= 21
    await wait_until(lambda: server.status()["client_count"] == 1)
    await cadence.kept(at_least=3)
    assert server.status()["errors"] == 0


def _half_open(port: int, count: int) -> list[socket.socket]:
    """TCP connections that never send the HTTP request of the opening handshake."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=40 * UNIT)
            sock.setblocking(False)
            sockets.append(sock)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _dropped(sock: socket.socket) -> bool:
    """True once the server has closed this socket (EOF or reset)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(60 * UNIT):
        try:
            return await loop.sock_recv(sock, 1) == b""
        except ConnectionResetError:
            return True


async def test_half_open_connections_are_dropped_after_open_timeout(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    watch: Callable[[Client], Stream],
) -> None:
    """50 connections that never finish the handshake are dropped after open_timeout
    (0.5 s); the count falls back to the one real client, which keeps its cadence."""
    open_timeout = 0.5
    server = await start_server(open_timeout=open_timeout)
    stream, _ = await healthy_stream(server, open_client, watch)
    cadence = Cadence(server, stream)
    opened_at = time.monotonic()
    sockets = _half_open(server.port, 50)
    try:
        await wait_until(lambda: server.status()["connections"] == 51)
        await wait_until(lambda: server.status()["connections"] == 1)
        dropped_after = time.monotonic() - opened_at
        assert dropped_after >= 0.9 * open_timeout
        assert all(await asyncio.gather(*(_dropped(sock) for sock in sockets)))
    finally:
        for sock in sockets:
            sock.close()
    assert server.status()["client_count"] == 1
    await cadence.kept(at_least=5)
    assert server.status()["errors"] == 0


async def test_stop_is_prompt_with_half_open_connections_pending(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """With 50 handshakes pending and a 30 s open_timeout, stop() drops them at once and
    the real client still gets its 1001."""
    server = await start_server(open_timeout=30.0)
    client = await open_client(url_of(server))
    sockets = _half_open(server.port, 50)
    try:
        await wait_until(lambda: server.status()["connections"] == 51)
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 40 * UNIT
        assert all(await asyncio.gather(*(_dropped(sock) for sock in sockets)))
    finally:
        for sock in sockets:
            sock.close()
    await client.ws.wait_closed()
    assert client.ws.close_code == 1001


@pytest.mark.parametrize(
    ("setting", "limit", "http_status", "refusal"),
    [
        ("max_connections", 5, 503, "too_many_connections"),
        ("max_connections_per_ip", 3, 429, "too_many_connections_from_ip"),
    ],
)
async def test_connection_limits_refuse_the_extra_handshake(
    setting: str,
    limit: int,
    http_status: int,
    refusal: str,
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
) -> None:
    """One connection over the limit gets an HTTP refusal (503 overall, 429 per address);
    the connections already open keep working, and a freed slot can be used again."""
    server = await start_server(**{setting: limit})
    clients = [await open_client(url_of(server)) for _ in range(limit)]
    with pytest.raises(InvalidStatus) as refused:
        await connect(url_of(server), open_timeout=40 * UNIT)
    assert refused.value.response.status_code == http_status
    assert server.status()["refused"] == {refusal: 1}
    for client in clients:
        await client.send_json({"type": "ping"})
        await client.recv_type("pong")
        await client.recv_type("metrics_update")
    await clients[0].ws.close()
    await wait_until(lambda: server.status()["connections"] == limit - 1)
    replacement = await open_client(url_of(server))
    await replacement.recv_type("metrics_update")
    assert server.status()["errors"] == 0


# 4. Fuzzing the client-message handler through one real connection

FUZZ_EXAMPLES = int(os.environ.get("REALTIME_FUZZ_EXAMPLES", "200"))
FRAME_LIMIT = 4096
"""The server's default max_message_size: the largest frame the fuzz sends."""
DOCUMENTED_ERROR_CODES = frozenset(
    {
        "invalid_json",
        "invalid_message",
        "unknown_type",
        "invalid_skill",
        "unsupported_frame",
        "not_authenticated",
        "rate_limited",
        "internal_error",
    }
)
"""The codes listed in docs/protocol.md, "Error codes"."""
PING = json.dumps({"type": "ping"})

_wild_char = st.one_of(
    st.characters(codec="utf-8"),
    st.characters(categories=["Cs"]),  # lone surrogates: only reachable as JSON escapes
    st.characters(categories=["Cc", "Cf", "Co", "Zs", "Zl", "Zp"]),
    st.sampled_from(["\x00", "\x7f", "\u200b", "\ufeff", "\u2028", "'", '"', "\\", "%", "_"]),
)
_wild_text = st.text(alphabet=_wild_char, max_size=20)


@st.composite
def _huge_text(draw: st.DrawFn) -> str:
    """One character repeated so that its JSON form nearly fills a frame."""
    char = draw(_wild_char)
    width = len(json.dumps(char)) - 2  # widest form: \\uXXXX escapes, pairs for astral
    return char * draw(st.integers(0, (FRAME_LIMIT - 96) // width))


_skill_like = st.one_of(
    st.text(  # mostly plausible names; some start or end with a space
        alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"]),
        min_size=1,
        max_size=40,
    ),
    _wild_text,
    _huge_text(),
    st.text(alphabet="abc-", min_size=126, max_size=130),  # around the 128 limit
    st.sampled_from(
        [
            "skill-01",
            "skill-12",
            "not-yet-used",
            " skill-01",
            "skill-01 ",
            "x'); DROP TABLE skill_metrics; --",
            "%",
            "*",
            "..",
            "null",
        ]
    ),
)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | _wild_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_wild_text, inner, max_size=4),
    max_leaves=10,
)
_skill_values = st.one_of(_skill_like, _skill_like, _json_values)  # strings twice as often
_extra_fields = st.dictionaries(_wild_text, _json_values, max_size=3)


def _message(kind: Any, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects of type ``kind`` with the given fields, some random extra fields underneath."""
    return st.builds(
        lambda base, extra: {**extra, **base},
        st.fixed_dictionaries({"type": kind, **fields}),
        _extra_fields,
    )


_same_skill_twice = _skill_values.map(lambda skill: {"skill": skill, "skill_name": skill})
_messages = st.one_of(
    _message(st.just("subscribe")),
    _message(st.just("subscribe"), skill=_skill_values),
    _message(st.just("subscribe"), skill_name=_skill_values),
    _message(st.just("subscribe"), skill=_skill_values, skill_name=_skill_values),
    st.builds(lambda m, both: {**m, **both}, _message(st.just("subscribe")), _same_skill_twice),
    _message(st.sampled_from(["unsubscribe", "ping"])),
    _message(st.just("auth"), token=_skill_values),
    _message(st.just("auth")),
    _message(st.sampled_from(["random", "PING", "Subscribe", ""]) | _wild_text | _json_values),
)


def _to_json(value: Any, ascii_only: bool) -> str:
    """JSON text; lone surrogates can only travel escaped, so they force ensure_ascii."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, ensure_ascii=True)
    return text


def _padded_to_limit(kind: str, short_by: int) -> str:
    """A message of ``kind`` padded to exactly FRAME_LIMIT - short_by bytes."""
    bare = json.dumps({"type": kind, "pad": ""})
    return json.dumps({"type": kind, "pad": "p" * (FRAME_LIMIT - short_by - len(bare))})


_garbage = st.one_of(
    st.text(max_size=200),  # arbitrary text (valid UTF-8, as a text frame must be)
    st.builds(operator.mul, st.characters(codec="utf-8"), st.integers(0, FRAME_LIMIT // 4)),
    st.integers(1, FRAME_LIMIT // 2).map(lambda depth: "[" * depth + "]" * depth),
    st.builds(lambda m, tail: _to_json(m, True) + tail, _messages, st.sampled_from([" x", "}"])),
    st.binary(max_size=64),
)
_frames = st.one_of(
    st.builds(_to_json, _messages, st.booleans()),
    _garbage,
    st.builds(_to_json, _json_values, st.booleans()),
    st.builds(_padded_to_limit, st.sampled_from(["ping", "subscribe"]), st.integers(0, 3)),
)


def _expected(frame: str | bytes) -> list[tuple[str, Any]]:
    """The replies (type, code or skill) the protocol prescribes for one frame."""
    try:
        request = parse_client_message(frame)
    except ProtocolError as exc:
        return [("error", exc.code.value)]
    if isinstance(request, Subscribe):
        return [("subscription_confirmed", request.skill), ("metrics_update", request.skill)]
    if isinstance(request, Unsubscribe):
        return [("unsubscribed", None)]
    if isinstance(request, Ping):
        return [("pong", None)]
    assert isinstance(request, Auth)
    return [("authenticated", None)]


async def _expected_async(frame: str | bytes) -> list[tuple[str, Any]]:
    return _expected(frame)


DEEP_NESTING = 100


def _nesting(frame: str | bytes) -> int:
    """How deeply JSON arrays and objects nest in ``frame`` (0 for bytes)."""
    if isinstance(frame, bytes):
        return 0
    depth = deepest = 0
    in_string = escaped = False
    for char in frame:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _key(message: dict[str, Any]) -> tuple[str, Any]:
    if message["type"] == "error":
        return ("error", message["code"])
    if message["type"] in {"subscription_confirmed", "metrics_update"}:
        return (message["type"], message["skill"])
    return (message["type"], None)


def _safe_skill_name(skill: str) -> bool:
    """What an accepted skill name must be, checked independently of the package."""
    try:
        skill.encode("utf-8")
    except UnicodeEncodeError:
        return False
    printable = not any(unicodedata.category(char).startswith("C") for char in skill)
    return 1 <= len(skill) <= 128 and skill == skill.strip() and printable


class _LoopThread:
    """An event loop running in a background thread; coroutines are submitted to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop")
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 200 * UNIT) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=200 * UNIT)
        self.loop.close()


class _FuzzSession:
    """One server and one client connection, living on a ``_LoopThread``."""

    def __init__(self, db_path: Path) -> None:
        self.server = RealTimeMetricsServer(
            host="127.0.0.1",
            port=0,
            db_path=db_path,
            update_interval=3600.0,  # no broadcast interleaves with the replies
            message_rate=1e9,
            message_burst=10**9,
        )
        self.ws: ClientConnection | None = None
        self.reconnects = -1
        self.inputs = 0

    async def start(self) -> None:
        await self.server.start()

    async def _connection(self) -> ClientConnection:
        if self.ws is None or self.ws.state is not State.OPEN:
            if self.ws is not None:
                await self.ws.close()
            self.ws = await connect(url_of(self.server), open_timeout=40 * UNIT)
            self.reconnects += 1
            welcome = json.loads(await self.ws.recv())
            SERVER_MESSAGE.validate(welcome)
            assert welcome["type"] == "connected"
            # A broadcaster idle without clients serves the first one at once; with a
            # one-hour interval that is the only update, and it comes before any reply.
            first = json.loads(await self.ws.recv())
            SERVER_MESSAGE.validate(first)
            assert first["type"] == "metrics_update"
        return self.ws

    async def exchange(self, frame: str | bytes, replies: int) -> list[dict[str, Any]]:
        """Send ``frame`` then a ping; return the ``replies`` frames and the pong after."""
        ws = await self._connection()
        self.inputs += 1
        try:
            await ws.send(frame)
            await ws.send(PING)
            received = []
            for _ in range(replies + 1):
                async with asyncio.timeout(40 * UNIT):
                    raw = await ws.recv()
                assert isinstance(raw, str), "server frames are text"
                message = json.loads(raw)
                SERVER_MESSAGE.validate(message)
                received.append(message)
            return received
        except BaseException:
            ws.transport.abort()  # out of step: the next example starts afresh
            raise

    async def status(self) -> dict[str, Any]:
        return self.server.status()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.server.stop()


@contextlib.contextmanager
def _fuzz_session(db_path: Path) -> Iterator[tuple[_LoopThread, _FuzzSession]]:
    loop = _LoopThread()
    try:
        session = _FuzzSession(db_path)
        loop.run(session.start())
        try:
            yield loop, session
        finally:
            loop.run(session.close())
    finally:
        loop.close()


@pytest.mark.timeout(60 + FUZZ_EXAMPLES // 10)
def test_fuzz_client_messages_over_one_connection(ranked_db: SkillsDB) -> None:
    """For arbitrary text, JSON values and near-valid messages, the server answers each
    with valid server messages (the prescribed reply, or an error with a documented
    code), the connection stays open (the ping after it gets a pong) and no internal
    error is recorded."""
    with _fuzz_session(ranked_db.path) as (loop, session):

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(frame=_frames)
        def one_input(frame: str | bytes) -> None:
            if isinstance(frame, str):
                assume(len(frame.encode("utf-8")) <= FRAME_LIMIT)
            expected = _expected(frame)
            received = loop.run(session.exchange(frame, len(expected)))
            *replies, pong = received
            if _nesting(frame) > DEEP_NESTING:
                # How deep json.loads may go depends on the recursion limit (Hypothesis
                # raises it) and on the stack of the thread parsing: too deep is either
                # parsed (as on the server's shallower stack) or refused as invalid_json.
                parsed_there = loop.run(_expected_async(frame))
                expected_any = [expected, parsed_there, [("error", "invalid_json")]]
            else:
                expected_any = [expected]
            assert [_key(m) for m in replies] in expected_any, frame
            assert pong["type"] == "pong"
            for message in replies:
                if message["type"] == "error":
                    assert message["code"] in DOCUMENTED_ERROR_CODES
                    assert message["code"] not in {"internal_error", "rate_limited"}
                if message["type"] == "subscription_confirmed" and message["skill"]:
                    assert _safe_skill_name(message["skill"])
            status = loop.run(session.status())
            assert status["errors"] == 0, status["last_error"]
            assert status["connections"] == 1

        one_input()
        status = loop.run(session.status())
    print(f"\nfuzz: {session.inputs} inputs through one connection ({FUZZ_EXAMPLES} examples)")
    assert session.reconnects == 0
    assert status["errors"] == 0
    assert status["rate_limited"] == 0
    assert session.inputs >= min(FUZZ_EXAMPLES, 100)
