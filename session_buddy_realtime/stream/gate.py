"""What happens before a WebSocket opens: connection accounting and handshake checks.

``ConnectionRegistry`` sees every TCP connection from its accept, and drops at once
those over the socket caps (per address, and in all), so a flood of half-open sockets
cannot exhaust the open-file limit. ``HandshakeGate`` refuses, with an HTTP status,
malformed requests (400), requests over the limits and Hosts not allowed (``admit``,
for every request), then upgrades whose Origin is not allowed and tokens that do not
match (``upgrade``). ``HttpRouter`` (``router.py``) calls them in turn. Only admitted
WebSockets count against ``max_connections``, so a burst of handshakes admits exactly
as many as the limit says.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import resource
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from websockets.http11 import Request, Response

from session_buddy_realtime.stream.connection import Connection
from session_buddy_realtime.stream.security import (
    AuthThrottle,
    OriginLog,
    handshake_token,
    host_header_allowed,
    host_of,
    origin_allowed,
    tokens_match,
)

__all__ = [
    "PENDING_BACKLOG",
    "SEND_BUFFER_BYTES",
    "ConnectionRegistry",
    "HandshakeGate",
    "default_max_connections",
    "drop",
    "listen_backlog",
    "peer_ip",
]

logger = logging.getLogger(__name__)

SEND_BUFFER_BYTES: Final = 32 * 1024
"""``SO_SNDBUF`` of every accepted socket (Linux doubles it for its bookkeeping): the kernel
holds at most this much unsent data per client, instead of autotuning up to megabytes."""
_PER_IP_SLACK: Final = 16
_LOG_EVERY: Final = 1.0
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


def _pending_allowance(max_connections: int) -> int:
    """Sockets allowed beyond ``max_connections`` while their handshakes are in flight."""
    return max(16, min(1024, max_connections // 10))


@dataclass(eq=False)
class ConnectionRegistry:
    """Open TCP connections of one server, per address, and the admitted WebSockets.

    Args:
        max_sockets: TCP connections at most, handshakes included; more are dropped at once.
        max_sockets_per_ip: The same, for one address.
        write_limit: Unsent bytes at which a connection that sends more is dropped.
    """

    max_sockets: int = 1 << 30
    max_sockets_per_ip: int = 1 << 30
    write_limit: int = 1 << 30
    connections: set[Connection] = field(default_factory=set)
    per_ip: Counter[str] = field(default_factory=Counter)
    admitted: set[Connection] = field(default_factory=set)
    preauthenticated: set[Connection] = field(default_factory=set)
    dropped: Counter[str] = field(default_factory=Counter)
    tls_handshakes: set[asyncio.Task[None]] = field(default_factory=set)

    def add(self, connection: Connection) -> None:
        """Count a connection just accepted; drop it if it is over a socket cap."""
        ip = peer_ip(connection)
        self.connections.add(connection)
        self.per_ip[ip] += 1
        if self.per_ip[ip] > self.max_sockets_per_ip:
            self.drop(connection, "too_many_sockets_from_ip")
        elif len(self.connections) > self.max_sockets:
            self.drop(connection, "too_many_sockets")

    def remove(self, connection: Connection) -> None:
        """Forget a connection that closed."""
        if connection in self.connections:
            self.connections.discard(connection)
            ip = peer_ip(connection)
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
        self.admitted.discard(connection)
        self.preauthenticated.discard(connection)

    def drop(self, connection: Connection, reason: str) -> None:
        """Reset ``connection`` at once and count it under ``reason``."""
        self.dropped[reason] += 1
        drop(connection)

    @classmethod
    def for_limits(
        cls,
        max_connections: int,
        max_connections_per_ip: int,
        *,
        max_buffered_bytes: int,
        dropped: Counter[str],
    ) -> ConnectionRegistry:
        """A registry whose socket caps leave room for the handshakes of these limits.

        A client that sends while twice ``max_buffered_bytes`` (where the hub starts
        skipping its updates) waits for it is not reading: it is dropped.
        """
        return cls(
            max_sockets=min(max_connections + _pending_allowance(max_connections), _usable_files()),
            max_sockets_per_ip=max_connections_per_ip + _PER_IP_SLACK,
            write_limit=2 * max_buffered_bytes,
            dropped=dropped,
        )


def peer_ip(connection: Connection) -> str:
    """The peer's address, or "unknown"."""
    peer = connection.transport.get_extra_info("peername") if connection.transport else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"


def drop(connection: Connection) -> None:
    """Reset a connection at once, discarding what the kernel still holds for it."""
    transport = connection.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER 0: close() sends RST and frees the send buffer instead of leaving
        # the socket in FIN-WAIT-1 with its backlog.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


