"""What crosses Redis, without Redis: envelopes, their checks, and an edge's ordering."""

from __future__ import annotations

import json
from typing import Any

import pytest

from session_buddy_realtime.data.source import (
    History,
    HistoryWindow,
    MetricsSnapshot,
    SkillNames,
    SourceState,
)
from session_buddy_realtime.scaleout import wire
from session_buddy_realtime.scaleout.received import Received
from tests.fakes import anomaly, skill_row

STAMP = wire.Stamp(epoch=5, seq=7, producer="producer:host:1:abcd")


def _snapshot() -> MetricsSnapshot:
    top = [skill_row(f"s{i}", 100 - i) for i in range(10)]
    rare = skill_row("rare", 1)
    anomalies = [anomaly(f"s{i % 10}", 9 - i / 100) for i in range(60)] + [anomaly("rare", 1.0)]
    skills = {"rare": rare, "gone": None, **{row["skill_name"]: row for row in top}}
    return MetricsSnapshot(top, skills, anomalies, SourceState.OK, None, "2026-12-02T10:00:00.000Z")


def _state(snapshot: MetricsSnapshot, watched: set[str], stamp: wire.Stamp = STAMP) -> bytes:
    body = wire.encode_body(wire.state_body(snapshot, watched))
    return wire.encode_state(body, stamp, 1.0, 1_800_000_000.0)


def test_a_state_round_trips_into_the_same_frames() -> None:
    """An edge's frames made from a decoded state equal the producer's, for all skills and
    for every watched skill."""
    snapshot = _snapshot()
    published = wire.decode_published(_state(snapshot, {"rare", "gone"}))
    assert published.kind == "state"
    assert published.stamp == STAMP
    decoded = published.snapshot
    assert decoded is not None
    for skill in (None, "rare", "gone"):
        assert decoded.data(skill) == snapshot.data(skill), skill
        assert decoded.source() == snapshot.source()
    assert set(decoded.skills) == {"rare", "gone"}


def test_a_state_carries_only_what_edges_need() -> None:
    """Anomalies of unwatched skills beyond the all-skills frame's 50 are left out."""
    snapshot = _snapshot()
    body = wire.state_body(snapshot, set())
    assert len(body["anomalies"]) == 50
    assert wire.state_body(snapshot, {"rare"})["anomalies"][-1]["skill_name"] == "rare"


def _envelope() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(_state(_snapshot(), {"rare"}))
    return loaded


def _with(path: tuple[Any, ...], value: Any) -> bytes:
    envelope = _envelope()
    target = envelope
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(envelope).encode()


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"\xff\xfe", "not JSON"),
        (b'{"v": 1, "kind": "state"', "not JSON"),
        (b"[]", "envelope must be an object"),
        (b'{"v": 9, "kind": "heartbeat"}', "wire version"),
        (b'{"v": 1, "kind": "reply"}', "does not belong"),
        (_with(("seq",), True), "seq must be a whole number"),
        (_with(("epoch",), 0), "epoch must be a whole number"),
        (_with(("producer",), "no spaces allowed"), "producer must be"),
        (_with(("interval",), -1), "interval"),
        (_with(("extra",), 1), "unexpected extra"),
        (_with(("state", "state"), "fine"), "unknown state"),
        (_with(("state", "as_of"), "yesterday"), "as_of"),
        (_with(("state", "message"), "x" * 5000), "message must be text"),
        (_with(("state", "top_skills", 0, "total_invocations"), "9"), "total_invocations"),
        (_with(("state", "top_skills", 0, "completion_rate"), None), "completion_rate"),
        (_with(("state", "top_skills", 0, "skill_name"), "x" * 500), "skill_name"),
        (_with(("state", "top_skills", 0, "planted"), 1), "unexpected planted"),
        (_with(("state", "top_skills"), [skill_row("x", 1)] * 101), "over 100"),
        (_with(("state", "skills", "rare", "skill_name"), "other"), "names another skill"),
        (_with(("state", "skills", " padded"), None), "whitespace"),
        (_with(("state", "anomalies", 0, "source"), "made-up"), "source must be"),
        (_with(("state", "anomalies", 0, "metric"), "weight"), "metric must be"),
        (_with(("state", "anomalies", 0, "deviation_score"), "high"), "deviation_score"),
        (json.dumps(_envelope()).replace("100", "NaN", 1).encode(), "not a number"),
        (b" " * (wire.MAX_WIRE_BYTES + 1), "over the limit"),
    ],
)
def test_every_bad_envelope_is_refused_with_a_reason(raw: bytes, says: str) -> None:
    """Anything that is not exactly a valid envelope raises ``WireError`` saying why."""
    with pytest.raises(wire.WireError, match=says):
        wire.decode_published(raw)


