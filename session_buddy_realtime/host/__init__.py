"""The host side: what a host runs to load plugins, and what this plugin does inside one.

A host needs only what this package exports: ``HostContext`` (the contract's, from
``hookspecs``), ``PluginHost`` and ``create_plugin_manager`` (``plugins.py``). The rest
is this plugin's own work in a host: ``service.py`` (start, stop, status, snapshot,
auto-start), ``tools.py`` and ``tool_arguments.py`` (the MCP tools and their argument
checks), ``settings.py`` (``SESSION_BUDDY_REALTIME_*``), ``stdio.py``
(``session-buddy-realtime mcp``, a host of its own), ``stdio_channel.py`` (a clean stdout
and signal-endable input for stdio servers), and ``launcher.py`` with ``sessionbuddy.py``
(``session-buddy-realtime run``: the real Session-Buddy as the host).
"""

from __future__ import annotations

from session_buddy_realtime.hookspecs import HostContext, PluginFailure
from session_buddy_realtime.host.plugins import PluginHost, create_plugin_manager, hookimpl

__all__ = ["HostContext", "PluginFailure", "PluginHost", "create_plugin_manager", "hookimpl"]
