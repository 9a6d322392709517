"""Authentication, TLS, Origin and Host checks, limits and log redaction, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from session_buddy_realtime import RealTimeMetricsServer, ServerStartError
from session_buddy_realtime.stream.security import AuthThrottle, redact, tokens_match
from tests.conftest import UNIT, Client, ClientFactory, ServerFactory, SkillsDB, url_of, wait_until

TOKEN = "correct-horse-battery-staple-42"


@pytest.fixture
def secret_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture every log record at DEBUG; after the test, no record may contain TOKEN."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    leaked = [r.getMessage() for r in caplog.records if TOKEN in r.getMessage()]
    assert leaked == [], "the token reached the logs"
    assert TOKEN not in caplog.text


async def expect_close(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the server closes; return the close code and reason."""

    async def read_all() -> None:
        while True:
            await ws.recv()

    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(read_all(), 40 * UNIT)
    return ws.close_code, ws.close_reason


async def test_bearer_header_authenticates_at_the_handshake(
    ranked_db: SkillsDB, start_server: ServerFactory, secret_logs: pytest.LogCaptureFixture
) -> None:
    """A valid Authorization header gives an authenticated connection that gets metrics."""
    server = await start_server(token=TOKEN)
    async with connect(
        url_of(server), additional_headers={"Authorization": f"Bearer {TOKEN}"}
    ) as ws:
        client = Client(ws)
        welcome = await client.recv()
        assert (welcome["auth_required"], welcome["authenticated"]) == (True, True)
        assert welcome["subscription"] == "all"
        await client.recv_type("metrics_update")
    assert server.status()["auth_enabled"] is True


async def test_query_parameter_authenticates_and_is_never_logged(
    ranked_db: SkillsDB, start_server: ServerFactory, secret_logs: pytest.LogCaptureFixture
) -> None:
    """?token= works for browsers, and even debug logs of the request line redact it."""
    server = await start_server(token=TOKEN)
    async with connect(f"{url_of(server)}/?token={TOKEN}") as ws:
        client = Client(ws)
        assert (await client.recv())["authenticated"] is True
        await client.recv_type("metrics_update")
    assert any("[redacted]" in r.getMessage() for r in secret_logs.records), "request was logged"


async def test_first_message_auth_and_nothing_served_before_it(
    ranked_db: SkillsDB, start_server: ServerFactory, secret_logs: pytest.LogCaptureFixture
) -> None:
    """Without handshake credentials only 'auth' is served; after it, metrics flow."""
    server = await start_server(token=TOKEN)
    async with connect(url_of(server)) as ws:
        client = Client(ws)
        welcome = await client.recv()
        assert (welcome["authenticated"], welcome["subscription"]) == (False, None)
        for request in ({"type": "subscribe"}, {"type": "ping"}):
            await client.send_json(request)
            error = await client.recv()
            assert (error["type"], error["code"]) == ("error", "not_authenticated")
        ticks = server.status()["ticks"]
        await wait_until(lambda: server.status()["ticks"] >= ticks + 3)
        await client.send_json({"type": "auth", "token": TOKEN})
        confirmed = await client.recv()
        assert confirmed["type"] == "authenticated", "no metrics before authentication"
        update = await client.recv_type("metrics_update")
        assert update["skill"] is None
        [described] = server.status()["clients"]
        assert described["authenticated"] is True


async def test_wrong_token_message_closes_with_4001(
    start_server: ServerFactory, secret_logs: pytest.LogCaptureFixture
) -> None:
    """A wrong token in the auth message closes the connection with 4001."""
    server = await start_server(token=TOKEN)
    async with connect(url_of(server)) as ws:
        await Client(ws).recv()
        await ws.send(json.dumps({"type": "auth", "token": TOKEN[:-1] + "x"}))
        assert await expect_close(ws) == (4001, "authentication failed")
    assert server.status()["auth_failures"] == 1


