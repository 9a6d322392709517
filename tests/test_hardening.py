"""What outside clients broke, done again from outside: raw sockets, floods, hostile requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

from session_buddy_realtime import RealTimeMetricsServer
from tests.conftest import (
    INTERVAL,
    UNIT,
    Client,
    ClientFactory,
    ServerFactory,
    SkillsDB,
    iso,
    url_of,
    wait_until,
)
from tests.test_reliability import OP_TEXT, RawClient, client_frame

OP_PING = 0x9
TOKEN = "hardening-token-123"


async def test_a_ping_flood_without_reading_is_cut_off(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """A client that unsubscribes, then sends ping frames and never reads the pongs, is
    reset once the replies waiting for it pass twice max_buffered_bytes, instead of
    making the server queue a pong per ping for ever."""
    server = await start_server(max_buffered_bytes=16 * 1024, ping_interval=None)
    client = await RawClient.open(server.port)
    await client.read_text("connected")
    await client.send(client_frame(OP_TEXT, b'{"type": "unsubscribe"}'))
    ping = client_frame(OP_PING, b"p" * 125)
    sent = 0
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(200 * UNIT):
            while sent < 40_000:  # 5 MB of pongs if the server kept answering
                await client.send(ping * 50)
                sent += 50
    await client.close()
    assert sent < 40_000, "the server kept reading and answering a client that never read"
    await wait_until(lambda: server.status()["connections"] == 0)
    assert server.status()["refused"].get("not_reading") == 1


@pytest.mark.parametrize(
    "headers",
    [
        "Host: 127.0.0.1\r\nHost: 127.0.0.1",
        "Host: 127.0.0.1\r\nOrigin: http://localhost\r\nOrigin: http://localhost",
        "Host: [::1",
        "Host: 127.0.0.1:80x",
    ],
    ids=["two-hosts", "two-origins", "unclosed-bracket", "bad-port"],
)
async def test_malformed_requests_get_400_and_keep_the_log_quiet(
    headers: str,
    start_server: ServerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A repeated Host or Origin header, or a malformed Host, gets 400 (not 500), and
    fifty of them log no error and at most one debug line."""
    caplog.set_level(logging.DEBUG, logger="session_buddy_realtime")
    server = await start_server()
    statuses = []
    for _ in range(50):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = (
            f"GET / HTTP/1.1\r\n{headers}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        writer.write(request.encode())
        async with asyncio.timeout(40 * UNIT):
            statuses.append((await reader.readline()).split()[1])
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert set(statuses) == {b"400"}
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    refused_lines = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(refused_lines) <= 2  # one per second of the run at most
    assert server.status()["refused"] == {"malformed_request": 50}


async def test_a_burst_of_handshakes_admits_exactly_the_limit(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """Forty clients connecting at once to a server limited to thirty connections: exactly
    thirty are admitted and ten refused with 503 (handshakes in flight do not count)."""
    server = await start_server(max_connections=30)

    async def attempt() -> int:
        try:
            ws = await connect(url_of(server), open_timeout=100 * UNIT)
        except InvalidStatus as refused:
            return refused.response.status_code
        opened.append(ws)
        return 101

    opened: list[object] = []
    try:
        results = await asyncio.gather(*(attempt() for _ in range(40)))
    finally:
        for ws in opened:
            await ws.close()  # type: ignore[attr-defined]
    assert sorted(results).count(101) == 30
    assert sorted(results).count(503) == 10


def _half_open_from(address: str, port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((address, 0))
        sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


async def test_half_open_sockets_from_one_address_do_not_lock_out_the_others(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Sixty half-open sockets from 127.0.0.2, with at most four connections per address
    and ten in all, are cut back at accept to the per-address cap, and a client from
    127.0.0.1 still connects and gets updates."""
    server = await start_server(max_connections=10, max_connections_per_ip=4, open_timeout=5.0)
    hostile = _half_open_from("127.0.0.2", server.port, 60)
    try:
        # Dropped at accept: each one counted, then gone once its reset completes.
        await wait_until(
            lambda: (
                server.status()["refused"].get("too_many_sockets_from_ip", 0) >= 60 - 20
                and server.status()["connections"] <= 4 + 16
            )
        )
        client = await open_client(url_of(server))
        await client.recv_type("metrics_update")
    finally:
        for sock in hostile:
            sock.close()


async def test_no_form_of_the_token_reaches_the_log(
    ranked_db: SkillsDB, start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """With debug logging on, a token sent as a percent-encoded query key, as a
    JSON-escaped key, and at the tail of a long frame never appears in any log record."""
    caplog.set_level(logging.DEBUG)
    server = await start_server(token=TOKEN)
    async with connect(f"{url_of(server)}/?%74oken={TOKEN}", open_timeout=40 * UNIT) as ws:
        assert json.loads(await ws.recv())["authenticated"] is True
    async with connect(url_of(server), open_timeout=40 * UNIT) as ws:
        await ws.recv()
        padding = "x" * 3000
        await ws.send(f'{{"type": "auth", "pad": "{padding}", "\\u0074oken": "{TOKEN}"}}')
        reply = json.loads(await ws.recv())
        assert reply["type"] in {"authenticated", "error"}
    async with connect(url_of(server), open_timeout=40 * UNIT) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "auth", "pad": "y" * 3000, "token": TOKEN}))
        assert json.loads(await ws.recv())["type"] == "authenticated"
    ours = [r for r in caplog.records if r.name.startswith("session_buddy_realtime")]
    logged = "\n".join(record.getMessage() for record in ours)
    assert "< TEXT" in logged or "> TEXT" in logged, "frames were logged at debug level"
    assert TOKEN not in logged
    assert TOKEN[-8:] not in logged


async def test_failed_authentication_is_throttled_per_address(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """After five wrong tokens from one address, its next attempts get 429 with the time
    to wait, even with the right token; another kind of client (no token) is unaffected."""
    server = await start_server(token=TOKEN)
    statuses = []
    for attempt in range(8):
        token = TOKEN if attempt == 7 else f"wrong-token-{attempt}"
        try:
            async with connect(
                url_of(server),
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=40 * UNIT,
            ):
                statuses.append(101)
        except InvalidStatus as refused:
            statuses.append(refused.response.status_code)
            body = refused.response.body.decode()
    assert statuses[:5] == [401] * 5
    assert statuses[5:] == [429, 429, 429]
    assert "retry in" in body
    async with connect(url_of(server), open_timeout=40 * UNIT) as ws:  # first-message auth
        await ws.recv()
        await ws.send(json.dumps({"type": "auth", "token": TOKEN}))
        await ws.wait_closed()
        assert ws.close_code == 4001
        assert ws.close_reason.startswith("too many failed attempts; retry in")


async def test_subscribing_right_after_connecting_gets_fresh_data_not_busy(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """A client that subscribes to a skill below the top 10 as soon as it connects to an
    idle server (the seed's own example) gets a fresh update with that skill's row, never
    a 'busy' one, ten times in a row."""
    server = await start_server()
    for _ in range(10):
        async with connect(url_of(server), open_timeout=40 * UNIT) as ws:
            client = Client(ws)
            await client.send_json({"type": "subscribe", "skill": "skill-12"})
            await client.recv_type("subscription_confirmed")
            update = await client.recv_type("metrics_update")
            assert update["source"]["state"] == "ok", update["source"]
            assert [row["skill_name"] for row in update["data"]["top_skills"]] == ["skill-12"]
        await wait_until(lambda: server.status()["client_count"] == 0)
    assert server.status()["database"]["state"] == "ok"


_LOW_LIMIT_SERVE = (
    "import resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
    "from session_buddy_realtime.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_a_low_open_file_limit_is_respected_quietly(tmp_path: Path) -> None:
    """Under an open-file limit of 256, 600 sockets opened at once are cut back at accept,
    nothing logs 'out of system resource' or 'accepting paused', and a client arriving
    afterwards is served."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _LOW_LIMIT_SERVE,
            "serve",
            "--demo",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--interval",
            "0.2",
        ],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        port = int(line.rsplit(":", 1)[1])
        flood = []
        for _ in range(600):  # connects started without waiting, as a flood would
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            flood.append(sock)
        try:
            # Held open until the kernel has queued them, for the server to accept.
            select.select([], flood[:500], [], 40 * UNIT)
        finally:
            for sock in flood:
                sock.close()

        async def one_client() -> str:
            # As a real client would: retry (a bounded number of times) while the server
            # is still dropping the flood's sockets.
            for _ in range(20):
                try:
                    async with connect(f"ws://127.0.0.1:{port}", open_timeout=40 * UNIT) as ws:
                        return str(json.loads(await ws.recv())["type"])
                except (OSError, InvalidMessage):
                    await asyncio.sleep(2 * UNIT)
            return "never connected"

        assert asyncio.run(one_client()) == "connected"
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=200 * UNIT)
    assert process.returncode == 0, stderr
    assert "out of system resource" not in stderr
    assert "accepting paused" not in stderr
    assert "Traceback" not in stderr


async def test_many_clients_subscribing_at_once_never_see_busy(
    skills_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fifty clients subscribing at once, each to its own skill, all get their skill's
    row, known and fresh; the database is never reported busy and nothing is logged slow."""
    caplog.set_level(logging.INFO, logger="session_buddy_realtime")
    for n in range(60):
        skills_db.record(f"many-{n:02d}", count=1 + n % 7)
    server = await start_server(update_interval=1.0)  # a read deadline of 0.8 s
    clients = [await open_client(url_of(server)) for _ in range(50)]
    await asyncio.gather(
        *(
            c.send_json({"type": "subscribe", "skill": f"many-{n:02d}"})
            for n, c in enumerate(clients)
        )
    )
    for n, client in enumerate(clients):
        confirmed = await client.recv_type("subscription_confirmed")
        assert confirmed["known"] is True
        update = await client.recv_type("metrics_update")
        assert update["source"]["state"] == "ok"
        assert [row["skill_name"] for row in update["data"]["top_skills"]] == [f"many-{n:02d}"]
    assert not [r for r in caplog.records if "taking longer" in r.getMessage()]


async def test_a_stuck_client_is_noticed_before_the_kernel_absorbs_megabytes(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """A client that stops reading, with an ordinary receive buffer, is being skipped
    once a few hundred KiB went its way, not megabytes: every accepted socket's kernel
    send buffer is capped, so the server notices at once and holds little for it."""
    now = datetime.now(UTC)
    for i in range(40):  # frames of several KiB
        ranked_db.add_anomaly(f"skill-{i % 12 + 1:02d}", iso(now - timedelta(minutes=i)))
    server = await start_server(update_interval=0.01, slow_client_timeout=60.0, ping_interval=None)
    frame = len(json.dumps(await server.snapshot()))
    stuck = await RawClient.open(server.port)  # reads nothing from here on
    try:
        await wait_until(
            lambda: any(c["congested"] for c in server.status()["clients"]), timeout=200 * UNIT
        )
        [described] = server.status()["clients"]
        written = described["messages_sent"] * frame
        assert written < 1 << 20, f"{written} bytes went to a client that reads nothing"
    finally:
        await stuck.close()


async def test_failed_handshakes_and_plain_requests_hold_no_connection_slot(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """With room for two connections, plain GETs (the dashboard's 200, a path without a
    route's 426) and an upgrade the library rejects (no Sec-WebSocket-Key, 400) leave both
    slots free for real clients at once."""
    server = await start_server(max_connections=2, close_timeout=5.0)
    kept_open = []
    for request in (
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "GET /no-route HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request.encode())
        async with asyncio.timeout(40 * UNIT):
            status = (await reader.readline()).split()[1]
        kept_open.append(writer)  # as a client that lingers would
        assert status in {b"200", b"426", b"400"}
    try:
        clients = [await open_client(url_of(server)) for _ in range(2)]
        for client in clients:
            await client.recv_type("metrics_update")
    finally:
        for writer in kept_open:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def test_stop_is_not_held_up_by_a_read_waiting_on_a_lock(
    ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """stop() while another process holds the database's write lock and a read waits on
    it returns within close_timeout plus the source's one-second lock wait, not after
    SQLite's default five seconds."""
    with ranked_db.connect() as conn:
        assert conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    server = RealTimeMetricsServer(
        "127.0.0.1", 0, ranked_db.path, update_interval=INTERVAL, close_timeout=0.2
    )
    await server.start()
    client = await open_client(url_of(server))
    await client.recv_type("metrics_update")
    holder = sqlite3.connect(ranked_db.path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        await wait_until(lambda: server.status()["database"]["state"] == "busy")
        began = time.monotonic()
        await server.stop()
        elapsed = time.monotonic() - began
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        await server.stop()
    assert elapsed < 0.2 + 1.0 + 1.0, f"stop() took {elapsed:.2f} s"  # SQLite alone: 5 s


async def test_a_storm_of_connections_waits_in_the_kernel_queue_while_the_loop_is_busy(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """300 clients that connect at once while the server's event loop is busy (nothing is
    being accepted) all get through the TCP handshake at once, queued by the kernel,
    instead of having their SYNs dropped beyond the accept batch and retried a second or
    more later (a reconnect storm after a restart)."""
    server = await start_server()
    expected = min(300, _kernel_listen_cap())
    sockets = [socket.socket() for _ in range(300)]
    try:
        # No await from here on: the loop accepts nothing while the clients connect.
        for sock in sockets:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", server.port))
        poller = select.poll()
        for sock in sockets:
            poller.register(sock, select.POLLOUT)
        connected: set[int] = set()
        deadline = time.monotonic() + 0.8  # the first SYN retry comes after 1 s
        while len(connected) < len(sockets) and time.monotonic() < deadline:
            for fd, _ in poller.poll(50):
                poller.unregister(fd)
                connected.add(fd)
        established = sum(
            1
            for sock in sockets
            if sock.fileno() in connected
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        )
    finally:
        for sock in sockets:
            sock.close()
    assert established >= expected, f"only {established} of 300 got through the handshake"


def _kernel_listen_cap() -> int:
    """``net.core.somaxconn``: no listen backlog is longer."""
    return int(Path("/proc/sys/net/core/somaxconn").read_text())
