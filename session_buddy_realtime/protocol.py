"""The wire protocol: parse and validate client messages, build server messages.

Everything here is a pure function of its arguments, so it can be tested and fuzzed
without a socket. ``docs/protocol.md`` describes the same messages for people and
``schemas/protocol.schema.json`` for programs.
"""

from __future__ import annotations

import json
import time
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from importlib.resources import files
from typing import Any, Final, Literal

__all__ = [
    "MAX_SKILL_NAME_LENGTH",
    "MAX_SKILL_RESULTS",
    "PROTOCOL_VERSION",
    "Auth",
    "CloseCode",
    "ErrorCode",
    "HistoryRequest",
    "Ping",
    "ProtocolError",
    "Request",
    "SkillsRequest",
    "Subscribe",
    "Unsubscribe",
    "authenticated_message",
    "connected_message",
    "encode",
    "error_message",
    "format_timestamp",
    "history_message",
    "load_schema",
    "metrics_update_message",
    "parse_client_message",
    "pong_message",
    "skills_message",
    "subscription_confirmed_message",
    "unsubscribed_message",
    "validate_skill_name",
    "validate_skill_query",
]

PROTOCOL_VERSION: Final = 1
MAX_SKILL_NAME_LENGTH: Final = 128
MAX_SKILL_RESULTS: Final = 20
"""Names at most in a ``skills`` reply."""
WELCOME_TEXT: Final = "Connected to Session-Buddy real-time metrics"


class ErrorCode(StrEnum):
    """Values of ``code`` in an ``error`` message."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_SKILL = "invalid_skill"
    UNSUPPORTED_FRAME = "unsupported_frame"
    NOT_AUTHENTICATED = "not_authenticated"
    RATE_LIMITED = "rate_limited"
    INTERNAL_ERROR = "internal_error"


class CloseCode(IntEnum):
    """WebSocket close codes the server uses."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    AUTH_FAILED = 4001


class ProtocolError(ValueError):
    """A client message that cannot be served; carries the reply's error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Subscribe:
    """``subscribe``: ``skill`` is None for all skills."""

    skill: str | None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """``unsubscribe``: stop metrics for this connection."""


@dataclass(frozen=True, slots=True)
class Ping:
    """``ping``: answered with ``pong``."""


@dataclass(frozen=True, slots=True)
class Auth:
    """``auth``: the shared token, as the first message (never shown in ``repr``)."""

    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """``history``: recent invocations per bucket; ``skill`` is None for all skills."""

    skill: str | None


@dataclass(frozen=True, slots=True)
class SkillsRequest:
    """``skills``: the names that contain ``query`` ("" for the most invoked)."""

    query: str


Request = Subscribe | Unsubscribe | Ping | Auth | HistoryRequest | SkillsRequest
_TYPES: Final = "'subscribe', 'unsubscribe', 'ping', 'auth', 'history' or 'skills'"


def load_schema() -> dict[str, Any]:
    """Return the protocol's JSON Schema (draft 2020-12) shipped with the package."""
    text = files("session_buddy_realtime").joinpath("schemas/protocol.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def format_timestamp(moment: datetime | None = None) -> str:
    """Return ``moment`` (default: now) as ISO 8601 UTC with milliseconds and ``Z``."""
    if moment is None:
        # Every message carries one: the part up to the second is formatted once a second.
        now = time.time()
        second = int(now)
        if second != _this_second[0]:
            _this_second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))]
        return f"{_this_second[1]}{int((now - second) * 1000):03d}Z"
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


_this_second: list[Any] = [None, ""]


def validate_skill_name(value: object) -> str | None:
    """Return a valid skill name, None for "all skills", or raise ``ProtocolError``.

    Names are 1 to 128 characters with no control, format, private-use, unassigned or
    surrogate code points and no surrounding whitespace, so that nothing odd reaches
    SQLite or a log line.
    """
    if value is None:
        return None
    if value == "":
        raise ProtocolError(
            ErrorCode.INVALID_SKILL, "'skill' must not be empty; use null for all skills"
        )
    return _checked_name(value, "skill")


def validate_skill_query(value: object) -> str:
    """Return a valid ``skills`` query ("" for null or missing), or raise ``ProtocolError``.

    The rules of skill names apply, but a query may be empty (it then matches every skill).
    """
    if value is None or value == "":
        return ""
    return _checked_name(value, "query")


