"""``session-buddy-realtime mcp``: a stdio MCP server that plays the Session-Buddy host.

It does what a host does: opens the skills database with aiosqlite, loads plugins
through the ``session_buddy`` entry points, lets them register tools, runs their
``startup`` hooks (auto-start) and, on exit, their ``shutdown`` hooks before closing the
database. A database that does not exist yet is not opened (nor created): plugins get
only its path, and the stream waits for the file. Only protocol messages go to stdout;
logs go to stderr.
"""

from __future__ import annotations

import inspect
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite

from session_buddy_realtime._version import __version__
from session_buddy_realtime.hookspecs import HostContext
from session_buddy_realtime.host.plugins import PluginHost
from session_buddy_realtime.host.stdio_channel import serve_until_signal

__all__ = ["build_host_server", "run_stdio"]

logger = logging.getLogger(__name__)

SERVER_NAME = "session-buddy-realtime"


def _server_class() -> Any:
    try:
        from mcp.server.mcpserver import MCPServer
    except ImportError:  # mcp 1.x
        from mcp.server.fastmcp import FastMCP  # type: ignore[attr-defined,unused-ignore]

        return FastMCP
    return MCPServer


async def open_host_database(path: Path) -> aiosqlite.Connection | None:
    """Open the skills database read-write as a host does; None (logged) if it is missing.

    A missing file is not created: plugins then have ``db_path`` only, and the stream
    waits for the file to appear (Session-Buddy creates it on first use).
    """
    if not path.is_file():  # noqa: ASYNC240 - one stat at launch
        logger.info(
            "skills database %s does not exist yet; the realtime stream waits for it",
            path.absolute(),  # noqa: ASYNC240 - no I/O
        )
        return None
    try:
        uri = f"file:{quote(str(path.resolve()))}?mode=rw"  # noqa: ASYNC240 - at launch
        return await aiosqlite.connect(uri, uri=True)
    except sqlite3.Error as exc:
        logger.error("cannot open skills database %s: %s", path, exc)
        return None


def build_host_server(db_path: Path, settings: Mapping[str, str] | None = None) -> Any:
    """Return an MCP server with the installed plugins' tools and a host lifespan."""
    host = HostContext(db_path=db_path, settings=dict(os.environ if settings is None else settings))
    plugins = PluginHost(host)

    @asynccontextmanager
    async def lifespan(_server: Any) -> AsyncIterator[dict[str, Any]]:
        db = await open_host_database(db_path)
        try:
            async with plugins.lifespan(db):
                yield {"host": host}
        finally:
            if db is not None:
                await db.close()

    server_class = _server_class()
    extra: dict[str, Any] = {}
    if "version" in inspect.signature(server_class).parameters:  # mcp 2.x
        extra["version"] = __version__
    server = server_class(
        SERVER_NAME,
        instructions="Live Session-Buddy skill metrics: start, stop and inspect the "
        "realtime WebSocket stream, or read a snapshot.",
        lifespan=lifespan,
        **extra,
    )
    plugins.register_tools(server)
    logger.info("session-buddy-realtime %s host ready (database %s)", __version__, db_path)
    return server


def run_stdio(db_path: Path) -> int:
    """Serve MCP over stdin/stdout until the client closes it, or SIGINT or SIGTERM.

    A signal ends the input, so the server stops as if the client had closed stdin: the
    shutdown hooks run and the database is closed. Returns the exit status.
    """
    return serve_until_signal(build_host_server(db_path).run_stdio_async)
