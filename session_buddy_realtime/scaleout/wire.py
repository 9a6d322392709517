"""What travels through Redis: envelopes, their checks, and the seam's types.

Every envelope is one JSON object with ``v`` (the wire version) and ``kind``. On the
state channel the producer publishes ``state`` (the whole state edges need: the
all-skills part and the rows of every watched skill) when it changed, and ``heartbeat``
otherwise, each stamped with the producer's identity, its lease epoch and a sequence
number. Edges ask the producer for what a tick does not carry (``request``) and get a
``reply`` on their own channel.

An edge reads Redis like any untrusted input: ``decode_*`` refuse anything over
``MAX_WIRE_BYTES``, any field of the wrong type, any key not expected, and any number
that is not finite, with a ``WireError`` naming the problem; nothing of such an
envelope reaches a client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any, Final, Literal

from session_buddy_realtime.data.source import (
    MAX_ANOMALIES,
    History,
    HistoryWindow,
    MetricsSnapshot,
    SkillNames,
)
from session_buddy_realtime.protocol import ProtocolError, validate_skill_query
from session_buddy_realtime.scaleout import checks
from session_buddy_realtime.scaleout.checks import MAX_WIRE_BYTES, WIRE_VERSION, WireError

__all__ = [
    "MAX_REQUEST_SKILLS",
    "MAX_WATCHED",
    "MAX_WIRE_BYTES",
    "WIRE_VERSION",
    "Published",
    "Reply",
    "Request",
    "Stamp",
    "WireError",
    "decode_published",
    "decode_reply",
    "decode_request",
    "encode_body",
    "encode_heartbeat",
    "encode_reply",
    "encode_request",
    "encode_state",
    "history_body",
    "history_from_body",
    "is_skill_name",
    "names_body",
    "names_from_body",
    "snapshot_from_body",
    "state_body",
]

MAX_WATCHED: Final = 1000
"""Skills whose rows a state carries at most (the most recently announced first)."""
MAX_REQUEST_SKILLS: Final = 200
"""Skills one ``read`` request may ask for."""
MAX_TOP_SKILLS: Final = 100
MAX_ANOMALY_COUNT: Final = 20_000
MAX_BUCKETS: Final = 10_000
Op = Literal["read", "history", "skills"]


@dataclass(frozen=True, slots=True, order=True)
class Stamp:
    """Who published an envelope: ordered by (epoch, seq), then by producer."""

    epoch: int
    seq: int
    producer: str


@dataclass(frozen=True, slots=True)
class Published:
    """One envelope of the state channel: ``state`` carries a snapshot, ``heartbeat`` none."""

    kind: Literal["state", "heartbeat"]
    stamp: Stamp
    interval: float
    sent_at: float
    snapshot: MetricsSnapshot | None


@dataclass(frozen=True, slots=True)
class Request:
    """An edge's question to the producer, answered on ``reply_to``."""

    id: str
    edge: str
    op: Op
    skills: frozenset[str] = frozenset()
    skill: str | None = None
    bucket_seconds: int = 0
    buckets: int = 0
    query: str = ""
    limit: int = 0

    @property
    def window(self) -> HistoryWindow:
        """The history window of a ``history`` request."""
        return HistoryWindow(self.bucket_seconds, self.buckets)


@dataclass(frozen=True, slots=True)
class Reply:
    """The producer's answer to request ``id``; ``body`` is checked by its ``*_from_body``."""

    id: str
    stamp: Stamp
    body: dict[str, Any]


# Encoding (the producer's side and the edge's requests).


def state_body(snapshot: MetricsSnapshot, watched: Set[str]) -> dict[str, Any]:
    """What a state carries of ``snapshot``: the all-skills part and ``watched``'s rows.

    The anomalies are the all-skills frame's first ``MAX_ANOMALIES`` and every anomaly of a
    watched skill, in the snapshot's order, so an edge's frames equal the producer's.
    """
    anomalies = [
        anomaly
        for position, anomaly in enumerate(snapshot.anomalies)
        if position < MAX_ANOMALIES or anomaly["skill_name"] in watched
    ]
    return {
        "top_skills": snapshot.top_skills,
        "skills": {name: snapshot.skills.get(name) for name in sorted(watched)},
        "anomalies": anomalies,
        "state": snapshot.state.value,
        "message": snapshot.message,
        "as_of": snapshot.as_of,
    }


def encode_body(body: Mapping[str, Any]) -> bytes:
    """A ``state_body`` encoded once: compared with the last one, then sent as it is."""
    return _encode(body)


