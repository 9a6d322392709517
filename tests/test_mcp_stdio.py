"""``session-buddy-realtime mcp``, run as a real subprocess and spoken to in raw JSON-RPC.

No MCP client library: the tests write newline-delimited JSON-RPC 2.0 to the process's
stdin and read its stdout line by line, so they see exactly what a host's client would,
whichever mcp version serves it. Every line the process writes to stdout, from launch to
exit, must be one JSON-RPC 2.0 message (logs belong on stderr). Every wait is bounded (a
multiple of ``UNIT``) and waits on a reply, a frame or an exit, never on a fixed sleep;
every process is killed at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import SERVER_MESSAGE, UNIT, Client, SkillsDB

COMMAND = [sys.executable, "-m", "session_buddy_realtime.cli", "mcp"]
PROTOCOL_VERSION = "2025-06-18"
"""An MCP revision both mcp 1.x and mcp 2.x speak."""
SETTING = "SESSION_BUDDY_REALTIME_"
STARTUP = 200 * UNIT
"""Time allowed for the process to start and answer ``initialize`` (10 s)."""
REPLY = 100 * UNIT
"""Time allowed for the answer to one request (5 s)."""
EXIT = 100 * UNIT
"""Time allowed for the process to exit once its stdin is closed (5 s)."""
STREAM_LIMIT = 16 * 1024 * 1024
"""Longest stdout line accepted (``tools/list`` is one long line)."""
TOOLS = {"realtime_start", "realtime_stop", "realtime_status", "realtime_snapshot"}
READ_ONLY_TOOLS = {"realtime_status", "realtime_snapshot"}
_LOCAL_URL = re.compile(r"ws://127\.0\.0\.1:(\d+)")


def jsonrpc_problem(line: str) -> str | None:
    """Say why ``line`` is not exactly one JSON-RPC 2.0 message; None if it is one."""
    try:
        message = json.loads(line)
    except ValueError as exc:
        return f"not JSON ({exc})"
    if not isinstance(message, dict):
        return "not a JSON object (batches are not part of MCP 2025-06-18)"
    if message.get("jsonrpc") != "2.0":
        return 'no "jsonrpc": "2.0"'
    if "method" in message:
        if not isinstance(message["method"], str):
            return "its method is not a string"
        if "result" in message or "error" in message:
            return "a request or notification with a result or error"
        return None
    if "id" not in message:
        return "neither a request, a notification nor a response"
    if ("result" in message) == ("error" in message):
        return "a response needs exactly one of result and error"
    return None


class McpProcess:
    """One ``mcp`` process: requests go to stdin, every stdout line is checked."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stdout_lines: list[str] = []
        """Every line written to stdout, without its newline."""
        self.problems: list[str] = []
        """Lines of stdout that are not JSON-RPC 2.0 messages, with the reason."""
        self.server_messages: list[dict[str, Any]] = []
        """Notifications and requests from the server (anything but a response)."""
        self.stderr_lines: list[str] = []
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._readers = [
            asyncio.create_task(self._read_stdout(), name="mcp stdout"),
            asyncio.create_task(self._read_stderr(), name="mcp stderr"),
        ]

    @classmethod
    async def launch(cls, db: Path, cwd: Path, env: dict[str, str]) -> McpProcess:
        process = await asyncio.create_subprocess_exec(
            *COMMAND,
            "--db",
            str(db),
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=STREAM_LIMIT,
        )
        return cls(process)

    # Reading

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        try:
            async for raw in self.process.stdout:
                self._take_line(raw)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(AssertionError("stdout closed before the reply"))

    def _take_line(self, raw: bytes) -> None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.stdout_lines.append(raw.decode("utf-8", "backslashreplace"))
            self.problems.append(f"not UTF-8 ({exc}): {raw[:200]!r}")
            return
        line = text.removesuffix("\n")
        self.stdout_lines.append(line)
        if line == text:
            self.problems.append(f"not newline-terminated: {line[:200]!r}")
        problem = jsonrpc_problem(line)
        if problem is not None:
            self.problems.append(f"{problem}: {line[:200]!r}")
            return
        message = json.loads(line)
        if "method" in message:
            self.server_messages.append(message)
            return
        future = self._pending.pop(message["id"], None)
        if future is None:
            self.problems.append(f"a response to no pending request: {line[:200]!r}")
        elif not future.done():
            future.set_result(message)

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.stderr_lines.append(raw.decode("utf-8", "backslashreplace").rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    # Writing

    async def send(self, message: dict[str, Any]) -> None:
        """Write one message as one line (``json.dumps`` escapes control characters)."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        await self.process.stdin.drain()

    async def request(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = REPLY
    ) -> dict[str, Any]:
        """Send a request and return the ``result`` of its response (an error fails)."""
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(message)
        try:
            async with asyncio.timeout(timeout):
                response = await future
        except TimeoutError:
            raise AssertionError(
                f"no reply to {method} in {timeout:g}s\nstderr:\n{self.stderr}"
            ) from None
        assert "error" not in response, f"{method} failed: {response['error']}"
        result = response["result"]
        assert isinstance(result, dict)
        return result

    async def initialize(self) -> dict[str, Any]:
        """Do the MCP handshake: ``initialize``, then ``notifications/initialized``."""
        result = await self.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "test_mcp_stdio", "version": "0"},
            },
            timeout=STARTUP,
        )
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return result

    async def call(self, tool: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call a tool and return the ``CallToolResult`` as sent (camelCase keys)."""
        result = await self.request("tools/call", {"name": tool, "arguments": arguments or {}})
        assert isinstance(result.get("isError"), bool), result
        assert isinstance(result.get("content"), list), result
        assert result["content"], result
        assert all(item.get("type") == "text" for item in result["content"]), result
        return result

    async def ok(self, tool: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call a tool that must succeed; return its ``structuredContent``."""
        result = await self.call(tool, arguments)
        assert result["isError"] is False, result
        structured = result.get("structuredContent")
        assert isinstance(structured, dict), result
        # Clients that ignore structured output read the same object as JSON text.
        assert json.loads(result["content"][0]["text"]) == structured
        return structured

    async def fails(self, tool: str, arguments: dict[str, Any] | None = None) -> str:
        """Call a tool that must report an error (``isError``); return its text."""
        result = await self.call(tool, arguments)
        assert result["isError"] is True, result
        return "\n".join(item["text"] for item in result["content"])

    # Ending

    async def close_stdin_and_wait(self, timeout: float = EXIT) -> int:
        """Close stdin as a client does when it leaves; return the exit status."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            async with asyncio.timeout(timeout):
                status = await self.process.wait()
                await asyncio.gather(*self._readers)
        except TimeoutError:
            raise AssertionError(
                f"still running {timeout:g}s after stdin closed\nstderr:\n{self.stderr}"
            ) from None
        return status

    def assert_only_jsonrpc_on_stdout(self) -> None:
        """Every stdout line so far was one JSON-RPC 2.0 message, each answered once."""
        assert self.stdout_lines, "nothing was written to stdout"
        assert not self.problems, "stdout carries more than JSON-RPC:\n" + "\n".join(self.problems)
        assert not self._pending, f"requests never answered: {sorted(self._pending)}"

    async def kill(self) -> None:
        """Kill the process if it still runs, reap it and stop the readers (idempotent)."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        assert self.process.stdin is not None
        self.process.stdin.close()
        await self.process.wait()
        _, alive = await asyncio.wait(self._readers, timeout=EXIT)
        for task in alive:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


Launch = Callable[..., Awaitable[McpProcess]]


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launch]:
    """Start ``mcp --db DB`` processes in ``tmp_path``; all are killed at teardown.

    The environment is this one without any ``SESSION_BUDDY_REALTIME_*`` variable, then
    ``HOST=127.0.0.1``, ``PORT=0`` and the given settings (``PORT="x"`` sets
    ``SESSION_BUDDY_REALTIME_PORT=x``).
    """
    started: list[McpProcess] = []

    async def _launch(db: Path, **settings: str) -> McpProcess:
        env = {key: value for key, value in os.environ.items() if not key.startswith(SETTING)}
        env.update({f"{SETTING}HOST": "127.0.0.1", f"{SETTING}PORT": "0"})
        env.update({SETTING + name: value for name, value in settings.items()})
        process = await McpProcess.launch(db, tmp_path, env)
        started.append(process)
        return process

    yield _launch
    for process in started:
        await process.kill()


async def close_code(ws: ClientConnection, timeout: float = 40 * UNIT) -> int | None:
    """Read (and validate) frames until the server closes; return its close code."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                raw = await ws.recv()
            except ConnectionClosed as exc:
                return None if exc.rcvd is None else exc.rcvd.code
            SERVER_MESSAGE.validate(json.loads(raw))


def tools_by_name(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tools = listing["tools"]
    by_name = {tool["name"]: tool for tool in tools}
    assert len(by_name) == len(tools), "tool names are unique"
    return by_name


async def test_full_flow_over_stdio(launch: Launch, tmp_path: Path) -> None:
    """Over raw stdio JSON-RPC, the host auto-starts the server, lists four annotated tools,
    reports a live dashboard, snapshots a skill, reports bad arguments as tool errors, stops
    (closing the dashboard with 1001) and exits 0 when stdin closes, writing only JSON-RPC
    to stdout."""
    db = SkillsDB(tmp_path / "skills.db")
    db.record("alpha", count=3, duration=2.0)
    db.record("alpha", completed=False)
    db.record("beta", count=5)
    db.record("gamma")
    mcp = await launch(db.path)

    init = await mcp.initialize()
    assert init["protocolVersion"] == PROTOCOL_VERSION
    assert init["serverInfo"]["name"] == "session-buddy-realtime"
    assert "tools" in init["capabilities"]

    tools = tools_by_name(await mcp.request("tools/list"))
    assert set(tools) == TOOLS
    for name, tool in tools.items():
        assert tool["annotations"] == {
            "title": tool["annotations"]["title"],
            "readOnlyHint": name in READ_ONLY_TOOLS,
            "destructiveHint": False,
            "idempotentHint": True,
            "openWorldHint": False,
        }, name
        assert tool["annotations"]["title"], name
        assert tool["description"], name
        assert tool["inputSchema"]["type"] == "object", name
        assert tool["outputSchema"]["type"] == "object", name
    for name in ("realtime_start", "realtime_stop", "realtime_status"):
        assert "running" in tools[name]["outputSchema"]["properties"], name
    assert "top_skills" in json.dumps(tools["realtime_snapshot"]["outputSchema"])
    assert set(tools["realtime_start"]["inputSchema"]["properties"]) == {
        "host",
        "port",
        "interval",
        "redis_url",
    }
    assert set(tools["realtime_snapshot"]["inputSchema"]["properties"]) == {"skill"}

    status = await mcp.ok("realtime_status")
    assert status["running"] is True
    assert status["autostart"] == {"enabled": True, "outcome": "started"}
    assert len(status["urls"]) == 1
    match = _LOCAL_URL.fullmatch(status["urls"][0])
    assert match, status["urls"]
    assert int(match[1]) == status["port"] > 0
    assert status["requested_port"] == 0
    assert status["database"]["shared_connection"] is True
    assert status["plugin_errors"] == []
    assert status["client_count"] == 0

    async with connect(status["urls"][0], open_timeout=40 * UNIT, close_timeout=4 * UNIT) as ws:
        dashboard = Client(ws)
        assert (await dashboard.recv())["type"] == "connected"
        await dashboard.send_json({"type": "subscribe", "skill": "alpha"})
        confirmed = await dashboard.recv_type("subscription_confirmed")
        assert confirmed["skill"] == "alpha"
        assert confirmed["known"] is True
        pushed = await dashboard.recv_type("metrics_update")
        assert pushed["skill"] == "alpha"

        status = await mcp.ok("realtime_status")
        assert status["client_count"] == 1
        [client] = status["clients"]
        assert client["subscription"] == "alpha"
        local_host, local_port = ws.local_address[:2]
        assert client["remote"] == f"{local_host}:{local_port}"

        snapshot = await mcp.ok("realtime_snapshot", {"skill": "alpha"})
        SERVER_MESSAGE.validate(snapshot)
        assert snapshot["type"] == "metrics_update"
        assert snapshot["skill"] == "alpha"
        assert snapshot["source"]["state"] == "ok"
        [row] = snapshot["data"]["top_skills"]
        assert row["skill_name"] == "alpha"
        assert row["total_invocations"] == 4
        assert row["completed_invocations"] == 3
        assert row["completion_rate"] == pytest.approx(75.0)
        assert row["avg_duration_seconds"] == pytest.approx(2.0)
        # Exactly what the dashboard subscribed to the same skill was sent.
        assert snapshot["data"] == pushed["data"]

        message = await mcp.fails("realtime_start", {"port": 70000})
        assert "port" in message
        assert "65535" in message
        message = await mcp.fails("realtime_snapshot", {"skill": "al\u0000pha"})
        assert "skill" in message
        assert "U+0000" in message
        # Bad arguments changed nothing.
        assert (await mcp.ok("realtime_status"))["urls"] == status["urls"]

        stopped = await mcp.ok("realtime_stop")
        assert stopped["running"] is False
        assert stopped["urls"] == []
        assert await close_code(ws) == 1001

    again = await mcp.ok("realtime_stop")
    assert again["running"] is False
    message = await mcp.fails("realtime_snapshot", {"skill": "alpha"})
    assert "not running" in message
    assert "realtime_start" in message

    assert await mcp.close_stdin_and_wait() == 0
    mcp.assert_only_jsonrpc_on_stdout()
    assert mcp.server_messages == [], "nothing was asked of this client"
    assert "Traceback" not in mcp.stderr


async def test_autostart_off_then_realtime_start(launch: Launch, tmp_path: Path) -> None:
    """With SESSION_BUDDY_REALTIME_AUTOSTART=0 nothing listens until realtime_start, which
    starts a real server once (a second call returns it unchanged) that closing stdin stops."""
    db = SkillsDB(tmp_path / "skills.db")
    db.record("alpha")
    mcp = await launch(db.path, AUTOSTART="0")
    await mcp.initialize()

    status = await mcp.ok("realtime_status")
    assert status["running"] is False
    assert status["urls"] == []
    assert status["autostart"]["enabled"] is False
    assert status["autostart"]["outcome"] == "disabled"
    assert "not running" in await mcp.fails("realtime_snapshot")

    started = await mcp.ok("realtime_start", {"port": 0})
    assert started["running"] is True
    assert len(started["urls"]) == 1
    match = _LOCAL_URL.fullmatch(started["urls"][0])
    assert match, started["urls"]
    assert int(match[1]) == started["port"] > 0
    assert (await mcp.ok("realtime_start", {"port": 0}))["urls"] == started["urls"]

    async with connect(started["urls"][0], open_timeout=40 * UNIT, close_timeout=4 * UNIT) as ws:
        assert (await Client(ws).recv())["type"] == "connected"
        assert await mcp.close_stdin_and_wait() == 0
        assert await close_code(ws) == 1001, "the shutdown hook closed the dashboard"

    mcp.assert_only_jsonrpc_on_stdout()
    assert "Traceback" not in mcp.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_signal_stops_the_host_like_the_end_of_input(
    launch: Launch, tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGINT or SIGTERM while the client keeps stdin open stops the host at once, through
    its shutdown hooks (the dashboard is closed with 1001), with exit status 0."""
    db = SkillsDB(tmp_path / "skills.db")
    db.record("alpha")
    mcp = await launch(db.path)
    await mcp.initialize()
    status = await mcp.ok("realtime_status")
    async with connect(status["urls"][0], open_timeout=40 * UNIT, close_timeout=4 * UNIT) as ws:
        assert (await Client(ws).recv())["type"] == "connected"
        mcp.process.send_signal(signum)
        async with asyncio.timeout(EXIT):
            assert await mcp.process.wait() == 0
        assert await close_code(ws) == 1001, "the shutdown hook closed the dashboard"
    mcp.assert_only_jsonrpc_on_stdout()


async def test_missing_database_still_serves_mcp(launch: Launch, tmp_path: Path) -> None:
    """With a --db file that does not exist the host serves its tools and auto-starts the
    stream waiting on that path (status and stream say so, nothing is created); when the
    database appears with its tables, its data flows without a restart."""
    missing = tmp_path / "nowhere" / "skills.db"
    mcp = await launch(missing)
    await mcp.initialize()

    assert set(tools_by_name(await mcp.request("tools/list"))) == TOOLS
    status = await mcp.ok("realtime_status")
    assert status["running"] is True
    assert status["autostart"] == {"enabled": True, "outcome": "started"}
    assert status["database"]["shared_connection"] is False
    assert status["database"]["path"] == str(missing)
    assert status["database"]["state"] == "waiting"
    assert f"waiting for the skills database at {missing}" in status["database"]["message"]
    assert (await mcp.ok("realtime_start", {"port": 0}))["urls"] == status["urls"]

    async with connect(status["urls"][0], open_timeout=40 * UNIT, close_timeout=4 * UNIT) as ws:
        dashboard = Client(ws)
        assert (await dashboard.recv())["type"] == "connected"
        waiting = await dashboard.recv_type("metrics_update")
        assert waiting["source"]["state"] == "waiting"
        assert str(missing) in waiting["source"]["message"]
        assert not missing.parent.exists(), "nothing is created"

        missing.parent.mkdir()
        SkillsDB(missing).record("appeared-later", count=2)
        async with asyncio.timeout(100 * UNIT):
            while True:
                update = await dashboard.recv_type("metrics_update")
                if update["source"]["state"] == "ok":
                    break
        assert [row["skill_name"] for row in update["data"]["top_skills"]] == ["appeared-later"]

    assert await mcp.close_stdin_and_wait() == 0
    mcp.assert_only_jsonrpc_on_stdout()
    assert "Traceback" not in mcp.stderr


async def test_bad_setting_is_reported_not_fatal(launch: Launch, tmp_path: Path) -> None:
    """With SESSION_BUDDY_REALTIME_PORT=notaport the host still launches and lists its tools,
    and realtime_status and realtime_start name the bad variable."""
    db = SkillsDB(tmp_path / "skills.db")
    mcp = await launch(db.path, PORT="notaport")
    await mcp.initialize()

    assert set(tools_by_name(await mcp.request("tools/list"))) == TOOLS
    status = await mcp.ok("realtime_status")
    assert status["running"] is False
    reported = [*status["plugin_errors"], status["last_error"] or ""]
    assert any("SESSION_BUDDY_REALTIME_PORT" in text for text in reported), reported
    assert "SESSION_BUDDY_REALTIME_PORT" in status["autostart"]["outcome"]

    assert "SESSION_BUDDY_REALTIME_PORT" in await mcp.fails("realtime_start")

    assert await mcp.close_stdin_and_wait() == 0
    mcp.assert_only_jsonrpc_on_stdout()
