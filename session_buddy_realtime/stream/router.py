"""The listener and its HTTP side: plain routes beside the WebSocket, on one port.

``HttpRouter`` is the server's ``process_request``. Every request passes the gate's
``admit`` checks (connection limits, Host). A plain request (no ``Upgrade: websocket``)
for a registered path is answered by that route; anything else is a WebSocket
handshake, checked by the gate's ``upgrade`` (Origin, token) and then handed to the hub
through the connection handler. A route never touches the hub.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from session_buddy_realtime.errors import PortInUseError, ServerStartError
from session_buddy_realtime.stream.gate import (
    HandshakeGate,
    listen_backlog,
    tracking_connection_class,
)
from session_buddy_realtime.stream.security import redacting_logger

__all__ = ["HttpRouter", "Route", "listen"]

Route = Callable[[ServerConnection, Request], Response | Awaitable[Response]]
"""Answers one plain HTTP request; may be a coroutine function."""


class HttpRouter:
    """Routes requests to plain HTTP handlers or to the WebSocket handshake.

    Args:
        gate: The checks every request, and then every upgrade, must pass.
    """

    def __init__(self, gate: HandshakeGate) -> None:
        self.gate = gate
        self._routes: dict[str, Route] = {}

    def add_route(self, path: str, route: Route) -> None:
        """Answer plain requests for ``path`` (the query string is ignored) with ``route``."""
        if not path.startswith("/"):
            raise ValueError(f"invalid route path {path!r}: must start with '/'")
        self._routes[path] = route

    def __call__(
        self, connection: ServerConnection, request: Request
    ) -> Response | Awaitable[Response] | None:
        """Return a response (a refusal or a route's answer), or None to open a WebSocket."""
        refusal = self.gate.admit(connection, request)
        if refusal is not None:
            return refusal
        if self._routes and not _is_upgrade(request):
            route = self._routes.get(urlsplit(request.path).path)
            if route is not None:
                return route(connection, request)
        return self.gate.upgrade(connection, request)


async def listen(
    handler: Callable[[ServerConnection], Awaitable[None]],
    host: str,
    port: int,
    *,
    router: HttpRouter,
    ssl_context: ssl.SSLContext | None,
    max_message_size: int,
    open_timeout: float,
    close_timeout: float,
) -> Server:
    """Listen on ``host``:``port``: requests go through ``router``, WebSockets to ``handler``.

    Raises:
        PortInUseError: the address is taken.
        ServerStartError: anything else that prevents listening.
    """
    try:
        return await serve(
            handler,
            host.strip("[]"),
            port,
            compression=None,
            max_size=max_message_size,
            max_queue=16,
            open_timeout=open_timeout,
            # One server-wide keepalive task replaces the library's task per
            # connection: less memory per client, pings spread over time.
            ping_interval=None,
            close_timeout=close_timeout,
            # TLS is done by the connection class, after the socket is counted.
            create_connection=tracking_connection_class(
                router.gate.registry, tls=ssl_context, tls_timeout=open_timeout
            ),
            process_request=router,
            process_response=router.gate.responded,
            logger=redacting_logger("session_buddy_realtime.websockets"),
            backlog=listen_backlog(),
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"port {port} on {host} is already in use; choose another "
                f"port or stop the process that holds it"
            ) from exc
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _is_upgrade(request: Request) -> bool:
    return any(
        token.strip().lower() == "websocket"
        for value in request.headers.get_all("Upgrade")
        for token in value.split(",")
    )
