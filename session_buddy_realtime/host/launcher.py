"""``session-buddy-realtime run -- COMMAND``: Session-Buddy's own command, with the plugins.

Two commands of Session-Buddy serve MCP, and both are run here, in this process and this
Python environment, with the plugins attached to Session-Buddy's server object
(``sessionbuddy.attach``):

- ``session-buddy start`` (or ``python -m session_buddy start``): its own command line
  runs as usual and serves over HTTP.
- ``python -m session_buddy.server``: the stdio server. Its module serves nothing when
  run (0.23 has no ``__main__`` block), so its server object is served here; stdout
  carries only the protocol.

Anything else (another Session-Buddy command, ``--help``, another program) runs
unchanged, with a bare ``python`` or ``session-buddy`` taken from this environment too. So
does Session-Buddy itself when it is not shaped as expected, after one line on stderr
saying why: the launcher never keeps the host from starting.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from session_buddy_realtime.host import sessionbuddy
from session_buddy_realtime.host.stdio_channel import protect_stdout, restore_stdout

__all__ = ["Launch", "classify", "run"]

Mode = Literal["http", "stdio", "unchanged"]
_SERVE_VERBS: Final = frozenset({"start"})


@dataclass(frozen=True, slots=True)
class Launch:
    """What to do with a command: its mode and Session-Buddy's own arguments."""

    mode: Mode
    command: tuple[str, ...]
    arguments: tuple[str, ...] = ()
    """For ``http``: the arguments after ``session-buddy`` (``start ...``)."""
    program: str | None = None
    """The program the command names (``session-buddy`` or a Python), as given."""


_PYTHON_FLAGS: Final = frozenset({"-u", "-B", "-E", "-s", "-S", "-I", "-O", "-OO", "-q"})
"""Interpreter options that may stand before ``-m`` and change nothing that matters here."""
_HELP: Final = frozenset({"-h", "--help"})


def classify(command: Sequence[str]) -> Launch:
    """Tell what ``command`` is: Session-Buddy's HTTP start, its stdio server, or other."""
    if not command:
        raise ValueError("no command given: use 'run -- session-buddy start', for example")
    program, rest = command[0], tuple(command[1:])
    name = Path(program).name
    if name == "session-buddy":
        if rest and rest[0] in _SERVE_VERBS and not _HELP.intersection(rest):
            return Launch("http", tuple(command), rest, program)
        return Launch("unchanged", tuple(command))
    if _is_python(name):
        while rest and rest[0] in _PYTHON_FLAGS:
            rest = rest[1:]
        if len(rest) >= 2 and rest[0] == "-m":
            module, arguments = rest[1], rest[2:]
            if module == sessionbuddy.STDIO_MODULE and not arguments:
                return Launch("stdio", tuple(command), (), program)
            if (
                module == "session_buddy"
                and arguments
                and arguments[0] in _SERVE_VERBS
                and not _HELP.intersection(arguments)
            ):
                return Launch("http", tuple(command), arguments, program)
    return Launch("unchanged", tuple(command))


def _is_python(name: str) -> bool:
    return name == "python" or (
        name.startswith("python") and name.removeprefix("python").replace(".", "").isdigit()
    )


def run(command: Sequence[str]) -> int:
    """Run ``command`` as described in the module docstring; return its exit status."""
    launch = classify(command)
    if launch.mode == "unchanged":
        return _exec(launch.command)
    _say_if_other_environment(launch.program)
    try:
        return _run_with_plugins(launch)
    except KeyboardInterrupt:  # Ctrl-C while Session-Buddy loads
        return 130


def _run_with_plugins(launch: Launch) -> int:
    if launch.mode == "stdio":
        if sys.stdout is None or sys.stdin is None:
            _say("stdin or stdout is closed: there is no channel to serve MCP over stdio")
            return 2
        # Before Session-Buddy is imported: it prints to stdout while it loads.
        protect_stdout()
        module = sessionbuddy.STDIO_MODULE
    else:
        module = sessionbuddy.HTTP_MODULE
    try:
        server = sessionbuddy.find_server(module)
        sessionbuddy.attach(server, sessionbuddy.host_context(os.environ, Path.cwd()))
    except Exception as exc:  # the plugins must never keep Session-Buddy from starting
        _say(f"{exc}; running {' '.join(launch.command)!r} without the plugins")
        restore_stdout()
        return _exec(launch.command)
    if launch.mode == "stdio":
        return sessionbuddy.serve_stdio(server)
    return _session_buddy_cli(launch.arguments)


def _session_buddy_cli(arguments: Sequence[str]) -> int:
    """Run Session-Buddy's own command line, as its ``session-buddy`` script does."""
    entry = importlib.import_module("session_buddy.__main__")
    sys.argv = ["session-buddy", *arguments]
    try:
        entry.main()
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _exec(command: Sequence[str]) -> int:
    """Replace this process with ``command``, its bare program name taken from this environment."""
    program = _this_environment(command[0])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(program, [program, *command[1:]])  # noqa: S606 - the user's own command
    except OSError as exc:
        _say(f"cannot run {command[0]!r}: {exc.strerror or exc}")
        return 127
    return 0  # not reached: exec replaces this process


def _this_environment(program: str) -> str:
    """A bare ``python``/``session-buddy`` means this environment's, as for the commands
    the launcher runs itself; anything else is looked up as given."""
    if os.sep in program:
        return program
    if _is_python(program):
        return sys.executable
    beside = Path(sys.executable).parent / program
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else program


def _say_if_other_environment(program: str | None) -> None:
    """Say so when the command names, by path, a program of another Python environment."""
    if program is None or os.sep not in program:
        return  # a bare name ('session-buddy', 'python') means this environment's
    ours = Path(sys.executable).absolute().parent
    if Path(program).absolute().parent != ours:
        _say(
            f"running Session-Buddy from this Python environment ({sys.prefix}), not "
            f"from {Path(program).parent}; install session-buddy-realtime beside the "
            f"Session-Buddy you use"
        )


def _say(message: str) -> None:
    print(f"session-buddy-realtime: {message}", file=sys.stderr, flush=True)
