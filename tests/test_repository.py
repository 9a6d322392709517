"""The repository keeps its promises: README commands, CI, docs that match the schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import CLIENT_MESSAGE, SERVER_MESSAGE

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(markdown: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", markdown, re.S)]


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run contains, verbatim, the test command that the README gives second."""
    run_command, test_command = _bash_blocks((ROOT / "README.md").read_text())[:2]
    assert "serve --demo" in run_command
    assert test_command.endswith("pytest")
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_top_level_holds_only_the_designed_entries() -> None:
    """The top of the repository is exactly what the design lists (plus dot-files)."""
    visible = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
    visible -= {"build", "dist"} | {p for p in visible if p.endswith(".egg-info")}
    assert visible == {
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "session_buddy_realtime",
        "tests",
        "docs",
    }


def _json_examples(markdown: str) -> list[object]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", markdown, re.S)]


@pytest.mark.parametrize("example", _json_examples((ROOT / "docs" / "protocol.md").read_text()))
def test_protocol_doc_examples_match_the_schema(example: dict[str, object]) -> None:
    """Every JSON example in docs/protocol.md is a valid server or client message (every
    server message has a timestamp, no client message has one)."""
    validator = SERVER_MESSAGE if "timestamp" in example else CLIENT_MESSAGE
    try:
        validator.validate(example)
    except jsonschema.ValidationError as exc:
        pytest.fail(f"{example.get('type')}: {exc.message}")


def test_protocol_doc_names_every_error_code() -> None:
    """docs/protocol.md documents each error code that the server can send."""
    from session_buddy_realtime.protocol import ErrorCode

    text = (ROOT / "docs" / "protocol.md").read_text()
    missing = [code.value for code in ErrorCode if f"`{code.value}`" not in text]
    assert missing == []
