"""The pluggy contract, the host helper, auto-start and settings."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from importlib.metadata import entry_points
from typing import Any

import aiosqlite
import pluggy
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from session_buddy_realtime import __version__, hookspecs, plugin
from session_buddy_realtime.errors import ConfigError, PortInUseError
from session_buddy_realtime.host import HostContext, PluginHost, create_plugin_manager, hookimpl
from session_buddy_realtime.host.service import service_for
from session_buddy_realtime.host.settings import RealtimeSettings, load_settings
from session_buddy_realtime.host.tools import TOOL_NAMES
from session_buddy_realtime.protocol import WELCOME_TEXT
from tests.conftest import Client, SkillsDB
from tests.mcp_support import make_mcp_server, mcp_session

LOOPBACK = {"SESSION_BUDDY_REALTIME_HOST": "127.0.0.1", "SESSION_BUDDY_REALTIME_PORT": "0"}


@pytest.fixture
async def host_db(skills_db: SkillsDB) -> AsyncIterator[aiosqlite.Connection]:
    """The host's own connection to a skills database with one skill."""
    skills_db.record("pytest-run", count=3)
    async with aiosqlite.connect(skills_db.path) as db:
        yield db


def fresh_manager(*plugins: object) -> pluggy.PluginManager:
    """A new PluginManager('session_buddy') with the hookspecs and ``plugins``, checked."""
    manager = pluggy.PluginManager("session_buddy")
    manager.add_hookspecs(hookspecs)
    for item in plugins:
        manager.register(item)
    manager.check_pending()
    return manager


class Recorder:
    """A well-behaved plugin that records what it was called with."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def register_tools(self, mcp: Any) -> None:  # fewer arguments than the spec
        self.calls.append("register_tools")

        @mcp.tool(name="recorder_ping", description="Answer pong.")
        async def recorder_ping() -> str:
            return "pong"

    @hookimpl
    async def startup(self, host: HostContext) -> None:
        self.calls.append(f"startup db={host.db is not None}")

    @hookimpl
    def shutdown(self) -> None:
        self.calls.append("shutdown")


class Broken:
    """A plugin that raises in every hook."""

    @hookimpl
    def register_tools(self, mcp: Any, host: HostContext) -> None:
        raise RuntimeError("cannot register")

    @hookimpl
    def startup(self, host: HostContext) -> None:
        raise RuntimeError("cannot start")

    @hookimpl
    async def shutdown(self, host: HostContext) -> None:
        raise RuntimeError("cannot stop")


def test_installed_package_exposes_the_entry_point() -> None:
    """Installing the package is enough: the session_buddy group names this plugin."""
    [entry] = [e for e in entry_points(group="session_buddy") if e.name == "realtime"]
    assert entry.load() is plugin
    manager, failures = create_plugin_manager()
    manager.check_pending()
    assert failures == []
    assert manager.get_plugin("realtime") is plugin


def test_hookspecs_are_the_contract() -> None:
    """The three hooks exist under the project name and the plugin implements them all."""
    manager = fresh_manager(plugin)
    assert manager.project_name == "session_buddy"
    names = {impl.plugin_name for impl in manager.hook.startup.get_hookimpls()}
    assert names == {manager.get_name(plugin)}
    for hook in ("register_tools", "startup", "shutdown"):
        assert getattr(manager.hook, hook).spec is not None


async def test_host_runs_hooks_in_order_and_awaits_what_they_return(
    host_db: aiosqlite.Connection,
) -> None:
    """register_tools, then startup after the DB is open (awaited), then shutdown."""
    recorder = Recorder()
    host = HostContext(settings={"SESSION_BUDDY_REALTIME_AUTOSTART": "0"})
    plugins = PluginHost(host, fresh_manager(recorder, plugin))
    server = make_mcp_server("mcp")
    plugins.register_tools(server)
    async with plugins.lifespan(host_db), mcp_session(server) as session:
        tools = {tool["name"] for tool in await session.list_tools()}
        assert recorder.calls == ["register_tools", "startup db=True"]
    assert recorder.calls[-1] == "shutdown"
    assert tools == {*TOOL_NAMES, "recorder_ping"}


async def test_a_plugin_that_raises_is_logged_and_skipped(
    host_db: aiosqlite.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A plugin raising in every hook is logged with its name; the host and the other
    plugins work, and the failures show in realtime_status."""
    host = HostContext(settings=LOOPBACK)
    manager = fresh_manager(plugin)
    manager.register(Broken(), name="broken-plugin")
    plugins = PluginHost(host, manager)
    server = make_mcp_server("mcp")
    with caplog.at_level(logging.ERROR, logger="session_buddy_realtime.host"):
        plugins.register_tools(server)
        async with plugins.lifespan(host_db), mcp_session(server) as session:
            status = await session.call("realtime_status")
    assert status.structured is not None
    assert status.structured["running"] is True, "auto-start still happened"
    assert [f.hook for f in host.plugin_errors] == ["register_tools", "startup", "shutdown"]
    assert all(f.plugin == "broken-plugin" for f in host.plugin_errors)
    assert any("broken-plugin" in line for line in status.structured["plugin_errors"])
    logged = [r.getMessage() for r in caplog.records]
    assert sum("plugin broken-plugin failed in" in line for line in logged) == 3


