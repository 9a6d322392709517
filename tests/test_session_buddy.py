"""The plugin inside the real Session-Buddy 0.23, started through ``session-buddy-realtime run``.

Every test here starts Session-Buddy as a user would (the launcher as a subprocess, in a
project directory of its own, with HOME pointed there too), talks to it with a real MCP
client, and writes the skills database with Session-Buddy's own migrations and
``SkillsStorage``. They need Session-Buddy installed (Python >= 3.13): CI runs them in
its Session-Buddy environment; elsewhere they skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pytest
from websockets.asyncio.client import connect

from tests.conftest import NEEDS_SESSION_BUDDY, NO_SKIP, SESSION_BUDDY_PYTHON

try:
    import session_buddy
except ImportError:
    if NO_SKIP and sys.version_info >= SESSION_BUDDY_PYTHON:
        raise  # CI's Session-Buddy environment must have it
    pytest.skip(
        f"{NEEDS_SESSION_BUDDY} 0.23 (pip install session-buddy==0.23.0, Python >= 3.13)",
        allow_module_level=True,
    )

from session_buddy.storage.migrations import get_migration_manager
from session_buddy.storage.skills_storage import SkillsStorage

LAUNCHER = str(Path(sys.executable).with_name("session-buddy-realtime"))
HTTP_PORT = 8678
"""Session-Buddy 0.23 always serves HTTP here; the tests use it one at a time."""
START = 60.0
"""Seconds allowed for Session-Buddy to import and serve (it takes 2-5 s)."""
EXIT = 15.0
"""Seconds allowed for Session-Buddy to exit after a signal or the end of its input."""
INTEGRATION = Path(__file__).parents[1] / "docs" / "integration.md"
OWN_TOOLS = {"session_welcome", "permissions", "quality_monitor"}
REALTIME_TOOLS = {"realtime_start", "realtime_stop", "realtime_status", "realtime_snapshot"}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty project directory (no .session-buddy yet) that is also HOME."""
    directory = tmp_path / "project"
    directory.mkdir()
    return directory


