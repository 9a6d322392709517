"""What an edge has accepted from its producer, in order, and the snapshots made of it.

Envelopes are accepted in (epoch, seq) order: a duplicate, or a late one from an older
epoch while the newer producer is alive, is dropped; a gap is counted. Rows for skills
the states do not carry yet come from replies and are kept beside the newest state.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any

from session_buddy_realtime.data.source import MetricsSnapshot, SourceState
from session_buddy_realtime.scaleout import wire

__all__ = ["Received"]

_EMPTY = MetricsSnapshot([], {}, [], SourceState.OK, None, None)
MAX_SEQ_JUMP = 1000
"""A sequence number further ahead than this, on a live feed, is not the producer's."""


class Received:
    """The newest accepted state, its stamp, and what was dropped on the way."""

    def __init__(self) -> None:
        self.stamp: wire.Stamp | None = None
        self.heard_at: float | None = None
        """When (monotonic) the last envelope was accepted."""
        self.interval: float | None = None
        """The producer's interval, as its envelopes say."""
        self.latest: MetricsSnapshot | None = None
        self.counts = {"received": 0, "duplicates": 0, "stale": 0, "gaps": 0}
        self._extra: dict[str, tuple[dict[str, Any] | None, list[dict[str, Any]], float]] = {}

    def accept(
        self, published: wire.Published, now: float, *, producer_gone: bool, from_last: bool
    ) -> bool | None:
        """Take ``published`` if it is newer than what was accepted.

        ``producer_gone``: nothing was accepted for a while, so any stamp is taken (an older
        epoch is then a producer that took over after Redis lost its data, not a late one).
        ``from_last``: read from the last-state key (not counted as a duplicate). Returns
        None when dropped, else whether the last state must be read again (a heartbeat
        after a gap, or from a new producer, may follow a state this edge never saw).
        """
        stamp, current = published.stamp, self.stamp
        resync = False
        if current is None or producer_gone:
            # Nothing accepted lately: whatever comes is the baseline (a forged or runaway
            # stamp can so silence an edge for a few intervals, never for good).
            resync = published.kind == "heartbeat"
        elif stamp.epoch < current.epoch:
            self.counts["stale"] += 1
            return None
        elif stamp.epoch == current.epoch and stamp.seq > current.seq + MAX_SEQ_JUMP:
            raise wire.WireError(f"sequence number {stamp.seq} jumps over {MAX_SEQ_JUMP} ahead")
        elif stamp.epoch == current.epoch:
            if stamp.producer != current.producer:
                raise wire.WireError("two producers with one epoch")
            if stamp.seq <= current.seq:
                if not from_last:
                    self.counts["duplicates"] += 1
                return None
            if stamp.seq > current.seq + 1 and not from_last:
                self.counts["gaps"] += 1
                resync = published.kind == "heartbeat"
        else:
            resync = published.kind == "heartbeat"
        self.stamp, self.heard_at, self.interval = stamp, now, published.interval
        self.counts["received"] += 1
        if published.snapshot is not None:
            self.latest = published.snapshot
            for name in published.snapshot.skills:
                self._extra.pop(name, None)
        return resync

    def keep_rows(
        self, reply: MetricsSnapshot, skills: Set[str], now: float, *, replace: bool = False
    ) -> None:
        """Keep the rows of ``skills`` from a ``read`` reply until a state carries them.

        The reply is a whole state of the producer's: with ``replace`` (the edge was idle,
        and the producer published no states meanwhile), or before any state, it becomes the
        newest. Its rows are kept if the producer read them (state ``ok``).
        """
        if replace or self.latest is None:
            self.latest = reply
        # The rows are kept besides: a whole state answered after this one (two requests
        # of a fresh edge, answered out of order) must not take them away.
        if reply.state is not SourceState.OK:
            return
        for name in skills:
            if name in reply.skills:
                anomalies = [a for a in reply.anomalies if a["skill_name"] == name]
                self._extra[name] = (reply.skills[name], anomalies, now)

    def has_row(self, name: str, now: float, fresh_for: float) -> bool:
        """True when the newest state carries ``name``, or a reply did within ``fresh_for``."""
        if self.latest is not None and name in self.latest.skills:
            return True
        extra = self._extra.get(name)
        return extra is not None and now - extra[2] <= fresh_for

    def snapshot(self, skills: Set[str], outage: tuple[SourceState, str] | None) -> MetricsSnapshot:
        """The newest state with ``skills``' rows, flagged with ``outage`` if there is one.

        A row never received is left out and the snapshot flagged, so that no client is
        told a skill does not exist when its row merely has not arrived.
        """
        latest = self.latest or _EMPTY
        rows: dict[str, dict[str, Any] | None] = {}
        anomalies = latest.anomalies
        unknown = False
        for name in skills:
            if name in latest.skills:
                rows[name] = latest.skills[name]
            elif name in self._extra:
                row, extra_anomalies, _ = self._extra[name]
                rows[name] = row
                # The newest state's first anomalies may already hold some of them.
                held = {_identity(a) for a in anomalies if a["skill_name"] == name}
                anomalies = [*anomalies, *(a for a in extra_anomalies if _identity(a) not in held)]
            else:
                unknown = True
        state, message = outage or (latest.state, latest.message)
        if self.latest is None and outage is None:
            state, message = SourceState.UNAVAILABLE, "waiting for the producer's first state"
        if unknown and state is SourceState.OK:
            state, message = SourceState.UNAVAILABLE, "the producer did not answer in time"
        return MetricsSnapshot(latest.top_skills, rows, anomalies, state, message, latest.as_of)


def _identity(anomaly: dict[str, Any]) -> tuple[Any, ...]:
    return (
        anomaly["skill_name"],
        anomaly["detected_at"],
        anomaly["anomaly_type"],
        anomaly["source"],
    )
