"""The realtime_* MCP tools through a real MCP client session, on every installed server kind."""

from __future__ import annotations

import importlib.util
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


def error_text(kind: str, tool: str, message: str) -> str:
    """A tool error's text as the server kind sends it: mcp's own servers name the tool first."""
    return message if kind == "fastmcp" else f"Error executing tool {tool}: {message}"


def refuses_unknown_arguments(kind: str) -> bool:
    """False only on mcp 1.x's own FastMCP, which shows a tool no raw arguments."""
    return kind == "fastmcp" or importlib.util.find_spec("mcp.server.mcpserver") is not None


PORT_RULE = "port must be a whole number from 0 to 65535"
INTERVAL_RULE = "interval must be seconds from 0.05 to 3600"
HOST_RULE = "host must be a host name or IP address of 1 to 253 letters, digits or . : [ ] _ -"


@pytest.mark.parametrize("kind", SERVER_KINDS)
@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        ("realtime_start", {"port": 99999}, f"{PORT_RULE} (got 99999)"),
        ("realtime_start", {"port": -1}, f"{PORT_RULE} (got -1)"),
        ("realtime_start", {"port": "eighty"}, f"{PORT_RULE} (got 'eighty')"),
        ("realtime_start", {"port": 80.5}, f"{PORT_RULE} (got 80.5)"),
        ("realtime_start", {"port": True}, f"{PORT_RULE} (got True)"),
        ("realtime_start", {"interval": 0}, f"{INTERVAL_RULE} (got 0)"),
        ("realtime_start", {"interval": 7200.5}, f"{INTERVAL_RULE} (got 7200.5)"),
        ("realtime_start", {"interval": "nan"}, f"{INTERVAL_RULE} (got 'nan')"),
        ("realtime_start", {"interval": [1]}, f"{INTERVAL_RULE} (got [1])"),
        ("realtime_start", {"host": "bad host"}, f"{HOST_RULE} (got 'bad host')"),
        ("realtime_start", {"host": ""}, f"{HOST_RULE} (got '')"),
        ("realtime_start", {"host": 42}, f"{HOST_RULE} (got 42)"),
        ("realtime_snapshot", {"skill": 42}, "skill must be a string or null (got 42)"),
        ("realtime_snapshot", {"skill": {"a": 1}}, "skill must be a string or null (got {'a': 1})"),
        (
            "realtime_snapshot",
            {"skill": "x" * 200},
            "skill must be a string of at most 128 characters (got 200 characters)",
        ),
    ],
)
async def test_bad_argument_gets_one_line_naming_it_and_what_is_accepted(
    kind: str, tool: str, arguments: dict[str, Any], message: str, host_db: aiosqlite.Connection
) -> None:
    """A wrong type or an out-of-range value is an error of exactly one line that names the
    argument, what it accepts and what was sent, with no validation dump, and starts nothing."""
    async with hosted(kind, db=host_db) as (session, _):
        result = await session.call(tool, arguments)
        assert result.is_error
        assert result.text == error_text(kind, tool, message)
        assert "pydantic" not in result.text
        status = await session.call("realtime_status")
        assert status.structured is not None
        assert status.structured["running"] is False


@pytest.mark.parametrize("kind", SERVER_KINDS)
@pytest.mark.parametrize("value", ["x\n" * 5000, "\u202e" + "y" * 100, 10**100, ["z" * 100] * 100])
async def test_echoed_value_is_cut_short_and_kept_on_one_line(
    kind: str, value: object, host_db: aiosqlite.Connection
) -> None:
    """Whatever a client sends, the value quoted back is at most 40 characters on one line."""
    async with hosted(kind, db=host_db) as (session, _):
        result = await session.call("realtime_start", {"port": value})
    assert result.is_error
    prefix = error_text(kind, "realtime_start", f"{PORT_RULE} (got ")
    assert result.text.startswith(prefix)
    assert result.text.endswith(")")
    assert len(result.text) - len(prefix) - 1 <= 40
    assert result.text.isprintable()


