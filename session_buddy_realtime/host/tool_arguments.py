"""The MCP tools' arguments: their published schemas, their checks and the messages.

Each argument is taken as any JSON value and checked here, while the input schema still
publishes its type and range. The servers' own checks would answer with pydantic's
multi-line text (and a link to its docs), wrapped differently on each server kind; these
answer with one line naming the argument, what it accepts and what was sent.
"""

from __future__ import annotations

import contextlib
import math
import re
import reprlib
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final

from pydantic import Field, TypeAdapter, WithJsonSchema

from session_buddy_realtime.errors import ConfigError
from session_buddy_realtime.host.settings import HOST_PATTERN
from session_buddy_realtime.protocol import MAX_SKILL_NAME_LENGTH
from session_buddy_realtime.scaleout.link import check_redis_url, redacted_url

__all__ = [
    "ArgumentError",
    "HostName",
    "Interval",
    "Port",
    "RedisUrl",
    "SkillName",
    "check_host",
    "check_interval",
    "check_port",
    "check_redis",
    "check_skill",
    "not_applied",
    "unknown_arguments",
]

_PORTS: Final = (0, 65535)
_INTERVALS: Final = (0.05, 3600)
_HOST_LENGTHS: Final = (1, 253)
_SHOWN_LENGTH: Final = 40
_URL_LENGTH: Final = 2048
_DIGITS: Final = re.compile(r"[0-9]{1,10}")

_REPR: Final = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _SHOWN_LENGTH
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 2, 4, 4


class ArgumentError(ValueError):
    """An argument the client must fix; the message is one line naming it."""


def _shown(value: object) -> str:
    """The client's value as a short one-line ``repr``, safe to quote in an error line."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer too long for str()
        return "a number too long to show"
    return text if len(text) <= _SHOWN_LENGTH else f"{text[: _SHOWN_LENGTH - 3]}..."


def _published(strict: Any, description: str) -> WithJsonSchema:
    """Publish the JSON schema of ``strict`` for a parameter that itself takes any value."""
    return WithJsonSchema({**TypeAdapter(strict).json_schema(), "description": description})


def check_host(value: object) -> str | None:
    """Return ``value`` if it is a host to listen on, or None; raise ``ArgumentError``."""
    if value is None:
        return None
    low, high = _HOST_LENGTHS
    if isinstance(value, str) and low <= len(value) <= high and HOST_PATTERN.fullmatch(value):
        return value
    raise ArgumentError(
        f"host must be a host name or IP address of {low} to {high} letters, digits "
        f"or . : [ ] _ - (got {_shown(value)})"
    )


def check_port(value: object) -> int | None:
    """Return ``value`` as a port, or None; raise ``ArgumentError``.

    A whole float (``8080.0``) and digits in a string (``"8080"``) count, as they did when
    pydantic checked the port.
    """
    if value is None:
        return None
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and _DIGITS.fullmatch(value.strip())
    ):
        number = int(value)
    low, high = _PORTS
    if number is None or not low <= number <= high:
        raise ArgumentError(
            f"port must be a whole number from {low} to {high} (got {_shown(value)})"
        )
    return number


def check_interval(value: object) -> float | None:
    """Return ``value`` as seconds between updates, or None; raise ``ArgumentError``.

    A number in a string (``"0.5"``) counts, as it did when pydantic checked the interval.
    """
    if value is None:
        return None
    number = math.nan
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        # Not a number, or an integer too large for a float: refused below, as nan is.
        with contextlib.suppress(ValueError, OverflowError):
            number = float(value)
    low, high = _INTERVALS
    if not low <= number <= high:  # False for nan
        raise ArgumentError(
            f"interval must be seconds from {low:g} to {high:g} (got {_shown(value)})"
        )
    return number


def check_skill(value: object) -> str | None:
    """Return ``value`` if it is a string short enough for a skill name, or None.

    The protocol's other skill-name rules are checked where the snapshot is read.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ArgumentError(f"skill must be a string or null (got {_shown(value)})")
    if len(value) > MAX_SKILL_NAME_LENGTH:
        raise ArgumentError(
            f"skill must be a string of at most {MAX_SKILL_NAME_LENGTH} characters "
            f"(got {len(value)} characters)"
        )
    return value