def encode_state(body: bytes, stamp: Stamp, interval: float, sent_at: float) -> bytes:
    """A ``state`` envelope around an encoded ``body`` (from ``encode_body``)."""
    head = _encode(_stamped("state", stamp, interval, sent_at))
    return head[:-1] + b',"state":' + body + b"}"


def encode_heartbeat(stamp: Stamp, interval: float, sent_at: float) -> bytes:
    """A ``heartbeat`` envelope: the producer is alive and its last state still holds."""
    return _encode(_stamped("heartbeat", stamp, interval, sent_at))


def encode_request(request: Request) -> bytes:
    """A ``request`` envelope."""
    envelope: dict[str, Any] = {
        "v": WIRE_VERSION,
        "kind": "request",
        "id": request.id,
        "edge": request.edge,
        "op": request.op,
    }
    if request.op == "read":
        envelope["skills"] = sorted(request.skills)
    elif request.op == "history":
        envelope.update(
            skill=request.skill, bucket_seconds=request.bucket_seconds, buckets=request.buckets
        )
    else:
        envelope.update(query=request.query, limit=request.limit)
    return _encode(envelope)


def encode_reply(request_id: str, stamp: Stamp, body: Mapping[str, Any]) -> bytes:
    """A ``reply`` envelope to ``request_id``."""
    return _encode(
        {
            "v": WIRE_VERSION,
            "kind": "reply",
            "id": request_id,
            "producer": stamp.producer,
            "epoch": stamp.epoch,
            "seq": stamp.seq,
            "body": body,
        }
    )


def history_body(history: History) -> dict[str, Any]:
    """A ``History`` as a reply body."""
    return {
        "skill": history.skill,
        "bucket_seconds": history.window.bucket_seconds,
        "buckets": history.window.buckets,
        "start": history.start,
        "invocations": history.invocations,
        "completed": history.completed,
        "state": history.state.value,
        "message": history.message,
        "as_of": history.as_of,
    }


def names_body(names: SkillNames) -> dict[str, Any]:
    """``SkillNames`` as a reply body."""
    return {
        "query": names.query,
        "names": names.names,
        "state": names.state.value,
        "message": names.message,
        "as_of": names.as_of,
    }


# Decoding: everything read from Redis goes through these.


def decode_published(raw: bytes | str) -> Published:
    """Check and decode an envelope of the state channel."""
    envelope = checks.load(raw)
    kind = envelope.get("kind")
    if kind == "heartbeat":
        checks.keys(envelope, {"v", "kind", "producer", "epoch", "seq", "interval", "sent_at"})
        snapshot = None
    elif kind == "state":
        checks.keys(
            envelope, {"v", "kind", "producer", "epoch", "seq", "interval", "sent_at", "state"}
        )
        snapshot = snapshot_from_body(envelope["state"])
    else:
        raise WireError(f"kind {kind!r} does not belong on the state channel")
    interval = checks.number(envelope["interval"], "interval")
    if not 0 < interval <= 3600:
        raise WireError("interval must be from 0 to 3600 seconds")
    return Published(
        kind, _stamp(envelope), interval, checks.number(envelope["sent_at"], "sent_at"), snapshot
    )


def decode_request(raw: bytes | str) -> Request:
    """Check and decode a ``request`` envelope (the producer's side)."""
    envelope = checks.load(raw)
    if envelope.get("kind") != "request":
        raise WireError("not a request")
    op = envelope.get("op")
    base = {"v", "kind", "id", "edge", "op"}
    ident, edge = checks.ident(envelope.get("id"), "id"), checks.ident(envelope.get("edge"), "edge")
    try:
        if op == "read":
            checks.keys(envelope, base | {"skills"})
            skills = checks.items(envelope["skills"], "skills", MAX_REQUEST_SKILLS)
            names = frozenset(checks.skill(name) for name in skills)
            return Request(ident, edge, "read", skills=names)
        if op == "history":
            checks.keys(envelope, base | {"skill", "bucket_seconds", "buckets"})
            skill = None if envelope["skill"] is None else checks.skill(envelope["skill"])
            bucket = checks.whole(envelope["bucket_seconds"], "bucket_seconds", 1, 86_400)
            buckets = checks.whole(envelope["buckets"], "buckets", 1, MAX_BUCKETS)
            return Request(
                ident, edge, "history", skill=skill, bucket_seconds=bucket, buckets=buckets
            )
        if op == "skills":
            checks.keys(envelope, base | {"query", "limit"})
            query = validate_skill_query(envelope["query"])
            limit = checks.whole(envelope["limit"], "limit", 1, 100)
            return Request(ident, edge, "skills", query=query, limit=limit)
    except ProtocolError as exc:
        raise WireError(exc.message) from None
    raise WireError(f"unknown op {op!r}")


