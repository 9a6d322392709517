"""The plain HTTP side, from outside: the dashboard's files, /healthz, /api/snapshot, /metrics."""

from __future__ import annotations

import http
import math
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from session_buddy_realtime import __version__
from session_buddy_realtime.stream.hub import Hub
from session_buddy_realtime.stream.pages import CONTENT_TYPES
from session_buddy_realtime.stream.prometheus import Family, metric_name, render
from session_buddy_realtime.stream.router import listen
from session_buddy_realtime.stream.routes import install_routes
from session_buddy_realtime.stream.session import SessionPolicy
from session_buddy_realtime.stream.stats import Histogram, StreamStats
from tests.conftest import (
    SERVER_MESSAGE,
    UNIT,
    ClientFactory,
    ServerFactory,
    SkillsDB,
    iso,
    url_of,
    wait_until,
)
from tests.fakes import FakeSource
from tests.http_support import HttpReply, bare_router, http_request

TOKEN = "http-token-for-the-tests"
DASHBOARD = files("session_buddy_realtime") / "dashboard"


def _dashboard_files() -> list[str]:
    return sorted(
        entry.name
        for entry in DASHBOARD.iterdir()
        if entry.is_file() and entry.name[entry.name.rfind(".") :] in CONTENT_TYPES
    )


def _families(reply: HttpReply) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(reply.text())}


def _value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    for each in families[family].samples:
        if each.name == sample and each.labels == labels:
            return float(each.value)
    raise AssertionError(f"no sample {sample}{labels}")


# The dashboard's files


async def test_the_dashboard_is_served_at_the_root_with_strict_headers(
    start_server: ServerFactory,
) -> None:
    """GET / is index.html, with a CSP that allows only the page's own origin and its
    WebSocket by scheme, host and port, and the other protective headers."""
    server = await start_server()
    reply = await http_request(server.port, "/?skill=pytest-run")
    assert reply.status == 200
    assert reply.body == (DASHBOARD / "index.html").read_bytes()
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    csp = reply.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self';" in csp
    assert "style-src 'self';" in csp
    own = f"127.0.0.1:{server.port}"
    assert f"connect-src 'self' ws://{own} wss://{own};" in csp
    for loose in ("unsafe-inline", "unsafe-eval", "ws: ", "wss: ", "*"):
        assert loose not in csp
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["referrer-policy"] == "no-referrer"
    assert reply.headers["x-frame-options"] == "DENY"
    assert reply.headers["cache-control"] == "no-cache"


async def test_every_asset_is_served_with_its_type(start_server: ServerFactory) -> None:
    """Each file of the dashboard folder of a known type is served under /assets/ as it is,
    with its Content-Type and the same headers as the page."""
    server = await start_server()
    names = _dashboard_files()
    assert "index.html" in names
    assert len(names) >= 2
    for name in names:
        reply = await http_request(server.port, f"/assets/{name}")
        assert reply.status == 200, name
        assert reply.body == (DASHBOARD / name).read_bytes()
        assert reply.headers["content-type"] == CONTENT_TYPES[name[name.rfind(".") :]]
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert "content-security-policy" in reply.headers


async def test_a_request_with_the_current_etag_gets_304(start_server: ServerFactory) -> None:
    """Cache-Control: no-cache makes the browser revalidate: an unchanged file costs a 304."""
    server = await start_server()
    first = await http_request(server.port, "/")
    again = await http_request(server.port, "/", headers={"If-None-Match": first.headers["etag"]})
    assert (again.status, again.body) == (304, b"")


@pytest.mark.parametrize(
    "path",
    [
        "/assets/../__init__.py",
        "/assets/%2e%2e/__init__.py",
        "/assets/..%2f..%2fpyproject.toml",
        "/assets/%2e%2e%2fprotocol.py",
        "/assets/../../../../etc/passwd",
        "/assets//etc/passwd",
        "/assets/",
        "/assets/.",
        "/assets/.hidden.js",
        "/assets/index.html/.",
        "/assets/app.js%00.html",
        "/assets/missing.js",
        "/assets/__init__.py",
        "/assets/C:%5Cwindows%5Cwin.ini",
    ],
)
async def test_nothing_outside_the_dashboard_folder_is_served(
    start_server: ServerFactory, path: str
) -> None:
    """Traversal in every spelling, encoded or not, and names that are not plain files of
    a known type get 404, and the server goes on serving."""
    server = await start_server()
    reply = await http_request(server.port, path)
    assert (reply.status, reply.text()) == (404, "not found\n")
    assert (await http_request(server.port, "/healthz")).status == 200


