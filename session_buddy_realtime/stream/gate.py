"""What happens before a WebSocket opens: connection accounting and handshake checks.

``ConnectionRegistry`` sees every TCP connection (handshake finished or not), so limits
count half-open ones and ``stop()`` can drop them. ``HandshakeGate`` refuses, with an
HTTP status, connections over the limits and requests whose Host is not allowed
(``admit``, for every request), then upgrades whose Origin is not allowed and tokens
that do not match (``upgrade``). ``HttpRouter`` (``router.py``) calls them in turn.
"""

from __future__ import annotations

import asyncio
import http
import logging
import resource
from collections import Counter
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from session_buddy_realtime.stream.security import (
    handshake_token,
    host_header_allowed,
    origin_allowed,
    tokens_match,
)

__all__ = [
    "ConnectionRegistry",
    "HandshakeGate",
    "default_max_connections",
    "tracking_connection_class",
]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ConnectionRegistry:
    """Open TCP connections of one server, and how many come from each address."""

    connections: set[ServerConnection] = field(default_factory=set)
    per_ip: Counter[str] = field(default_factory=Counter)
    preauthenticated: set[ServerConnection] = field(default_factory=set)

    def add(self, connection: ServerConnection) -> None:
        self.connections.add(connection)
        self.per_ip[_ip_of(connection)] += 1

    def remove(self, connection: ServerConnection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            ip = _ip_of(connection)
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
        self.preauthenticated.discard(connection)


def _ip_of(connection: ServerConnection) -> str:
    peer = connection.transport.get_extra_info("peername") if connection.transport else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"


def tracking_connection_class(registry: ConnectionRegistry) -> type[ServerConnection]:
    """A ServerConnection that enters ``registry`` on TCP accept and leaves on close."""

    class TrackedConnection(ServerConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            registry.add(self)

        def connection_lost(self, exc: Exception | None) -> None:
            registry.remove(self)
            super().connection_lost(exc)

    return TrackedConnection


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

    def admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Checks for any request: connection limits and the Host header."""
        if len(self.registry.connections) > self.max_connections:
            return self._refuse(
                connection,
                "too_many_connections",
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "server is at its connection limit; try again later",
            )
        if self.registry.per_ip[_ip_of(connection)] > self.max_connections_per_ip:
            return self._refuse(
                connection,
                "too_many_connections_from_ip",
                http.HTTPStatus.TOO_MANY_REQUESTS,
                "too many connections from your address",
            )
        headers: Headers = request.headers
        if self.check_host_header and not host_header_allowed(headers.get("Host"), self.bound_host):
            return self._refuse(
                connection,
                "host_not_allowed",
                http.HTTPStatus.FORBIDDEN,
                "Host header not allowed for a loopback server",
            )
        return None

    def upgrade(self, connection: ServerConnection, request: Request) -> Response | None:
        """Checks for a WebSocket upgrade: the Origin and the token, if one is sent."""
        headers: Headers = request.headers
        if not origin_allowed(headers.get("Origin"), self.allowed_origins):
            return self._refuse(
                connection,
                "origin_not_allowed",
                http.HTTPStatus.FORBIDDEN,
                "Origin not allowed",
            )
        provided = handshake_token(headers.raw_items(), request.path)
        if provided is not None and self.token is not None:
            if not tokens_match(provided, self.token):
                return self._refuse(
                    connection, "bad_token", http.HTTPStatus.UNAUTHORIZED, "invalid token"
                )
            self.registry.preauthenticated.add(connection)
        return None

    def _refuse(
        self, connection: ServerConnection, reason: str, status: http.HTTPStatus, text: str
    ) -> Response:
        self.refused[reason] += 1
        logger.debug("refused a connection from %s: %s", _ip_of(connection), reason)
        return connection.respond(status, text + "\n")


def default_max_connections() -> int:
    """10,000 connections, or fewer when the open-file limit is lower."""
    # Leave room for the database, logs and the host's own files.
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 10_000
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(1, min(10_000, soft - 64))
