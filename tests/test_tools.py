"""The realtime_* MCP tools through a real MCP client session, on every installed server kind."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiosqlite
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from session_buddy_realtime import plugin
from session_buddy_realtime.data.schema import SCHEMA_SQL
from session_buddy_realtime.host import HostContext, PluginHost, create_plugin_manager
from session_buddy_realtime.host.tools import TOOL_NAMES
from tests.conftest import SERVER_MESSAGE, Client, SkillsDB, iso
from tests.mcp_support import SERVER_KINDS, Session, make_mcp_server, mcp_session

LOOPBACK = {"SESSION_BUDDY_REALTIME_HOST": "127.0.0.1", "SESSION_BUDDY_REALTIME_PORT": "0"}


@asynccontextmanager
async def hosted(
    kind: str,
    *,
    db: aiosqlite.Connection | None = None,
    settings: dict[str, str] | None = None,
) -> AsyncIterator[tuple[Session, HostContext]]:
    """A host of the given server kind with only this plugin, launched, with a client."""
    host = HostContext(
        db=db, settings={"SESSION_BUDDY_REALTIME_AUTOSTART": "0", **LOOPBACK, **(settings or {})}
    )
    manager, _ = create_plugin_manager(load_entry_points=False, plugins=[plugin])
    manager.check_pending()
    plugins = PluginHost(host, manager)
    server = make_mcp_server(kind)
    plugins.register_tools(server)
    async with plugins.lifespan(db), mcp_session(server) as session:
        yield session, host


@pytest.fixture
async def host_db(skills_db: SkillsDB) -> AsyncIterator[aiosqlite.Connection]:
    """The host's own read-write connection to a skills database with a few skills."""
    skills_db.record("pytest-run", count=5)
    skills_db.record("ruff-check", count=3)
    async with aiosqlite.connect(skills_db.path) as db:
        yield db


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_tools_are_listed_with_annotations_and_output_schemas(
    kind: str, host_db: aiosqlite.Connection
) -> None:
    """The four tools appear with all four annotations set and a structured output schema."""
    async with hosted(kind, db=host_db) as (session, _):
        tools = {tool["name"]: tool for tool in await session.list_tools()}
    assert set(tools) == set(TOOL_NAMES)
    for name, tool in tools.items():
        hints = tool["annotations"]
        read_only = name in {"realtime_status", "realtime_snapshot"}
        assert hints["readOnlyHint"] is read_only, name
        assert hints["idempotentHint"] is True, name
        assert hints["destructiveHint"] is False, name
        assert hints["openWorldHint"] is False, name
        assert tool["outputSchema"]["type"] == "object", name
        assert tool["description"], name


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_start_connect_status_snapshot_stop(kind: str, host_db: aiosqlite.Connection) -> None:
    """Start, see a dashboard client in the status, snapshot a skill, stop, stop again."""
    async with hosted(kind, db=host_db) as (session, _):
        started = await session.call("realtime_start", {"interval": 0.1})
        assert not started.is_error, started.text
        assert started.structured is not None
        assert started.structured["running"] is True
        [url] = started.structured["urls"]
        again = await session.call("realtime_start", {})
        assert again.structured is not None
        assert again.structured["urls"] == [url], "already running: same server"

        async with connect(url) as ws:
            client = Client(ws)
            await client.recv_type("connected")
            await client.send_json({"type": "subscribe", "skill": "ruff-check"})
            await client.recv_type("subscription_confirmed")
            status = await session.call("realtime_status")
            assert status.structured is not None
            [described] = status.structured["clients"]
            assert described["subscription"] == "ruff-check"
            assert status.structured["database"]["shared_connection"] is True

            snapshot = await session.call("realtime_snapshot", {"skill": "ruff-check"})
            assert snapshot.structured is not None
            SERVER_MESSAGE.validate(snapshot.structured)
            [row] = snapshot.structured["data"]["top_skills"]
            assert (row["skill_name"], row["total_invocations"]) == ("ruff-check", 3)
            everything = await session.call("realtime_snapshot")
            assert everything.structured is not None
            assert len(everything.structured["data"]["top_skills"]) == 2

            stopped = await session.call("realtime_stop")
            assert stopped.structured is not None
            assert stopped.structured["running"] is False
            with pytest.raises(ConnectionClosed):
                await client.recv_type("no-such-type")  # reads until the close
            assert ws.close_code == 1001

        stopped_again = await session.call("realtime_stop")
        assert not stopped_again.is_error
        assert stopped_again.structured is not None
        assert stopped_again.structured["running"] is False
        late = await session.call("realtime_snapshot")
        assert late.is_error
        assert "realtime_start" in late.text


