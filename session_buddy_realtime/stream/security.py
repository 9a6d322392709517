"""Authentication, TLS, browser checks, rate limiting and log redaction.

Pure helpers used by the server at the handshake and per message; ``docs/security.md``
describes the threat model and every setting.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import logging
import re
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs, urlsplit

from websockets.frames import Frame, Opcode

from session_buddy_realtime.errors import ServerStartError

__all__ = [
    "AuthThrottle",
    "OriginLog",
    "RateLimiter",
    "RedactSecrets",
    "bearer_token",
    "build_ssl_context",
    "handshake_token",
    "host_header_allowed",
    "host_of",
    "is_loopback",
    "origin_allowed",
    "own_origins",
    "redacting_logger",
    "tokens_match",
    "warn_if_exposed",
]

logger = logging.getLogger(__name__)

_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.", "ip6-localhost"})
_SECRET_PATTERNS: Final = (
    # Every query parameter value: the token's key may come percent-encoded (%74oken),
    # which the parser decodes, so no key is trusted to be harmless.
    re.compile(r"([?&][^=&\s\"']*=)[^&\s\"']+"),
    re.compile(r"(?i)(authorization\s*:\s*)[^\r\n]+"),
    re.compile(r"(?i)(bearer\s+)[^\s\"',]+"),
    # The password of a Redis URL (redis://user:password@host).
    re.compile(r"(?i)(rediss?://[^:@/\s]*:)[^@\s]+(?=@)"),
)
# A JSON member "key": "value..." whose key may be written with escapes (\u0074oken).
_JSON_MEMBER: Final = re.compile(r'"((?:[^"\\]|\\.)*)"(\s*:\s*")((?:[^"\\]|\\.)*)')
_DATA_OPCODES: Final = frozenset({Opcode.TEXT, Opcode.BINARY, Opcode.CONT})


def tokens_match(provided: str, expected: str) -> bool:
    """Compare two tokens in constant time (for equal lengths)."""
    return hmac.compare_digest(
        provided.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def bearer_token(headers: Iterable[tuple[str, str]]) -> str | None:
    """Return the token of an ``Authorization: Bearer`` header, if there is one."""
    for name, value in headers:
        if name.lower() == "authorization":
            scheme, _, credentials = value.partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    return None


def handshake_token(headers: Iterable[tuple[str, str]], path: str) -> str | None:
    """Return the token of an ``Authorization: Bearer`` header or a ``token`` query parameter."""
    token = bearer_token(headers)
    if token is not None:
        return token
    values = parse_qs(urlsplit(path).query).get("token")
    return values[0] if values else None


@functools.lru_cache(maxsize=256)  # every handshake asks, mostly about the same few hosts
def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    name = host.strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=256)  # as is_loopback: mostly the same few values
def host_of(value: str) -> str | None:
    """The host name of a ``Host`` header value; None when the value is malformed."""
    value = value.strip()
    port = ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:]
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name = value  # a bare IPv6 address, as some clients send it
    if port and not (port.isdigit() and len(port) <= 5):
        return None
    if not name or any(char.isspace() or char in "/?#@" for char in name):
        return None
    return name


def host_header_allowed(name: str, bound_host: str) -> bool:
    """Check the Host of a request to a loopback server (against DNS rebinding)."""
    return is_loopback(name) or name.lower() == bound_host.strip("[]").lower()


def warn_if_exposed(host: str, *, token: bool, tls: bool) -> None:
    """Warn when a server off loopback has neither a token nor TLS."""
    if not is_loopback(host) and not token and not tls:
        logger.warning(
            "listening on %s, which is not a loopback address, with neither a token "
            "nor TLS: anyone who can reach this port can read the metrics; set a "
            "token (SESSION_BUDDY_REALTIME_TOKEN) and TLS, or bind to localhost",
            host,
        )


def own_origins(port: int) -> set[str]:
    """Origins of pages served by this machine on the server's port (its own dashboard)."""
    return {
        f"{scheme}://{host}:{port}"
        for scheme in ("http", "https")
        for host in ("localhost", "127.0.0.1", "[::1]")
    }


# A well-formed http(s) origin; group 1 is the host. Also what a setting can list as it is.
_ORIGIN: Final = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def origin_allowed(
    origin: str | None,
    allowed: set[str],
    *,
    host: str | None = None,
    bound_host: str = "",
) -> bool:
    """Whether a WebSocket from a page of ``origin`` may open (the default policy).

    Allowed: no Origin header (not a browser); an origin listed in ``allowed`` (kept
    lowercase, matched in any case; ``*`` for any, ``null`` for ``file://`` pages); the
    page this server served, that is the request's own ``host`` (its Host header) when
    that names an address or a loopback host, or the host the server is bound to (not
    any other name: that could be DNS rebinding); and, when ``bound_host`` is a loopback
    address, any loopback page (``http(s)://localhost:*``, ``127.0.0.1``, ``[::1]``), which
    only this machine serves.
    """
    if origin is None:
        return True
    origin = origin.rstrip("/")
    # Scheme and host are case-insensitive; ``allowed`` is kept lowercase.
    if "*" in allowed or origin.lower() in allowed:
        return True
    parsed = _ORIGIN.fullmatch(origin)
    if parsed is None:
        return False  # "null" (opaque origins: files, sandboxed frames) unless listed
    name = parsed.group(1).strip("[]").lower()
    if is_loopback(bound_host) and is_loopback(name):
        return True
    if host is None or origin.partition("://")[2].lower() != host.strip().lower():
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return is_loopback(name) or name == bound_host.strip("[]").lower()
    return True


