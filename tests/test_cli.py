"""The ``session-buddy-realtime`` command, run as real subprocesses.

A ``serve --demo`` process streams from a demo database in a temporary directory and
``watch`` processes read it. Every wait is bounded (a multiple of ``UNIT``) and waits on
an output line or an exit, never on a fixed sleep; every process is killed at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from websockets.asyncio.client import connect

from session_buddy_realtime import __version__
from session_buddy_realtime.data.schema import SCHEMA_SQL
from tests.conftest import SERVER_MESSAGE, UNIT, Client, SkillsDB

COMMAND = [sys.executable, "-m", "session_buddy_realtime.cli"]
STARTUP = 200 * UNIT
"""Time allowed for a process to start and print its first lines (10 s)."""
RUN = 200 * UNIT
"""Time allowed for a short command to finish (10 s)."""
_URL_LINE = re.compile(r"Streaming skill metrics from .+ on (ws://127\.0\.0\.1:(\d+))")


class _Lines:
    """The lines of one pipe, collected by a thread as they arrive."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: list[str] = []
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe: IO[str]) -> None:
        with pipe:
            for line in pipe:
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Return the first line matching ``pattern``; fail after ``timeout`` or at EOF."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    why = "output ended" if self._closed else f"nothing after {timeout:g}s"
                    raise AssertionError(f"{why} without {regex.pattern!r}: {self.lines}")
                self._changed.wait(remaining)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)


class Process:
    """A running CLI process whose stdout and stderr are read line by line."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            [*COMMAND, *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.popen.stdout is not None
        assert self.popen.stderr is not None
        self.stdout = _Lines(self.popen.stdout)
        self.stderr = _Lines(self.popen.stderr)

    def wait(self, timeout: float) -> int:
        """Wait for the exit status, then for the rest of the output."""
        status = self.popen.wait(timeout)
        self.stdout.join(timeout)
        self.stderr.join(timeout)
        return status

    def kill(self) -> None:
        """Kill the process if it still runs and reap it (idempotent)."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.wait(RUN)


@dataclass
class Server:
    """A ``serve`` process and the address it printed."""

    process: Process
    url: str
    port: int