async def test_head_gives_the_headers_of_get_without_a_body(start_server: ServerFactory) -> None:
    """HEAD answers like GET, Content-Length included, but sends no body."""
    server = await start_server()
    get = await http_request(server.port, "/")
    head = await http_request(server.port, "/", method="HEAD")
    assert (head.status, head.body) == (200, b"")
    assert head.headers["content-length"] == str(len(get.body))
    assert (await http_request(server.port, "/healthz", method="HEAD")).body == b""


async def test_other_methods_get_405(start_server: ServerFactory) -> None:
    """POST or DELETE on a route is refused with 405 and the methods that are allowed."""
    server = await start_server()
    for method in ("POST", "DELETE", "PUT"):
        reply = await http_request(server.port, "/metrics", method=method)
        assert reply.status == 405
        assert reply.headers["allow"] == "GET, HEAD"


async def test_an_oversized_request_line_gets_414_and_the_server_goes_on(
    start_server: ServerFactory,
) -> None:
    """A query string longer than the request line limit (8 KiB) is refused with 414."""
    server = await start_server()
    reply = await http_request(server.port, "/api/snapshot?skill=" + "x" * 9000)
    assert reply.status == 414
    assert (await http_request(server.port, "/healthz")).status == 200


async def test_a_websocket_upgrade_on_the_root_still_opens_the_stream(
    skills_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """The page and the stream share the URL: a handshake on / opens the WebSocket."""
    skills_db.record("pytest-run")
    server = await start_server()
    client = await open_client(url_of(server) + "/")
    update = await client.recv_type("metrics_update")
    assert update["data"]["top_skills"][0]["skill_name"] == "pytest-run"


async def test_the_host_check_covers_the_dashboard(start_server: ServerFactory) -> None:
    """A DNS-rebinding Host gets 403 for the page too, before any file is read."""
    server = await start_server()
    reply = await http_request(server.port, "/", host=f"rebound.example:{server.port}")
    assert reply.status == 403


# /healthz and /api/snapshot


async def test_healthz_is_open_and_says_only_ok(start_server: ServerFactory) -> None:
    """Even with a token set, /healthz answers 200 {"status": "ok"} and nothing else."""
    server = await start_server(token=TOKEN)
    reply = await http_request(server.port, "/healthz")
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    assert reply.headers["cache-control"] == "no-store"


async def test_healthz_is_503_when_nothing_broadcasts() -> None:
    """/healthz of a hub whose broadcaster does not run answers 503 (what a load
    balancer needs to take the instance out)."""
    router = bare_router()
    hub: Hub[Any] = Hub(
        FakeSource(),
        StreamStats(),
        interval=1.0,
        read_timeout=0.8,
        max_buffered_bytes=65536,
        slow_client_timeout=10.0,
        close_timeout=1.0,
    )
    policy = SessionPolicy(
        token=None, auth_timeout=1.0, message_rate=10.0, message_burst=20, update_interval=1.0
    )

    async def snapshot(skill: str | None) -> dict[str, Any]:
        return {}

    install_routes(router, hub, policy, status=dict, snapshot=snapshot)

    async def handler(connection: Any) -> None:
        await connection.wait_closed()

    listener = await listen(
        handler,
        "127.0.0.1",
        0,
        router=router,
        ssl_context=None,
        max_message_size=4096,
        open_timeout=20 * UNIT,
        close_timeout=4 * UNIT,
    )
    try:
        reply = await http_request(listener.sockets[0].getsockname()[1], "/healthz")
        assert (reply.status, reply.json()) == (503, {"status": "unavailable"})
    finally:
        listener.close()
        await listener.wait_closed()


async def test_api_snapshot_is_the_payload_a_subscriber_gets(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """/api/snapshot is server.snapshot() as JSON, for all skills or ?skill=NAME (any
    skill, percent-encoded or not), valid against the schema's metrics_update."""
    server = await start_server()
    reply = await http_request(server.port, "/api/snapshot")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    payload = reply.json()
    expected = await server.snapshot()
    assert payload["data"] == expected["data"]
    assert payload["source"]["state"] == "ok"
    SERVER_MESSAGE.validate(payload)
    one = (await http_request(server.port, "/api/snapshot?skill=skill%2D12")).json()
    assert one["skill"] == "skill-12"
    assert [row["skill_name"] for row in one["data"]["top_skills"]] == ["skill-12"]


@pytest.mark.parametrize(
    ("query", "code", "words"),
    [
        ("skill=", "invalid_skill", "must not be empty"),
        ("skill=%20pytest", "invalid_skill", "whitespace"),
        ("skill=a%00b", "invalid_skill", "U+0000"),
        ("skill=" + "x" * 129, "invalid_skill", "129 characters"),
        ("skill=a&skill=b", "invalid_message", "at most once"),
        ("skill=%ff", "invalid_message", "not UTF-8"),
        ("&".join(f"k{i}=v" for i in range(20)), "invalid_message", "malformed"),
    ],
)
async def test_api_snapshot_refuses_a_bad_skill_with_400_naming_the_problem(
    start_server: ServerFactory, query: str, code: str, words: str
) -> None:
    """A skill name the protocol refuses, a repeated or undecodable parameter: 400 with
    a JSON error whose code and message say what is wrong."""
    server = await start_server()
    reply = await http_request(server.port, f"/api/snapshot?{query}")
    assert reply.status == 400
    error = reply.json()
    assert error["error"] == code
    assert words in error["message"]


# /metrics


async def test_metrics_parse_as_prometheus_text_with_skills_and_server_figures(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """/metrics parses with prometheus_client's parser and carries each skill's figures,
    the server's counters, the database state and the tick histogram."""
    ranked_db.add_anomaly("skill-02", iso(datetime.now(UTC)), anomaly_type="pattern_shift")
    server = await start_server()
    client = await open_client(url_of(server))
    await client.recv_type("metrics_update")
    await wait_until(lambda: server.status()["ticks"] >= 2)
    reply = await http_request(server.port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = _families(reply)
    invocations = "session_buddy_skill_invocations"
    assert families[invocations].type == "counter"
    assert _value(families, invocations, invocations + "_total", skill="skill-01") == 29
    assert _value(families, invocations, invocations + "_total", skill="skill-12") == 18
    ratio = "session_buddy_skill_completion_ratio"
    assert _value(families, ratio, ratio, skill="skill-01") == 1.0
    duration = "session_buddy_skill_average_duration_seconds"
    assert _value(families, duration, duration, skill="skill-03") == 3.0
    anomalies = "session_buddy_anomalies"
    assert _value(families, anomalies, anomalies, type="pattern_shift", source="table") == 1
    assert _value(families, anomalies, anomalies, type="other", source="table") == 0
    assert _value(families, anomalies, anomalies, type="drop", source="live") == 0
    state = "session_buddy_realtime_database_state"
    assert _value(families, state, state, state="ok") == 1
    assert _value(families, state, state, state="error") == 0
    assert _value(families, "session_buddy_realtime_clients", "session_buddy_realtime_clients") == 1
    ticks = "session_buddy_realtime_ticks"
    assert _value(families, ticks, ticks + "_total") >= 2
    histogram = "session_buddy_realtime_tick_duration_seconds"
    assert families[histogram].type == "histogram"
    count = _value(families, histogram, histogram + "_count")
    assert count >= 2
    assert _value(families, histogram, histogram + "_bucket", le="+Inf") == count
    info = "session_buddy_realtime_info"
    assert _value(families, info, info, version=__version__) == 1


async def test_metrics_export_at_most_50_skills_the_most_invoked(
    skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """With 60 skills, the skill label takes 50 values: the 50 most invoked."""
    for rank in range(60):
        skills_db.record(f"s-{rank:02d}", count=70 - rank)
    server = await start_server()
    families = _families(await http_request(server.port, "/metrics"))
    skills = {s.labels["skill"] for s in families["session_buddy_skill_invocations"].samples}
    assert skills == {f"s-{rank:02d}" for rank in range(50)}


async def test_metrics_escape_label_values_that_the_database_holds(
    skills_db: SkillsDB, start_server: ServerFactory
) -> None:
    """A skill name with a double quote, a backslash and braces reads back unchanged."""
    name = 'say "hi" \\ {x} = 1'
    skills_db.record(name, count=3)
    server = await start_server()
    families = _families(await http_request(server.port, "/metrics"))
    samples = families["session_buddy_skill_invocations"].samples
    assert [(s.labels["skill"], s.value) for s in samples] == [(name, 3.0)]


def test_rendered_text_escapes_newlines_and_sanitizes_names() -> None:
    """render() escapes a newline, a quote and a backslash in label values and HELP, and
    metric_name() maps characters a name cannot hold to '_'."""
    family = Family("odd-name.x", "gauge", "line one\nline two \\")
    family.add(1.5, skill='a\nb"c\\d')
    text = render([family])
    assert metric_name("odd-name.x") == "odd_name_x"
    assert metric_name("9lives") == "_9lives"
    (parsed,) = text_string_to_metric_families(text)
    assert parsed.name == "odd_name_x"
    assert parsed.documentation == "line one\nline two \\"
    assert parsed.samples[0].labels == {"skill": 'a\nb"c\\d'}
    assert parsed.samples[0].value == 1.5


def test_the_histogram_counts_by_inclusive_upper_bound() -> None:
    """An observation equal to a bound counts in that bound's bucket; +Inf holds all."""
    histogram = Histogram(bounds=(0.01, 0.1))
    for value in (0.01, 0.05, 0.5, 0.001):
        histogram.observe(value)
    assert histogram.cumulative() == [(0.01, 2), (0.1, 3), (math.inf, 4)]
    assert (histogram.count, round(histogram.total, 3)) == (4, 0.561)


# Access rules


async def test_data_routes_need_the_bearer_token_when_one_is_set(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """With a token, /metrics and /api/snapshot answer 401 with WWW-Authenticate: Bearer
    without it or with a wrong one (counted), and 200 with it; ?token= does not count."""
    server = await start_server(token=TOKEN)
    for path in ("/metrics", "/api/snapshot"):
        missing = await http_request(server.port, path)
        assert missing.status == 401
        assert missing.headers["www-authenticate"].startswith("Bearer ")
        assert missing.json()["error"] == "not_authenticated"
        assert (await http_request(server.port, f"{path}?token={TOKEN}")).status == 401
        wrong = await http_request(server.port, path, headers={"Authorization": "Bearer nope-nope"})
        assert wrong.status == 401
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        right = await http_request(server.port, path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status == 200
    status = server.status()
    assert status["auth_failures"] == 2
    assert status["refused"]["bad_token"] == 2
    assert status["refused"]["no_token"] == 4


async def test_the_dashboard_files_need_no_token(start_server: ServerFactory) -> None:
    """The page holds no data, so it is served without a token: it asks for one itself."""
    server = await start_server(token=TOKEN)
    assert (await http_request(server.port, "/")).status == 200


async def test_guessing_the_token_over_http_is_throttled(
    start_server: ServerFactory,
) -> None:
    """Five wrong tokens block the address: then even the right one gets 429 with
    Retry-After, shared with the WebSocket's throttle."""
    server = await start_server(token=TOKEN)
    for _ in range(5):
        wrong = await http_request(
            server.port, "/metrics", headers={"Authorization": "Bearer wrong-token"}
        )
        assert wrong.status == 401
    blocked = await http_request(
        server.port, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert blocked.status == http.HTTPStatus.TOO_MANY_REQUESTS
    assert int(blocked.headers["retry-after"]) >= 1
    with pytest.raises(InvalidStatus) as refused:
        await connect(url_of(server), additional_headers={"Authorization": f"Bearer {TOKEN}"})
    assert refused.value.response.status_code == http.HTTPStatus.TOO_MANY_REQUESTS
