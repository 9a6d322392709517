"""The Redis side: the URL, the keys and channels, the scripts, and reconnecting.

One ``Keys`` names everything of one stream under a prefix, so several streams (several
databases) can share one Redis. The scripts make the lease and the publish atomic: only
the lease holder's envelopes ever reach the channel, whatever its clocks or pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from session_buddy_realtime.errors import ConfigError, ServerStartError

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "DEFAULT_PREFIX",
    "Backoff",
    "Keys",
    "RedisTimings",
    "check_prefix",
    "check_redis_url",
    "connect",
    "describe_error",
    "first_contact",
    "log_failure",
    "new_identity",
    "redacted_url",
    "require_redis",
    "stay_connected",
]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "session-buddy-realtime"
_PREFIX: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_SCHEMES: Final = ("redis", "rediss", "unix")
_OPTION_HELP: Final = {
    "db": "a database number",
    "protocol": "2 or 3",
    "ssl_ca_certs": "a file",
    "ssl_ca_path": "a folder",
    "ssl_certfile": "a file",
    "ssl_keyfile": "a file",
    "ssl_cert_reqs": "none, optional or required",
    "ssl_check_hostname": "true or false",
}
_OPTION_VALUES: Final[dict[str, Callable[[str], bool]]] = {
    "db": lambda v: v.isdigit(),
    "protocol": lambda v: v in ("2", "3"),
    "ssl_ca_certs": bool,
    "ssl_ca_path": bool,
    "ssl_certfile": bool,
    "ssl_keyfile": bool,
    "ssl_cert_reqs": lambda v: v in ("none", "optional", "required"),
    "ssl_check_hostname": lambda v: v.lower() in ("true", "false", "yes", "no", "1", "0"),
}
_QUERY_OPTIONS: Final = frozenset(_OPTION_HELP)


@dataclass(frozen=True, slots=True)
class RedisTimings:
    """How fast the producer and its edges notice trouble (shortened by the tests)."""

    lease_seconds: float = 4.0
    """The lease expires this long after its holder's last renewal: the failover time."""
    renew_every: float = 1.0
    """Seconds between the holder's renewals (and the others' attempts to take the lease)."""
    watch_seconds: float = 15.0
    """An edge's announcement of a watched skill lasts this long unless renewed."""
    stale_after: float = 3.0
    """Intervals without an envelope from the producer before an edge calls the feed stale."""
    reconnect_max: float = 5.0
    """Longest wait between reconnection attempts."""
    reply_timeout: float = 5.0
    """Seconds an edge waits for the producer to answer a request."""


@dataclass(frozen=True, slots=True)
class Keys:
    """The keys and channels of one stream."""

    prefix: str = DEFAULT_PREFIX

    @property
    def lease(self) -> str:
        """String: the producer that may publish, with an expiry."""
        return f"{self.prefix}:lease"

    @property
    def epoch(self) -> str:
        """Counter: incremented each time a producer takes the lease."""
        return f"{self.prefix}:epoch"

    @property
    def last(self) -> str:
        """String: the last ``state`` envelope, for an edge that (re)connects."""
        return f"{self.prefix}:last"

    @property
    def watch(self) -> str:
        """Sorted set: watched skills (``skill:NAME``, or ``all``), scored by expiry (ms)."""
        return f"{self.prefix}:watch"

    @property
    def states(self) -> str:
        """Channel: ``state`` and ``heartbeat`` envelopes."""
        return f"{self.prefix}:states"

    @property
    def requests(self) -> str:
        """Channel: edges' requests to the producer."""
        return f"{self.prefix}:requests"

    def replies(self, edge: str) -> str:
        """Channel: the producer's replies to one edge."""
        return f"{self.prefix}:replies:{edge}"


# Milliseconds from the Redis server's clock, so that no two machines' clocks are compared.
_NOW_MS: Final = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

CLAIM_LEASE: Final = (
    _NOW_MS
    + """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('GET', KEYS[2])) or 0}
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  local epoch = math.max(now, (tonumber(redis.call('GET', KEYS[2])) or 0) + 1)
  redis.call('SET', KEYS[2], epoch)
  return {1, epoch}
end
return {0, holder}
"""
)
"""KEYS: lease, epoch; ARGV: identity, ttl ms. {1, epoch} when held, else {0, holder}.

A new holder's epoch is above every earlier one, and at least the Redis server's time in
milliseconds, so it keeps growing even after Redis lost its data (restarted unsaved)."""

RELEASE_LEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

PUBLISH_HELD: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if ARGV[3] == '1' then redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4]) end
return redis.call('PUBLISH', ARGV[5], ARGV[2])
"""
"""KEYS: lease, last; ARGV: identity, envelope, keep as last (1/0), seconds kept, channel.
-1 when the lease is not ours (nothing published), else the number of receivers."""

ANNOUNCE: Final = (
    _NOW_MS
    + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'GT', now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return #ARGV - 1
"""
)
"""KEYS: watch; ARGV: ttl ms, members. Extends each member's expiry (never shortens it)."""