def decode_reply(raw: bytes | str) -> Reply:
    """Check and decode a ``reply`` envelope; its body is checked by the caller's parser."""
    envelope = checks.load(raw)
    if envelope.get("kind") != "reply":
        raise WireError("not a reply")
    checks.keys(envelope, {"v", "kind", "id", "producer", "epoch", "seq", "body"})
    return Reply(
        checks.ident(envelope["id"], "id"), _stamp(envelope), checks.obj(envelope["body"], "body")
    )


def snapshot_from_body(body: object) -> MetricsSnapshot:
    """A ``state_body`` (or a ``read`` reply) as a ``MetricsSnapshot``."""
    body = checks.obj(body, "state")
    checks.keys(body, {"top_skills", "skills", "anomalies", "state", "message", "as_of"})
    top = [
        checks.row(row) for row in checks.items(body["top_skills"], "top_skills", MAX_TOP_SKILLS)
    ]
    watched = checks.obj(body["skills"], "skills")
    if len(watched) > MAX_WATCHED + MAX_REQUEST_SKILLS:
        raise WireError("skills has too many entries")
    skills: dict[str, dict[str, Any] | None] = {}
    for name, row in watched.items():
        skills[checks.skill(name)] = None if row is None else checks.row(row)
        if row is not None and row["skill_name"] != name:
            raise WireError(f"the row of {name!r} names another skill")
    anomalies = [
        checks.anomaly(a) for a in checks.items(body["anomalies"], "anomalies", MAX_ANOMALY_COUNT)
    ]
    state, message, as_of = checks.source_fields(body)
    return MetricsSnapshot(top, skills, anomalies, state, message, as_of)


def history_from_body(body: Mapping[str, Any], window: HistoryWindow) -> History:
    """A ``history_body`` for ``window`` as a ``History``."""
    checks.keys(body, {"skill", "bucket_seconds", "buckets", "start", "invocations", "completed",
                 "state", "message", "as_of"})  # fmt: skip
    if (body["bucket_seconds"], body["buckets"]) != (window.bucket_seconds, window.buckets):
        raise WireError("the history is not of the window asked for")
    skill = None if body["skill"] is None else checks.skill(body["skill"])
    start = checks.whole(body["start"], "start", 0, 2**40)
    counts = [
        [
            checks.whole(n, name, 0, checks.INT64 - 1)
            for n in checks.items(body[name], name, window.buckets)
        ]
        for name in ("invocations", "completed")
    ]
    if any(len(each) != window.buckets for each in counts):
        raise WireError("a history needs one count per bucket")
    state, message, as_of = checks.source_fields(body)
    return History(skill, window, start, counts[0], counts[1], state, message, as_of)


def names_from_body(body: Mapping[str, Any], limit: int) -> SkillNames:
    """A ``names_body`` as ``SkillNames`` (at most ``limit`` names)."""
    checks.keys(body, {"query", "names", "state", "message", "as_of"})
    if not isinstance(body["query"], str):
        raise WireError("query must be a string")
    names = [checks.skill(name) for name in checks.items(body["names"], "names", limit)]
    state, message, as_of = checks.source_fields(body)
    return SkillNames(body["query"], names, state, message, as_of)


def _stamped(kind: str, stamp: Stamp, interval: float, sent_at: float) -> dict[str, Any]:
    return {
        "v": WIRE_VERSION,
        "kind": kind,
        "producer": stamp.producer,
        "epoch": stamp.epoch,
        "seq": stamp.seq,
        "interval": interval,
        "sent_at": round(sent_at, 6),
    }


def _encode(envelope: Mapping[str, Any]) -> bytes:
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _stamp(envelope: Mapping[str, Any]) -> Stamp:
    return Stamp(
        checks.whole(envelope["epoch"], "epoch", 1, checks.INT64 - 1),
        checks.whole(envelope["seq"], "seq", 1, checks.INT64 - 1),
        checks.ident(envelope["producer"], "producer"),
    )


def is_skill_name(name: str) -> bool:
    """True when ``name`` follows the protocol's skill-name rules."""
    try:
        checks.skill(name)
    except WireError:
        return False
    return True
