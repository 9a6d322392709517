"""In-process MCP client sessions against whichever MCP server kinds are installed.

The same tests run on mcp's own server class (``MCPServer`` on mcp 2.x, ``FastMCP`` on
mcp 1.x) and on the standalone FastMCP (3.x or 4.x), each through a real client session.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

SERVER_KINDS = ["mcp"] + (["fastmcp"] if importlib.util.find_spec("fastmcp") else [])


def make_mcp_server(kind: str) -> Any:
    """A bare MCP server of the given kind, named like a host."""
    if kind == "fastmcp":
        from fastmcp import FastMCP

        return FastMCP("test-host")
    try:
        from mcp.server.mcpserver import MCPServer
    except ImportError:
        from mcp.server.fastmcp import FastMCP as MCPServer
    return MCPServer("test-host")


@dataclass
class ToolResult:
    is_error: bool
    structured: dict[str, Any] | None
    text: str


class Session:
    """A connected MCP client with the two calls the tests need, as wire-format dicts."""

    def __init__(self, client: Any, *, fastmcp: bool) -> None:
        self._client = client
        self._fastmcp = fastmcp

    async def list_tools(self) -> list[dict[str, Any]]:
        listed = await self._client.list_tools()
        tools = listed if isinstance(listed, list) else listed.tools
        return [tool.model_dump(by_alias=True, exclude_none=True) for tool in tools]

    async def call(self, name: str, arguments: dict[str, Any] | None = None) -> ToolResult:
        if self._fastmcp:
            result = await self._client.call_tool_mcp(name, arguments or {})
        else:
            result = await self._client.call_tool(name, arguments or {})
        wire = result.model_dump(by_alias=True)
        text = " ".join(item.get("text", "") for item in wire.get("content", []))
        return ToolResult(bool(wire.get("isError")), wire.get("structuredContent"), text)


@asynccontextmanager
async def mcp_session(server: Any) -> AsyncIterator[Session]:
    """Open a real client session to ``server`` in this process."""
    if any(cls.__module__.split(".")[0] == "fastmcp" for cls in type(server).__mro__):
        from fastmcp import Client as FastMCPClient

        async with FastMCPClient(server) as client:
            yield Session(client, fastmcp=True)
        return
    try:
        from mcp import Client
    except ImportError:  # mcp 1.x
        from mcp.shared.memory import create_connected_server_and_client_session

        async with create_connected_server_and_client_session(server._mcp_server) as session:
            yield Session(session, fastmcp=False)
        return
    async with Client(server) as client:
        yield Session(client, fastmcp=False)
