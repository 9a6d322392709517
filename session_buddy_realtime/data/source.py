"""The source seam: "the state for these skills, within this deadline".

The hub asks a ``Source`` for a ``MetricsSnapshot`` every tick and never knows where it
comes from. ``DatabaseSource`` (``data/database.py``) reads Session-Buddy's skills
database; anything else that implements these four methods (a Redis-fed source on an
edge, a fake in a test) can feed the same hub.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

from session_buddy_realtime.protocol import metrics_update_message

__all__ = ["MAX_ANOMALIES", "MetricsSnapshot", "Source", "SourceState"]

MAX_ANOMALIES: Final = 50
"""Anomalies per ``metrics_update`` for all skills (most severe first)."""


class SourceState(StrEnum):
    """Health of the data source, carried in every ``metrics_update``."""

    OK = "ok"
    MISSING_TABLES = "missing_tables"
    ERROR = "error"
    BUSY = "busy"
    """A read is taking longer than the tick allows (locked or slow database)."""
    WAITING = "waiting"
    """The database file does not exist (yet, or any more); it is read once it appears."""


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
        return {
            "state": self.state.value,
            "stale": not self.fresh,
            "as_of": self.as_of,
            "message": self.message,
        }

    def update(self, skill: str | None, timestamp: str) -> dict[str, Any]:
        """Return the ``metrics_update`` for subscribers of ``skill`` (None: all skills)."""
        return metrics_update_message(
            timestamp=timestamp, skill=skill, data=self.data(skill), source=self.source()
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

    async def close(self) -> None:
        """Release what ``open()`` took; harmless when not open."""

    def describe(self) -> dict[str, Any]:
        """Return the source as shown under ``database`` in ``status()``."""
        ...