Spawn = Callable[..., Process]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start CLI processes in ``tmp_path``; all are killed at teardown."""
    started: list[Process] = []

    def _spawn(*args: str, cwd: Path = tmp_path) -> Process:
        process = Process(list(args), cwd)
        started.append(process)
        return process

    yield _spawn
    for process in started:
        process.kill()


def run_cli(*args: str, cwd: Path, timeout: float = RUN) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (killed by ``subprocess.run`` on timeout)."""
    return subprocess.run(
        [*COMMAND, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def started(process: Process) -> Server:
    """Wait for the URL line of a ``serve`` process."""
    try:
        match = process.stdout.wait_for(_URL_LINE, STARTUP)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nstderr: {process.stderr.text}") from None
    return Server(process, match[1], int(match[2]))


def serve_demo(spawn: Spawn, *extra: str, interval: str = "0.2") -> Server:
    """Start ``serve --demo`` on 127.0.0.1, a free port, and wait until it listens."""
    return started(spawn("serve", "--demo", "--host", "127.0.0.1", "--interval", interval, *extra))


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One ``serve --demo --port 0 --interval 0.2`` for the read-only ``watch`` tests."""
    tmp = tmp_path_factory.mktemp("demo")
    process = Process(
        [
            "serve",
            "--demo",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--db",
            str(tmp / "demo.db"),
            "--interval",
            "0.2",
        ],
        cwd=tmp,
    )
    try:
        yield started(process)
    finally:
        process.kill()


def json_lines(stdout: str) -> list[dict[str, Any]]:
    """Parse ``watch --json`` output: one server message per line, each schema-valid."""
    messages = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    for message in messages:
        SERVER_MESSAGE.validate(message)
    return messages


def test_watch_json_prints_connected_and_metrics_updates(
    demo_server: Server, tmp_path: Path
) -> None:
    """``watch --count 2 --json`` prints schema-valid frames: a welcome, then two updates."""
    result = run_cli("watch", "--url", demo_server.url, "--count", "2", "--json", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    messages = json_lines(result.stdout)
    assert messages[0]["type"] == "connected"
    kinds = [m["type"] for m in messages]
    confirmed_at = kinds.index("subscription_confirmed")
    updates = [m for m in messages[confirmed_at:] if m["type"] == "metrics_update"]
    assert len(updates) == 2
    assert messages[-1] is updates[-1], "watch exits right after the last counted update"
    for update in updates:
        assert update["skill"] is None
        assert update["source"]["state"] == "ok"
        assert update["data"]["top_skills"], "the demo database has history"


def test_watch_one_skill_gets_confirmation_then_that_skill(spawn: Spawn, tmp_path: Path) -> None:
    """``watch SKILL --count 1`` is confirmed for SKILL and then prints an update of SKILL."""
    server = serve_demo(spawn, "--port", "0", "--db", str(tmp_path / "demo.db"), interval="30")

    result = run_cli(
        "watch", "pytest-run", "--url", server.url, "--count", "1", "--json", cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    messages = json_lines(result.stdout)
    # An idle server serves its first client at once, so an all-skills update may come
    # before the subscription is confirmed; watch does not count it.
    messages = [m for m in messages if not (m["type"] == "metrics_update" and m["skill"] is None)]
    assert [m["type"] for m in messages] == [
        "connected",
        "subscription_confirmed",
        "metrics_update",
    ]
    assert messages[1]["skill"] == "pytest-run"
    assert messages[1]["known"] is True
    update = messages[2]
    assert update["skill"] == "pytest-run"
    assert [row["skill_name"] for row in update["data"]["top_skills"]] == ["pytest-run"]
    assert all(a["skill_name"] == "pytest-run" for a in update["data"]["anomalies"])


def test_serve_prints_the_dashboard_url_and_it_answers(demo_server: Server) -> None:
    """``serve`` prints the dashboard's http:// URL beside the ws:// one, and that URL serves
    the page (checked with a plain HTTP request, as a browser's first one)."""
    line = demo_server.process.stdout.wait_for(r"^Or open the dashboard: (http://\S+/)$", STARTUP)
    assert line.group(1) == f"http://127.0.0.1:{demo_server.port}/"
    with socket.create_connection(("127.0.0.1", demo_server.port), timeout=RUN) as plain:
        plain.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{demo_server.port}\r\n\r\n".encode())
        head = plain.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 200 ")
    assert "text/html" in head


def test_watch_ping_prints_pong(demo_server: Server, tmp_path: Path) -> None:
    """``watch --ping`` measures one round trip, prints "pong" and exits 0."""
    result = run_cli("watch", "--ping", "--url", demo_server.url, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"pong in \d+\.\d ms\n", result.stdout), result.stdout


def test_watch_default_output_is_a_skill_table(demo_server: Server, tmp_path: Path) -> None:
    """Without ``--json``, ``watch --count 1`` prints a readable table of the top skills."""
    result = run_cli("watch", "--url", demo_server.url, "--count", "1", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "connected: Connected to Session-Buddy real-time metrics" in lines[0]
    header = next(line for line in lines if "runs" in line)
    assert header.split() == ["skill", "runs", "done", "%", "avg", "s"]
    table = lines[lines.index(header) + 1 :]
    rows = [line.split() for line in table if not line.lstrip().startswith("!")]
    assert 1 <= len(rows) <= 10
    assert "pytest-run" in {row[0] for row in rows}
    for row in rows:
        assert int(row[1]) > 0
        assert 0.0 <= float(row[2]) <= 100.0
    assert not result.stdout.lstrip().startswith("{"), "no JSON without --json"


def test_ctrl_c_stops_serve_cleanly_and_frees_the_port(spawn: Spawn, tmp_path: Path) -> None:
    """SIGINT makes ``serve --demo`` close its clients cleanly, print "Stopped." and exit 0
    promptly, after which a new server binds the same port at once."""
    server = serve_demo(spawn, "--port", "0")
    assert (tmp_path / ".session-buddy" / "demo-skills.db").is_file(), "default demo path"
    watcher = spawn("watch", "--url", server.url)
    watcher.stdout.wait_for("connected: ", STARTUP)

    began = time.monotonic()
    server.process.popen.send_signal(signal.SIGINT)
    status = server.process.wait(60 * UNIT)
    elapsed = time.monotonic() - began

    assert status == 0, server.process.stderr.text
    assert elapsed < 60 * UNIT
    assert server.process.stdout.lines[-1] == "Stopped."
    assert "Traceback" not in server.process.stderr.text
    # The watcher saw the server going away (1001, not a dropped socket) and reconnects.
    watcher.stderr.wait_for(r"^connection lost \(closed with 1001\); reconnecting", 40 * UNIT)
    watcher.kill()

    again = serve_demo(spawn, "--port", str(server.port))
    assert again.port == server.port
    assert "created demo database" not in again.process.stderr.text, "reuses the demo DB"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT], ids=str)
def test_every_stop_signal_stops_serve_as_cleanly_as_ctrl_c(
    spawn: Spawn, tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM, SIGHUP (terminal or ssh session closed) and SIGQUIT each close the clients
    with 1001, stop the demo writer and exit 0 with "Stopped.", leaving the database intact."""
    server = serve_demo(spawn, "--port", "0")
    watcher = spawn("watch", "--url", server.url)
    watcher.stdout.wait_for("connected: ", STARTUP)

    server.process.popen.send_signal(signum)
    status = server.process.wait(60 * UNIT)

    assert status == 0, server.process.stderr.text
    assert server.process.stdout.lines[-1] == "Stopped."
    assert "Traceback" not in server.process.stderr.text
    watcher.stderr.wait_for(r"^connection lost \(closed with 1001\); reconnecting", 40 * UNIT)
    watcher.kill()
    with contextlib.closing(sqlite3.connect(tmp_path / ".session-buddy" / "demo-skills.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_serve_on_a_missing_database_says_it_waits_then_streams_it(
    spawn: Spawn, tmp_path: Path
) -> None:
    """``serve`` without ``--demo`` on a path with no file says at once, in one line, that it
    waits for that file (creating nothing); a client sees ``waiting``, then the data once
    another process creates the database."""
    missing = tmp_path / "later" / "skills.db"
    process = spawn("serve", "--port", "0", "--db", str(missing), "--interval", "0.1")
    server = started(process)
    line = process.stdout.wait_for(r"^Waiting for the skills database (\S+):", STARTUP)
    assert line.group(1) == str(missing.resolve())
    assert not missing.parent.exists(), "nothing is created"

    async def follow() -> None:
        async with connect(server.url) as ws:
            client = Client(ws)
            await client.recv_type("connected")
            await client.send_json({"type": "subscribe"})
            update = await client.recv_type("metrics_update")
            assert update["source"]["state"] == "waiting"
            missing.parent.mkdir()
            SkillsDB(missing).record("pytest-run", completed=True)
            while "pytest-run" not in [r["skill_name"] for r in update["data"]["top_skills"]]:
                update = await client.recv_type("metrics_update", timeout=STARTUP)
            assert update["source"]["state"] == "ok"

    asyncio.run(follow())


def test_serve_demo_refuses_a_foreign_sqlite_file(tmp_path: Path) -> None:
    """``serve --demo`` exits 1 rather than write demo data into someone's database."""
    foreign = tmp_path / "skills.db"
    with contextlib.closing(sqlite3.connect(foreign)) as db:
        db.executescript(SCHEMA_SQL)
        db.execute(
            "INSERT INTO skill_invocation (skill_name, invoked_at, completed) "
            "VALUES ('real-skill', '2025-01-01T00:00:00Z', 1)"
        )
        db.commit()
    before = foreign.read_bytes()

    result = run_cli("serve", "--demo", "--port", "0", "--db", str(foreign), cwd=tmp_path)

    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{foreign} exists and was not created by --demo; refusing" in result.stderr
    assert "Traceback" not in result.stderr
    assert foreign.read_bytes() == before


@pytest.mark.parametrize("kind", ["text file", "directory"])
def test_serve_demo_on_something_that_is_not_a_database_exits_1(tmp_path: Path, kind: str) -> None:
    """``serve --demo --db`` on a text file or a directory fails with a one-line error."""
    target = tmp_path / "notes"
    if kind == "directory":
        target.mkdir()
    else:
        target.write_text("shopping list\n" * 100)

    result = run_cli("serve", "--demo", "--port", "0", "--db", str(target), cwd=tmp_path)

    assert result.returncode == 1
    assert f"cannot prepare demo database {target}" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_port_in_use_exits_1(tmp_path: Path) -> None:
    """``serve`` on a port another socket listens on says so and exits 1."""
    db = SkillsDB(tmp_path / "skills.db")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        result = run_cli(
            "serve", "--host", "127.0.0.1", "--port", str(port), "--db", str(db.path), cwd=tmp_path
        )

    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "complaint"),
    [
        ("--interval", "0", "interval must be at least 0.05 seconds"),
        ("--interval", "nan", "interval must be at least 0.05 seconds"),
        ("--port", "70000", "port must be 0-65535"),
    ],
)
def test_serve_rejects_bad_options_with_usage_error(
    tmp_path: Path, option: str, value: str, complaint: str
) -> None:
    """Out-of-range ``serve`` options are usage errors (status 2), before anything runs."""
    result = run_cli("serve", "--demo", option, value, cwd=tmp_path)

    assert result.returncode == 2
    assert complaint in result.stderr
    assert result.stderr.startswith("usage: ")
    assert not (tmp_path / ".session-buddy").exists(), "no demo database was created"


def test_watch_closed_port_exits_1(tmp_path: Path, free_port: int) -> None:
    """``watch`` against a port nobody listens on reports it cannot connect, status 1."""
    url = f"ws://127.0.0.1:{free_port}"

    result = run_cli("watch", "--url", url, "--count", "1", cwd=tmp_path)

    assert result.returncode == 1
    assert f"cannot connect to {url}" in result.stderr
    assert result.stdout == ""


def test_console_script_is_installed(tmp_path: Path) -> None:
    """The ``session-buddy-realtime`` script next to this Python runs the same command."""
    script = shutil.which("session-buddy-realtime", path=os.path.dirname(sys.executable))
    assert script is not None

    result = subprocess.run(
        [script, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=RUN
    )

    assert result.returncode == 0
    assert result.stdout.strip() == f"session-buddy-realtime {__version__}"