async def test_wrong_header_token_is_refused_with_401(
    start_server: ServerFactory, secret_logs: pytest.LogCaptureFixture
) -> None:
    """A wrong Bearer token is refused at the handshake with HTTP 401."""
    server = await start_server(token=TOKEN)
    with pytest.raises(InvalidStatus) as refused:
        await connect(url_of(server), additional_headers={"Authorization": "Bearer nope-nope"})
    assert refused.value.response.status_code == 401
    assert server.status()["refused"] == {"bad_token": 1}


async def test_client_that_never_authenticates_is_closed(start_server: ServerFactory) -> None:
    """No auth message within auth_timeout closes the connection with 4001."""
    server = await start_server(token=TOKEN, auth_timeout=0.3)
    async with connect(url_of(server)) as ws:
        await Client(ws).recv()
        assert await expect_close(ws) == (4001, "authentication timeout")


async def test_auth_on_a_server_without_token_changes_nothing(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """'auth' sent to a server without a token is acknowledged and metrics keep flowing."""
    server = await start_server()
    client = await open_client(url_of(server))
    await client.send_json({"type": "auth", "token": "whatever-it-is"})
    await client.recv_type("authenticated")
    await client.recv_type("metrics_update")


def test_tokens_are_compared_whole_and_redacted_everywhere() -> None:
    """The comparison needs the whole token; redaction covers query, header and JSON forms."""
    assert tokens_match(TOKEN, TOKEN)
    assert not tokens_match(TOKEN, TOKEN + "x")
    assert not tokens_match(TOKEN[:-1], TOKEN)
    text = f'GET /?token={TOKEN}&x=1 Authorization: Bearer {TOKEN} {{"token": "{TOKEN}"}}'
    assert TOKEN not in redact(text)
    assert redact(text).count("[redacted]") == 3


# TLS


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(certificate_authority: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost and its key, as PEM files."""
    cert = certificate_authority.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


async def test_wss_clients_work_with_tls(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    tls_files: tuple[Path, Path],
    certificate_authority: trustme.CA,
) -> None:
    """With a certificate the server speaks wss:// and a client trusting the CA gets metrics."""
    cert, key = tls_files
    server = await start_server(ssl_certfile=cert, ssl_keyfile=key)
    assert url_of(server).startswith("wss://")
    context = ssl.create_default_context()
    certificate_authority.configure_trust(context)
    async with connect(url_of(server), ssl=context) as ws:
        await Client(ws).recv_type("metrics_update")
    assert server.status()["tls_enabled"] is True


async def test_a_silent_tls_handshake_is_dropped_after_open_timeout(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    tls_files: tuple[Path, Path],
) -> None:
    """A TCP connection to a wss:// server that never sends its ClientHello is dropped
    after open_timeout, which bounds the TLS handshake too (asyncio's own default: 60 s)."""
    cert, key = tls_files
    server = await start_server(ssl_certfile=cert, ssl_keyfile=key, open_timeout=4 * UNIT)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    began = time.monotonic()
    async with asyncio.timeout(100 * UNIT):
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
    assert time.monotonic() - began < 60 * UNIT
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def test_sockets_in_their_tls_handshake_count_against_the_caps(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    tls_files: tuple[Path, Path],
    certificate_authority: trustme.CA,
) -> None:
    """Sixty raw TCP connections from 127.0.0.2 to a wss:// server that never start TLS
    are counted from their accept, so those over the per-address cap are reset at once,
    and a real TLS client from another address connects and streams meanwhile."""
    cert, key = tls_files
    server = await start_server(
        ssl_certfile=cert, ssl_keyfile=key, max_connections_per_ip=4, open_timeout=5.0
    )
    silent = []
    for _ in range(60):
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", server.port))
        silent.append(sock)
    try:
        await wait_until(
            lambda: (
                server.status()["refused"].get("too_many_sockets_from_ip", 0) >= 60 - 20
                and server.status()["connections"] <= 4 + 16
            )
        )
        context = ssl.create_default_context()
        certificate_authority.configure_trust(context)
        async with connect(url_of(server), ssl=context, open_timeout=40 * UNIT) as ws:
            await Client(ws).recv_type("metrics_update")
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.parametrize("broken", ["missing cert", "missing key", "mismatched pair", "not pem"])
async def test_bad_tls_files_fail_at_start_naming_the_file(
    broken: str,
    skills_db: SkillsDB,
    tls_files: tuple[Path, Path],
    certificate_authority: trustme.CA,
    tmp_path: Path,
    free_port: int,
) -> None:
    """A missing, mismatched or unreadable certificate fails start() and leaves nothing bound."""
    cert, key = tls_files
    named = cert
    if broken == "missing cert":
        cert = named = tmp_path / "absent.pem"
    elif broken == "missing key":
        key = named = tmp_path / "absent.key"
    elif broken == "mismatched pair":
        other = tmp_path / "other.key"
        certificate_authority.issue_cert("other.test").private_key_pem.write_to_path(str(other))
        key = other
    else:
        cert.write_text("not a certificate\n")
    server = RealTimeMetricsServer(
        "127.0.0.1", free_port, skills_db.path, ssl_certfile=cert, ssl_keyfile=key
    )
    with pytest.raises(ServerStartError, match=str(named).replace(".", r"\.")):
        await server.start()
    assert not server.running
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", free_port))


# Browsers


async def test_origins_are_checked(ranked_db: SkillsDB, start_server: ServerFactory) -> None:
    """No Origin and the server's own origin pass; another site's origin is refused (403)."""
    server = await start_server()
    own = f"http://127.0.0.1:{server.port}"
    async with connect(url_of(server), origin=own) as ws:  # type: ignore[arg-type]
        assert (await Client(ws).recv())["type"] == "connected"
    with pytest.raises(InvalidStatus) as refused:
        await connect(url_of(server), origin="https://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    assert server.status()["refused"] == {"origin_not_allowed": 1}


async def test_allowed_origins_setting(ranked_db: SkillsDB, start_server: ServerFactory) -> None:
    """A listed origin is accepted; '*' accepts any."""
    listed = await start_server(allowed_origins=["https://dash.example/"])
    async with connect(url_of(listed), origin="https://dash.example") as ws:  # type: ignore[arg-type]
        await Client(ws).recv()
    anything = await start_server(allowed_origins=["*"])
    async with connect(url_of(anything), origin="https://any.example") as ws:  # type: ignore[arg-type]
        await Client(ws).recv()


async def test_dns_rebinding_host_header_is_refused(start_server: ServerFactory) -> None:
    """On loopback, a request whose Host names another site is refused with 403."""
    server = await start_server()
    sock = socket.create_connection(("127.0.0.1", server.port))
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://rebound.example:{server.port}", sock=sock)
    assert refused.value.response.status_code == 403
    sock.close()
    assert server.status()["refused"] == {"host_not_allowed": 1}


async def test_exposed_bind_without_token_or_tls_warns(
    skills_db: SkillsDB, caplog: pytest.LogCaptureFixture
) -> None:
    """Listening on all interfaces with neither token nor TLS logs a loud warning."""
    server = RealTimeMetricsServer("0.0.0.0", 0, skills_db.path)  # noqa: S104 - the case tested
    with caplog.at_level(logging.WARNING):
        async with server:
            pass
    assert any("not a loopback address" in r.getMessage() for r in caplog.records)


# Limits


async def test_connection_limits_refuse_at_the_handshake(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """Over max_connections the handshake gets 503, over the per-address limit 429; the
    connections already open keep working."""
    total = await start_server(max_connections=3)
    kept = [await connect(url_of(total)) for _ in range(3)]
    with pytest.raises(InvalidStatus) as full:
        await connect(url_of(total))
    assert full.value.response.status_code == 503
    for ws in kept:
        assert (await Client(ws).recv())["type"] == "connected"
        await ws.close()

    per_ip = await start_server(max_connections_per_ip=2)
    kept = [await connect(url_of(per_ip)) for _ in range(2)]
    with pytest.raises(InvalidStatus) as busy:
        await connect(url_of(per_ip))
    assert busy.value.response.status_code == 429
    for ws in kept:
        await Client(ws).recv_type("metrics_update")
        await ws.close()


async def test_rate_limit_errors_first_then_closes(start_server: ServerFactory) -> None:
    """Past the burst, one rate_limited error; a client that keeps going is closed with 1008."""
    server = await start_server(message_rate=1.0, message_burst=5, update_interval=60.0)
    async with connect(url_of(server)) as ws:
        client = Client(ws)
        await client.recv()
        for _ in range(5):
            await client.send_json({"type": "ping"})
        for _ in range(5):
            assert (await client.recv())["type"] == "pong"
        await client.send_json({"type": "ping"})
        error = await client.recv()
        assert (error["type"], error["code"]) == ("error", "rate_limited")
        for _ in range(10):
            await client.send_json({"type": "ping"})
        assert await expect_close(ws) == (1008, "message rate limit exceeded")
    assert server.status()["rate_limited"] >= 6


async def test_a_client_just_over_the_rate_is_closed_and_never_answered_over_it(
    start_server: ServerFactory,
) -> None:
    """A client pinging at three times the limit, paced (so that allowed messages mix
    with refused ones), is answered only as often as the limit allows and is closed with
    1008 once it is a burst over, within about burst / excess rate seconds."""
    rate, burst = 20.0, 5
    server = await start_server(message_rate=rate, message_burst=burst, update_interval=60.0)
    async with connect(url_of(server)) as ws:
        client = Client(ws)
        await client.recv()
        replies: list[dict[str, object]] = []

        async def read() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    replies.append(await client.recv())

        reader = asyncio.create_task(read())
        began = time.monotonic()
        with contextlib.suppress(ConnectionClosed):
            for _ in range(400):  # 20 s at 3x the rate: far longer than the close takes
                await client.send_json({"type": "ping"})
                await asyncio.sleep(1 / (3 * rate))
        await reader
        elapsed = time.monotonic() - began
    assert ws.close_code == 1008
    assert ws.close_reason == "message rate limit exceeded"
    pongs = sum(reply["type"] == "pong" for reply in replies)
    assert pongs <= burst + rate * elapsed + 1
    assert [r.get("code") for r in replies if r["type"] == "error"] == ["rate_limited"]
    # Tokens run out after burst / (3r - r) s; the close follows burst more refusals.
    assert elapsed < 40 * UNIT


# The CLI


def test_serve_and_watch_with_a_token(ranked_db: SkillsDB, tmp_path: Path, free_port: int) -> None:
    """serve takes the token from the environment; watch with it gets updates, without it
    it is told the token is missing."""
    env = {**os.environ, "SESSION_BUDDY_REALTIME_TOKEN": TOKEN}
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "session_buddy_realtime.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port),
            "--db",
            str(ranked_db.path),
            "--interval",
            "0.1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stdout is not None
        assert "Streaming" in serve.stdout.readline()
        url = f"ws://127.0.0.1:{free_port}"
        watch = [sys.executable, "-m", "session_buddy_realtime.cli", "watch", "--url", url]
        ok = subprocess.run(
            [*watch, "--count", "1", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=200 * UNIT,
            check=False,
        )
        assert ok.returncode == 0, ok.stderr
        assert '"authenticated":true' in ok.stdout
        plain = {k: v for k, v in env.items() if k != "SESSION_BUDDY_REALTIME_TOKEN"}
        token_file = tmp_path / "token"
        token_file.write_text("not-the-right-token\n")
        refused = subprocess.run(
            [*watch, "--token-file", str(token_file)],
            env=plain,
            capture_output=True,
            text=True,
            timeout=200 * UNIT,
            check=False,
        )
        assert refused.returncode == 1
        assert "401" in refused.stderr
    finally:
        serve.terminate()
        _, errors = serve.communicate(timeout=200 * UNIT)
    assert TOKEN not in errors


def test_the_auth_throttle_caps_its_wait_and_never_overflows() -> None:
    """An address that guesses each time its block ends keeps being blocked for at most
    `longest` seconds, even after thousands of failures (2.0 ** n would overflow)."""
    throttle = AuthThrottle()
    now = 0.0
    for _ in range(3000):
        now += throttle.wait("203.0.113.9", now)
        throttle.failed("203.0.113.9", now)
    assert throttle.wait("203.0.113.9", now) == throttle.longest