async def test_plugin_that_fails_to_import_does_not_stop_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An entry point whose import fails is reported and skipped; ours still loads."""

    class BadEntry:
        name = "exploding"

        def load(self) -> object:
            raise ImportError("missing dependency")

    real = entry_points(group="session_buddy")
    monkeypatch.setattr(
        "session_buddy_realtime.host.plugins.entry_points", lambda group: [BadEntry(), *real]
    )
    manager, failures = create_plugin_manager()
    assert [(f.plugin, f.hook) for f in failures] == [("exploding", "load")]
    assert manager.get_plugin("realtime") is plugin


async def test_autostart_on_launch_serves_the_hosts_data(host_db: aiosqlite.Connection) -> None:
    """With default settings the startup hook starts the server on the host's connection."""
    host = HostContext(settings=LOOPBACK)
    plugins = PluginHost(host, fresh_manager(plugin))
    async with plugins.lifespan(host_db):
        status = service_for(host).status()
        assert status["running"] is True
        assert status["autostart"] == {"enabled": True, "outcome": "started"}
        async with connect(status["urls"][0]) as ws:
            welcome = await Client(ws).recv()
            assert welcome["type"] == "connected"
    assert service_for(host).status()["running"] is False


async def test_autostart_can_be_turned_off(host_db: aiosqlite.Connection) -> None:
    """SESSION_BUDDY_REALTIME_AUTOSTART=0 leaves the server stopped and says so."""
    host = HostContext(settings={**LOOPBACK, "SESSION_BUDDY_REALTIME_AUTOSTART": "off"})
    async with PluginHost(host, fresh_manager(plugin)).lifespan(host_db):
        status = service_for(host).status()
    assert status["running"] is False
    assert status["autostart"] == {"enabled": False, "outcome": "disabled"}


async def test_autostart_next_port_when_another_instance_serves(
    host_db: aiosqlite.Connection,
) -> None:
    """A second host whose port is held by the first one's server listens on the next port
    and its status says another instance serves the first."""
    first = HostContext(settings=LOOPBACK)
    async with PluginHost(first, fresh_manager(plugin)).lifespan(host_db):
        port = service_for(first).status()["port"]
        second = HostContext(settings={**LOOPBACK, "SESSION_BUDDY_REALTIME_PORT": str(port)})
        async with PluginHost(second, fresh_manager(plugin)).lifespan(host_db):
            status = service_for(second).status()
    assert status["running"] is True
    assert status["requested_port"] == port
    assert status["port"] != port
    assert f"another session-buddy-realtime instance ({__version__}) is serving" in status["note"]
    assert f"listening on port {status['port']} instead" in status["note"]
    assert status["port_holder"] == {
        "port": port,
        "kind": "session-buddy-realtime",
        "server_version": __version__,
    }


