"""The dashboard at GET /, in a real headless Chromium against a real server and database.

Each test loads the page the server serves, drives it as a person would (typing, Enter,
clicks, reloads) through the DevTools protocol (``tests/browser.py``), and asserts what
the page shows. Every page must also finish without an uncaught exception, a
Content-Security-Policy violation or a dialog (checked when its tab closes).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from session_buddy_realtime import RealTimeMetricsServer
from tests.browser import CHROMIUM, Chromium, Page
from tests.conftest import INTERVAL, UNIT, ServerFactory, SkillsDB, iso, url_of
from tests.test_snippets import PRINTED_URL, snippets

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"needs {CHROMIUM} (Debian package chromium)"
)

WAIT = 160 * UNIT
"""Longest wait for something the page should show (8 s)."""
TOKEN = "dashboard-test-token-0123456789"
MARKUP = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    """One browser for the module; each test gets its own tab."""
    browser = Chromium.start()
    yield browser
    browser.close()


@pytest.fixture
async def page(chromium: Chromium) -> AsyncIterator[Page]:
    """A fresh tab at laptop size, light mode; checked for script problems when closed."""
    tab = await chromium.new_page()
    await tab.viewport(1280, 900)
    await tab.color_scheme("light")
    yield tab
    problems = tab.exceptions + tab.violations + [f"dialog: {text}" for text in tab.dialogs]
    await tab.close()
    assert problems == [], "the page reported script errors, CSP violations or dialogs"


def page_url(server: RealTimeMetricsServer, query: str = "") -> str:
    return f"http://127.0.0.1:{server.port}/{query}"


async def open_live(page: Page, server: RealTimeMetricsServer, query: str = "") -> None:
    """Load the dashboard and wait until it says it is live."""
    await page.navigate(page_url(server, query))
    await page.wait_for(
        "document.getElementById('status-text').textContent.startsWith('Live')", WAIT, "live"
    )


# The visible cells of a skill's row in the table, found by the name a person reads.
_ROW = """(name) => {
  const row = [...document.querySelectorAll('#skills-body tr')].find(
    (tr) => tr.querySelector('.skill-link, .skill-name').textContent === name);
  if (!row) return null;
  const [invocations, completed, duration] = [...row.querySelectorAll('.value')]
    .map((cell) => cell.innerText);
  return {invocations, completed, duration};
}"""
_NAMES = (
    "[...document.querySelectorAll('#skills-body .skill-link, #skills-body .skill-name')]"
    ".map((cell) => cell.innerText)"
)


async def row(page: Page, name: str) -> dict[str, str] | None:
    value: dict[str, str] | None = await page.evaluate(f"({_ROW})({json.dumps(name)})")
    return value


async def wait_for_row(page: Page, name: str, **cells: str) -> dict[str, str]:
    """Wait until the table shows ``name`` with these visible cell texts."""
    condition = " && ".join(
        [f"(r = ({_ROW})({json.dumps(name)}))"]
        + [f"r.{key} === {json.dumps(value)}" for key, value in cells.items()]
    )
    await page.wait_for(f"(() => {{ let r; return {condition}; }})()", WAIT, f"{name} {cells}")
    found = await row(page, name)
    assert found is not None
    return found


async def visible(page: Page, element_id: str) -> Any:
    return await page.evaluate(f"!document.getElementById({json.dumps(element_id)}).hidden")


async def test_shows_the_skills_of_the_database(
    page: Page, skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """Skill names, invocations, completion rate and average duration from the database."""
    skills_db.record("pytest-run", count=12, duration=5.2)
    skills_db.record("pytest-run", completed=False, count=3)
    skills_db.record("ruff-check", count=7, duration=1.4)
    server = await start_server()
    await open_live(page, server)

    pytest_run = await wait_for_row(page, "pytest-run", invocations="15")
    assert pytest_run == {"invocations": "15", "completed": "80.0 %", "duration": "5.2 s"}
    assert await row(page, "ruff-check") == {
        "invocations": "7",
        "completed": "100 %",
        "duration": "1.4 s",
    }
    assert await page.evaluate(_NAMES) == ["pytest-run", "ruff-check"]
    header = await page.text(".topbar")
    assert "Interval\n100 ms" in header  # from `connected`
    assert "protocol 1" in header
    assert "No anomalies" in await page.text("#anomalies")
    # ...under the server's strict policy, which the page fixture checks was never violated.
    policy = await page.evaluate("fetch('/').then((r) => r.headers.get('content-security-policy'))")
    assert "script-src 'self'" in policy
    assert "style-src 'self'" in policy
    assert "unsafe" not in policy


async def test_a_value_changes_after_new_invocations(
    page: Page, skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """Invocations written while the page is open show up without a reload."""
    skills_db.record("ruff-check", count=7)
    server = await start_server()
    await open_live(page, server)
    await wait_for_row(page, "ruff-check", invocations="7")
    skills_db.record("ruff-check", count=5, completed=False)
    assert await wait_for_row(page, "ruff-check", invocations="12") == {
        "invocations": "12",
        "completed": "58.3 %",
        "duration": "1.0 s",
    }


async def test_an_anomaly_shows_prominently(
    page: Page, skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """A row of skill_anomalies shows with its type, deviation, source and time."""
    skills_db.record("git-commit", count=3)
    server = await start_server()
    await open_live(page, server)
    await wait_for_row(page, "git-commit")
    assert await page.evaluate("document.getElementById('anomalies').dataset.count") == "0"

    skills_db.add_anomaly("git-commit", iso(datetime.now(UTC) - timedelta(minutes=2)), score=4.25)
    await page.wait_for(
        "document.querySelectorAll('#anomaly-list li').length === 1", WAIT, "one anomaly"
    )
    text = await page.text("#anomalies")
    assert "Anomalies\n1" in text or "Anomalies 1" in text
    for shown in ("DROP", "git-commit", "deviation 4.25", "skill_anomalies table", "2 min ago"):
        assert shown in text
    assert "baseline 90 → observed 40" in text
    assert await page.evaluate("document.title") == "(1) Session-Buddy realtime"


async def test_the_activity_chart_is_full_on_first_load(
    page: Page, skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """Invocations of the last minutes, written before the page opened, fill the chart at once."""
    now = datetime.now(UTC)
    skills_db.record("pytest-run", at=now - timedelta(seconds=150), count=4)
    skills_db.record("ruff-check", at=now - timedelta(seconds=90), count=6, completed=False)
    skills_db.record("pytest-run", at=now - timedelta(seconds=20), count=5)
    server = await start_server()
    await page.navigate(page_url(server))
    mode = await page.wait_for(
        "document.getElementById('activity').dataset.mode !== 'waiting'"
        " && document.getElementById('activity').dataset.mode",
        WAIT,
        "the activity chart to leave 'waiting'",
    )
    assert mode == "history", (
        "the server did not answer the `history` request (the page fell back to live "
        "updates, so the chart started empty): GET / needs the `history` protocol message"
    )
    caption = await page.text("#activity-caption")
    assert caption.startswith("15 invocations in the last"), caption
    bars = await page.evaluate(
        "[...document.querySelectorAll('#activity-chart g.bucket')]"
        ".map((g) => Number(g.dataset.invocations)).filter((n) => n > 0)"
    )
    assert sum(bars) == 15
    assert len(bars) >= 2, "150 s and 20 s ago fall in different bars"
    heights = await page.evaluate(
        "[...document.querySelectorAll('#activity-chart rect')].map((r) => r.getBBox().height)"
    )
    assert max(heights) > 20, "the bars are drawn, not only counted"

    skills_db.record("ruff-check", count=3)
    await page.wait_for(
        "document.getElementById('activity-caption').textContent.startsWith('18 invocations')",
        WAIT,
        "new invocations extend the chart",
    )


async def test_drill_down_by_name_and_back(
    page: Page, ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """Typing a name and Enter shows that skill alone (even outside the top 10), linkably."""
    server = await start_server()
    await open_live(page, server)
    await page.wait_for(f"{_NAMES}.length === 10", WAIT, "the top 10")
    assert "skill-12" not in await page.evaluate(_NAMES)

    await page.type("#search-input", "skill-12")
    await page.press("Enter")
    await page.wait_for(f"{_NAMES}.join() === 'skill-12'", WAIT, "only skill-12")
    assert await page.evaluate("location.search") == "?skill=skill-12"
    assert await page.text("#view-title") == "Skill: skill-12"
    assert (await row(page, "skill-12") or {}).get("invocations") == "18"
    assert await visible(page, "view-all")

    await page.reload()
    await page.wait_for(f"{_NAMES}.join() === 'skill-12'", WAIT, "skill-12 after a reload")
    assert await page.text("#view-title") == "Skill: skill-12"

    await page.click("#view-all")
    await page.wait_for(f"{_NAMES}.length === 10", WAIT, "back to the top 10")
    assert await page.evaluate("location.search") == ""
    assert await page.text("#view-title") == "All skills"
    assert not await visible(page, "view-all")


async def test_search_finds_skills_outside_the_top_ten(
    page: Page, ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """The search box lists matching names, most invoked first; picking one drills down."""
    server = await start_server()
    await open_live(page, server)
    await page.type("#search-input", "skill-1")
    results = "[...document.querySelectorAll('#search-results button')].map((b) => b.innerText)"
    await page.wait_for(
        f"{results}.join() === 'skill-10,skill-11,skill-12'",
        WAIT,
        "three matches (needs the `skills` protocol message)",
    )
    await page.press("ArrowDown")
    await page.press("ArrowDown")
    assert await page.evaluate("document.activeElement.innerText") == "skill-11"
    await page.press("Enter")
    await page.wait_for(f"{_NAMES}.join() === 'skill-11'", WAIT, "only skill-11")
    assert await page.evaluate("location.search") == "?skill=skill-11"
    assert not await visible(page, "search-results")


async def test_a_token_is_asked_for_then_data_flows(
    page: Page, skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """With a token set, the page asks for it, says when it is wrong, and then shows data."""
    skills_db.record("pytest-run", count=4)
    server = await start_server(token=TOKEN)
    await page.navigate(page_url(server))
    await page.wait_for("!document.getElementById('auth').hidden", WAIT, "the token form")
    assert await page.text("#status-text") == "Token required"
    assert await page.evaluate("document.activeElement.id") == "auth-token"
    assert "pytest-run" not in await page.text()

    await page.type("#auth-token", "wrong-token-wrong")
    await page.press("Enter")
    await page.wait_for(
        "document.getElementById('auth-message').textContent.includes('refused')",
        WAIT,
        "the wrong token refused",
    )
    await page.type("#auth-token", TOKEN)
    await page.press("Enter")
    await wait_for_row(page, "pytest-run", invocations="4")
    assert not await visible(page, "auth")
    storage = "JSON.stringify([location.href, {...localStorage}, {...sessionStorage}])"
    assert TOKEN not in await page.evaluate(storage)

    # Kept in memory only: a reload asks again. Ticking "remember" keeps it across reloads.
    await page.reload()
    await page.wait_for("!document.getElementById('auth').hidden", WAIT, "asked again")
    await page.click("#auth-remember")
    await page.type("#auth-token", TOKEN)
    await page.press("Enter")
    await wait_for_row(page, "pytest-run")
    await page.reload()
    await wait_for_row(page, "pytest-run")
    assert not await visible(page, "auth")
    assert TOKEN in await page.evaluate("JSON.stringify({...localStorage})")
    await page.click("#forget-token")
    assert await page.evaluate("localStorage.length") == 0


async def test_reconnects_after_the_server_restarts(
    page: Page, skills_db: SkillsDB, free_port: int
) -> None:
    """When the server stops, the page says it is reconnecting, and is live again after."""
    skills_db.record("ruff-check", count=7)

    def new_server() -> RealTimeMetricsServer:
        return RealTimeMetricsServer(
            host="127.0.0.1", port=free_port, db_path=skills_db.path, update_interval=INTERVAL
        )

    server = new_server()
    await server.start()
    try:
        await open_live(page, server)
        await wait_for_row(page, "ruff-check", invocations="7")
        await server.stop()
        await page.wait_for(
            "document.getElementById('status').dataset.state === 'reconnecting'",
            WAIT,
            "reconnecting",
        )
        assert "Disconnected: reconnecting" in await page.text("#status")
        assert "next try in" in await page.text("#status-detail")
        assert await visible(page, "reconnect-now")
        skills_db.record("ruff-check", count=5)
        server = new_server()
        await server.start()
        await wait_for_row(page, "ruff-check", invocations="12")
        assert await page.text("#status-text") == "Live"
    finally:
        await server.stop()


async def test_stale_data_shows_the_reason(
    page: Page, tmp_path: Path, start_server: ServerFactory
) -> None:
    """While the database is missing, the page says so with the server's reason; then recovers."""
    path = tmp_path / "later.db"
    server = await start_server(db_path=path)
    await page.navigate(page_url(server))
    await page.wait_for("!document.getElementById('stale').hidden", WAIT, "the stale banner")
    assert "waiting for the skills database at" in await page.text("#stale")
    assert str(path) in await page.text("#stale")
    assert await page.text("#status-text") == "Live: data is stale"

    SkillsDB(path).record("late-skill", count=2)
    await wait_for_row(page, "late-skill", invocations="2")
    assert not await visible(page, "stale")
    assert await page.text("#status-text") == "Live"


