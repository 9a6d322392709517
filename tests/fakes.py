"""Stand-ins behind the seams: a source the test feeds, a connection with no socket."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Set
from typing import Any

from websockets.exceptions import ConnectionClosedOK
from websockets.frames import Close
from websockets.protocol import State

from session_buddy_realtime.data.source import (
    History,
    HistoryWindow,
    MetricsSnapshot,
    SkillNames,
    SourceState,
)


def skill_row(name: str, runs: int, rate: float = 100.0) -> dict[str, Any]:
    """A ``top_skills`` entry as a source delivers it."""
    return {
        "skill_name": name,
        "total_invocations": runs,
        "completion_rate": rate,
        "avg_duration_seconds": 1.5,
        "completed_invocations": round(runs * rate / 100),
        "last_invoked": "2026-12-01T10:00:00.000Z",
    }


def anomaly(name: str, score: float) -> dict[str, Any]:
    """An anomaly as a source delivers it."""
    return {
        "skill_name": name,
        "detected_at": "2026-12-01T10:00:00.000Z",
        "anomaly_type": "drop",
        "deviation_score": score,
        "baseline_value": 95.0,
        "observed_value": 40.0,
        "source": "live",
    }


class FakeSource:
    """A ``Source`` that serves what the test sets and records what it was asked."""

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows = {row["skill_name"]: row for row in rows or []}
        self.anomalies: list[dict[str, Any]] = []
        self.state = SourceState.OK
        self.message: str | None = None
        self.asked: list[tuple[frozenset[str], float]] = []
        self.fail_next: Exception | None = None
        self.opened = 0
        self.closed = 0
        self.history_rows: list[tuple[int, int, int]] = []
        """What ``history`` returns: (bucket index, invocations, completed)."""
        self.lookups: list[tuple[str, object]] = []
        self.lookup_gate: asyncio.Event | None = None
        """When set, history and skill_names wait for it (a database that does not answer)."""

    async def open(self) -> None:
        self.opened += 1

    async def close(self) -> None:
        self.closed += 1

    async def read(self, skills: Set[str], within: float) -> MetricsSnapshot:
        self.asked.append((frozenset(skills), within))
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        top = sorted(self.rows.values(), key=lambda row: -row["total_invocations"])[:10]
        return MetricsSnapshot(
            top_skills=top,
            skills={name: self.rows.get(name) for name in skills},
            anomalies=list(self.anomalies),
            state=self.state,
            message=self.message,
            as_of="2026-12-01T10:00:00.000Z",
        )

    async def history(self, skill: str | None, window: HistoryWindow, within: float) -> History:
        self.lookups.append(("history", skill))
        if self.lookup_gate is not None:
            await self.lookup_gate.wait()
        return History.from_rows(
            skill,
            window,
            window.start(1_800_000_000),
            self.history_rows,
            as_of="2026-12-01T10:00:00.000Z",
            state=self.state,
            message=self.message,
        )

    async def skill_names(self, query: str, limit: int, within: float) -> SkillNames:
        self.lookups.append(("skills", query))
        ranked = sorted(self.rows.values(), key=lambda row: -row["total_invocations"])
        names = [row["skill_name"] for row in ranked if query.lower() in row["skill_name"].lower()]
        return SkillNames(query, names[:limit], self.state, self.message, None)

    def describe(self) -> dict[str, Any]:
        return {
            "path": None,
            "shared_connection": False,
            "state": self.state.value,
            "message": self.message,
            "queries": len(self.asked),
            "refreshes": 0,
        }


class FakeTransport:
    """Collects what is written; never congested."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.aborted = True

    def frames(self) -> list[dict[str, Any]]:
        """Decode the unmasked text frames written so far (and forget them)."""
        data, self.written = bytes(self.written), bytearray()
        messages = []
        while data:
            assert data[0] == 0x81, "one whole text frame per message"
            length, offset = data[1] & 0x7F, 2
            if length == 126:
                (length,), offset = struct.unpack("!H", data[2:4]), 4
            elif length == 127:
                (length,), offset = struct.unpack("!Q", data[2:10]), 10
            messages.append(json.loads(data[offset : offset + length]))
            data = data[offset + length :]
        return messages


class FakeProtocol:
    state = State.OPEN

    def data_to_send(self) -> list[bytes]:
        return []


class FakeConnection:
    """What a session and the hub use of a Connection, without a socket."""

    remote_address = ("203.0.113.7", 40000)

    def __init__(self, incoming: list[str] | None = None) -> None:
        self.transport = FakeTransport()
        self.protocol = FakeProtocol()
        self.state = State.OPEN
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self._incoming = list(incoming or [])

    async def send(self, text: str) -> None:
        self.sent.append(json.loads(text))

    def send_data(self, then: bytes = b"") -> None:
        self.transport.write(then)

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.state = self.protocol.state = State.CLOSED

    async def recv(self) -> str:
        await asyncio.sleep(0)
        if self.closed is not None or not self._incoming:
            # As the library's: the end of a connection closed normally.
            raise ConnectionClosedOK(Close(1000, ""), Close(1000, ""), rcvd_then_sent=True)
        return self._incoming.pop(0)
