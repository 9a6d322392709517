"""``session-buddy-realtime run -- COMMAND``: which commands it takes over, and its fallbacks.

These run with or without Session-Buddy installed; ``test_session_buddy.py`` runs the real
one through the launcher.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from session_buddy_realtime.host.launcher import classify

LAUNCHER = [sys.executable, "-m", "session_buddy_realtime.cli", "run", "--"]
EXIT = 30.0
"""Seconds allowed for a launched command to finish."""


@pytest.mark.parametrize(
    ("command", "mode", "arguments"),
    [
        (["session-buddy", "start"], "http", ("start",)),
        (["/venv/bin/session-buddy", "start", "--force"], "http", ("start", "--force")),
        (["python", "-m", "session_buddy", "start"], "http", ("start",)),
        (["python3.13", "-m", "session_buddy.server"], "stdio", ()),
        (["session-buddy", "status"], "unchanged", ()),
        (["session-buddy"], "unchanged", ()),
        (["python", "-m", "session_buddy.server", "--extra"], "unchanged", ()),
        (["python3", "-u", "-m", "session_buddy.server"], "stdio", ()),
        (["session-buddy", "start", "--help"], "unchanged", ()),
        (["python", "-m", "session_buddy", "start", "-h"], "unchanged", ()),
        (["python", "-X", "dev", "-m", "session_buddy.server"], "unchanged", ()),
        (["pythonista", "-m", "session_buddy.server"], "unchanged", ()),
        (["uvx", "session-buddy", "start"], "unchanged", ()),
    ],
)
def test_commands_are_told_apart(command: list[str], mode: str, arguments: tuple[str, ...]) -> None:
    """Session-Buddy's HTTP start and its stdio module are taken over; anything else runs as is."""
    launch = classify(command)
    assert launch.mode == mode
    assert launch.command == tuple(command)
    assert launch.arguments == arguments


def test_no_command_is_refused_with_an_example(tmp_path: Path) -> None:
    """``run`` without a command exits 2 with one line showing how to call it."""
    result = subprocess.run(
        LAUNCHER[:-1], cwd=tmp_path, capture_output=True, text=True, timeout=EXIT, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: run needs a command, e.g. 'run -- session-buddy start'"


def test_other_commands_run_unchanged_with_their_status(tmp_path: Path) -> None:
    """A command that is not Session-Buddy's runs as given: output and exit status pass through."""
    result = subprocess.run(
        [*LAUNCHER, sys.executable, "-c", "print('plain'); raise SystemExit(3)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=EXIT,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (3, "plain\n", "")


def test_a_bare_python_is_this_environments_not_paths(tmp_path: Path) -> None:
    """A command run unchanged that names a bare ``python`` gets this environment's Python,
    even when PATH finds no Python at all (an MCP client's PATH often lacks the venv)."""
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing to find there
    result = subprocess.run(
        [*LAUNCHER, "python", "-c", "import sys; print(sys.prefix)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXIT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == sys.prefix


def test_closed_stdout_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """Launched for stdio with stdout closed, the launcher says so in one line and exits 2."""
    result = subprocess.run(
        [*LAUNCHER, "python", "-m", "session_buddy.server"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=EXIT,
        check=False,
        pass_fds=(),
        preexec_fn=lambda: os.close(1),
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "session-buddy-realtime: stdin or stdout is closed: "
        "there is no channel to serve MCP over stdio"
    )


def test_a_missing_program_is_named(tmp_path: Path) -> None:
    """A command that does not exist exits 127 with one line naming it."""
    result = subprocess.run(
        [*LAUNCHER, "no-such-program-here"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=EXIT,
        check=False,
    )
    assert result.returncode == 127
    assert "'no-such-program-here'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unshaped_session_buddy_runs_unchanged_after_one_line(tmp_path: Path) -> None:
    """A session_buddy.server that is not the one the launcher knows (here a stand-in with
    no server object; or no Session-Buddy installed at all): one line on stderr says why,
    and the command runs unchanged, its own stdout intact."""
    shadow = tmp_path / "shadow" / "session_buddy"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    (shadow / "server.py").write_text("print('the module ran')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent), "HOME": str(tmp_path)}
    result = subprocess.run(
        [*LAUNCHER, sys.executable, "-m", "session_buddy.server"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXIT,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout == "the module ran\n"
    # (What the module printed while the launcher tried it went to stderr.)
    notes = [line for line in result.stderr.splitlines() if "session-buddy-realtime" in line]
    assert len(notes) == 1, notes
    assert notes[0].startswith("session-buddy-realtime: ")
    assert notes[0].endswith("without the plugins")
