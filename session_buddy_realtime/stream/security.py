"""Authentication, TLS, browser checks, rate limiting and log redaction.

Pure helpers used by the server at the handshake and per message; ``docs/security.md``
describes the threat model and every setting.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs, urlsplit

from session_buddy_realtime.errors import ServerStartError

__all__ = [
    "RateLimiter",
    "RedactSecrets",
    "build_ssl_context",
    "handshake_token",
    "host_header_allowed",
    "is_loopback",
    "origin_allowed",
    "own_origins",
    "redacting_logger",
    "tokens_match",
]

_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.", "ip6-localhost"})
_SECRET_PATTERNS: Final = (
    re.compile(r"(?i)(token=)[^&\s\"']+"),
    re.compile(r"(?i)(bearer\s+)[^\s\"',]+"),
    re.compile(r"(?i)(\"token\"\s*:\s*\")[^\"]*"),
)


def tokens_match(provided: str, expected: str) -> bool:
    """Compare two tokens in constant time (for equal lengths)."""
    return hmac.compare_digest(
        provided.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def handshake_token(headers: Iterable[tuple[str, str]], path: str) -> str | None:
    """Return the token of an ``Authorization: Bearer`` header or a ``token`` query parameter."""
    for name, value in headers:
        if name.lower() == "authorization":
            scheme, _, credentials = value.partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    values = parse_qs(urlsplit(path).query).get("token")
    return values[0] if values else None


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    name = host.strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_header_allowed(value: str | None, bound_host: str) -> bool:
    """Check the Host header of a request to a loopback server (against DNS rebinding)."""
    if not value:
        return False
    name = value.strip()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    return is_loopback(name) or name.lower() == bound_host.strip("[]").lower()


def own_origins(port: int) -> set[str]:
    """Origins of pages served by this machine on the server's port (its own dashboard)."""
    return {
        f"{scheme}://{host}:{port}"
        for scheme in ("http", "https")
        for host in ("localhost", "127.0.0.1", "[::1]")
    }


def origin_allowed(origin: str | None, allowed: set[str]) -> bool:
    """No Origin header (not a browser) is allowed; otherwise it must be listed, or ``*``."""
    if origin is None:
        return True
    return "*" in allowed or origin.rstrip("/") in allowed


def build_ssl_context(certfile: Path, keyfile: Path | None) -> ssl.SSLContext:
    """Load a certificate and key; raise ``ServerStartError`` naming the file at fault."""
    for path in (certfile, keyfile):
        if path is not None and not path.is_file():
            raise ServerStartError(f"TLS file not found: {path}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        files = str(certfile) if keyfile is None else f"{certfile} and {keyfile}"
        raise ServerStartError(
            f"cannot use TLS certificate/key {files}: {exc.reason or exc} "
            f"(is the key the one for this certificate, both PEM?)"
        ) from exc
    except OSError as exc:
        raise ServerStartError(f"cannot read TLS file: {exc}") from exc
    return context


@dataclass(slots=True)
class RateLimiter:
    """A token bucket: ``rate`` messages per second on average, bursts up to ``burst``.

    ``violations`` counts the messages refused since the bucket was last full, that is
    since the client last kept within the limit long enough to earn a whole burst back.
    """

    rate: float
    burst: int
    tokens: float = field(init=False)
    updated: float = field(init=False, default_factory=time.monotonic)
    violations: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def allow(self, now: float | None = None) -> bool:
        """Take one token if there is one; count a violation if not."""
        now = time.monotonic() if now is None else now
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= self.burst:
            self.violations = 0
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.violations += 1
        return False


class RedactSecrets(logging.Filter):
    """Replace tokens in log records (query parameters, Bearer headers, JSON fields)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact(text: str) -> str:
    """Return ``text`` with every token replaced by ``[redacted]``."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1[redacted]", text)
    return text


def redacting_logger(name: str) -> logging.Logger:
    """The logger ``name`` with ``RedactSecrets`` on it (added once)."""
    # The WebSocket library logs request lines at debug level, query string (token) included.
    library = logging.getLogger(name)
    if not any(isinstance(f, RedactSecrets) for f in library.filters):
        library.addFilter(RedactSecrets())
    return library