def environment(project: Path, **settings: str) -> dict[str, str]:
    """Session-Buddy's environment: offline, its files under ``project``, stream on any port."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SESSION_BUDDY_REALTIME_")
    }
    # PATH is left as it is: the launcher must not depend on finding its environment there.
    env.update(HOME=str(project), FASTMCP_CHECK_FOR_UPDATES="off", SESSION_BUDDY_REALTIME_PORT="0")
    env.update({f"SESSION_BUDDY_REALTIME_{key}": value for key, value in settings.items()})
    return env


class StdioHost:
    """Session-Buddy over stdio, spoken to in raw JSON-RPC lines, stdout checked line by line."""

    def __init__(self, command: list[str], project: Path, env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            command,
            cwd=project,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._next_id = 0
        self.stderr = _Drain(self.popen.stderr)

    def send(self, message: dict[str, Any]) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(message).encode() + b"\n")
        self.popen.stdin.flush()

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request; return its result. Every stdout line must be JSON-RPC 2.0."""
        self._next_id += 1
        self.send({"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params or {}})
        assert self.popen.stdout is not None
        while True:
            line = self.popen.stdout.readline()
            assert line, f"stdout closed; stderr: {self.stderr.text()[-2000:]}"
            message = json.loads(line)  # anything but JSON on stdout fails here
            assert message.get("jsonrpc") == "2.0", line
            if message.get("id") == self._next_id:
                assert "error" not in message, message
                return dict(message["result"])

    def initialize(self) -> dict[str, Any]:
        result = self.request(
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "tests", "version": "0"},
            },
        )
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return result

    def call(self, tool: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        result = self.request("tools/call", {"name": tool, "arguments": arguments or {}})
        assert not result.get("isError"), result
        return dict(result["structuredContent"])

    def tool_names(self) -> set[str]:
        return {tool["name"] for tool in self.request("tools/list")["tools"]}

    def close_input(self) -> int:
        """End the client's side; return the exit status (bounded wait)."""
        assert self.popen.stdin is not None
        assert self.popen.stdout is not None
        self.popen.stdin.close()
        rest = self.popen.stdout.read()
        assert rest == b"", rest
        return self.popen.wait(timeout=EXIT)

    def kill(self) -> None:
        """Kill the process if it still runs, reap it and close its pipes (idempotent)."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self.stderr.join()
        for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


class _Drain:
    """Collects a pipe in a thread, so a chatty stderr never blocks the process."""

    def __init__(self, pipe: IO[bytes] | None) -> None:
        import threading

        self._chunks: list[bytes] = []
        assert pipe is not None
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe: IO[bytes]) -> None:
        for chunk in iter(lambda: pipe.read1(65536), b""):  # type: ignore[attr-defined]
            self._chunks.append(chunk)

    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def join(self) -> None:
        """Wait for the end of the pipe (the process has exited)."""
        self._thread.join(EXIT)


@pytest.fixture
def stdio_host(project: Path) -> Iterator[Any]:
    """Start ``session-buddy-realtime run -- python -m session_buddy.server``."""
    started: list[StdioHost] = []

    def start(
        command: list[str] | None = None, env: dict[str, str] | None = None, **settings: str
    ) -> StdioHost:
        host = StdioHost(
            command or [LAUNCHER, "run", "--", "python", "-m", "session_buddy.server"],
            project,
            env or environment(project, **settings),
        )
        started.append(host)
        return host

    yield start
    for host in started:
        host.kill()


def store(project: Path, skill: str, *, completed: bool = True, duration: float = 2.0) -> None:
    """Record one invocation the way Session-Buddy does: its migrations, its storage."""
    db_path = project / ".session-buddy" / "skills.db"
    db_path.parent.mkdir(exist_ok=True)
    get_migration_manager(db_path).migrate()
    with SkillsStorage(db_path) as storage:
        storage.store_invocation(
            skill,
            datetime.now(UTC).isoformat(),
            "tests",
            completed=completed,
            duration_seconds=duration,
        )


async def next_update(url: str, where: Any, timeout: float = 20.0) -> dict[str, Any]:
    """Subscribe to all skills on ``url``; return the first update for which ``where`` holds."""
    async with asyncio.timeout(timeout), connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "connected"
        await ws.send(json.dumps({"type": "subscribe"}))
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == "metrics_update" and where(message):
                return dict(message)


def skills_of(update: dict[str, Any]) -> set[str]:
    return {row["skill_name"] for row in update["data"]["top_skills"]}


# ---- stdio -------------------------------------------------------------------------


def test_stdio_serves_both_tool_sets_with_only_json_rpc_on_stdout(stdio_host: Any) -> None:
    """Over stdio every stdout line is JSON-RPC although Session-Buddy prints while it
    loads; Session-Buddy's own tools and the realtime tools are both listed; end of input
    exits 0."""
    host = stdio_host()
    info = host.initialize()
    assert info["serverInfo"]["name"] == "session-buddy"
    names = host.tool_names()
    assert names >= OWN_TOOLS
    assert names >= REALTIME_TOOLS
    assert host.close_input() == 0


async def test_stdio_stream_waits_for_the_database_then_streams_session_buddy_writes(
    project: Path,
) -> None:
    """Through a real MCP stdio client: with no database at launch the stream auto-starts
    waiting for the file; Session-Buddy's migrations and store_invocation() then reach a
    WebSocket client and the tools (status, snapshot, stop, start)."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    parameters = StdioServerParameters(
        command=LAUNCHER,
        args=["run", "--", "python", "-m", "session_buddy.server"],
        env=environment(project),
        cwd=project,
    )
    with (project / "stderr.log").open("w") as errlog:
        async with (
            stdio_client(parameters, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await asyncio.wait_for(session.initialize(), START)
            status = await call(session, "realtime_status")
            assert status["running"] is True
            assert status["autostart"]["outcome"] == "started"
            db_path = project / ".session-buddy" / "skills.db"
            assert status["database"]["path"] == str(db_path)
            url = status["urls"][0]
            waiting = await next_update(url, lambda u: u["source"]["state"] == "waiting")
            assert str(db_path) in waiting["source"]["message"]
            assert not db_path.exists()  # the stream never creates it

            store(project, "pytest-run")
            store(project, "pytest-run", completed=False)
            update = await next_update(url, lambda u: "pytest-run" in skills_of(u))
            row = next(r for r in update["data"]["top_skills"] if r["skill_name"] == "pytest-run")
            assert row["total_invocations"] == 2
            assert row["completion_rate"] == 50.0
            assert update["source"]["state"] == "ok"

            snapshot = await call(session, "realtime_snapshot", {"skill": "pytest-run"})
            assert snapshot["data"]["top_skills"][0]["total_invocations"] == 2
            assert (await call(session, "realtime_stop"))["running"] is False
            assert (await call(session, "realtime_start", {"port": 0}))["running"] is True


def test_other_session_buddy_commands_run_from_this_environment(project: Path) -> None:
    """``run -- session-buddy status`` runs Session-Buddy's own command from the launcher's
    environment (not PATH's), unchanged: its message and exit status come through."""
    env = environment(project)
    env["PATH"] = "/usr/bin:/bin"  # as an MCP client may start it

    def status(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, "status"],
            cwd=project,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START,
            check=False,
        )

    result = status(LAUNCHER, "run", "--", "session-buddy")
    bare = status(str(Path(sys.executable).with_name("session-buddy")))
    assert (result.returncode, result.stdout) == (bare.returncode, bare.stdout)
    assert "session-buddy-realtime" not in result.stderr


def test_fallback_from_8677_never_takes_session_buddys_http_port(
    stdio_host: Any, project: Path
) -> None:
    """With 8677 taken and no port set, the stream inside Session-Buddy falls back past 8678
    (Session-Buddy's HTTP port) to 8679, and says so."""
    env = environment(project)
    del env["SESSION_BUDDY_REALTIME_PORT"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 8677))
        holder.listen()
        host = stdio_host(env=env)
        host.initialize()
        status = host.call("realtime_status")
    assert status["requested_port"] == 8677
    assert status["port"] == 8679
    assert "port 8677" in status["note"]
    assert host.close_input() == 0