WATCHED: Final = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
"""
)
"""KEYS: watch; ARGV: limit. Drops expired members, returns the rest (latest expiry first)."""


class Backoff:
    """Exponential backoff with full jitter: 0.1 s doubling up to ``cap``."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.attempt = 0

    def reset(self) -> None:
        """After a success: the next failure waits briefly again."""
        self.attempt = 0

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt."""
        ceiling = min(self.cap, 0.1 * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 30)
        return random.uniform(ceiling / 2, ceiling)


def check_redis_url(url: str, setting: str = "redis_url") -> str:
    """Return ``url`` if it is a Redis URL this package can use, else raise ``ConfigError``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{setting}: {exc} in {redacted_url(url)!r}") from None
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            f"{setting} must start with redis://, rediss:// (TLS) or unix://, "
            f"not {redacted_url(url)!r}"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{setting} names no host: {redacted_url(url)!r}")
    if port == 0:
        raise ConfigError(f"{setting} has port 0: {redacted_url(url)!r}")
    options = dict(parse_qsl(parts.query))
    unknown = options.keys() - _QUERY_OPTIONS
    if unknown:
        raise ConfigError(
            f"{setting} has options this package does not pass on: {', '.join(sorted(unknown))}"
            f" (known: {', '.join(sorted(_QUERY_OPTIONS))})"
        )
    for name, value in options.items():
        if name.startswith("ssl_") and parts.scheme != "rediss":
            raise ConfigError(f"{setting}: {name} needs a rediss:// (TLS) URL")
        if not _OPTION_VALUES[name](value):
            raise ConfigError(f"{setting}: {name}={value[:40]!r} is not {_OPTION_HELP[name]}")
    return url


def check_prefix(prefix: str, setting: str = "redis_prefix") -> str:
    """Return ``prefix`` if it is 1-64 letters, digits or ``._:-``, else raise ``ConfigError``."""
    if not _PREFIX.fullmatch(prefix):
        raise ConfigError(f"{setting} must be 1-64 letters, digits or ._:- (got {prefix[:40]!r})")
    return prefix


def redacted_url(url: str) -> str:
    """``url`` with its password replaced, for status and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an unreadable URL)"
    if parts.password is None:
        return urlunsplit(parts._replace(query=""))
    user = quote(parts.username or "", safe="")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:[redacted]@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc, query=""))


def require_redis() -> None:
    """Raise ``ConfigError`` saying how to install the extra if ``redis`` is missing."""
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        raise ConfigError(
            "a Redis URL is set, but the redis package is not installed; install "
            "session-buddy-realtime[redis]"
        ) from None


async def first_contact(url: str, *, name: str) -> str | None:
    """Ping ``url`` once: None when it answers, the error when it is unreachable.

    Raises:
        ServerStartError: Redis refused the credentials (a setting to fix, not an outage).
        ConfigError: the client cannot use the URL.
    """
    require_redis()
    from redis.exceptions import AuthenticationError, RedisError, ResponseError

    client = connect(url, name=name)
    try:
        async with asyncio.timeout(5.0):
            await client.ping()
    except (AuthenticationError, ResponseError) as exc:
        raise ServerStartError(f"redis_url {redacted_url(url)}: {describe_error(exc)}") from None
    except (RedisError, OSError, TimeoutError) as exc:
        return describe_error(exc)
    except (ValueError, TypeError) as exc:  # what the client makes of a URL it cannot use
        raise ConfigError(f"redis_url {redacted_url(url)}: {exc}") from None
    finally:
        await client.aclose()
    return None


def connect(url: str, *, name: str) -> Redis:
    """A client for ``url`` that fails fast (no retries of its own: the caller reconnects)."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    tcp: dict[str, Any] = {} if url.startswith("unix:") else {"socket_keepalive": True}
    return Redis.from_url(
        url,
        socket_connect_timeout=3.0,
        socket_timeout=5.0,
        health_check_interval=5,
        retry=Retry(NoBackoff(), 0),
        client_name=name,
        **tcp,
    )


def new_identity(role: str) -> str:
    """A name for this process in Redis: role, host, process id and a random part."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:60] or "host"
    return f"{role}:{host}:{os.getpid()}:{random.getrandbits(32):08x}"


def describe_error(exc: BaseException) -> str:
    """One line about a Redis failure, with no password in it."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


async def stay_connected(
    url: str,
    *,
    name: str,
    stopping: asyncio.Event,
    backoff: Backoff,
    session: Callable[[Redis], Awaitable[None]],
    lost: Callable[[Redis], Awaitable[None]],
    failed: Callable[[BaseException, bool], None],
) -> None:
    """Run ``session`` on a new client until ``stopping``, reconnecting with ``backoff``.

    After each session ``lost`` runs (the client still open) and the client is closed; a
    Redis or socket error goes to ``failed(exc, False)``, a fault of ours to
    ``failed(exc, True)``: neither ends the loop.
    """
    from redis.exceptions import RedisError

    while not stopping.is_set():
        client = connect(url, name=name)
        try:
            await session(client)
        except* (RedisError, OSError) as failure:
            failed(failure.exceptions[0], False)
        except* Exception as failure:
            failed(failure.exceptions[0], True)
        finally:
            await lost(client)
            with contextlib.suppress(Exception):
                await client.aclose()
        if await wait_or_stop(stopping, backoff.next_delay()):
            return


def log_failure(
    url: str, exc: BaseException, *, ours: bool, what: str, then: str, last: str | None
) -> str:
    """Log a failure of ``what``: a fault of ours with its traceback, a Redis one once per
    kind (not when it is ``last`` again). Returns its one-line description."""
    text = describe_error(exc)
    if ours:
        logger.error("%s failed; reconnecting", what, exc_info=exc)
    elif text != last:
        logger.warning("Redis at %s: %s; %s", redacted_url(url), text, then)
    return text


async def wait_or_stop(
    stopping: asyncio.Event, seconds: float, also: asyncio.Event | None = None
) -> bool:
    """Wait ``seconds``, or until ``stopping`` (or ``also``) is set; True when stopping."""
    waiters = [asyncio.ensure_future(e.wait()) for e in (stopping, also) if e is not None]
    try:
        await asyncio.wait(waiters, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return stopping.is_set()


def as_text(value: Any) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
