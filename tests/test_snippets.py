"""The client examples of docs/protocol.md work as printed, run against a real server.

Each example is the fenced block right after a ``<!-- snippet: NAME -->`` line. The tests
change nothing in it but the server's address (``ws://localhost:8765`` becomes the test
server's). The browser example is run in headless Chromium by ``tests/test_dashboard.py``;
here it is only checked to parse.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import UNIT, ServerFactory, SkillsDB, url_of

ROOT = Path(__file__).resolve().parent.parent
PRINTED_URL = "ws://localhost:8765"
_SNIPPET = re.compile(r"<!-- snippet: (\w+) -->\n```(\w+)\n(.*?)```", re.S)


def snippets(document: str = "docs/protocol.md") -> dict[str, tuple[str, str]]:
    """The examples of ``document`` by name: (language, code)."""
    text = (ROOT / document).read_text()
    return {name: (language, code) for name, language, code in _SNIPPET.findall(text)}


def test_the_readme_prints_the_tested_examples() -> None:
    """Every example the README marks as a snippet is the tested one of docs/protocol.md,
    character for character."""
    tested = snippets()
    for name, example in snippets("README.md").items():
        assert example == tested[name], f"README's {name} example differs from docs/protocol.md's"


def test_the_three_examples_are_there() -> None:
    """docs/protocol.md marks a browser, a Node.js and a Python example, each connecting
    to the default address and sending only once the socket is open."""
    found = snippets()
    assert {name: language for name, (language, _) in found.items()} == {
        "browser": "javascript",
        "node": "javascript",
        "python": "python",
    }
    for _, code in found.values():
        assert code.count(PRINTED_URL) == 1
    assert 'addEventListener("open"' in found["browser"][1]
    assert 'ws.on("open"' in found["node"][1]
    assert "from websockets.asyncio.client import connect" in found["python"][1]


async def _run_until(command: list[str], cwd: Path, expected: str) -> list[str]:
    """Run ``command`` until a line of its output starts with ``expected``; return the lines."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(200 * UNIT):
            while not any(line.startswith(expected) for line in lines):
                raw = await process.stdout.readline()
                if not raw:
                    break
                lines.append(raw.decode().rstrip())
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
    assert any(line.startswith(expected) for line in lines), lines
    return lines


async def test_the_python_example_runs_as_printed(
    ranked_db: SkillsDB, start_server: ServerFactory, tmp_path: Path
) -> None:
    """The Python example, run as a script, prints the welcome and the busiest skill."""
    server = await start_server()
    code = snippets()["python"][1].replace(PRINTED_URL, url_of(server))
    script = tmp_path / "client.py"
    script.write_text(code)
    lines = await _run_until([sys.executable, str(script)], tmp_path, "skill-01 29 100.0")
    assert lines[0].startswith("Connected to Session-Buddy real-time metrics - server ")


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the ``ws`` package installed from the npm registry (once per run)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("needs node and npm on PATH")
    folder = tmp_path_factory.mktemp("node-client")
    try:
        result = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--no-save", "ws@8"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("npm install ws took longer than 180 s (no registry?)")
    if result.returncode != 0:
        pytest.skip(f"npm install ws failed: {result.stderr.strip()[-300:]}")
    return folder


async def test_the_node_example_runs_as_printed(
    ranked_db: SkillsDB, start_server: ServerFactory, node_modules: Path
) -> None:
    """The Node.js example, with the ws package, prints the busiest skill's figures."""
    server = await start_server()
    code = snippets()["node"][1].replace(PRINTED_URL, url_of(server))
    (node_modules / "client.js").write_text(code)
    await _run_until(["node", "client.js"], node_modules, "skill-01 29 100")


def test_the_browser_example_parses() -> None:
    """The browser example is valid JavaScript (node --check); the dashboard's browser
    tests run it in Chromium."""
    if shutil.which("node") is None:
        pytest.skip("needs node on PATH")
    result = subprocess.run(
        ["node", "--check", "--input-type=module"],
        input=snippets()["browser"][1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
