"""The checks of ``RealTimeMetricsServer``'s arguments: a bad one fails at construction,
named, with what it must be."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = ["check_arguments"]


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0 and math.isfinite(value)


def _optional_positive(value: Any) -> bool:
    return value is None or _positive(value)


def _whole(low: int, high: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


_RULES: Final[dict[str, tuple[Callable[[Any], bool], str]]] = {
    "port": (_whole(0, 65535), "an integer 0-65535"),
    "update_interval": (_positive, "a positive number of seconds"),
    "max_message_size": (_whole(256), "at least 256 bytes"),
    "max_buffered_bytes": (_whole(1024), "at least 1024 bytes"),
    "slow_client_timeout": (_positive, "positive"),
    "open_timeout": (_positive, "positive"),
    "close_timeout": (_positive, "positive"),
    "ping_interval": (_optional_positive, "positive or None"),
    "ping_timeout": (_optional_positive, "positive or None"),
    "token": (lambda v: v is None or (isinstance(v, str) and len(v) >= 8), "at least 8 characters"),
    "auth_timeout": (_positive, "positive"),
    "max_connections": (lambda v: v is None or _whole(1)(v), ">= 1"),
    "max_connections_per_ip": (_whole(1), ">= 1"),
    "message_rate": (_positive, "positive"),
    "message_burst": (_whole(1), ">= 1"),
}


def check_arguments(arguments: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first argument that breaks its rule."""
    for name, (valid, expected) in _RULES.items():
        if name in arguments and not valid(arguments[name]):
            raise ValueError(f"invalid {name}: must be {expected}")
    if arguments.get("ssl_keyfile") is not None and arguments.get("ssl_certfile") is None:
        raise ValueError("invalid ssl_keyfile: must be given together with ssl_certfile")