def unknown_arguments(tool: str, arguments: Mapping[str, object], accepted: Sequence[str]) -> str:
    """Say which of ``arguments`` the tool does not take, and which it does; "" if none."""
    unknown = [name for name in arguments if name not in accepted]
    if not unknown:
        return ""
    names = ", ".join(_shown(name) for name in unknown[:3])
    if len(unknown) > 3:
        names = f"{names} and {len(unknown) - 3} more"
    takes = f"accepted: {', '.join(accepted)}" if accepted else f"{tool} takes no arguments"
    plural = "s" if len(unknown) > 1 else ""
    return f"unknown argument{plural} {names} for {tool}; {takes}"


def check_redis(value: object) -> str | None:
    """Return ``value`` if it is a Redis URL, or None; raise ``ArgumentError``.

    The value is quoted with its password hidden."""
    if value is None:
        return None
    if isinstance(value, str) and 0 < len(value) <= _URL_LENGTH:
        try:
            return check_redis_url(value)
        except ConfigError as exc:
            raise ArgumentError(str(exc)) from None
    shown = _shown(redacted_url(value)) if isinstance(value, str) else _shown(value)
    raise ArgumentError(
        f"redis_url must be a redis://, rediss:// or unix:// URL of at most {_URL_LENGTH} "
        f"characters, or null (got {shown})"
    )


def not_applied(
    status: dict[str, Any],
    host: str | None,
    port: int | None,
    interval: float | None,
    redis_url: str | None = None,
) -> str | None:
    """Name the values asked for that the running server does not have, and how to apply them."""
    if not status["running"]:
        return None
    differing = []
    if host is not None and host.lower() != str(status["host"]).lower():
        differing.append(f"host={host}")
    if port not in (None, 0) and port != status["port"]:
        differing.append(f"port={port}")
    if interval is not None and not math.isclose(interval, status["update_interval"]):
        differing.append(f"interval={interval}")
    running_redis = (status.get("redis") or {}).get("url")
    if redis_url is not None and redacted_url(redis_url) != running_redis:
        differing.append(f"redis_url={redacted_url(redis_url)}")
    if not differing:
        return None
    return (
        f"already running on {status['host']} port {status['port']} every "
        f"{status['update_interval']} s; {' and '.join(differing)} "
        f"{'were' if len(differing) > 1 else 'was'} not applied: call realtime_stop, "
        f"then realtime_start with the new values"
    )


# The tools' parameter annotations: any value, published as the strict type it is checked for.
HostName = Annotated[
    object,
    _published(
        Annotated[
            str | None,
            Field(
                min_length=_HOST_LENGTHS[0],
                max_length=_HOST_LENGTHS[1],
                pattern=f"^{HOST_PATTERN.pattern}$",
            ),
        ],
        "Address to listen on, e.g. 'localhost' or '127.0.0.1' "
        "(default: SESSION_BUDDY_REALTIME_HOST or localhost).",
    ),
]
Port = Annotated[
    object,
    _published(
        Annotated[int | None, Field(ge=_PORTS[0], le=_PORTS[1])],
        "Port to listen on, 0-65535; 0 picks a free one "
        "(default: SESSION_BUDDY_REALTIME_PORT, else 8765; inside Session-Buddy 8677).",
    ),
]
Interval = Annotated[
    object,
    _published(
        Annotated[float | None, Field(ge=_INTERVALS[0], le=_INTERVALS[1])],
        "Seconds between updates, 0.05-3600 (default: SESSION_BUDDY_REALTIME_INTERVAL or 1.0).",
    ),
]
RedisUrl = Annotated[
    object,
    _published(
        Annotated[str | None, Field(min_length=1, max_length=_URL_LENGTH)],
        "Publish the stream through Redis for edges, e.g. 'redis://localhost:6379/0' "
        "('rediss://' for TLS, 'redis://user:password@host:port/0' for an ACL user); "
        "default: SESSION_BUDDY_REALTIME_REDIS_URL, else no Redis.",
    ),
]
SkillName = Annotated[
    object,
    _published(
        Annotated[str | None, Field(max_length=MAX_SKILL_NAME_LENGTH)],
        "A skill name to read one skill (any skill, not only the top 10); "
        "omit or null for the top 10 and all anomalies.",
    ),
]