@pytest.mark.parametrize("kind", SERVER_KINDS)
@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        (
            "realtime_start",
            {"port": 0, "prot": 9000},
            "unknown argument 'prot' for realtime_start; accepted: host, port, interval, redis_url",
        ),
        (
            "realtime_stop",
            {"force": True},
            "unknown argument 'force' for realtime_stop; realtime_stop takes no arguments",
        ),
        (
            "realtime_status",
            {"verbose": 1, "all": 2},
            "unknown arguments 'verbose', 'all' for realtime_status; "
            "realtime_status takes no arguments",
        ),
        (
            "realtime_snapshot",
            {"skil": "pytest-run"},
            "unknown argument 'skil' for realtime_snapshot; accepted: skill",
        ),
    ],
)
async def test_unknown_argument_is_refused_by_name(
    kind: str, tool: str, arguments: dict[str, Any], message: str, host_db: aiosqlite.Connection
) -> None:
    """An argument the tool does not take is refused by name, with the accepted ones, before
    the tool acts (except on mcp 1.x's own FastMCP, where it is ignored, as documented)."""
    async with hosted(kind, db=host_db) as (session, _):
        result = await session.call(tool, arguments)
        if not refuses_unknown_arguments(kind):
            assert "unknown argument" not in result.text
            return
        assert result.is_error
        assert result.text == error_text(kind, tool, message)
        status = await session.call("realtime_status")
        assert status.structured is not None
        assert status.structured["running"] is False


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_start_while_running_says_which_values_were_not_applied(
    kind: str, host_db: aiosqlite.Connection
) -> None:
    """realtime_start with another port, interval or host than the running server's keeps the
    server as it is and says in the note what was not applied and how to apply it."""
    async with hosted(kind, db=host_db) as (session, _):
        started = await session.call("realtime_start", {"interval": 0.5})
        assert started.structured is not None
        port = started.structured["port"]
        other = port + 1 if port < 65535 else port - 1
        running = f"already running on 127.0.0.1 port {port} every 0.5 s"
        how = "not applied: call realtime_stop, then realtime_start with the new values"

        again = await session.call("realtime_start", {"port": other, "interval": 2})
        assert again.structured is not None
        assert again.structured["note"] == f"{running}; port={other} and interval=2.0 were {how}"
        assert (again.structured["port"], again.structured["update_interval"]) == (port, 0.5)
        by_host = await session.call("realtime_start", {"host": "localhost"})
        assert by_host.structured is not None
        assert by_host.structured["note"] == f"{running}; host=localhost was {how}"
        status = await session.call("realtime_status")
        assert status.structured is not None
        assert status.structured["note"] is None, "the note belongs to that call's result"

        await session.call("realtime_stop")
        applied = await session.call("realtime_start", {"interval": 2})
        assert applied.structured is not None
        assert applied.structured["update_interval"] == 2.0
        assert applied.structured["note"] is None


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_start_while_running_with_its_own_values_or_port_0_has_no_note(
    kind: str, host_db: aiosqlite.Connection
) -> None:
    """Asking again for what runs, for any port (0), or for nothing in particular adds no note."""
    async with hosted(kind, db=host_db) as (session, _):
        started = await session.call("realtime_start", {"interval": 0.5})
        assert started.structured is not None
        same = {"host": "127.0.0.1", "port": started.structured["port"], "interval": 0.5}
        for arguments in ({}, {"port": 0}, same):
            again = await session.call("realtime_start", arguments)
            assert again.structured is not None
            assert again.structured["note"] is None, arguments


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_numbers_written_as_strings_are_still_accepted(
    kind: str, host_db: aiosqlite.Connection
) -> None:
    """A port or interval written as a string ("0", "0.5") works, as it did before the checks."""
    async with hosted(kind, db=host_db) as (session, _):
        started = await session.call("realtime_start", {"port": "0", "interval": "0.5"})
    assert not started.is_error, started.text
    assert started.structured is not None
    assert started.structured["running"] is True
    assert started.structured["update_interval"] == 0.5


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_input_schemas_still_publish_types_ranges_and_descriptions(
    kind: str, host_db: aiosqlite.Connection
) -> None:
    """Clients still see each argument's type, range and description, and nothing else."""
    async with hosted(kind, db=host_db) as (session, _):
        tools = {tool["name"]: tool["inputSchema"] for tool in await session.list_tools()}
    start = tools["realtime_start"]["properties"]
    assert set(start) == {"host", "port", "interval", "redis_url"}
    assert {"type": "integer", "minimum": 0, "maximum": 65535} in start["port"]["anyOf"]
    assert {"type": "number", "minimum": 0.05, "maximum": 3600} in start["interval"]["anyOf"]
    [host] = [choice for choice in start["host"]["anyOf"] if choice["type"] == "string"]
    assert (host["minLength"], host["maxLength"]) == (1, 253)
    assert host["pattern"].startswith("^")
    skill = tools["realtime_snapshot"]["properties"]
    assert set(skill) == {"skill"}
    assert {"type": "string", "maxLength": 128} in skill["skill"]["anyOf"]
    [url] = [choice for choice in start["redis_url"]["anyOf"] if choice["type"] == "string"]
    assert (url["minLength"], url["maxLength"]) == (1, 2048)
    for name in ("host", "port", "interval", "redis_url"):
        assert {"type": "null"} in start[name]["anyOf"], name
        assert start[name]["description"], name
    assert tools["realtime_stop"]["properties"] == {}
    if kind == "fastmcp":
        assert all(schema["additionalProperties"] is False for schema in tools.values())


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
    """On a host's own FastMCP subclass with mask_error_details, the error texts still arrive,
    argument errors included."""
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
        bad = await session.call("realtime_start", {"port": 99999})
        unknown = await session.call("realtime_start", {"prot": 1})
    assert result.is_error
    assert "realtime_start" in result.text
    assert bad.text == f"{PORT_RULE} (got 99999)"
    assert (
        unknown.text == "unknown argument 'prot' for realtime_start; "
        "accepted: host, port, interval, redis_url"
    )
