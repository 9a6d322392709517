"""Settings from ``SESSION_BUDDY_REALTIME_*`` variables: the one place that reads them.

The host passes its settings as an environment-style mapping (usually ``os.environ``).
Every value is checked here, and a bad one raises ``ConfigError`` naming the variable,
so a typo fails at start instead of being silently ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from session_buddy_realtime.errors import ConfigError
from session_buddy_realtime.scaleout.link import check_prefix, check_redis_url

__all__ = ["PREFIX", "RealtimeSettings", "load_settings"]

PREFIX: Final = "SESSION_BUDDY_REALTIME_"
HOST_PATTERN: Final = re.compile(r"[A-Za-z0-9.:\[\]_-]+")
"""What a host name or address to listen on may contain (also enforced by the MCP tool)."""
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RealtimeSettings:
    """The plugin's settings, with their defaults."""

    autostart: bool = True
    """Start the server when the host launches (``SESSION_BUDDY_REALTIME_AUTOSTART``)."""
    host: str = "localhost"
    """Address to listen on (``_HOST``)."""
    port: int = 8765
    """Port to listen on; 0 for any free port (``_PORT``)."""
    port_attempts: int = 10
    """Auto-start tries this many consecutive ports when the first is taken (``_PORT_ATTEMPTS``)."""
    interval: float = 1.0
    """Seconds between updates (``_INTERVAL``)."""
    token: str | None = field(default=None, repr=False)
    """Shared secret clients must present (``_TOKEN``); None for no authentication."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed besides the server's own, comma-separated (``_ALLOWED_ORIGINS``)."""
    tls_certfile: Path | None = None
    """PEM certificate chain for ``wss://`` (``_TLS_CERTFILE``)."""
    tls_keyfile: Path | None = None
    """PEM private key, if not in the certificate file (``_TLS_KEYFILE``)."""
    max_connections: int | None = None
    """Open connections at most (``_MAX_CONNECTIONS``); None: 10,000 or the file limit."""
    max_connections_per_ip: int = 1000
    """Open connections from one address at most (``_MAX_CONNECTIONS_PER_IP``)."""
    message_rate: float = 10.0
    """Client messages per second, on average (``_MESSAGE_RATE``)."""
    redis_url: str | None = field(default=None, repr=False)
    """Share the stream through Redis as a producer (``_REDIS_URL``); None for no Redis."""
    redis_prefix: str = "session-buddy-realtime"
    """The stream's name in Redis (``_REDIS_PREFIX``): one per database."""

    def server_options(self) -> dict[str, Any]:
        """The keyword arguments of ``RealTimeMetricsServer`` these settings give."""
        return {
            "token": self.token,
            "allowed_origins": self.allowed_origins,
            "ssl_certfile": self.tls_certfile,
            "ssl_keyfile": self.tls_keyfile,
            "max_connections": self.max_connections,
            "max_connections_per_ip": self.max_connections_per_ip,
            "message_rate": self.message_rate,
            "redis_url": self.redis_url,
            "redis_prefix": self.redis_prefix,
        }


def load_settings(environ: Mapping[str, str]) -> RealtimeSettings:
    """Read the ``SESSION_BUDDY_REALTIME_*`` entries of ``environ``.

    Raises:
        ConfigError: a value is invalid, or a variable is unknown; the message names it.
    """
    known = {
        "AUTOSTART",
        "HOST",
        "PORT",
        "PORT_ATTEMPTS",
        "INTERVAL",
        "TOKEN",
        "ALLOWED_ORIGINS",
        "TLS_CERTFILE",
        "TLS_KEYFILE",
        "MAX_CONNECTIONS",
        "MAX_CONNECTIONS_PER_IP",
        "MESSAGE_RATE",
        "REDIS_URL",
        "REDIS_PREFIX",
    }
    for key in sorted(environ):
        if not key.startswith(PREFIX):
            continue
        name = key.removeprefix(PREFIX)
        if name not in known:
            raise ConfigError(
                f"unknown setting {key}; known settings are "
                + ", ".join(PREFIX + k for k in sorted(known))
            )
    defaults = RealtimeSettings()
    if (
        environ.get(PREFIX + "TLS_KEYFILE", "").strip()
        and not environ.get(PREFIX + "TLS_CERTFILE", "").strip()
    ):
        raise ConfigError(
            f"{PREFIX}TLS_KEYFILE is set without {PREFIX}TLS_CERTFILE; set both, or neither"
        )
    return RealtimeSettings(
        autostart=_read(environ, "AUTOSTART", _boolean, defaults.autostart),
        host=_read(environ, "HOST", _host, defaults.host),
        port=_read(environ, "PORT", _bounded_int(0, 65535), defaults.port),
        port_attempts=_read(environ, "PORT_ATTEMPTS", _bounded_int(1, 100), defaults.port_attempts),
        interval=_read(environ, "INTERVAL", _interval, defaults.interval),
        token=_read(environ, "TOKEN", _token, None, secret=True),
        allowed_origins=_read(environ, "ALLOWED_ORIGINS", _origins, ()),
        tls_certfile=_read(environ, "TLS_CERTFILE", Path, None),
        tls_keyfile=_read(environ, "TLS_KEYFILE", Path, None),
        max_connections=_read(environ, "MAX_CONNECTIONS", _bounded_int(1, 1_000_000), None),
        max_connections_per_ip=_read(
            environ, "MAX_CONNECTIONS_PER_IP", _bounded_int(1, 1_000_000), 1000
        ),
        message_rate=_read(environ, "MESSAGE_RATE", _rate, defaults.message_rate),
        redis_url=_read(environ, "REDIS_URL", _redis_url, None, secret=True),
        redis_prefix=_read(environ, "REDIS_PREFIX", _redis_prefix, defaults.redis_prefix),
    )


def _read(
    environ: Mapping[str, str],
    name: str,
    parse: Callable[[str], T],
    default: T,
    *,
    secret: bool = False,
) -> T:
    raw = environ.get(PREFIX + name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw.strip())
    except ValueError as exc:
        shown = "(value hidden)" if secret else repr(raw)
        raise ConfigError(f"{PREFIX}{name}={shown} is invalid: {exc}") from None


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("use 1/0, true/false, yes/no or on/off")


def _host(text: str) -> str:
    if not HOST_PATTERN.fullmatch(text) or len(text) > 253:
        raise ValueError("expected a host name or IP address")
    return text


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected a whole number from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return value

    return parse


def _token(text: str) -> str:
    if len(text) < 8:
        raise ValueError("use at least 8 characters (better: 32 random ones)")
    return text


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())
    for origin in origins:
        if origin not in ("*", "null") and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"{origin!r} is not an origin like http://localhost:3000 or null")
    return origins


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected messages per second") from None
    if not math.isfinite(value) or not 0.1 <= value <= 10_000:
        raise ValueError("expected messages per second from 0.1 to 10000")
    return value


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(value) or not 0.05 <= value <= 3600:
        raise ValueError("expected seconds from 0.05 to 3600")
    return value


def _redis_url(text: str) -> str:
    try:
        return check_redis_url(text, "the URL")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def _redis_prefix(text: str) -> str:
    try:
        return check_prefix(text, "the prefix")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