@dataclass(eq=False)
class HandshakeGate:
    """The checks of the opening handshake, in the order they run."""

    registry: ConnectionRegistry
    max_connections: int
    max_connections_per_ip: int
    token: str | None
    allowed_origins: set[str]
    check_host_header: bool
    bound_host: str
    refused: Counter[str] = field(default_factory=Counter)
    throttle: AuthThrottle = field(default_factory=AuthThrottle)
    origin_log: OriginLog = field(default_factory=OriginLog)
    _logged_at: dict[str, float] = field(default_factory=dict)

    def admit(self, connection: Connection, request: Request) -> Response | None:
        """Checks for any request: well-formed, within the limits, and the Host header."""
        headers = request.headers
        hosts = headers.get_all("Host")
        if len(hosts) > 1 or len(headers.get_all("Origin")) > 1:
            return self._malformed(connection, "a repeated Host or Origin header")
        host = host_of(hosts[0]) if hosts else None
        if hosts and host is None:
            return self._malformed(connection, "a malformed Host header")
        if len(self.registry.admitted) >= self.max_connections:
            return self._refuse(
                connection,
                "too_many_connections",
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "server is at its connection limit; try again later",
            )
        if self.registry.per_ip[peer_ip(connection)] > self.max_connections_per_ip:
            return self._refuse(
                connection,
                "too_many_connections_from_ip",
                http.HTTPStatus.TOO_MANY_REQUESTS,
                "too many connections from your address",
            )
        if self.check_host_header and (
            host is None or not host_header_allowed(host, self.bound_host)
        ):
            return self._refuse(
                connection,
                "host_not_allowed",
                http.HTTPStatus.FORBIDDEN,
                "Host header not allowed for a loopback server",
            )
        return None

    def upgrade(self, connection: Connection, request: Request) -> Response | None:
        """Checks for a WebSocket upgrade: the Origin and the token, if one is sent."""
        headers = request.headers
        origin = headers.get("Origin")
        if not origin_allowed(
            origin, self.allowed_origins, host=headers.get("Host"), bound_host=self.bound_host
        ):
            self.origin_log.refused(str(origin))
            return self._refuse(
                connection,
                "origin_not_allowed",
                http.HTTPStatus.FORBIDDEN,
                "Origin not allowed",
            )
        provided = (
            handshake_token(headers.raw_items(), request.path)
            if "Authorization" in headers or "?" in request.path
            else None  # where a token would be, there is nothing
        )
        if provided is not None and self.token is not None:
            ip = peer_ip(connection)
            wait = self.throttle.wait(ip)
            if wait > 0:
                return self._refuse(
                    connection,
                    "auth_throttled",
                    http.HTTPStatus.TOO_MANY_REQUESTS,
                    f"too many failed authentication attempts; retry in {wait:.0f} s",
                )
            if not tokens_match(provided, self.token):
                self.throttle.failed(ip)
                return self._refuse(
                    connection, "bad_token", http.HTTPStatus.UNAUTHORIZED, "invalid token"
                )
            self.throttle.succeeded(ip)
            self.registry.preauthenticated.add(connection)
        return None

    def responded(self, connection: Connection, request: Request, status: int) -> None:
        """After the handshake's answer: a WebSocket that opened counts as admitted.

        A refusal, a plain route's answer or an upgrade the library rejected holds no
        slot. No await comes between ``admit`` and this, so concurrent handshakes never
        admit more than the limit.
        """
        if status == http.HTTPStatus.SWITCHING_PROTOCOLS:
            self.registry.admitted.add(connection)
        else:
            self.registry.preauthenticated.discard(connection)

    def _malformed(self, connection: Connection, what: str) -> Response:
        return self._refuse(
            connection, "malformed_request", http.HTTPStatus.BAD_REQUEST, f"bad request: {what}"
        )

    def _refuse(
        self, connection: Connection, reason: str, status: http.HTTPStatus, text: str
    ) -> Response:
        self.refused[reason] += 1
        # At most one line a second per reason: a flood of bad requests cannot flood the log.
        now = time.monotonic()
        if now - self._logged_at.get(reason, -_LOG_EVERY) >= _LOG_EVERY:
            self._logged_at[reason] = now
            logger.debug(
                "refused a connection from %s: %s (%d so far)",
                peer_ip(connection),
                reason,
                self.refused[reason],
            )
        return connection.protocol.reject(status, text + "\n")


def default_max_connections() -> int:
    """10,000 connections, or fewer when the open-file limit is lower."""
    usable = _usable_files()
    return max(1, min(10_000, usable - _pending_allowance(usable)))


def listen_backlog() -> int:
    """The listen backlog: 100, or less under a low open-file limit.

    asyncio accepts up to a backlog of sockets at a time before any can be dropped, so
    a smaller batch keeps a flood of connections inside the open-file limit.
    """
    return min(100, max(16, _soft_file_limit() // 16))


PENDING_BACKLOG: Final = 4096
"""The kernel's queue of connections not yet accepted (capped by ``net.core.somaxconn``):
a reconnect storm of thousands waits there instead of having its SYNs dropped and
retried seconds later. It holds no file of ours."""


def _usable_files() -> int:
    # Room for two accept batches in flight, the database, logs and the host's own files.
    return _soft_file_limit() - 64 - 2 * listen_backlog()


def _soft_file_limit() -> int:
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 1 << 20
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft
