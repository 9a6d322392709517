"""The listener and its HTTP side: plain routes beside the WebSocket, on one port.

``HttpRouter`` is the server's ``process_request``. Every request passes the gate's
``admit`` checks (connection limits, Host). A plain request (no ``Upgrade: websocket``)
for a registered path is answered by that route; anything else is a WebSocket
handshake, checked by the gate's ``upgrade`` (Origin, token) and then handed to the hub
through the connection handler. A route never touches the hub. Routes answer GET and
HEAD (the same headers, no body); other methods get 405.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import http
import ssl
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from session_buddy_realtime.errors import PortInUseError, ServerStartError
from session_buddy_realtime.stream.connection import Connection, Handler, ListenerConfig
from session_buddy_realtime.stream.gate import PENDING_BACKLOG, HandshakeGate, listen_backlog
from session_buddy_realtime.stream.listener import Listener, open_listener
from session_buddy_realtime.stream.opening import answer, socket_options
from session_buddy_realtime.stream.security import redacting_logger

__all__ = ["HttpRouter", "Route", "http_response", "listen", "listener_urls"]

Route = Callable[[Connection, Request], Response | Awaitable[Response]]
"""Answers one plain HTTP request; may be a coroutine function."""


class HttpRouter:
    """Routes requests to plain HTTP handlers or to the WebSocket handshake.

    Args:
        gate: The checks every request, and then every upgrade, must pass.
    """

    def __init__(self, gate: HandshakeGate) -> None:
        self.gate = gate
        self._routes: dict[str, Route] = {}
        self._prefixes: dict[str, Route] = {}

    def add_route(self, path: str, route: Route, *, prefix: bool = False) -> None:
        """Answer plain requests for ``path`` (the query string is ignored) with ``route``.

        With ``prefix``, for every path that starts with ``path`` (the route checks the rest).
        """
        if not path.startswith("/"):
            raise ValueError(f"invalid route path {path!r}: must start with '/'")
        (self._prefixes if prefix else self._routes)[path] = route

    def __call__(
        self, connection: Connection, request: Request
    ) -> Response | Awaitable[Response] | None:
        """Return a response (a refusal or a route's answer), or None to open a WebSocket."""
        refusal = self.gate.admit(connection, request)
        if refusal is not None:
            return refusal
        if (self._routes or self._prefixes) and not _is_upgrade(request):
            route = self._route_for(urlsplit(request.path).path)
            if route is not None:
                return _answer(route, connection, request)
        return self.gate.upgrade(connection, request)

    def _route_for(self, path: str) -> Route | None:
        route = self._routes.get(path)
        if route is None:
            for prefix, candidate in self._prefixes.items():
                if path.startswith(prefix):
                    return candidate
        return route


def _answer(
    route: Route, connection: Connection, request: Request
) -> Response | Awaitable[Response]:
    if request.method not in ("GET", "HEAD"):
        return http_response(
            http.HTTPStatus.METHOD_NOT_ALLOWED,
            b"method not allowed: use GET or HEAD\n",
            "text/plain; charset=utf-8",
            [("Allow", "GET, HEAD")],
        )
    response = route(connection, request)
    if request.method == "GET":
        return response
    if isinstance(response, Response):
        response.body = b""  # HEAD: the GET's headers, Content-Length included
        return response

    async def without_body() -> Response:
        answered = await response
        answered.body = b""
        return answered

    return without_body()


def http_response(
    status: http.HTTPStatus,
    body: bytes,
    content_type: str,
    headers: Iterable[tuple[str, str]] = (),
) -> Response:
    """A plain HTTP response, closing the connection after it, never sniffed for its type."""
    return Response(
        status.value,
        status.phrase,
        Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Connection", "close"),
                ("Content-Length", str(len(body))),
                ("Content-Type", content_type),
                ("X-Content-Type-Options", "nosniff"),
                *headers,
            ]
        ),
        body,
    )


def listener_urls(listener: Listener, *, tls: bool) -> list[str]:
    """The ``ws://`` (``wss://`` with ``tls``) address of each of the listener's sockets."""
    urls = []
    for sock in listener.sockets:
        address, port = sock.getsockname()[:2]
        shown = f"[{address}]" if ":" in address else address
        urls.append(f"{'wss' if tls else 'ws'}://{shown}:{port}")
    return urls


async def listen(
    handler: Handler,
    host: str,
    port: int,
    *,
    router: HttpRouter,
    ssl_context: ssl.SSLContext | None,
    max_message_size: int,
    open_timeout: float,
    close_timeout: float,
    dead_peer: tuple[float, float] | None = None,
) -> Listener:
    """Listen on ``host``:``port``: requests go through ``router``, WebSockets to ``handler``.

    ``dead_peer`` (keepalive interval, timeout) lets the kernel drop peers that stop
    acknowledging (see ``socket_options``).

    Raises:
        PortInUseError: the address is taken.
        ServerStartError: anything else that prevents listening.
    """
    config = ListenerConfig(
        registry=router.gate.registry,
        answer=answer,
        handler=handler,
        process_request=router,
        process_response=router.gate.responded,
        max_size=max_message_size,
        open_timeout=open_timeout,
        close_timeout=close_timeout,
        protocol_logger=redacting_logger("session_buddy_realtime.websockets"),
        tls=ssl_context,  # done by the connection, after the socket is counted
    )
    try:
        listener = await open_listener(
            host.strip("[]"), port, config, pending=PENDING_BACKLOG, batch=listen_backlog()
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"port {port} on {host} is already in use; choose another "
                f"port or stop the process that holds it"
            ) from exc
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    _set_inherited_options(listener, socket_options(dead_peer))
    return listener


def _set_inherited_options(listener: Listener, options: list[tuple[int, int, int]]) -> None:
    """Set on the listening sockets what every accepted socket inherits."""
    for sock in listener.sockets:
        for level, name, value in options:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, name, value)


def _is_upgrade(request: Request) -> bool:
    return any(
        token.strip().lower() == "websocket"
        for value in request.headers.get_all("Upgrade")
        for token in value.split(",")
    )
