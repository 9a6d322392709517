"""Plain HTTP requests over a raw socket: exactly the bytes a test writes, nothing added."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from session_buddy_realtime.stream.gate import ConnectionRegistry, HandshakeGate
from session_buddy_realtime.stream.router import HttpRouter
from tests.conftest import UNIT


@dataclass
class HttpReply:
    """A response as it came off the socket."""

    status: int
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def text(self) -> str:
        return self.body.decode()


async def http_request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    host: str | None = None,
) -> HttpReply:
    """Send one request to 127.0.0.1:``port`` and read the response until the server closes."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(40 * UNIT):
            data = await reader.read()  # every response closes the connection
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return HttpReply(int(status_line.split()[1]), parsed, body)


def bare_router() -> HttpRouter:
    """A router without routes, behind a gate that checks the Host header (loopback)."""
    gate = HandshakeGate(
        registry=ConnectionRegistry(),
        max_connections=10,
        max_connections_per_ip=10,
        token=None,
        allowed_origins=set(),
        check_host_header=True,
        bound_host="127.0.0.1",
    )
    return HttpRouter(gate)