_MAX_LOGGED_ORIGINS: Final = 1000


@dataclass(slots=True)
class OriginLog:
    """Logs each refused origin once, at WARNING, with the setting that would allow it.

    At most ``limit`` distinct origins are remembered; beyond them one line says that
    further origins are no longer logged, so no client can flood the log.
    """

    limit: int = _MAX_LOGGED_ORIGINS
    _seen: set[str] = field(default_factory=set)
    _full: bool = False

    def refused(self, origin: str) -> None:
        """Note that a WebSocket from ``origin`` was refused."""
        origin = origin.rstrip("/")
        if origin in self._seen:
            return
        if len(self._seen) >= self.limit:
            if not self._full:
                self._full = True
                logger.warning(
                    "refused WebSockets from more than %d distinct origins; further "
                    "origins are refused without a log line",
                    self.limit,
                )
            return
        self._seen.add(origin)
        shown = origin if len(origin) <= 200 else origin[:200] + "..."
        if origin == "null" or _ORIGIN.fullmatch(origin):
            logger.warning(
                "refused a WebSocket from origin %r (not allowed): to allow it, add %s to "
                "SESSION_BUDDY_REALTIME_ALLOWED_ORIGINS (comma-separated) or pass "
                "--allow-origin %s",
                shown,
                origin,
                origin,
            )
        else:
            logger.warning(
                "refused a WebSocket from origin %r: not an origin that can be listed",
                shown,
            )


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


@dataclass(slots=True)
class AuthThrottle:
    """Failed authentication attempts per address, and how long the address must wait.

    The ``free``-th failure blocks the address for 2 s, and each later one twice as long
    as the one before, up to ``longest`` seconds; attempts while blocked are refused
    unchecked. A success, or ``forget``
    seconds without a failure, clears the address. At most ``max_addresses`` are kept.
    """

    free: int = 5
    longest: float = 60.0
    forget: float = 600.0
    max_addresses: int = 10_000
    _addresses: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    """address -> (failures, blocked until, last failure), oldest first."""

    def wait(self, address: str, now: float | None = None) -> float:
        """Seconds ``address`` must still wait before its next attempt (0 if none)."""
        entry = self._addresses.get(address)
        if entry is None:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, entry[1] - now)

    def failed(self, address: str, now: float | None = None) -> None:
        """Record a failed attempt from ``address``."""
        now = time.monotonic() if now is None else now
        failures, _, last = self._addresses.pop(address, (0, 0.0, now))
        failures = 1 if now - last > self.forget else failures + 1
        doublings = min(failures - self.free + 1, 32)  # 2 ** 32 s is past any ``longest``
        blocked = 0.0 if failures < self.free else min(2.0**doublings, self.longest)
        self._addresses[address] = (failures, now + blocked, now)
        while len(self._addresses) > self.max_addresses:
            del self._addresses[next(iter(self._addresses))]

    def succeeded(self, address: str) -> None:
        """Clear ``address`` after a successful authentication."""
        self._addresses.pop(address, None)


class RedactSecrets(logging.Filter):
    """Keep tokens out of log records: query values, Authorization headers, JSON fields,
    and the contents of WebSocket data frames (which the library logs at debug level,
    cut to their head and tail) entirely."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, Frame) and arg.opcode in _DATA_OPCODES for arg in record.args
        ):
            record.args = tuple(_frame_summary(arg) for arg in record.args)
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def _frame_summary(arg: object) -> object:
    if isinstance(arg, Frame) and arg.opcode in _DATA_OPCODES:
        return f"{arg.opcode.name} [{len(arg.data)} bytes, contents not logged]"
    return arg


def redact(text: str) -> str:
    """Return ``text`` with every token replaced by ``[redacted]``."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1[redacted]", text)
    return _JSON_MEMBER.sub(_redact_member, text)


def _redact_member(match: re.Match[str]) -> str:
    try:
        key = json.loads(f'"{match.group(1)}"')
    except ValueError:
        key = match.group(1)
    if not isinstance(key, str) or key.lower() != "token":
        return match.group(0)
    return f'"{match.group(1)}"{match.group(2)}[redacted]'


def redacting_logger(name: str) -> logging.Logger:
    """The logger ``name`` with ``RedactSecrets`` on it (added once)."""
    # The WebSocket library logs request lines at debug level, query string (token) included.
    library = logging.getLogger(name)
    if not any(isinstance(f, RedactSecrets) for f in library.filters):
        library.addFilter(RedactSecrets())
    return library
