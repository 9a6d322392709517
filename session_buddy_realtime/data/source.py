"""The source seam: "the state for these skills, within this deadline".

The hub asks a ``Source`` for a ``MetricsSnapshot`` every tick and never knows where it
comes from. Sessions ask it for histories and skill names when a client does.
``DatabaseSource`` (``data/database.py``) reads Session-Buddy's skills database; anything
else that implements these six methods (a Redis-fed source on an edge, a fake in a test)
can feed the same hub.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Protocol

from session_buddy_realtime.protocol import (
    format_timestamp,
    history_message,
    metrics_update_message,
    skills_message,
)

__all__ = [
    "HISTORY_SECONDS",
    "LOOKUP_WAIT",
    "MAX_ANOMALIES",
    "MIN_BUCKET_SECONDS",
    "History",
    "HistoryWindow",
    "MetricsSnapshot",
    "SkillNames",
    "Source",
    "SourceState",
    "source_status",
]

MAX_ANOMALIES: Final = 50
"""Anomalies per ``metrics_update`` for all skills (most severe first)."""
LOOKUP_WAIT: Final = 5.0
"""Seconds a request for history or skill names (or a scrape) waits for the source."""
HISTORY_SECONDS: Final = 600
"""The span of a history: the last 10 minutes (rounded up to whole buckets)."""
MIN_BUCKET_SECONDS: Final = 10


class SourceState(StrEnum):
    """Health of the data source, carried in every ``metrics_update``."""

    OK = "ok"
    MISSING_TABLES = "missing_tables"
    ERROR = "error"
    BUSY = "busy"
    """A read is taking longer than the tick allows (locked or slow database)."""
    WAITING = "waiting"
    """The database file does not exist (yet, or any more); it is read once it appears."""
    UNAVAILABLE = "unavailable"
    """An edge's feed is not reaching it (Redis unreachable, or no producer publishing);
    the data is the last received."""


@dataclass(slots=True)
class MetricsSnapshot:
    """One consistent state of the metrics, shaped for the protocol."""

    top_skills: list[dict[str, Any]]
    skills: dict[str, dict[str, Any] | None]
    anomalies: list[dict[str, Any]]
    state: SourceState
    message: str | None
    as_of: str | None

    @property
    def fresh(self) -> bool:
        """True when the last read succeeded (the data is not stale)."""
        return self.state is SourceState.OK

    def data(self, skill: str | None) -> dict[str, Any]:
        """Return the ``data`` object of a ``metrics_update`` for all skills or one."""
        if skill is None:
            return {"top_skills": self.top_skills, "anomalies": self.anomalies[:MAX_ANOMALIES]}
        row = self.skills.get(skill)
        return {
            "top_skills": [] if row is None else [row],
            "anomalies": [a for a in self.anomalies if a["skill_name"] == skill],
        }

    def source(self) -> dict[str, Any]:
        """Return the ``source`` object: state, staleness and age of the data."""
        return source_status(self.state, self.message, self.as_of)

    def update(self, skill: str | None, timestamp: str) -> dict[str, Any]:
        """Return the ``metrics_update`` for subscribers of ``skill`` (None: all skills)."""
        return metrics_update_message(
            timestamp=timestamp, skill=skill, data=self.data(skill), source=self.source()
        )


def source_status(state: SourceState, message: str | None, as_of: str | None) -> dict[str, Any]:
    """The ``source`` object of a message: state, staleness and age of the data."""
    return {
        "state": state.value,
        "stale": state is not SourceState.OK,
        "as_of": as_of,
        "message": message,
    }


@dataclass(frozen=True, slots=True)
class HistoryWindow:
    """How a history is cut: ``buckets`` buckets of ``bucket_seconds``, the last one holding now.

    Buckets start at multiples of ``bucket_seconds`` (Unix time), so two histories asked
    for a moment apart have the same buckets, and a client can add to the last one.
    """

    bucket_seconds: int
    buckets: int

    @classmethod
    def for_interval(cls, interval: float) -> HistoryWindow:
        """``bucket_seconds`` = max(10, the interval rounded up to whole seconds), over
        ``HISTORY_SECONDS`` rounded up to whole buckets."""
        bucket = max(MIN_BUCKET_SECONDS, math.ceil(interval))
        return cls(bucket, max(1, math.ceil(HISTORY_SECONDS / bucket)))

    @property
    def seconds(self) -> int:
        """The span of the window."""
        return self.bucket_seconds * self.buckets

    def start(self, now: float) -> int:
        """Unix time at which the first bucket starts, when the last one holds ``now``."""
        return (math.floor(now / self.bucket_seconds) + 1 - self.buckets) * self.bucket_seconds


@dataclass(slots=True)
class History:
    """Invocations and completions per bucket of a window, for all skills or one."""

    skill: str | None
    window: HistoryWindow
    start: int
    invocations: list[int]
    completed: list[int]
    state: SourceState
    message: str | None
    as_of: str | None

    @classmethod
    def from_rows(
        cls,
        skill: str | None,
        window: HistoryWindow,
        start: int,
        rows: Iterable[Sequence[Any]],
        *,
        as_of: str | None,
        state: SourceState = SourceState.OK,
        message: str | None = None,
    ) -> History:
        """Rows of ``(bucket index, invocations, completed)``; buckets without a row are 0."""
        invocations, completed = [0] * window.buckets, [0] * window.buckets
        for slot, count, done in rows:
            if isinstance(slot, int) and 0 <= slot < window.buckets:
                invocations[slot], completed[slot] = int(count or 0), int(done or 0)
        return cls(skill, window, start, invocations, completed, state, message, as_of)

    @classmethod
    def empty(
        cls,
        skill: str | None,
        window: HistoryWindow,
        start: int,
        state: SourceState,
        message: str | None,
    ) -> History:
        """No data: every bucket 0, and ``state`` saying why."""
        return cls.from_rows(skill, window, start, [], as_of=None, state=state, message=message)

    def reply(self, timestamp: str) -> dict[str, Any]:
        """The ``history`` message."""
        step = self.window.bucket_seconds
        buckets = [
            {
                "start": format_timestamp(datetime.fromtimestamp(self.start + i * step, UTC)),
                "invocations": count,
                "completed": done,
            }
            for i, (count, done) in enumerate(zip(self.invocations, self.completed, strict=True))
        ]
        return history_message(
            timestamp=timestamp,
            skill=self.skill,
            bucket_seconds=step,
            window_seconds=self.window.seconds,
            buckets=buckets,
            source=source_status(self.state, self.message, self.as_of),
        )


@dataclass(slots=True)
class SkillNames:
    """Skill names that contain ``query``, the most invoked first."""

    query: str
    names: list[str]
    state: SourceState
    message: str | None
    as_of: str | None

    def reply(self, timestamp: str) -> dict[str, Any]:
        """The ``skills`` message."""
        return skills_message(
            timestamp=timestamp,
            query=self.query,
            skills=self.names,
            source=source_status(self.state, self.message, self.as_of),
        )


class Source(Protocol):
    """Where the hub gets its state from."""

    async def open(self) -> None:
        """Get ready to read; raise a ``ServerStartError`` that says what is wrong."""

    async def read(self, skills: Set[str], within: float) -> MetricsSnapshot:
        """Return the state, with the rows of ``skills``, within about ``within`` seconds.

        A source that cannot answer in time returns its last good state flagged stale
        rather than keep the tick waiting. It never raises for trouble with its data.
        """
        ...

    async def history(self, skill: str | None, window: HistoryWindow, within: float) -> History:
        """Invocations per bucket of ``window``, for all skills (None) or ``skill``.

        Asked for only when a client asks, so it may cost a query. Like ``read``, it never
        raises for trouble with its data: the buckets are then 0 and the state says why.
        """
        ...

    async def skill_names(self, query: str, limit: int, within: float) -> SkillNames:
        """At most ``limit`` skill names containing ``query``, the most invoked first."""
        ...

    async def close(self) -> None:
        """Release what ``open()`` took; harmless when not open."""

    def describe(self) -> dict[str, Any]:
        """Return the source as shown under ``database`` in ``status()``."""
        ...
