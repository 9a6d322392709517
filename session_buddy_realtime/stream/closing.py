"""Closing a listener and all its connections at once, within one deadline."""

from __future__ import annotations

import asyncio

from session_buddy_realtime.stream.gate import ConnectionRegistry, drop
from session_buddy_realtime.stream.listener import Listener, going_away

__all__ = ["close_listener"]


async def close_listener(
    listener: Listener,
    registry: ConnectionRegistry,
    *,
    max_buffered_bytes: int,
    close_timeout: float,
) -> None:
    """Close ``listener`` and every connection in ``registry`` within ``close_timeout``.

    Connections still in the handshake (TLS or WebSocket), and clients so far behind that
    a close frame would wait behind their backlog, are dropped at once; the rest get 1001,
    all written in one pass.
    Whoever has not finished the closing handshake in ``close_timeout`` (a stuck client
    cannot even receive the close frame) is dropped too.
    """
    # First: no new connection, and no closing handshake gets a deadline of its own
    # (``Connection.send_data``): the one below covers them all.
    listener.close(close_connections=False)
    connections = registry.connections
    for connection in list(connections):
        if connection.opening:
            connection.transport.abort()
        elif connection.transport.get_write_buffer_size() > max_buffered_bytes:
            drop(connection)  # reset: its backlog is discarded, not sent first
    if registry.tls_handshakes:
        await asyncio.gather(*registry.tls_handshakes, return_exceptions=True)
    # Every close frame now, from here, with one deadline for all.
    for connection in list(connections):
        going_away(connection)
    try:
        async with asyncio.timeout(close_timeout):
            await listener.wait_closed()
    except TimeoutError:
        for connection in list(connections):
            connection.transport.abort()
        await listener.wait_closed()
