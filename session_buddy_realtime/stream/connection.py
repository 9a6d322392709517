"""The connection class of the listener: accounting, socket options, TLS, and a lean footprint.

Every accepted TCP connection is a ``TrackedConnection``: it enters the registry on
accept (so the socket caps apply before any byte is read), caps its kernel send buffer,
asks the kernel to detect dead peers, runs TLS after it is counted, and, once its
WebSocket is open, lets go of what only the handshake needed (``settle``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
from typing import Any, Final, cast

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from session_buddy_realtime.stream.gate import SEND_BUFFER_BYTES, ConnectionRegistry

__all__ = ["socket_options", "text_frame", "tracking_connection_class", "write_first"]

_NO_HEADERS: Final = Headers()
"""The headers of every open connection's request: nothing reads them after the upgrade
(the library only checks that a request was received), so none of them is kept."""


def text_frame(text: str) -> bytes:
    """One unmasked, unfragmented text frame, as the server side sends it.

    Written straight to a transport, it is what the library's own send would write:
    server frames are unmasked and, with compression off, no extension alters them.
    """
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])


def write_first(connection: ServerConnection, frame: bytes) -> None:
    """Write ``frame`` as the first message of an open connection, in one write with the
    handshake's response when the connection still holds it: one segment, one system
    call, where two would each wake the client."""
    held = b"".join(connection.protocol.data_to_send())
    connection.transport.write(held + frame if held else frame)


def settle(connection: ServerConnection) -> None:
    """Let an open connection go of its handshake's headers and response.

    They are a fifth of the objects a connection keeps, and every one of them is scanned
    by each full garbage collection while the client stays. (The request itself stays
    referenced by the library's parser, so its headers are dropped instead.)
    """
    if connection.request is not None:
        connection.request.headers = _NO_HEADERS
    connection.response = None


def socket_options(dead_peer: tuple[float, float] | None) -> list[tuple[int, int, int]]:
    """The options of every accepted socket, set once on the listening socket (Linux
    copies them to each connection it accepts, which saves six system calls per accept).

    The kernel send buffer is capped at ``SEND_BUFFER_BYTES``. With ``dead_peer``
    (keepalive interval, timeout), the kernel gives up on a peer that acknowledges
    nothing for that long (``TCP_USER_TIMEOUT``, and TCP keepalive while idle).
    """
    options = [(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)]
    if dead_peer is not None and hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        interval, timeout = dead_peer
        options += [
            # Data unacknowledged for interval + timeout: the connection is reset, as a
            # ping without a pong would have it closed.
            (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round((interval + timeout) * 1000)),
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(interval))),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(timeout / 4))),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4),
        ]
    return options


def tracking_connection_class(
    registry: ConnectionRegistry,
    *,
    tls: ssl.SSLContext | None = None,
    tls_timeout: float = 5.0,
) -> type[ServerConnection]:
    """A ServerConnection that enters ``registry`` on accept and leaves on close.

    It is dropped when the peer sends data (a ping frame each time, say) while
    ``write_limit`` bytes are waiting for it: a client that does not read cannot make the
    server queue replies for ever. With ``tls``, the TLS handshake runs here, after the
    socket is counted: sockets still in their TLS handshake count against the caps like
    any other. Its socket options are the listening socket's (``socket_options``).
    """

    class TrackedConnection(ServerConnection):
        early: list[bytes] | None = None
        """Data that arrived between the TLS handshake and the connection taking it over."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # The library wraps the logger per connection (an adapter, its dict and a
            # proxy); every connection can share the listener's own.
            shared = cast(logging.LoggerAdapter[logging.Logger], self.protocol.logger).logger
            self.logger = self.protocol.logger = shared
            # Only appended to, removed from and iterated: a list does that in 56 bytes,
            # where the library's deque takes 760 for every connection.
            self.drain_waiters = cast("collections.deque[asyncio.Future[None]]", [])

        handshaking = False

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            self.handshaking = True
            try:
                await super().handshake(*args, **kwargs)
            finally:
                self.handshaking = False
            if self.protocol.state is State.OPEN:
                settle(self)

        def send_data(self) -> None:
            # The 101 response stays queued in the protocol: the welcome takes it along
            # (``write_first``), or the next send does. A refusal goes out at once.
            if self.handshaking and self.protocol.state is State.OPEN:
                return
            super().send_data()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if tls is None:
                super().connection_made(transport)
                registry.add(self)
                return
            # Until TLS is up the connection holds the raw transport, so that the caps,
            # drop() and stop() treat it as any other.
            self.transport = cast(asyncio.Transport, transport)
            self.early = []
            registry.add(self)
            if not transport.is_closing():  # not dropped at accept
                task = asyncio.get_running_loop().create_task(self._start_tls(self.transport))
                registry.tls_handshakes.add(task)
                task.add_done_callback(registry.tls_handshakes.discard)

        async def _start_tls(self, transport: asyncio.Transport) -> None:
            assert tls is not None
            try:
                async with asyncio.timeout(tls_timeout + 1.0):  # ssl_handshake_timeout's backstop
                    secure = await asyncio.get_running_loop().start_tls(
                        transport, self, tls, server_side=True, ssl_handshake_timeout=tls_timeout
                    )
            except OSError:  # SSL errors, resets, and the handshake timeout (TimeoutError)
                transport.abort()
                registry.remove(self)
                return
            if secure is None or transport.is_closing():
                registry.remove(self)
                return
            early, self.early = self.early or [], None
            super().connection_made(secure)
            for data in early:
                self.data_received(data)

        def data_received(self, data: bytes) -> None:
            if self.early is not None:
                self.early.append(data)
                return
            if self.transport.get_write_buffer_size() > registry.write_limit:
                registry.drop(self, "not_reading")
                return
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            registry.remove(self)
            if self.early is None:  # the library's side exists only once TLS is up
                super().connection_lost(exc)

    return TrackedConnection