def test_inside_session_buddy_the_stream_port_is_its_websocket_port(project: Path) -> None:
    """Session-Buddy's own websocket_port setting (8677) is the stream's port inside it, and
    SESSION_BUDDY_REALTIME_PORT still wins."""
    from session_buddy.cli import SessionBuddySettings

    from session_buddy_realtime.host.sessionbuddy import host_context

    assert SessionBuddySettings().websocket_port == 8677
    inside = host_context({}, project)
    assert inside.settings["SESSION_BUDDY_REALTIME_PORT"] == "8677"
    assert inside.db_path == project / ".session-buddy" / "skills.db"
    assert inside.host_ports == {SessionBuddySettings().http_port} == {HTTP_PORT}
    ours = host_context({"SESSION_BUDDY_REALTIME_PORT": "9001"}, project)
    assert ours.settings["SESSION_BUDDY_REALTIME_PORT"] == "9001"


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = START) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "Session-Buddy exited before serving"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)  # polling a port that is not open yet; bounded by the deadline
    raise AssertionError(f"nothing listened on {port} within {timeout} s")


# ---- HTTP --------------------------------------------------------------------------


@pytest.fixture
def http_host(project: Path) -> Iterator[Any]:
    """Start ``session-buddy-realtime run -- session-buddy start`` and wait for port 8678."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**settings: str) -> subprocess.Popen[bytes]:
        try:
            socket.create_connection(("127.0.0.1", HTTP_PORT), timeout=0.5).close()
        except OSError:
            pass
        else:
            pytest.fail(f"port {HTTP_PORT} is taken; Session-Buddy 0.23 can serve nowhere else")
        process = subprocess.Popen(
            [LAUNCHER, "run", "--", "session-buddy", "start"],
            cwd=project,
            env=environment(project, **settings),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        _wait_for_port(HTTP_PORT, process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@asynccontextmanager
async def http_client() -> AsyncIterator[Any]:
    """A real MCP client session over streamable HTTP to Session-Buddy."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with (
        streamable_http_client(f"http://127.0.0.1:{HTTP_PORT}/mcp") as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def call(session: Any, tool: str, arguments: dict[str, Any] | None = None) -> Any:
    result = await session.call_tool(tool, arguments or {})
    assert not result.isError, result
    return result.structuredContent


