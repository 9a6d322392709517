"""The browser Origin policy through real handshakes: what it admits, refuses and logs."""

from __future__ import annotations

import logging
import socket

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from session_buddy_realtime import RealTimeMetricsServer
from session_buddy_realtime.errors import ConfigError
from session_buddy_realtime.host.settings import load_settings
from session_buddy_realtime.stream.security import OriginLog, origin_allowed
from tests.conftest import UNIT, Client, ServerFactory, SkillsDB

GATE_LOGGER = "session_buddy_realtime.stream.gate"
SECURITY_LOGGER = "session_buddy_realtime.stream.security"


async def _opens(port: int, origin: str | None, *, host: str | None = None, path: str = "/") -> int:
    """Handshake from ``origin`` (Host ``host``) to 127.0.0.1:``port``: 101, or the refusal."""
    sock = socket.create_connection(("127.0.0.1", port))
    uri = f"ws://{host or f'127.0.0.1:{port}'}{path}"
    try:
        async with connect(
            uri,
            sock=sock,
            origin=origin,  # type: ignore[arg-type]
            open_timeout=40 * UNIT,
            close_timeout=4 * UNIT,
        ) as ws:
            assert (await Client(ws).recv())["type"] == "connected"
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        (None, 101),  # not a browser
        ("http://localhost:8000", 101),  # python -m http.server on this machine
        ("http://127.0.0.1:3000", 101),
        ("https://localhost:5173", 101),
        ("http://[::1]:8080", 101),
        ("http://localhost", 101),
        ("https://example.com", 403),  # any site the user visits
        ("http://localhost.example.com:8000", 403),
        ("http://127.0.0.1.nip.io:8000", 403),
        ("null", 403),  # file:// pages, sandboxed frames of any site
        ("file://", 403),
        ("chrome-extension://abcdef", 403),
        ("http://localhost:notaport", 403),
    ],
)
async def test_the_default_policy_on_loopback(
    skills_db: SkillsDB, start_server: ServerFactory, origin: str | None, status: int
) -> None:
    """Bound to loopback, pages of this machine (any loopback origin, any port) may
    connect; other sites, opaque origins (null) and malformed origins may not."""
    server = await start_server()
    assert await _opens(server.port, origin) == status


async def test_the_servers_own_page_is_allowed_wherever_it_is_served(
    skills_db: SkillsDB,
) -> None:
    """Bound beyond loopback, the page this server served (Origin equal to the Host, an
    address) connects; a loopback page on another port does not, nor a page under a DNS
    name (it could be rebinding to this address)."""
    server = RealTimeMetricsServer("0.0.0.0", 0, db_path=skills_db.path, update_interval=0.1)  # noqa: S104
    await server.start()
    try:
        port = server.port
        assert await _opens(port, f"http://127.0.0.1:{port}") == 101
        assert await _opens(port, f"http://localhost:{port}") == 101
        lan = f"192.0.2.10:{port}"
        assert await _opens(port, f"http://{lan}", host=lan) == 101
        assert await _opens(port, f"http://{lan}", host=f"192.0.2.11:{port}") == 403
        assert await _opens(port, "http://localhost:8000") == 403
        named = f"rebound.example:{port}"
        assert await _opens(port, f"http://{named}", host=named) == 403
    finally:
        await server.stop()


async def test_listed_origins_are_allowed_null_included(
    skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """An origin in allowed_origins connects, whatever the case of its scheme and host in
    the list or the request; 'null' lets file:// pages connect."""
    server = await start_server(allowed_origins=["null", "https://Dash.Example/"])
    assert await _opens(server.port, "null") == 101
    assert await _opens(server.port, "https://dash.example") == 101
    assert await _opens(server.port, "HTTPS://DASH.example") == 101
    assert await _opens(server.port, "https://other.example") == 403


async def test_a_refused_origin_is_logged_once_with_the_setting_that_allows_it(
    skills_db: SkillsDB, start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The first refusal of each origin logs one WARNING naming the exact setting and
    flag that would allow it; refusing it again logs nothing more."""
    caplog.set_level(logging.WARNING)
    server = await start_server()
    for _ in range(3):
        assert await _opens(server.port, "http://example.com") == 403
    assert await _opens(server.port, "null") == 403
    warnings = [r.getMessage() for r in caplog.records if r.name == SECURITY_LOGGER]
    assert warnings == [
        "refused a WebSocket from origin 'http://example.com' (not allowed): to allow it, "
        "add http://example.com to SESSION_BUDDY_REALTIME_ALLOWED_ORIGINS (comma-separated) "
        "or pass --allow-origin http://example.com",
        "refused a WebSocket from origin 'null' (not allowed): to allow it, "
        "add null to SESSION_BUDDY_REALTIME_ALLOWED_ORIGINS (comma-separated) "
        "or pass --allow-origin null",
    ]
    assert server.status()["refused"]["origin_not_allowed"] == 4


def test_the_origin_log_is_bounded_and_never_echoes_a_bad_origin(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past its limit of distinct origins the log says so once and then stays quiet; an
    origin that no setting could list is shown escaped, without a suggestion."""
    caplog.set_level(logging.WARNING)
    log = OriginLog(limit=3)
    log.refused("http://x\r\nINJECTED")
    for number in range(10):
        log.refused(f"http://site-{number}.example")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert messages[0] == (
        "refused a WebSocket from origin 'http://x\\r\\nINJECTED': not an origin that can be listed"
    )
    assert "more than 3 distinct origins" in messages[3]


def test_origin_rules_by_themselves() -> None:
    """The pure rule: trailing slashes ignored, '*' allows all, the Host rule only for
    addresses, loopback names or the bound host."""
    assert origin_allowed("https://a.example/", {"https://a.example"})
    assert origin_allowed("null", {"*"})
    assert origin_allowed("http://10.0.0.5:8765", set(), host="10.0.0.5:8765", bound_host="::")
    assert origin_allowed(
        "http://metrics.lan:8765", set(), host="metrics.lan:8765", bound_host="metrics.lan"
    )
    assert not origin_allowed(
        "http://metrics.lan:8765",
        set(),
        host="metrics.lan:8765",
        bound_host="0.0.0.0",  # noqa: S104
    )
    assert origin_allowed("http://[::1]:1", set(), bound_host="::1")
    assert not origin_allowed("http://[::1]:1", set(), bound_host="0.0.0.0")  # noqa: S104


def test_the_setting_accepts_null_for_file_pages() -> None:
    """SESSION_BUDDY_REALTIME_ALLOWED_ORIGINS takes 'null' beside http(s) origins and '*',
    and still refuses what is not an origin."""
    key = "SESSION_BUDDY_REALTIME_ALLOWED_ORIGINS"
    settings = load_settings({key: "null, http://localhost:3000/"})
    assert settings.allowed_origins == ("null", "http://localhost:3000")
    with pytest.raises(ConfigError, match="file:///tmp/page"):
        load_settings({key: "file:///tmp/page.html"})
