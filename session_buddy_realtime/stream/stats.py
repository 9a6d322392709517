"""The stream server's counters, shared by its parts and shown in ``status()``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

from session_buddy_realtime.protocol import format_timestamp

__all__ = ["StreamStats"]


@dataclass(slots=True)
class StreamStats:
    """What happened since the server last started.

    The hub counts ticks, messages and evictions; sessions count authentication failures
    and rate limiting; the gate counts refusals by reason; any part records errors.
    """

    ticks: int = 0
    idle_ticks: int = 0
    ticks_skipped: int = 0
    messages_sent: int = 0
    updates_dropped: int = 0
    clients_evicted: int = 0
    connections_total: int = 0
    last_tick_at: str | None = None
    last_tick_seconds: float | None = None
    last_error: str | None = None
    errors: int = 0
    auth_failures: int = 0
    rate_limited: int = 0
    refused: Counter[str] = field(default_factory=Counter)

    def reset(self) -> None:
        """Start counting from zero (on every ``start()``)."""
        fresh = StreamStats()
        for each in fields(self):
            setattr(self, each.name, getattr(fresh, each.name))

    def describe(self) -> dict[str, Any]:
        """The counters as shown in ``status()``."""
        described = {each.name: getattr(self, each.name) for each in fields(self)}
        described["refused"] = dict(self.refused)
        return described

    def record_error(self, message: str) -> None:
        """Count an internal error and keep it, timestamped, as ``last_error``."""
        self.errors += 1
        self.last_error = f"{format_timestamp()} {message}"
