"""The plugin contract of Session-Buddy hosts (project name ``session_buddy``).

A host calls these hooks through ``session_buddy_realtime.host``; a plugin implements
any of them with ``HookimplMarker("session_buddy")`` and may accept fewer arguments than
listed here, so that hooks can grow.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from session_buddy_realtime.host import HostContext

__all__ = ["PROJECT", "hookspec", "register_tools", "shutdown", "startup"]

PROJECT = "session_buddy"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def register_tools(mcp: Any, host: HostContext) -> None:
    """Add MCP tools to the host's server. Called once, before the server runs; return None.

    :param mcp: The host's MCP server; anything with the ``tool(...)`` decorator factory
        (mcp's ``MCPServer`` or ``FastMCP``, or the standalone FastMCP).
    :param host: The host context; its database may not be open yet.
    """


@hookspec
def startup(host: HostContext) -> Awaitable[None] | None:
    """Called once when the host launches, after its database is open.

    Return None, or an awaitable that the host awaits (this is where auto-start happens).

    :param host: The host context, with ``db`` open.
    """


@hookspec
def shutdown(host: HostContext) -> Awaitable[None] | None:
    """Called once when the host stops, before it closes its database.

    Return None, or an awaitable that the host awaits.

    :param host: The host context.
    """
