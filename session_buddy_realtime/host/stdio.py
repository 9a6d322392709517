"""``session-buddy-realtime mcp``: a stdio MCP server that plays the Session-Buddy host.

It does what a host does: opens the skills database with aiosqlite, loads plugins
through the ``session_buddy`` entry points, lets them register tools, runs their
``startup`` hooks (auto-start) and, on exit, their ``shutdown`` hooks before closing the
database. Only protocol messages go to stdout; logs go to stderr.
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
    """Open the skills database read-write as a host does; None (logged) if it is missing."""
    if not path.is_file():  # noqa: ASYNC240 - one stat at launch
        logger.error("skills database not found: %s (realtime tools will report it)", path)
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


async def run_stdio(db_path: Path) -> None:
    """Serve MCP over stdin/stdout until the client closes it."""
    await build_host_server(db_path).run_stdio_async()