def test_requests_and_replies_round_trip_and_are_checked() -> None:
    """Requests of each op decode to what was sent; bad skill names, limits and ops fail."""
    window = HistoryWindow(10, 60)
    for request in (
        wire.Request("1", "edge:h:1:aa", "read", skills=frozenset({"a", "b"})),
        wire.Request("2", "edge:h:1:aa", "history", skill="a", bucket_seconds=10, buckets=60),
        wire.Request("3", "edge:h:1:aa", "skills", query="py", limit=20),
    ):
        assert wire.decode_request(wire.encode_request(request)) == request
    bad = json.loads(wire.encode_request(wire.Request("4", "edge:h:1:aa", "read")))
    for change, says in (
        ({"skills": ["ok", "bad\u0000"]}, "control"),
        ({"skills": ["s"] * (wire.MAX_REQUEST_SKILLS + 1)}, "entries"),
        ({"op": "drop-table"}, "unknown op"),
        ({"edge": "../../etc"}, "edge must be"),
    ):
        with pytest.raises(wire.WireError, match=says):
            wire.decode_request(json.dumps({**bad, **change}))
    history = History.from_rows("a", window, 600, [(0, 3, 2)], as_of=None)
    reply = wire.decode_reply(wire.encode_reply("2", STAMP, wire.history_body(history)))
    assert wire.history_from_body(reply.body, window) == history
    with pytest.raises(wire.WireError, match="window"):
        wire.history_from_body(reply.body, HistoryWindow(20, 30))
    names = SkillNames("py", ["pytest-run"], SourceState.OK, None, None)
    reply = wire.decode_reply(wire.encode_reply("3", STAMP, wire.names_body(names)))
    assert wire.names_from_body(reply.body, 20) == names


def _published(kind: str, epoch: int, seq: int, producer: str = "p:1") -> wire.Published:
    snapshot = None if kind == "heartbeat" else _snapshot()
    return wire.Published(kind, wire.Stamp(epoch, seq, producer), 1.0, 0.0, snapshot)  # type: ignore[arg-type]


def test_an_edge_accepts_envelopes_in_epoch_and_sequence_order() -> None:
    """Duplicates and late envelopes of an older epoch are dropped and counted; a gap is
    counted, and a heartbeat after a gap (or from a new producer) asks for the last state."""
    received = Received()
    assert (
        received.accept(_published("state", 5, 1), 0.0, producer_gone=False, from_last=False)
        is False
    )
    assert (
        received.accept(_published("state", 5, 1), 0.1, producer_gone=False, from_last=False)
        is None
    )
    assert received.counts["duplicates"] == 1
    assert (
        received.accept(_published("state", 4, 99), 0.2, producer_gone=False, from_last=False)
        is None
    )
    assert received.counts["stale"] == 1
    assert (
        received.accept(_published("heartbeat", 5, 4), 0.3, producer_gone=False, from_last=False)
        is True
    )
    assert received.counts["gaps"] == 1
    assert (
        received.accept(
            _published("heartbeat", 6, 1, "p:2"), 0.4, producer_gone=False, from_last=False
        )
        is True
    )
    # An older epoch after the producer went quiet: Redis lost its data; taken, not stale.
    assert (
        received.accept(_published("state", 3, 1, "p:3"), 9.0, producer_gone=True, from_last=False)
        is False
    )
    assert received.stamp == wire.Stamp(3, 1, "p:3")
    with pytest.raises(wire.WireError, match="two producers"):
        received.accept(_published("state", 3, 2, "p:4"), 9.1, producer_gone=False, from_last=False)


def test_a_row_not_received_is_never_reported_unknown() -> None:
    """Until a skill's row arrives, an edge's snapshot flags the data instead of saying the
    skill has no row."""
    received = Received()
    assert received.snapshot(set(), None).state is SourceState.UNAVAILABLE
    received.accept(_published("state", 1, 1), 0.0, producer_gone=False, from_last=False)
    known = received.snapshot({"rare"}, None)
    assert (known.state, known.skills["rare"]) == (SourceState.OK, skill_row("rare", 1))
    missing = received.snapshot({"elsewhere"}, None)
    assert missing.state is SourceState.UNAVAILABLE
    assert "elsewhere" not in missing.skills
    flagged = received.snapshot({"rare"}, (SourceState.UNAVAILABLE, "Redis is down"))
    assert (flagged.state, flagged.message) == (SourceState.UNAVAILABLE, "Redis is down")
    assert flagged.skills["rare"] == skill_row("rare", 1)


def test_a_row_answered_first_survives_a_whole_state_answered_after_it() -> None:
    """A fresh edge asks for a whole state and for one skill's row at once; when the row's
    answer comes first (and so becomes the newest state) and the whole state after it,
    the row is still there for the skill's subscribers."""
    received = Received()
    with_row = _snapshot()
    whole = MetricsSnapshot(
        with_row.top_skills, {}, [], SourceState.OK, None, "2026-12-02T10:00:01.000Z"
    )
    received.keep_rows(with_row, {"rare"}, 0.0)
    received.keep_rows(whole, set(), 0.01, replace=True)
    assert received.has_row("rare", 0.02, fresh_for=1.0)
    assert received.snapshot({"rare"}, None).skills["rare"] == skill_row("rare", 1)
