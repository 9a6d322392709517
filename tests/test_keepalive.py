"""Keepalive: pings only for connections that receive nothing; the kernel watches the rest."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct

from tests.conftest import ServerFactory, raw_websocket

PING, CLOSE, TEXT = 0x9, 0x8, 0x1


async def _frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(length)


def _masked_text(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def _frames_for(reader: asyncio.StreamReader, seconds: float) -> list[tuple[int, bytes]]:
    frames: list[tuple[int, bytes]] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                frames.append(await _frame(reader))
    except (TimeoutError, asyncio.IncompleteReadError):  # the window ended, or the connection
        pass
    return frames


async def test_subscribers_fed_every_tick_are_not_pinged(start_server: ServerFactory) -> None:
    """A subscriber that gets an update every tick is never pinged, so one that would not
    answer pings stays connected: its updates keep its connection watched by the kernel."""
    server = await start_server(update_interval=0.05, ping_interval=0.2, ping_timeout=0.2)
    reader, writer = await raw_websocket(server.port)
    try:
        frames = await _frames_for(reader, 1.0)  # five ping intervals
        opcodes = [opcode for opcode, _ in frames]
        assert opcodes.count(TEXT) >= 10
        assert PING not in opcodes
        assert CLOSE not in opcodes
        assert server.status()["client_count"] == 1
    finally:
        writer.close()


async def test_an_unsubscribed_client_is_pinged_and_closed_when_silent(
    start_server: ServerFactory,
) -> None:
    """A connection that receives nothing (unsubscribed) is pinged, and closed with 1011
    when it does not answer."""
    server = await start_server(update_interval=0.05, ping_interval=0.2, ping_timeout=0.2)
    reader, writer = await raw_websocket(server.port)
    try:
        writer.write(_masked_text(json.dumps({"type": "unsubscribe"})))
        frames = await _frames_for(reader, 2.0)
        opcodes = [opcode for opcode, _ in frames]
        assert PING in opcodes
        assert opcodes[-1] == CLOSE
        code = int.from_bytes(frames[-1][1][:2], "big")
        assert code == 1011
    finally:
        writer.close()


async def test_accepted_sockets_let_the_kernel_drop_dead_peers(
    start_server: ServerFactory,
) -> None:
    """Every accepted socket gives up on a peer that acknowledges nothing for
    ping_interval + ping_timeout (TCP_USER_TIMEOUT), and probes idle ones (TCP keepalive)."""
    server = await start_server(ping_interval=20.0, ping_timeout=20.0)
    _, writer = await raw_websocket(server.port)
    try:
        running = server._running  # the server's side of the socket; nothing public shows it
        assert running is not None
        [connection] = running.registry.connections
        sock = connection.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 40_000
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 20
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
    finally:
        writer.close()
    quiet = await start_server(ping_interval=20.0, ping_timeout=None)
    _, writer = await raw_websocket(quiet.port)
    try:
        running = quiet._running
        assert running is not None
        [connection] = running.registry.connections
        sock = connection.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
    finally:
        writer.close()
