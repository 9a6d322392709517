"""Checks of what is read from Redis: each raises ``WireError`` naming what is wrong.

JSON constants (NaN, Infinity) are refused, every object must have exactly the keys
expected, and every number, text and list is bounded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Set
from typing import Any, Final

from session_buddy_realtime.data.source import SourceState
from session_buddy_realtime.protocol import (
    MAX_SKILL_NAME_LENGTH,
    ProtocolError,
    validate_skill_name,
)

__all__ = [
    "INT64",
    "MAX_WIRE_BYTES",
    "WIRE_VERSION",
    "WireError",
    "anomaly",
    "ident",
    "items",
    "keys",
    "load",
    "number",
    "obj",
    "optional",
    "row",
    "skill",
    "source_fields",
    "text",
    "whole",
]

WIRE_VERSION: Final = 1
MAX_WIRE_BYTES: Final = 4 * 1024 * 1024
"""Largest envelope an edge or producer reads; anything larger is counted and ignored."""
MAX_TEXT: Final = 64
"""Longest ``last_invoked``, ``detected_at`` or ``anomaly_type`` (as the reader keeps them)."""
MAX_MESSAGE: Final = 2000
INT64: Final = 2**63
_ID: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_TIMESTAMP: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
_ROW_KEYS: Final = frozenset(
    {
        "skill_name",
        "total_invocations",
        "completion_rate",
        "avg_duration_seconds",
        "completed_invocations",
        "last_invoked",
    }
)
_ANOMALY_KEYS: Final = frozenset(
    {
        "skill_name",
        "detected_at",
        "anomaly_type",
        "deviation_score",
        "baseline_value",
        "observed_value",
        "source",
    }
)


class WireError(ValueError):
    """An envelope that is not what this version reads; the message says what is wrong."""


def _reject_constant(name: str) -> None:
    raise WireError(f"{name} is not a number JSON allows")


def load(raw: bytes | str) -> dict[str, Any]:
    if len(raw) > MAX_WIRE_BYTES:
        raise WireError(f"{len(raw)} bytes, over the limit of {MAX_WIRE_BYTES}")
    try:
        envelope = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"not JSON: {exc}") from None
    envelope = obj(envelope, "envelope")
    if envelope.get("v") != WIRE_VERSION:
        raise WireError(f"wire version {envelope.get('v')!r}, this version reads {WIRE_VERSION}")
    return envelope


def keys(value: Mapping[str, Any], expected: Set[str], optional: Set[str] = frozenset()) -> None:
    keys = value.keys()
    if missing := expected - keys:
        raise WireError(f"missing {', '.join(sorted(missing))}")
    if extra := keys - expected - optional:
        raise WireError(f"unexpected {', '.join(sorted(map(str, extra)))[:200]}")


def obj(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{name} must be an object")
    return value


def items(value: object, name: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(f"{name} must be a list")
    if len(value) > limit:
        raise WireError(f"{name} has {len(value)} entries, over {limit}")
    return value


def whole(value: object, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise WireError(f"{name} must be a whole number from {low} to {high}")
    return value


def number(value: object, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise WireError(f"{name} must be a finite number")
    return float(value)


def optional(check: Callable[[object, str], Any], value: object, name: str) -> Any:
    return None if value is None else check(value, name)


def text(value: object, name: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise WireError(f"{name} must be text of at most {limit} characters")
    return value


def ident(value: object, name: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise WireError(f"{name} must be 1-128 letters, digits or ._:@-")
    return value


def skill(value: object) -> str:
    try:
        name = validate_skill_name(value)
    except ProtocolError as exc:
        raise WireError(exc.message) from None
    if name is None:
        raise WireError("a skill name must not be null here")
    return name


def source_fields(body: Mapping[str, Any]) -> tuple[SourceState, str | None, str | None]:
    try:
        state = SourceState(body["state"])
    except ValueError:
        raise WireError(f"unknown state {body['state']!r}") from None
    message = optional(lambda v, n: text(v, n, MAX_MESSAGE), body["message"], "message")
    as_of = body["as_of"]
    if as_of is not None and not (isinstance(as_of, str) and _TIMESTAMP.fullmatch(as_of)):
        raise WireError("as_of must be a UTC timestamp with milliseconds, or null")
    return state, message, as_of


def row(value: object) -> dict[str, Any]:
    row = obj(value, "a skill row")
    keys(row, _ROW_KEYS)
    text(row["skill_name"], "skill_name", MAX_SKILL_NAME_LENGTH)
    for name in ("total_invocations", "completed_invocations"):
        whole(row[name], name, -INT64, INT64 - 1)
    number(row["completion_rate"], "completion_rate")
    optional(number, row["avg_duration_seconds"], "avg_duration_seconds")
    optional(text, row["last_invoked"], "last_invoked")
    return row


def anomaly(value: object) -> dict[str, Any]:
    anomaly = obj(value, "an anomaly")
    keys(anomaly, _ANOMALY_KEYS, {"metric"})
    text(anomaly["skill_name"], "skill_name", MAX_SKILL_NAME_LENGTH)
    text(anomaly["detected_at"], "detected_at")
    text(anomaly["anomaly_type"], "anomaly_type")
    for name in ("deviation_score", "baseline_value", "observed_value"):
        optional(number, anomaly[name], name)
    if anomaly["source"] not in ("table", "live"):
        raise WireError("an anomaly's source must be table or live")
    if "metric" in anomaly and anomaly["metric"] not in ("completion_rate", "avg_duration_seconds"):
        raise WireError("an anomaly's metric must be completion_rate or avg_duration_seconds")
    return anomaly
