"""What the launcher costs Session-Buddy over stdio: time to serve, and time to stop.

Run (in an environment with Session-Buddy 0.23, Python 3.13)::

    .venv-sb/bin/python tests/benchmarks/session_buddy_launch.py [--rounds 5]

Each round, interleaved, starts Session-Buddy over stdio in an empty project twice: once
through ``session-buddy-realtime run -- python -m session_buddy.server`` and once as the
baseline, Session-Buddy's own server object served over stdio with nothing of ours
loaded (``python -c`` importing ``session_buddy.server`` and running ``mcp.run()``). It
measures the time from spawn to the answer of ``initialize`` and to the tool list, then,
with the client still holding stdin open, from a signal to exit: SIGTERM in one run,
SIGINT in another. Medians, and the ratio of the launcher to the baseline. A process
still running 10 s after the signal is killed and shown as "> 10 s" (SIGINT cancels the
baseline's server, which then waits on its blocked stdin read for the client's next line).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent
LAUNCHER = [
    str(BIN / "session-buddy-realtime"),
    "run",
    "--",
    "python",
    "-m",
    "session_buddy.server",
]
BASELINE = [
    sys.executable,
    "-c",
    "import sys; out = sys.stdout; sys.stdout = sys.stderr\n"
    "from session_buddy.server import mcp\n"
    "sys.stdout = out; mcp.run(transport='stdio', show_banner=False)",
]
GIVE_UP = 10.0


def request(pipe_in: IO[bytes], pipe_out: IO[bytes], ident: int, method: str) -> dict[str, object]:
    params = (
        {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "0"},
        }
        if method == "initialize"
        else {}
    )
    message = {"jsonrpc": "2.0", "id": ident, "method": method, "params": params}
    pipe_in.write(json.dumps(message).encode() + b"\n")
    pipe_in.flush()
    while True:
        reply = json.loads(pipe_out.readline())
        if reply.get("id") == ident:
            return dict(reply)


def one_run(
    command: list[str], project: Path, signum: signal.Signals
) -> tuple[float, float, float, int]:
    """Seconds to initialize, to the tool list, and from ``signum`` to exit; tools listed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_BUDDY_REALTIME_")}
    env.update(HOME=str(project), SESSION_BUDDY_REALTIME_PORT="0", PATH=f"{BIN}:{env['PATH']}")
    began = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=project,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    request(process.stdin, process.stdout, 1, "initialize")
    initialized = time.perf_counter() - began
    process.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
    listed = request(process.stdin, process.stdout, 2, "tools/list")
    tools = len(listed["result"]["tools"])  # type: ignore[index]
    ready = time.perf_counter() - began
    signalled = time.perf_counter()
    process.send_signal(signum)
    try:
        process.wait(GIVE_UP)
        stopped = time.perf_counter() - signalled
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        stopped = float("inf")
    process.stdin.close()
    process.stdout.close()
    return initialized, ready, stopped, tools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    commands = {"launcher": LAUNCHER, "baseline": BASELINE}
    runs: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(rounds):
            for signum in (signal.SIGTERM, signal.SIGINT):
                for name, command in commands.items():
                    project = Path(scratch) / f"{name}-{signum.name}-{number}"
                    project.mkdir()
                    result = one_run(command, project, signum)
                    runs.setdefault((name, signum.name), []).append(result)

    def median(name: str, index: int, signame: str | None = None) -> float:
        return statistics.median(
            run[index]
            for (who, sent), results in runs.items()
            if who == name and signame in (None, sent)
            for run in results
        )

    def shown(seconds: float) -> str:
        return f"{seconds:.2f} s" if seconds != float("inf") else f"> {GIVE_UP:.0f} s"

    print(f"Session-Buddy over stdio, {rounds} interleaved rounds per signal, medians")
    print(f"{'':10} {'initialize':>11} {'tools/list':>11} {'SIGTERM':>9} {'SIGINT':>9} tools")
    for name in commands:
        print(
            f"{name:10} {median(name, 0):9.2f} s {median(name, 1):9.2f} s "
            f"{shown(median(name, 2, 'SIGTERM')):>9} {shown(median(name, 2, 'SIGINT')):>9} "
            f"{median(name, 3):5.0f}"
        )
    ratios = [median("launcher", i) / median("baseline", i) for i in (0, 1)]
    print(f"{'ratio':10} {ratios[0]:10.2f}x {ratios[1]:10.2f}x")


if __name__ == "__main__":
    main()
