"""The Session-Buddy plugin: thin hook implementations over ``RealtimeService``.

Installed as the ``realtime`` entry point of the ``session_buddy`` group, so a host that
loads its plugins through entry points finds it without configuration.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from session_buddy_realtime.host import HostContext, hookimpl
from session_buddy_realtime.host.service import service_for
from session_buddy_realtime.host.tools import register_tools as add_tools

__all__ = ["register_tools", "shutdown", "startup"]


@hookimpl
def register_tools(mcp: Any, host: HostContext) -> None:
    """Add the realtime_* tools to the host's MCP server."""
    add_tools(mcp, service_for(host))


@hookimpl
def startup(host: HostContext) -> Awaitable[None]:
    """Auto-start the server if SESSION_BUDDY_REALTIME_AUTOSTART allows it (default on)."""
    return service_for(host).autostart()


@hookimpl
async def shutdown(host: HostContext) -> None:
    """Stop the server, closing its clients; the host's connection stays open."""
    await service_for(host).stop()