@pytest.mark.parametrize("kind", SERVER_KINDS)
@pytest.mark.parametrize(
    ("tool", "arguments", "says"),
    [
        ("realtime_start", {"port": 70000}, "65535"),
        ("realtime_start", {"port": "eighty"}, "port"),
        ("realtime_start", {"interval": 0}, "0.05"),
        ("realtime_start", {"host": "bad host"}, "host"),
        ("realtime_snapshot", {"skill": "x" * 200}, "128"),
    ],
)
async def test_bad_arguments_are_errors_that_say_what_to_fix(
    kind: str, tool: str, arguments: dict[str, Any], says: str, host_db: aiosqlite.Connection
) -> None:
    """An invalid argument returns an error result naming the field or the limit."""
    async with hosted(kind, db=host_db) as (session, _):
        result = await session.call(tool, arguments)
        assert result.is_error
        assert says in result.text
        status = await session.call("realtime_status")
        assert status.structured is not None
        assert status.structured["running"] is False


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_snapshot_skill_rules_are_explained(kind: str, host_db: aiosqlite.Connection) -> None:
    """A skill name with a control character is refused with the protocol's explanation."""
    async with hosted(kind, db=host_db) as (session, _):
        await session.call("realtime_start", {})
        result = await session.call("realtime_snapshot", {"skill": "bad\u0000name"})
        assert result.is_error
        assert "control" in result.text


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_port_in_use_is_an_error_naming_the_port(
    kind: str, host_db: aiosqlite.Connection
) -> None:
    """realtime_start on a taken port says which port and what to do."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        async with hosted(kind, db=host_db) as (session, _):
            result = await session.call("realtime_start", {"port": port})
            assert result.is_error
            assert str(port) in result.text
            assert "port 0" in result.text
            status = await session.call("realtime_status")
            assert status.structured is not None
            assert str(port) in (status.structured["last_error"] or "")


async def test_server_reads_the_hosts_connection_and_leaves_it_working() -> None:
    """Data that exists only in the host's in-memory connection reaches a dashboard through
    the tools, and the connection still works after realtime_stop."""
    async with aiosqlite.connect(":memory:") as private:
        await private.executescript(SCHEMA_SQL)
        await private.execute(
            "INSERT INTO skill_invocation (skill_name, invoked_at, completed, duration_seconds) "
            "VALUES ('only-in-this-connection', ?, 1, 1.5)",
            (iso(datetime.now(UTC)),),
        )
        await private.commit()
        async with hosted(SERVER_KINDS[0], db=private) as (session, host):
            started = await session.call("realtime_start", {"interval": 0.1})
            assert started.structured is not None
            async with connect(started.structured["urls"][0]) as ws:
                update = await Client(ws).recv_type("metrics_update")
            assert update["data"]["top_skills"][0]["skill_name"] == "only-in-this-connection"
            await session.call("realtime_stop")
            assert host.db is private
        async with private.execute("SELECT COUNT(*) FROM skill_metrics") as cursor:
            assert await cursor.fetchone() == (1,)


async def test_status_counts_messages_and_ticks(host_db: aiosqlite.Connection) -> None:
    """realtime_status reports ticks, messages sent and the last tick once a client listens."""
    async with hosted(SERVER_KINDS[0], db=host_db) as (session, _):
        started = await session.call("realtime_start", {"interval": 0.05})
        assert started.structured is not None
        async with connect(started.structured["urls"][0]) as ws:
            client = Client(ws)
            for _ in range(3):
                await client.recv_type("metrics_update")
            result = await session.call("realtime_status")
        status = result.structured
        assert status is not None
        assert status["messages_sent"] >= 3
        assert status["ticks"] >= 3
        assert status["last_tick_at"] is not None
        assert status["last_tick_seconds"] is not None
        assert status["uptime_seconds"] > 0


@pytest.mark.skipif("fastmcp" not in SERVER_KINDS, reason="needs the standalone FastMCP")
async def test_errors_reach_clients_of_a_fastmcp_subclass_that_masks_details(
    host_db: aiosqlite.Connection,
) -> None:
    """On a host's own FastMCP subclass with mask_error_details, the error text still arrives."""
    from fastmcp import FastMCP

    class HostServer(FastMCP):  # type: ignore[misc]
        pass

    HostServer.__module__ = "session_buddy.server"
    server = HostServer("host", mask_error_details=True)
    host = HostContext(db=host_db, settings={**LOOPBACK, "SESSION_BUDDY_REALTIME_AUTOSTART": "0"})
    manager, _ = create_plugin_manager(load_entry_points=False, plugins=[plugin])
    plugins = PluginHost(host, manager)
    plugins.register_tools(server)
    async with plugins.lifespan(host_db), mcp_session(server) as session:
        result = await session.call("realtime_snapshot")
    assert result.is_error
    assert "realtime_start" in result.text