def test_http_start_has_both_tool_sets_and_streams_session_buddy_writes(
    http_host: Any, project: Path
) -> None:
    """``session-buddy start`` through the launcher: over HTTP the tools of both are listed,
    the stream auto-started, and Session-Buddy's writes reach a WebSocket client."""
    http_host()

    async def scenario() -> None:
        async with http_client() as session:
            names = {tool.name for tool in (await session.list_tools()).tools}
            assert names >= OWN_TOOLS
            assert names >= REALTIME_TOOLS
            status = await call(session, "realtime_status")
            assert status["running"] is True
            store(project, "ruff-check")
            update = await next_update(status["urls"][0], lambda u: "ruff-check" in skills_of(u))
            assert update["source"]["state"] == "ok"
            snapshot = await call(session, "realtime_snapshot")
            assert "ruff-check" in {row["skill_name"] for row in snapshot["data"]["top_skills"]}
            assert (await call(session, "realtime_stop"))["running"] is False
            assert (await call(session, "realtime_start", {"port": 0}))["running"] is True

    asyncio.run(scenario())


# ---- signals -----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stream", ["autostarted", "started-by-tool", "not-running"])
def test_stdio_host_exits_promptly_on_a_signal(
    stdio_host: Any, signum: signal.Signals, stream: str
) -> None:
    """SIGINT or SIGTERM ends Session-Buddy over stdio within 15 s, whether the stream runs
    (auto-started or started by the tool) or not."""
    host = stdio_host(AUTOSTART="1" if stream == "autostarted" else "0")
    host.initialize()
    if stream == "started-by-tool":
        host.call("realtime_start", {"port": 0})
    assert host.call("realtime_status")["running"] is (stream != "not-running")
    host.popen.send_signal(signum)
    host.popen.wait(timeout=EXIT)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stream", ["started-by-tool", "not-running"])
def test_http_host_exits_promptly_on_a_signal(
    http_host: Any, signum: signal.Signals, stream: str
) -> None:
    """SIGINT or SIGTERM ends ``session-buddy start`` within 15 s, stream running or not,
    and the stream's port is closed with it."""
    process = http_host(AUTOSTART="0")

    async def prepare() -> str | None:
        async with http_client() as session:
            if stream == "not-running":
                assert (await call(session, "realtime_status"))["running"] is False
                return None
            started = await call(session, "realtime_start", {"port": 0})
            return str(started["urls"][0])

    url = asyncio.run(prepare())
    process.send_signal(signum)
    process.wait(timeout=EXIT)
    if url is not None:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()


# ---- the upstream change -----------------------------------------------------------