async def test_markup_in_a_skill_name_shows_as_text(
    page: Page, skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """A skill named like an HTML tag is shown as those characters, never parsed as markup."""
    skills_db.record(MARKUP, count=3)
    skills_db.record("<b>bold</b>", count=2)
    skills_db.add_anomaly(MARKUP, iso(datetime.now(UTC)))
    server = await start_server()
    await open_live(page, server)
    await wait_for_row(page, MARKUP, invocations="3")
    await page.wait_for("document.querySelectorAll('#anomaly-list li').length === 1", WAIT)
    assert MARKUP in await page.text("#anomalies")
    assert "<b>bold</b>" in await page.text("#skills")
    counts = "['img', 'b', 'i'].map((tag) => document.getElementsByTagName(tag).length)"
    assert await page.evaluate(counts) == [0, 0, 0]

    await page.click("#skills-body .skill-link")  # the first row: the markup skill
    await page.wait_for(f"{_NAMES}.join() === {json.dumps(MARKUP)}", WAIT, "drilled down")
    assert await page.text("#view-title") == f"Skill: {MARKUP}"
    assert await page.evaluate(counts) == [0, 0, 0]
    assert page.dialogs == []


async def test_a_name_the_stream_cannot_follow_is_shown_but_not_offered(
    page: Page, skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """Names in the top 10 that subscribe refuses (a leading space, a right-to-left override)
    show as text with no button to follow them; a valid name beside them keeps its button."""
    skills_db.record(" lead", count=5)
    skills_db.record("\u202eevil", count=4)
    skills_db.record("fine-skill", count=3)
    server = await start_server()
    await open_live(page, server)
    await wait_for_row(page, "fine-skill", invocations="3")
    buttons = "[...document.querySelectorAll('#skills-body .skill-link')].map((b) => b.textContent)"
    assert await page.evaluate(buttons) == ["fine-skill"]
    assert "lead" in await page.text("#skills-body")


async def test_phone_width_and_dark_mode(
    page: Page, skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """At phone width nothing overflows sideways; dark mode follows the system setting."""
    long_name = "a-skill-with-a-rather-long-name-for-a-phone-screen"
    skills_db.record(long_name, count=3)
    skills_db.add_anomaly(long_name, iso(datetime.now(UTC)))
    server = await start_server()
    await page.viewport(390, 844, mobile=True)
    await page.color_scheme("dark")
    await open_live(page, server)
    await wait_for_row(page, long_name)
    await page.wait_for("document.querySelectorAll('#anomaly-list li').length === 1", WAIT)
    assert await page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    card = "getComputedStyle(document.querySelector('.skill-row')).display"
    assert await page.evaluate(card) == "grid", "a row of the table is a card at phone width"
    background = "getComputedStyle(document.body).backgroundColor"
    assert await page.evaluate(background) == "rgb(14, 17, 22)"
    await page.color_scheme("light")
    assert await page.evaluate(background) == "rgb(244, 246, 249)"


async def test_keyboard_and_labels(
    page: Page, skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """Fields have labels, actions are buttons, focus is visible, the state is announced."""
    skills_db.record("pytest-run", count=2)
    server = await start_server()
    await open_live(page, server)
    await wait_for_row(page, "pytest-run")
    unlabelled = "[...document.querySelectorAll('input')].filter((i) => !i.labels.length).length"
    assert await page.evaluate(unlabelled) == 0
    actions = "[...document.querySelectorAll('.skill-link, .result, .button')]"
    assert await page.evaluate(f"{actions}.every((e) => e.tagName === 'BUTTON')")
    live = "document.getElementById('status-text').getAttribute('aria-live')"
    assert await page.evaluate(live) == "polite"

    await page.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Skip to the metrics"
    assert await page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    await page.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "search-input"
    await page.send("Input.insertText", text="pytest-run")
    await page.press("Enter")
    await page.wait_for("location.search === '?skill=pytest-run'", WAIT, "keyboard drill-down")

    # "All skills" is reached with Tab alone, and Enter on it goes back.
    for _ in range(10):
        if await page.evaluate("document.activeElement.id") == "view-all":
            break
        await page.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "view-all"
    await page.press("Enter")
    await page.wait_for("location.search === ''", WAIT, "back with the keyboard")


async def test_the_browser_example_of_the_protocol_doc_runs_as_printed(
    page: Page, ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """docs/protocol.md's browser example, in a page of the server's origin, logs the busiest
    skill's figures on each update, and the close when the server stops."""
    server = await start_server()
    # A page of the server's own origin without the dashboard's script: /healthz.
    await page.navigate(page_url(server, "healthz"))
    code = snippets()["browser"][1].replace(PRINTED_URL, url_of(server))
    await page.evaluate(f"(() => {{\n{code}\n}})()")  # its own scope, as in a <script>
    await page.wait_for_console("skill-01 29 100", WAIT)
    assert not any(line.startswith("skill-12 ") for line in page.console), "the top 10 only"
    await server.stop()
    await page.wait_for_console("closed 1001 ", WAIT)
