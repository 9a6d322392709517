"""The HTTP side: plain routes beside the WebSocket on one listener, behind the gate."""

from __future__ import annotations

import asyncio
import http
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server
from websockets.http11 import Request, Response

from session_buddy_realtime.errors import PortInUseError
from session_buddy_realtime.stream.connection import Connection
from session_buddy_realtime.stream.router import HttpRouter, http_response, listen
from tests.conftest import UNIT
from tests.http_support import bare_router


async def _greet(connection: Connection) -> None:
    await connection.send("hello over websocket")
    await connection.wait_closed()


def _hello_route(connection: Connection, request: Request) -> Response:
    return http_response(
        http.HTTPStatus.OK, f"hello over http at {request.path}\n".encode(), "text/plain"
    )


async def _http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        async with asyncio.timeout(40 * UNIT):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(head.split()[1]), body.decode()


@pytest.fixture
async def listener() -> AsyncIterator[tuple[Server, HttpRouter]]:
    """A listener on 127.0.0.1 port 0 with a router (no routes yet)."""
    router = bare_router()
    server = await listen(
        _greet,
        "127.0.0.1",
        0,
        router=router,
        ssl_context=None,
        max_message_size=4096,
        open_timeout=20 * UNIT,
        close_timeout=4 * UNIT,
    )
    yield server, router
    server.close()
    await server.wait_closed()


def _port(server: Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


async def test_a_plain_route_and_the_websocket_share_one_port(
    listener: tuple[Server, HttpRouter],
) -> None:
    """A GET for a registered path is answered by its route (query string ignored),
    while a WebSocket handshake on the very same path still opens the WebSocket."""
    server, router = listener
    router.add_route("/hello", _hello_route)
    port = _port(server)
    assert await _http_get(port, "/hello?x=1") == (200, "hello over http at /hello?x=1\n")
    async with connect(f"ws://127.0.0.1:{port}/hello", open_timeout=20 * UNIT) as ws:
        assert await ws.recv() == "hello over websocket"


async def test_paths_without_a_route_stay_websocket_only(
    listener: tuple[Server, HttpRouter],
) -> None:
    """A plain GET for a path with no route gets 426 Upgrade Required, as before routes."""
    server, router = listener
    router.add_route("/hello", _hello_route)
    status, _ = await _http_get(_port(server), "/")
    assert status == http.HTTPStatus.UPGRADE_REQUIRED


async def test_routes_are_behind_the_gates_host_check(
    listener: tuple[Server, HttpRouter],
) -> None:
    """A request naming a foreign Host (DNS rebinding) is refused 403 before any route runs."""
    server, router = listener
    called: list[str] = []

    def route(connection: Connection, request: Request) -> Response:
        called.append(request.path)
        return http_response(http.HTTPStatus.OK, b"should not be reached\n", "text/plain")

    router.add_route("/hello", route)
    status, _ = await _http_get(_port(server), "/hello", host="attacker.example")
    assert status == http.HTTPStatus.FORBIDDEN
    assert called == []
    assert router.gate.refused["host_not_allowed"] == 1


async def test_an_async_route_is_awaited(listener: tuple[Server, HttpRouter]) -> None:
    """A route may be a coroutine function (for answers that need to await a read)."""
    server, router = listener

    async def route(connection: Connection, request: Request) -> Response:
        await asyncio.sleep(0)
        return http_response(http.HTTPStatus.OK, b"awaited\n", "text/plain")

    router.add_route("/later", route)
    assert await _http_get(_port(server), "/later") == (200, "awaited\n")


def test_a_route_path_must_be_absolute() -> None:
    """add_route refuses a path that does not start with '/', naming it."""
    with pytest.raises(ValueError, match="'metrics'"):
        bare_router().add_route("metrics", _hello_route)


async def test_a_taken_port_is_a_port_in_use_error(listener: tuple[Server, HttpRouter]) -> None:
    """listen() on a port that is taken raises PortInUseError naming the port."""
    server, router = listener
    port = _port(server)
    with pytest.raises(PortInUseError, match=str(port)):
        await listen(
            _greet,
            "127.0.0.1",
            port,
            router=router,
            ssl_context=None,
            max_message_size=4096,
            open_timeout=UNIT,
            close_timeout=UNIT,
        )
