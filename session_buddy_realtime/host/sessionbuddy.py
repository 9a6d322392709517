"""Session-Buddy itself as the host: its MCP server object, its lifespan, its database.

Session-Buddy 0.23 has no plugin loader: its tools come from a fixed table. This module
does, from outside, what a loader inside it would do (``docs/integration.md`` shows the
same few lines as a change to Session-Buddy): add the plugins' tools to its server
object, run their ``startup``/``shutdown`` hooks inside its lifespan, and hand them its
skills database. Every fact about Session-Buddy's code that this relies on is checked
first; ``NotShapedAsExpected`` says which one did not hold.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final

from session_buddy_realtime.hookspecs import HostContext
from session_buddy_realtime.host.plugins import PluginHost
from session_buddy_realtime.host.settings import PREFIX
from session_buddy_realtime.host.stdio_channel import serve_until_signal

__all__ = [
    "HTTP_MODULE",
    "STDIO_MODULE",
    "NotShapedAsExpected",
    "attach",
    "find_server",
    "host_context",
    "serve_stdio",
    "session_buddy_version",
]

HTTP_MODULE: Final = "session_buddy.server_optimized"
"""Creates the server object that ``session-buddy start`` serves over HTTP."""
STDIO_MODULE: Final = "session_buddy.server"
"""The module MCP clients launch for stdio (the same object, with more tools)."""
SKILLS_DB: Final = Path(".session-buddy") / "skills.db"
"""Where Session-Buddy's ``SkillsStorage`` keeps the skills, under the working directory."""
_ATTACHED: Final = "_session_buddy_realtime_plugins"


class NotShapedAsExpected(Exception):
    """The installed Session-Buddy is not the one this module knows; the message says why."""


def session_buddy_version() -> str | None:
    """The installed Session-Buddy's version, or None when it is not installed."""
    try:
        return version("session-buddy")
    except PackageNotFoundError:
        return None


def find_server(module_name: str) -> Any:
    """Import ``module_name`` and return its ``mcp`` server object, checked.

    Raises:
        NotShapedAsExpected: the module, its ``mcp`` object, the ``tool`` decorator or
            the lifespan it runs is not where Session-Buddy 0.23 has them.
    """
    found = session_buddy_version()
    if found is None:
        raise NotShapedAsExpected("Session-Buddy is not installed in this Python environment")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure means "not the Session-Buddy we know"
        raise NotShapedAsExpected(
            f"Session-Buddy {found}: importing {module_name} failed ({exc!r})"
        ) from exc
    server = getattr(module, "mcp", None)
    if server is None or not callable(getattr(server, "tool", None)):
        raise NotShapedAsExpected(
            f"Session-Buddy {found}: {module_name} has no MCP server object 'mcp' with tool()"
        )
    if not callable(getattr(server, "add_provider", None)):
        raise NotShapedAsExpected(
            f"Session-Buddy {found}: its server object {type(server).__name__} has no "
            f"add_provider() for a lifespan of the plugins (FastMCP 3 has)"
        )
    return server


def host_context(environ: Mapping[str, str], cwd: Path) -> HostContext:
    """The host context of a Session-Buddy process started in ``cwd``.

    The database is the path Session-Buddy's storage uses; it opens its own connections
    per call and keeps none open, so there is none to share. Session-Buddy's
    ``websocket_port`` setting (8677) becomes the stream's port unless
    ``SESSION_BUDDY_REALTIME_PORT`` says otherwise, and its ``http_port`` (8678) is never
    taken by the stream, not even as a fallback.
    """
    settings = dict(environ)
    ours = _session_buddy_settings()
    websocket_port = _port(getattr(ours, "websocket_port", None))
    if not settings.get(PREFIX + "PORT", "").strip() and websocket_port is not None:
        settings[PREFIX + "PORT"] = str(websocket_port)
    http_port = _port(getattr(ours, "http_port", None))
    return HostContext(
        db_path=cwd / SKILLS_DB,
        settings=settings,
        host_ports=frozenset(() if http_port is None else (http_port,)),
    )


def _session_buddy_settings() -> object:
    """Session-Buddy's own CLI settings object, or None when this version has none."""
    try:
        return importlib.import_module("session_buddy.cli").SessionBuddySettings()
    except Exception:  # not there in this version: keep our own defaults
        return None


def _port(value: object) -> int | None:
    return value if isinstance(value, int) and 0 < value < 65536 else None


def attach(server: Any, host: HostContext) -> PluginHost:
    """Add the plugins' tools to ``server`` and run their hooks inside its lifespan.

    The lifespan comes through FastMCP's public ``add_provider()``: a provider with no
    components whose lifespan is the plugins'. FastMCP enters providers' lifespans after
    the server's own, so the plugins start once Session-Buddy's lifespan has started and
    stop before it ends. Attaching twice is harmless (the first plugin host is returned).
    """
    attached = getattr(server, _ATTACHED, None)
    if isinstance(attached, PluginHost):
        return attached
    plugins = PluginHost(host)
    plugins.register_tools(server)
    server.add_provider(_plugins_provider(plugins))
    setattr(server, _ATTACHED, plugins)
    return plugins


def _plugins_provider(plugins: PluginHost) -> Any:
    from fastmcp.server.providers import Provider

    class PluginsLifespan(Provider):
        """Provides nothing but the plugins' lifespan (startup and shutdown hooks)."""

        @asynccontextmanager
        async def lifespan(self) -> AsyncIterator[None]:
            async with plugins.lifespan():
                yield

    return PluginsLifespan()


def serve_stdio(server: Any) -> int:
    """Serve ``server`` (attached) over stdio until the client closes stdin, or a signal."""
    return serve_until_signal(lambda: server.run_stdio_async(show_banner=False))