def _checked_name(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(
            ErrorCode.INVALID_SKILL,
            f"'{name}' must be a string or null, not {_json_type(value)}",
        )
    if len(value) > MAX_SKILL_NAME_LENGTH:
        raise ProtocolError(
            ErrorCode.INVALID_SKILL,
            f"'{name}' is {len(value)} characters long; the limit is {MAX_SKILL_NAME_LENGTH}",
        )
    if value != value.strip():
        raise ProtocolError(
            ErrorCode.INVALID_SKILL, f"'{name}' must not start or end with whitespace"
        )
    for position, char in enumerate(value):
        if unicodedata.category(char).startswith("C"):
            raise ProtocolError(
                ErrorCode.INVALID_SKILL,
                f"'{name}' contains a control or non-printable character "
                f"(U+{ord(char):04X}) at position {position}",
            )
    return value


def parse_client_message(raw: str | bytes) -> Request:
    """Parse one client frame into a request, or raise ``ProtocolError``.

    Unknown fields are ignored so that clients may send more than this version reads.
    """
    if isinstance(raw, bytes | bytearray | memoryview):
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_FRAME,
            "binary frames are not supported; send JSON as a text frame",
        )
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.INVALID_JSON, "message is not valid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"message must be a JSON object, not {_json_type(message)}",
        )
    kind = message.get("type")
    if kind is None:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "message has no 'type' field")
    if not isinstance(kind, str):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, f"'type' must be a string, not {_json_type(kind)}"
        )
    if kind == "subscribe":
        return Subscribe(_subscribe_skill(message))
    if kind == "unsubscribe":
        return Unsubscribe()
    if kind == "ping":
        return Ping()
    if kind == "auth":
        token = message.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, "'auth' needs a non-empty string 'token'"
            )
        return Auth(token)
    if kind == "history":
        return HistoryRequest(_subscribe_skill(message))
    if kind == "skills":
        return SkillsRequest(validate_skill_query(message.get("query")))
    shown = (
        kind
        if len(kind) <= 32 and kind.isprintable()
        else kind[:32].encode("ascii", "backslashreplace").decode("ascii")
    )
    raise ProtocolError(
        ErrorCode.UNKNOWN_TYPE,
        f"unknown message type {shown!r}; expected {_TYPES}",
    )


def _subscribe_skill(message: dict[str, Any]) -> str | None:
    skill = message.get("skill")
    alias = message.get("skill_name")
    if skill is not None and alias is not None and skill != alias:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            "'skill' and 'skill_name' disagree; send only one of them",
        )
    return validate_skill_name(skill if skill is not None else alias)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def encode(message: dict[str, Any]) -> str:
    """Serialize a server message compactly (one encoding is shared by all receivers)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def connected_message(
    *,
    timestamp: str,
    server_version: str,
    update_interval: float,
    server_role: str = "standalone",
    subscription: Literal["all"] | None = "all",
    authenticated: bool = False,
    auth_required: bool = False,
) -> dict[str, Any]:
    """Build the welcome message sent first on every connection.

    ``subscription`` is None while the client still has to authenticate.
    """
    return {
        "type": "connected",
        "message": WELCOME_TEXT,
        "timestamp": timestamp,
        "protocol_version": PROTOCOL_VERSION,
        "server_version": server_version,
        "update_interval": update_interval,
        "server_role": server_role,
        "subscription": subscription,
        "auth_required": auth_required,
        "authenticated": authenticated,
    }


def authenticated_message(*, timestamp: str) -> dict[str, Any]:
    """Confirm a valid ``auth``; the client is then subscribed to all skills."""
    return {"type": "authenticated", "subscription": "all", "timestamp": timestamp}


def metrics_update_message(
    *, timestamp: str, skill: str | None, data: dict[str, Any], source: dict[str, Any]
) -> dict[str, Any]:
    """Build a ``metrics_update``: ``data`` holds ``top_skills`` and ``anomalies``."""
    return {
        "type": "metrics_update",
        "timestamp": timestamp,
        "skill": skill,
        "data": data,
        "source": source,
    }


def subscription_confirmed_message(
    *, timestamp: str, skill: str | None, known: bool | None
) -> dict[str, Any]:
    """Confirm a subscription; ``known`` says whether the skill has any metrics yet."""
    return {
        "type": "subscription_confirmed",
        "skill": skill,
        "known": known,
        "timestamp": timestamp,
    }


def history_message(
    *,
    timestamp: str,
    skill: str | None,
    bucket_seconds: int,
    window_seconds: int,
    buckets: list[dict[str, Any]],
    source: dict[str, Any],
) -> dict[str, Any]:
    """Answer ``history``: ``buckets`` holds ``start``, ``invocations`` and ``completed``."""
    return {
        "type": "history",
        "timestamp": timestamp,
        "skill": skill,
        "bucket_seconds": bucket_seconds,
        "window_seconds": window_seconds,
        "buckets": buckets,
        "source": source,
    }


def skills_message(
    *, timestamp: str, query: str, skills: list[str], source: dict[str, Any]
) -> dict[str, Any]:
    """Answer ``skills``: the names that contain ``query``, the most invoked first."""
    return {
        "type": "skills",
        "timestamp": timestamp,
        "query": query,
        "skills": skills,
        "source": source,
    }


def unsubscribed_message(*, timestamp: str) -> dict[str, Any]:
    """Confirm an ``unsubscribe``."""
    return {"type": "unsubscribed", "timestamp": timestamp}


def pong_message(*, timestamp: str) -> dict[str, Any]:
    """Answer a ``ping``."""
    return {"type": "pong", "timestamp": timestamp}


def error_message(code: ErrorCode, message: str, *, timestamp: str) -> dict[str, Any]:
    """Build an ``error`` reply; the connection stays open after it."""
    return {"type": "error", "code": code.value, "message": message, "timestamp": timestamp}
