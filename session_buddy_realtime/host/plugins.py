"""Loading plugins and calling their hooks: what Session-Buddy (or any host) calls.

A host builds a ``PluginHost`` once, lets plugins add their tools to its MCP server, and
runs ``lifespan()`` around its life::

    plugins = PluginHost(HostContext(db_path=path, settings=os.environ))
    plugins.register_tools(mcp)
    async with plugins.lifespan(db):   # startup hooks, then shutdown hooks
        ...

A plugin that fails to load or raises in any hook is logged with its name and skipped;
the host and the other plugins carry on. Failures are kept in ``HostContext.plugin_errors``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from importlib.metadata import entry_points
from typing import Any

import pluggy

from session_buddy_realtime import hookspecs
from session_buddy_realtime.data.connection import HostConnection
from session_buddy_realtime.hookspecs import PROJECT, HostContext, PluginFailure

__all__ = ["PluginHost", "create_plugin_manager", "hookimpl"]

logger = logging.getLogger(__name__)

hookimpl = pluggy.HookimplMarker(PROJECT)


def create_plugin_manager(
    *, load_entry_points: bool = True, plugins: Iterable[object] = ()
) -> tuple[pluggy.PluginManager, list[PluginFailure]]:
    """Return a plugin manager with the hookspecs, ``plugins`` and installed plugins.

    Installed plugins are those of the ``session_buddy`` entry-point group. One that
    fails to import is logged and reported in the returned list, not raised.
    """
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    for plugin in plugins:
        manager.register(plugin)
    failures: list[PluginFailure] = []
    if load_entry_points:
        for entry in entry_points(group=PROJECT):
            if manager.has_plugin(entry.name):
                continue
            try:
                loaded = entry.load()
                if not manager.is_registered(loaded):
                    manager.register(loaded, name=entry.name)
            except Exception as exc:  # a broken plugin must not stop the host
                logger.exception("plugin %s failed to load", entry.name)
                failures.append(PluginFailure(entry.name, "load", repr(exc)))
    return manager, failures


class PluginHost:
    """Calls each plugin's hooks one by one, so that one failing plugin skips only itself.

    Args:
        host: The context handed to every hook.
        manager: A plugin manager; by default one with the installed plugins.
    """

    def __init__(self, host: HostContext, manager: pluggy.PluginManager | None = None) -> None:
        self.host = host
        if manager is None:
            manager, failures = create_plugin_manager()
            host.plugin_errors.extend(failures)
        self.manager = manager
        self._entered = 0

    def register_tools(self, mcp: Any) -> None:
        """Run every ``register_tools`` hook on ``mcp``."""
        for name, function, kwargs in self._calls("register_tools", mcp=mcp, host=self.host):
            try:
                function(**kwargs)
            except Exception as exc:
                self._failed(name, "register_tools", exc)

    async def startup(self) -> None:
        """Run every ``startup`` hook, awaiting what it returns."""
        await self._run_async("startup")

    async def shutdown(self) -> None:
        """Run every ``shutdown`` hook, awaiting what it returns."""
        await self._run_async("shutdown")

    @asynccontextmanager
    async def lifespan(self, db: HostConnection | None = None) -> AsyncIterator[HostContext]:
        """Run ``startup`` on the first entry and ``shutdown`` on the last exit.

        Some servers enter their lifespan once per client session (mcp 1.x ``FastMCP``
        over HTTP); nesting is counted, so the hooks still run once for the host.

        Args:
            db: The host's open database connection, stored in ``host.db`` first.
        """
        # The first entry's connection is the one plugins keep using.
        if db is not None and self._entered == 0:
            self.host.db = db
        self._entered += 1
        try:
            if self._entered == 1:
                await self.startup()
            yield self.host
        finally:
            self._entered -= 1
            if self._entered == 0:
                await self.shutdown()

    async def _run_async(self, hook: str) -> None:
        for name, function, kwargs in self._calls(hook, host=self.host):
            try:
                result = function(**kwargs)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                self._failed(name, hook, exc)

    def _calls(self, hook: str, **available: Any) -> list[tuple[str, Any, dict[str, Any]]]:
        caller = getattr(self.manager.hook, hook)
        calls = []
        # pluggy calls the last registered implementation first; keep that order.
        for impl in reversed(caller.get_hookimpls()):
            kwargs = {arg: available[arg] for arg in impl.argnames}
            calls.append((impl.plugin_name, impl.function, kwargs))
        return calls

    def _failed(self, plugin: str, hook: str, exc: Exception) -> None:
        logger.error("plugin %s failed in %s: %r (skipped)", plugin, hook, exc, exc_info=exc)
        self.host.plugin_errors.append(PluginFailure(plugin, hook, repr(exc)))