async def test_the_hosts_own_ports_are_never_taken(host_db: aiosqlite.Connection) -> None:
    """A port in HostContext.host_ports is skipped by the fallback (the next free one is
    used, the attempts not reduced) and refused by name when asked for."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        hosts = frozenset({taken + 1})
        host = HostContext(
            settings={
                **LOOPBACK,
                "SESSION_BUDDY_REALTIME_PORT": str(taken),
                "SESSION_BUDDY_REALTIME_PORT_ATTEMPTS": "2",
            },
            host_ports=hosts,
        )
        async with PluginHost(host, fresh_manager(plugin)).lifespan(host_db):
            status = service_for(host).status()
            await service_for(host).stop()
            with pytest.raises(PortInUseError, match=f"port {taken + 1} is the host's own"):
                await service_for(host).start(port=taken + 1)
    assert status["running"] is True, status["autostart"]
    assert status["port"] == taken + 2


async def test_autostart_tells_session_buddys_own_realtime_server_from_ours(
    host_db: aiosqlite.Connection,
) -> None:
    """A port held by a server sending Session-Buddy 0.23's own welcome (our welcome text, no
    server_version) is reported as Session-Buddy's own realtime server, in the note and in
    port_holder."""

    async def session_buddy_welcome(ws: ServerConnection) -> None:
        # The welcome of session_buddy/realtime/websocket_server.py in Session-Buddy 0.23.
        await ws.send(
            json.dumps(
                {
                    "type": "connected",
                    "message": WELCOME_TEXT,
                    "authenticated": False,
                    "timestamp": "2026-12-02T00:00:00+00:00",
                }
            )
        )
        await ws.wait_closed()

    async with serve(session_buddy_welcome, "127.0.0.1", 0) as theirs:
        port = theirs.sockets[0].getsockname()[1]
        host = HostContext(settings={**LOOPBACK, "SESSION_BUDDY_REALTIME_PORT": str(port)})
        async with PluginHost(host, fresh_manager(plugin)).lifespan(host_db):
            status = service_for(host).status()
    assert status["running"] is True
    assert status["port"] != port
    assert f"Session-Buddy's own realtime server is serving ws://127.0.0.1:{port}" in status["note"]
    assert status["port_holder"] == {"port": port, "kind": "session-buddy", "server_version": None}


async def test_autostart_with_every_port_taken_never_fails_the_launch(
    host_db: aiosqlite.Connection,
) -> None:
    """When the only port allowed is taken by another program, the host still launches and
    the status explains why the server is not running."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        host = HostContext(
            settings={
                **LOOPBACK,
                "SESSION_BUDDY_REALTIME_PORT": str(port),
                "SESSION_BUDDY_REALTIME_PORT_ATTEMPTS": "1",
            }
        )
        async with PluginHost(host, fresh_manager(plugin)).lifespan(host_db):
            status = service_for(host).status()
    assert status["running"] is False
    assert status["autostart"]["outcome"].startswith("failed")
    assert f"port {port}" in status["autostart"]["outcome"]
    assert host.plugin_errors == []


async def test_bad_setting_fails_startup_naming_it_but_host_continues(
    host_db: aiosqlite.Connection,
) -> None:
    """A bad SESSION_BUDDY_REALTIME_PORT is reported by name; the host still serves tools."""
    host = HostContext(settings={"SESSION_BUDDY_REALTIME_PORT": "http"})
    plugins = PluginHost(host, fresh_manager(plugin))
    server = make_mcp_server("mcp")
    plugins.register_tools(server)
    async with plugins.lifespan(host_db), mcp_session(server) as session:
        status = await session.call("realtime_status")
        start = await session.call("realtime_start", {})
    assert status.structured is not None
    assert status.structured["running"] is False
    assert "SESSION_BUDDY_REALTIME_PORT" in status.structured["plugin_errors"][0]
    assert start.is_error
    assert "SESSION_BUDDY_REALTIME_PORT" in start.text


