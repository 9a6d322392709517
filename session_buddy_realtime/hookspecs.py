"""The plugin contract of Session-Buddy hosts (project name ``session_buddy``).

A host calls these hooks through ``session_buddy_realtime.host``; a plugin implements
any of them with ``HookimplMarker("session_buddy")`` and may accept fewer arguments than
listed here, so that hooks can grow. ``HostContext`` is what every hook is given. This
file imports nothing else of this package.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import pluggy

__all__ = [
    "PROJECT",
    "HostContext",
    "PluginFailure",
    "hookspec",
    "register_tools",
    "shutdown",
    "startup",
]

PROJECT = "session_buddy"
hookspec = pluggy.HookspecMarker(PROJECT)


@dataclass(frozen=True, slots=True)
class PluginFailure:
    """A plugin that could not load, or raised in a hook."""

    plugin: str
    hook: str
    error: str


@dataclass(eq=False)
class HostContext:
    """What a host hands to plugins.

    Attributes:
        db: The host's open skills-database connection: an ``aiosqlite.Connection``, or a
            synchronous ``sqlite3.Connection`` opened with ``check_same_thread=False`` (as
            Session-Buddy's ``SkillsStorage`` opens it). Plugins only read it, never close
            it. None until the host opened it, or when it has none yet.
        db_path: Where that database lives, if known (it may not exist yet).
        settings: Environment-style settings (``SESSION_BUDDY_REALTIME_PORT`` and so on).
        host_ports: Ports the host itself listens on (Session-Buddy: 8678); plugins never
            take them, not even when looking for a free port.
        state: Per-host state for plugins, keyed by plugin name; nothing global.
        plugin_errors: Every plugin failure so far, for status displays.
    """

    db: aiosqlite.Connection | sqlite3.Connection | None = None
    db_path: Path | None = None
    settings: Mapping[str, str] = field(default_factory=dict)
    host_ports: frozenset[int] = frozenset()
    state: dict[str, Any] = field(default_factory=dict)
    plugin_errors: list[PluginFailure] = field(default_factory=list)


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

    :param host: The host context, with ``db`` open if the host has a connection (else
        ``db_path`` names the database, which may not exist yet).
    """


@hookspec
def shutdown(host: HostContext) -> Awaitable[None] | None:
    """Called once when the host stops, before it closes its database.

    Return None, or an awaitable that the host awaits.

    :param host: The host context.
    """
