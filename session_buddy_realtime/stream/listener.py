"""The listening sockets of one server and the connections they accepted.

On asyncio's own (selector) event loop the listener accepts by itself: each accepted
socket becomes a transport and a ``Connection`` at once, where asyncio's server would
run a task per socket first (about 10 µs of CPU per handshake). Other event loops
(uvloop, say) accept through their own ``create_server``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from asyncio import selector_events
from typing import Final

from websockets.frames import CloseCode
from websockets.protocol import State

from session_buddy_realtime.stream.connection import Connection, ListenerConfig

__all__ = ["Listener", "going_away", "open_listener"]

logger = logging.getLogger(__name__)

ACCEPT_RETRY_DELAY: Final = 1.0
"""Seconds accepting pauses when the process is out of files or memory (as asyncio's)."""
_OUT_OF_RESOURCES: Final = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Listener:
    """An asyncio server whose connections are ``Connection``s sharing ``config``."""

    def __init__(self, server: asyncio.Server, config: ListenerConfig) -> None:
        self._server = server
        self.config = config
        self._settled = asyncio.Event()
        config.settled = self._check_settled
        self._accepting: list[socket.socket] = []
        """Our own handles on the listening sockets, when this listener accepts."""
        self._retry: asyncio.TimerHandle | None = None

    def _listen(self, pending: int, batch: int, *, accept: bool) -> None:
        """Let the kernel queue ``pending`` connections; with ``accept``, accept them by
        ourselves, up to ``batch`` on each readiness."""
        loop = asyncio.get_running_loop()
        for wrapped in self.sockets:
            # A descriptor of our own: asyncio's wrapper can neither listen() nor accept().
            sock = socket.socket(fileno=os.dup(wrapped.fileno()))
            sock.listen(pending)
            if not accept:
                sock.close()  # the duplicate only; asyncio's server accepts on its own
                continue
            sock.setblocking(False)
            self._accepting.append(sock)
            loop.add_reader(sock.fileno(), self._accept, loop, sock, batch)

    def _accept(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, backlog: int) -> None:
        for _ in range(backlog):
            try:
                accepted, address = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise  # the event loop logs it
                # The socket stays readable: pause, or this would spin.
                logger.warning("accepting paused for %.0f s: %s", ACCEPT_RETRY_DELAY, exc)
                for listening in self._accepting:
                    loop.remove_reader(listening.fileno())
                self._retry = loop.call_later(ACCEPT_RETRY_DELAY, self._resume, loop, backlog)
                return
            try:
                accepted.setblocking(False)
                make_transport = loop._make_socket_transport  # type: ignore[attr-defined]
                make_transport(accepted, Connection(self.config), extra={"peername": address})
            except Exception:  # one socket's trouble must not stop accepting
                logger.exception("could not take over an accepted connection")
                accepted.close()

    def _resume(self, loop: asyncio.AbstractEventLoop, backlog: int) -> None:
        self._retry = None
        if self.config.serving:
            for sock in self._accepting:
                loop.add_reader(sock.fileno(), self._accept, loop, sock, backlog)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (asyncio's wrappers)."""
        return self._server.sockets

    def close(self, *, close_connections: bool = True) -> None:
        """Stop accepting; with ``close_connections``, send 1001 to every open connection."""
        self.config.serving = False
        if self._retry is not None:
            self._retry.cancel()
        for sock in self._accepting:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()  # our descriptor; asyncio's server closes its own
        self._accepting.clear()
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
    if connection.opening:
        connection.transport.abort()
    elif connection.protocol.state is State.OPEN:
        try:
            connection.protocol.send_close(CloseCode.GOING_AWAY)
            connection.send_data()
        except Exception:
            connection.transport.abort()


async def open_listener(
    host: str, port: int, config: ListenerConfig, *, pending: int, batch: int
) -> Listener:
    """Listen on ``host``:``port``, the kernel queueing ``pending`` connections, accepted
    ``batch`` at a time (asyncio's server uses one number for both); every accepted socket
    becomes a ``Connection``."""
    loop = asyncio.get_running_loop()
    itself = accepts_itself(loop)
    server = await loop.create_server(
        lambda: Connection(config), host, port, backlog=batch, start_serving=not itself
    )
    listener = Listener(server, config)
    listener._listen(pending, batch, accept=itself)
    return listener


def accepts_itself(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether a listener on ``loop`` accepts by itself (asyncio's selector loop, whose
    transports it can make) rather than through ``loop.create_server``."""
    return isinstance(loop, selector_events.BaseSelectorEventLoop) and hasattr(
        loop, "_make_socket_transport"
    )
