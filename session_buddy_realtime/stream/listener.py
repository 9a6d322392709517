"""The listening sockets of one server and the connections they accepted."""

from __future__ import annotations

import asyncio
import socket

from websockets.frames import CloseCode
from websockets.protocol import State

from session_buddy_realtime.stream.connection import Connection, ListenerConfig

__all__ = ["Listener", "going_away", "open_listener"]


class Listener:
    """An asyncio server whose connections are ``Connection``s sharing ``config``."""

    def __init__(self, server: asyncio.Server, config: ListenerConfig) -> None:
        self._server = server
        self.config = config
        self._settled = asyncio.Event()
        config.settled = self._check_settled

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (asyncio's wrappers)."""
        return self._server.sockets

    def close(self, *, close_connections: bool = True) -> None:
        """Stop accepting; with ``close_connections``, send 1001 to every open connection."""
        self.config.serving = False
        self._server.close()
        if close_connections:
            for connection in list(self.config.registry.connections):
                going_away(connection)

    async def wait_closed(self) -> None:
        """Wait until the sockets are closed, every connection is gone and every
        connection's handler has returned."""
        await self._server.wait_closed()
        config = self.config
        while config.registry.connections or config.tasks:
            self._settled.clear()
            await self._settled.wait()

    def _check_settled(self) -> None:
        if not self.config.registry.connections and not self.config.tasks:
            self._settled.set()


def going_away(connection: Connection) -> None:
    """Send 1001 to an open connection; drop one still in its handshake (or whose
    transport is already failing: nothing to say goodbye on)."""
    if connection.protocol.state is State.CONNECTING:
        connection.transport.abort()
    elif connection.protocol.state is State.OPEN:
        try:
            connection.protocol.send_close(CloseCode.GOING_AWAY)
            connection.send_data()
        except Exception:
            connection.transport.abort()


async def open_listener(host: str, port: int, config: ListenerConfig, *, backlog: int) -> Listener:
    """Listen on ``host``:``port``; every accepted socket becomes a ``Connection``."""
    server = await asyncio.get_running_loop().create_server(
        lambda: Connection(config), host, port, backlog=backlog
    )
    return Listener(server, config)