def upstream_diff() -> str:
    """The unified diff that docs/integration.md tells Session-Buddy's maintainers to apply."""
    blocks = re.findall(r"```diff\n(.*?)```", INTEGRATION.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "docs/integration.md should hold exactly one diff block"
    return str(blocks[0])


def test_upstream_diff_applies_and_serves_the_plugins_over_stdio(
    stdio_host: Any, project: Path, tmp_path: Path
) -> None:
    """The diff of docs/integration.md applies to the installed Session-Buddy, and the patched
    copy, run as its README says (python -m session_buddy.server), serves the realtime tools
    over stdio with nothing but JSON-RPC on stdout."""
    patch = shutil.which("patch")
    assert patch is not None, "the 'patch' program is needed"
    installed = Path(session_buddy.__file__).parent
    copy = tmp_path / "patched"
    shutil.copytree(installed, copy / "session_buddy", ignore=shutil.ignore_patterns("*.pyc"))
    applied = subprocess.run(
        [patch, "-p1", "--forward", "--batch"],
        cwd=copy,
        input=upstream_diff(),
        text=True,
        capture_output=True,
        check=False,
    )
    assert applied.returncode == 0, applied.stdout + applied.stderr
    env = environment(project)
    env["PYTHONPATH"] = str(copy)
    host = stdio_host([sys.executable, "-m", "session_buddy.server"], env=env)
    host.initialize()
    assert host.tool_names() >= REALTIME_TOOLS | OWN_TOOLS
    status = host.call("realtime_status")
    assert status["running"] is True
    assert status["database"]["path"] == str(project / ".session-buddy" / "skills.db")
    assert host.close_input() == 0


# ---- beside Session-Buddy's own parts ----------------------------------------------


async def test_port_held_by_session_buddys_own_realtime_server_is_named(project: Path) -> None:
    """When Session-Buddy's own RealTimeMetricsServer holds the port, a start moves to the next
    port and says that it is Session-Buddy's server, not another instance of ours."""
    from session_buddy.realtime.websocket_server import RealTimeMetricsServer as TheirServer

    from session_buddy_realtime.hookspecs import HostContext
    from session_buddy_realtime.host.service import RealtimeService

    db_path = project / ".session-buddy" / "skills.db"
    store(project, "pytest-run")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    theirs = TheirServer(host="127.0.0.1", port=port, db_path=db_path)
    await theirs.start()
    try:
        service = RealtimeService(
            HostContext(db_path=db_path, settings={"SESSION_BUDDY_REALTIME_HOST": "127.0.0.1"})
        )
        status = await service.start(port=port, port_attempts=3)
        try:
            assert status["running"] is True
            assert status["port"] != port
            assert status["port_holder"] == {
                "port": port,
                "kind": "session-buddy",
                "server_version": None,
            }
            assert "Session-Buddy's own realtime server" in status["note"]
        finally:
            await service.stop()
    finally:
        await theirs.stop()


async def test_stream_reads_through_a_skills_storage_connection(project: Path) -> None:
    """Handed the sqlite3 connection of Session-Buddy's own SkillsStorage, the stream shows
    what store_invocation() writes through it, and leaves that connection as it was: open,
    with its sqlite3.Row row factory."""
    import sqlite3

    from session_buddy_realtime import RealTimeMetricsServer

    db_path = project / ".session-buddy" / "skills.db"
    store(project, "ruff-check")
    storage = SkillsStorage(db_path)
    with storage._get_connection() as connection:  # the connection it keeps and reuses
        pass
    server = RealTimeMetricsServer("127.0.0.1", 0, update_interval=0.1, db=connection)
    await server.start()
    try:
        url = server.urls[0]
        first = await next_update(url, lambda u: "ruff-check" in skills_of(u))
        assert first["source"]["state"] == "ok"
        storage.store_invocation("mypy", datetime.now(UTC).isoformat(), "tests", completed=True)
        update = await next_update(url, lambda u: "mypy" in skills_of(u))
        assert {"ruff-check", "mypy"} <= skills_of(update)
    finally:
        await server.stop()
    assert connection.row_factory is sqlite3.Row
    assert connection.execute("SELECT COUNT(*) FROM skill_invocation").fetchone()[0] == 2
    storage.close()
