"""The stream server's counters, shared by its parts and shown in ``status()``."""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Final

from session_buddy_realtime.protocol import format_timestamp

__all__ = ["TICK_BUCKETS", "Histogram", "StreamStats"]

TICK_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of the tick-duration histogram's buckets, +Inf implied."""


@dataclass(slots=True)
class Histogram:
    """Observations counted in buckets by upper bound (inclusive), as Prometheus reads them."""

    bounds: tuple[float, ...] = TICK_BUCKETS
    counts: list[int] = field(init=False)
    """Per bucket, not cumulative; the last one is above every bound."""
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at most that)`` per bucket, ending with +Inf."""
        running, result = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            result.append((bound, running))
        return result


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
    tick_seconds: Histogram = field(default_factory=Histogram)
    """How long ticks took (for ``/metrics``; not in ``status()``)."""

    def reset(self) -> None:
        """Start counting from zero (on every ``start()``)."""
        fresh = StreamStats()
        for each in fields(self):
            setattr(self, each.name, getattr(fresh, each.name))

    def describe(self) -> dict[str, Any]:
        """The counters as shown in ``status()``."""
        described = {
            each.name: getattr(self, each.name)
            for each in fields(self)
            if each.name != "tick_seconds"
        }
        described["refused"] = dict(self.refused)
        return described

    def record_error(self, message: str) -> None:
        """Count an internal error and keep it, timestamped, as ``last_error``."""
        self.errors += 1
        self.last_error = f"{format_timestamp()} {message}"