async def test_shutdown_closes_connected_clients_and_keeps_the_hosts_db(
    host_db: aiosqlite.Connection,
) -> None:
    """The shutdown hook closes dashboards with 1001 and leaves the host's connection open."""
    host = HostContext(settings=LOOPBACK)
    async with PluginHost(host, fresh_manager(plugin)).lifespan(host_db):
        url = service_for(host).status()["urls"][0]
        clients = [await connect(url) for _ in range(3)]
    for ws in clients:
        await ws.wait_closed()
        assert ws.close_code == 1001
    async with host_db.execute("SELECT COUNT(*) FROM skill_invocation") as cursor:
        assert await cursor.fetchone() == (3,)


def test_settings_defaults_and_parsing() -> None:
    """Unset variables give the documented defaults; set ones are parsed."""
    assert load_settings({}) == RealtimeSettings()
    assert RealtimeSettings().autostart is True
    parsed = load_settings(
        {
            "SESSION_BUDDY_REALTIME_AUTOSTART": "No",
            "SESSION_BUDDY_REALTIME_HOST": "0.0.0.0",  # noqa: S104 - parsing only
            "SESSION_BUDDY_REALTIME_PORT": "9000",
            "SESSION_BUDDY_REALTIME_INTERVAL": "0.5",
            "UNRELATED": "x",
        }
    )
    assert (parsed.autostart, parsed.host, parsed.port, parsed.interval) == (
        False,
        "0.0.0.0",  # noqa: S104
        9000,
        0.5,
    )


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("PORT", "99999", "0 to 65535"),
        ("PORT", "eighty", "whole number"),
        ("INTERVAL", "0", "0.05"),
        ("INTERVAL", "nan", "0.05"),
        ("AUTOSTART", "maybe", "true/false"),
        ("HOST", "two words", "host"),
        ("PORT_ATTEMPTS", "0", "1 to 100"),
        ("PROT", "8765", "unknown setting"),
        ("TOKEN", "secret", "at least 8"),
        ("ALLOWED_ORIGINS", "evil.example", "not an origin"),
        ("MESSAGE_RATE", "0", "0.1 to 10000"),
        ("REDIS_URL", "http://user:secret@localhost", "redis://"),
        ("REDIS_URL", "redis://user:secret@", "names no host"),
        ("REDIS_PREFIX", "two words", "letters, digits"),
    ],
)
def test_bad_settings_name_the_variable(name: str, value: str, says: str) -> None:
    """Each invalid or unknown variable raises ConfigError naming it and what is expected."""
    with pytest.raises(ConfigError) as caught:
        load_settings({f"SESSION_BUDDY_REALTIME_{name}": value})
    assert f"SESSION_BUDDY_REALTIME_{name}" in str(caught.value)
    assert says in str(caught.value)
    assert "secret" not in str(caught.value)


async def test_nested_lifespans_run_the_hooks_once(host_db: aiosqlite.Connection) -> None:
    """A server that enters the lifespan per session still gets one startup and one shutdown."""
    recorder = Recorder()
    plugins = PluginHost(HostContext(), fresh_manager(recorder))
    async with plugins.lifespan(host_db):
        async with plugins.lifespan(host_db):
            pass
        assert recorder.calls == ["startup db=True"], "inner exit must not shut down"
    assert recorder.calls == ["startup db=True", "shutdown"]


def test_plugin_given_explicitly_is_not_loaded_twice() -> None:
    """Registering this plugin by hand and loading entry points records no failure."""
    manager, failures = create_plugin_manager(plugins=[plugin])
    assert failures == []
    assert manager.is_registered(plugin)
