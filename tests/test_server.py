"""RealTimeMetricsServer through real sockets on port 0 and real SQLite files."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import sqlite3
import threading
import time
from asyncio import selector_events
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from session_buddy_realtime import (
    DatabaseNotFoundError,
    PortInUseError,
    RealtimeError,
    RealTimeMetricsServer,
    ServerStartError,
)
from session_buddy_realtime.data.schema import SCHEMA_SQL
from tests.conftest import (
    INTERVAL,
    UNIT,
    Client,
    ClientFactory,
    ServerFactory,
    SkillsDB,
    iso,
    raw_websocket,
    url_of,
    wait_until,
)
from tests.http_support import http_request

# Messages


async def test_connection_gets_welcome_then_updates_for_all_skills(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """A client that never subscribes gets 'connected' and then the all-skills stream."""
    server = await start_server()
    async with connect(url_of(server)) as ws:
        client = Client(ws)
        welcome = await client.recv()
        assert welcome["type"] == "connected"
        assert welcome["message"] == "Connected to Session-Buddy real-time metrics"
        assert welcome["update_interval"] == INTERVAL
        update = await client.recv_type("metrics_update")
        assert update["skill"] is None
        assert len(update["data"]["top_skills"]) == 10
        assert update["data"]["top_skills"][0]["skill_name"] == "skill-01"
        assert update["source"]["state"] == "ok"


async def test_subscribe_confirms_first_then_sends_a_snapshot_at_once(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """With a 60 s interval, the snapshot after subscription_confirmed cannot be a tick."""
    server = await start_server(update_interval=60.0)
    client = await open_client(url_of(server))
    await client.recv_type("metrics_update")  # the tick that served the first client
    await client.send_json({"type": "subscribe"})
    confirmed = await client.recv()
    snapshot = await client.recv()
    assert confirmed["type"] == "subscription_confirmed"
    assert confirmed["skill"] is None
    assert snapshot["type"] == "metrics_update"
    assert len(snapshot["data"]["top_skills"]) == 10


async def test_subscribing_to_a_skill_below_the_top_ten(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Any skill can be followed: the 12th gets its own row in the snapshot and every tick."""
    server = await start_server()
    client = await open_client(url_of(server))
    await client.send_json({"type": "subscribe", "skill": "skill-12"})
    confirmed = await client.recv_type("subscription_confirmed")
    assert (confirmed["skill"], confirmed["known"]) == ("skill-12", True)
    for _ in range(3):
        update = await client.recv_type("metrics_update")
        if update["skill"] == "skill-12":
            break
    [row] = update["data"]["top_skills"]
    assert row["skill_name"] == "skill-12"
    assert row["total_invocations"] == 18
    update = await client.recv_type("metrics_update")
    assert update["skill"] == "skill-12"


async def test_skill_name_is_an_alias_and_unknown_skills_are_accepted(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """'skill_name' works like 'skill'; a skill without metrics is confirmed as unknown."""
    server = await start_server()
    client = await open_client(url_of(server))
    await client.send_json({"type": "subscribe", "skill_name": "not-yet-used"})
    confirmed = await client.recv_type("subscription_confirmed")
    assert (confirmed["skill"], confirmed["known"]) == ("not-yet-used", False)
    snapshot = await client.recv()
    assert snapshot["type"] == "metrics_update"
    assert snapshot["data"] == {"top_skills": [], "anomalies": []}


async def test_skill_subscription_carries_only_that_skills_anomalies(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """A per-skill stream has that skill's anomalies; the all-skills stream has them all."""
    now = datetime.now(UTC)
    ranked_db.add_anomaly("skill-12", iso(now - timedelta(minutes=5)), score=4.0)
    ranked_db.add_anomaly("skill-02", iso(now - timedelta(minutes=6)), score=3.0)
    server = await start_server()
    one = await open_client(url_of(server))
    everything = await open_client(url_of(server))
    await one.send_json({"type": "subscribe", "skill": "skill-12"})
    await one.recv_type("subscription_confirmed")
    snapshot = await one.recv()
    assert [a["skill_name"] for a in snapshot["data"]["anomalies"]] == ["skill-12"]
    update = await everything.recv_type("metrics_update")
    assert [a["skill_name"] for a in update["data"]["anomalies"]] == ["skill-12", "skill-02"]


async def test_unsubscribe_stops_updates_but_ping_is_answered(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """After 'unsubscribed' several ticks pass with no update; a ping still gets a pong."""
    server = await start_server()
    client = await open_client(url_of(server))
    await client.recv_type("metrics_update")
    await client.send_json({"type": "unsubscribe"})
    await client.recv_type("unsubscribed")
    ticks = server.status()["ticks"]
    await wait_until(lambda: server.status()["ticks"] >= ticks + 5)
    await client.send_json({"type": "ping"})
    assert (await client.recv())["type"] == "pong"
    assert server.status()["clients"][0]["subscription"] is None


async def test_ping_gets_pong(start_server: ServerFactory, open_client: ClientFactory) -> None:
    """The seed's ping/pong test works."""
    server = await start_server(update_interval=60.0)
    client = await open_client(url_of(server))
    await client.send_json({"type": "ping"})
    assert (await client.recv_type("pong"))["type"] == "pong"


BAD_INPUT: list[tuple[str | bytes, str]] = [
    ("hello", "invalid_json"),
    ("{", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ('"ping"', "invalid_message"),
    ("null", "invalid_message"),
    ("{}", "invalid_message"),
    ('{"type": ["ping"]}', "invalid_message"),
    ('{"type": "subscribe", "skill": "a", "skill_name": "b"}', "invalid_message"),
    ('{"type": "explode"}', "unknown_type"),
    ('{"type": "subscribe", "skill": 12}', "invalid_skill"),
    ('{"type": "subscribe", "skill": {"$gt": ""}}', "invalid_skill"),
    ('{"type": "subscribe", "skill": ""}', "invalid_skill"),
    (json.dumps({"type": "subscribe", "skill": "x" * 1000}), "invalid_skill"),
    ('{"type": "subscribe", "skill": "\\ud83d"}', "invalid_skill"),
    ('{"type": "subscribe", "skill": "a\\u0000b"}', "invalid_skill"),
    ('{"type": "subscribe", "skill": "\\u200bzero-width"}', "invalid_skill"),
    (b"\x00\x01binary", "unsupported_frame"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_INPUT)
async def test_bad_input_gets_an_error_and_the_connection_keeps_working(
    frame: str | bytes, code: str, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Each kind of bad message gets an error reply with its code; the client then pings fine."""
    server = await start_server(update_interval=60.0)
    client = await open_client(url_of(server))
    await client.ws.send(frame)
    error = await client.recv_type("error")
    assert error["code"] == code
    await client.send_json({"type": "ping"})
    await client.recv_type("pong")
    assert server.status()["errors"] == 0


async def test_sql_looking_skill_names_are_just_names(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """A skill name that looks like SQL is looked up literally and the data is untouched."""
    server = await start_server()
    client = await open_client(url_of(server))
    name = "x'); DROP TABLE skill_metrics; --"
    await client.send_json({"type": "subscribe", "skill": name})
    confirmed = await client.recv_type("subscription_confirmed")
    assert (confirmed["skill"], confirmed["known"]) == (name, False)
    with ranked_db.connect() as db:
        assert db.execute("SELECT COUNT(*) FROM skill_metrics").fetchone()[0] == 12


async def test_oversized_message_closes_with_1009(
    start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """A frame over max_message_size closes that connection with 1009; others continue."""
    server = await start_server(max_message_size=1024)
    other = await open_client(url_of(server))
    client = await open_client(url_of(server))
    await client.ws.send(json.dumps({"type": "ping", "pad": "x" * 2000}))
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(_drain(client), 40 * UNIT)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009
    await other.send_json({"type": "ping"})
    await other.recv_type("pong")


async def _drain(client: Client) -> None:
    while True:
        await client.ws.recv()


# Data flow


async def test_updates_follow_new_invocations(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """A burst of new invocations for a skill shows up in a later update."""
    server = await start_server()
    client = await open_client(url_of(server))
    await client.recv_type("metrics_update")
    ranked_db.record("newcomer", count=100)
    async with asyncio.timeout(60 * UNIT):
        while True:
            update = await client.recv_type("metrics_update")
            names = [row["skill_name"] for row in update["data"]["top_skills"]]
            if names and names[0] == "newcomer":
                break
    assert update["data"]["top_skills"][0]["total_invocations"] == 100


async def test_live_anomaly_reaches_clients(
    skills_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Failures written while a client listens appear as a live 'drop' anomaly."""
    now = datetime.now(UTC)
    for minute in range(30, 150, 3):
        skills_db.record("deploy", at=now - timedelta(minutes=minute))
    server = await start_server()
    client = await open_client(url_of(server))
    first = await client.recv_type("metrics_update")
    assert first["data"]["anomalies"] == []
    skills_db.record("deploy", completed=False, count=12)
    async with asyncio.timeout(60 * UNIT):
        while True:
            update = await client.recv_type("metrics_update")
            if update["data"]["anomalies"]:
                break
    [anomaly] = update["data"]["anomalies"]
    assert (anomaly["skill_name"], anomaly["anomaly_type"], anomaly["source"]) == (
        "deploy",
        "drop",
        "live",
    )


async def test_interval_is_respected(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Updates arrive about once per interval: no bunching, no drift over ten ticks."""
    interval = 0.2
    server = await start_server(update_interval=interval)
    client = await open_client(url_of(server))
    await client.recv_type("metrics_update")
    arrivals = []
    for _ in range(10):
        await client.recv_type("metrics_update")
        arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    mean_gap = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
    assert 0.8 * interval <= mean_gap <= 1.3 * interval
    assert min(gaps) >= 0.3 * interval


async def test_no_queries_while_nobody_listens(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """With no client the broadcaster does not even tick; with only unsubscribed clients it
    ticks without querying the database."""
    server = await start_server()
    await asyncio.sleep(10 * INTERVAL)  # an observation window: nothing may happen in it
    status = server.status()
    assert (status["ticks"], status["database"]["queries"]) == (0, 0)
    client = await open_client(url_of(server))
    await client.recv_type("metrics_update")  # the first client is served at once
    await client.send_json({"type": "unsubscribe"})
    await client.recv_type("unsubscribed")
    before = server.status()
    await wait_until(lambda: server.status()["ticks"] >= before["ticks"] + 5)
    status = server.status()
    assert status["database"]["queries"] == before["database"]["queries"]
    assert status["idle_ticks"] - before["idle_ticks"] == status["ticks"] - before["ticks"]


async def test_no_requery_while_the_database_is_unchanged(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """A listening client gets every tick, but the data is read once until a write."""
    server = await start_server()
    client = await open_client(url_of(server))
    for _ in range(5):
        await client.recv_type("metrics_update")
    database = server.status()["database"]
    assert database["refreshes"] == 1
    ranked_db.record("skill-01")
    await wait_until(lambda: server.status()["database"]["refreshes"] == 2)


# Isolation


def _stuck_socket(port: int) -> socket.socket:
    """A TCP socket with a tiny receive buffer, for a client that will stop reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def _with_big_frames(db: SkillsDB) -> None:
    """Forty anomalies make each frame several KiB, so a stuck client's buffers fill soon."""
    now = datetime.now(UTC)
    for i in range(40):
        db.add_anomaly(f"skill-{i % 12 + 1:02d}", iso(now - timedelta(minutes=i)))


async def test_a_client_that_stops_reading_does_not_delay_the_others(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """While one client reads nothing, a healthy one keeps getting every tick; the stuck
    one has updates dropped (not queued) and is disconnected after slow_client_timeout."""
    _with_big_frames(ranked_db)
    server = await start_server(
        update_interval=0.01,
        slow_client_timeout=0.5,
        close_timeout=0.2,
        ping_interval=None,
    )
    healthy = await open_client(url_of(server))
    healthy_updates = 0

    async def read_healthy() -> None:
        nonlocal healthy_updates
        while True:
            healthy_updates += (await healthy.recv())["type"] == "metrics_update"

    reader = asyncio.create_task(read_healthy())
    stuck = await connect(url_of(server), sock=_stuck_socket(server.port), max_queue=1)
    try:
        await wait_until(lambda: server.status()["clients_evicted"] == 1, timeout=400 * UNIT)
        status = server.status()
        assert status["updates_dropped"] > 0
        # The healthy client got (nearly) every tick of the whole episode.
        await wait_until(lambda: healthy_updates >= 0.9 * status["ticks"])
        [remaining] = server.status()["clients"]
        assert remaining["updates_dropped"] == 0
        # The stuck socket is really gone within the close timeout (no keepalive here).
        await wait_until(lambda: server.status()["connections"] == 1, timeout=20 * UNIT)
    finally:
        reader.cancel()
        stuck.transport.abort()


async def test_stop_is_not_held_up_by_a_stuck_client(
    ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """stop() drops a client whose backlog is over the limit at once instead of waiting
    close_timeout (30 s here) for a closing handshake it could never complete; healthy
    clients still get their 1001."""
    _with_big_frames(ranked_db)
    server = RealTimeMetricsServer(
        host="127.0.0.1",
        port=0,
        db_path=ranked_db.path,
        update_interval=0.01,
        slow_client_timeout=3600,
        close_timeout=30,
        ping_interval=None,
    )
    await server.start()
    healthy = await open_client(url_of(server))
    reader = asyncio.create_task(_drain(healthy))
    stuck = await connect(url_of(server), sock=_stuck_socket(server.port), max_queue=1)
    try:
        await wait_until(lambda: server.status()["updates_dropped"] > 0, timeout=400 * UNIT)
        started = time.monotonic()
        await server.stop()
        elapsed = time.monotonic() - started
        assert elapsed < 40 * UNIT
        assert not server.running
        with pytest.raises(ConnectionClosed):
            await reader
        assert healthy.ws.close_code == 1001
    finally:
        reader.cancel()
        stuck.transport.abort()


async def test_clients_connecting_and_leaving_during_broadcasts(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Churn of 60 short-lived clients during fast ticks causes no error for anyone."""
    server = await start_server(update_interval=0.01)
    steady = await open_client(url_of(server))

    async def short_visit(i: int) -> None:
        async with connect(url_of(server)) as ws:
            if i % 3 == 0:
                await ws.send(json.dumps({"type": "subscribe", "skill": f"skill-{i % 12 + 1:02d}"}))
            if i % 2 == 0:
                await ws.recv()
            if i % 5 == 0:
                ws.transport.abort()

    for batch in range(6):
        await asyncio.gather(*(short_visit(batch * 10 + i) for i in range(10)))
    await wait_until(lambda: server.status()["client_count"] == 1)
    status = server.status()
    assert status["errors"] == 0
    assert status["connections_total"] == 61
    await steady.recv_type("metrics_update")


async def test_a_quiet_client_holds_no_task_until_it_speaks(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """A client that sends nothing gets its welcome and its updates with no task of its
    own; its first message starts one, and is answered."""
    server = await start_server()
    assert server._running is not None
    tasks = server._running.listener.config.tasks
    client = await open_client(url_of(server))
    await client.recv_type("metrics_update")
    assert tasks == set()
    await client.send_json({"type": "ping"})
    await client.recv_type("pong")
    assert len(tasks) == 1


async def test_quiet_clients_that_leave_are_forgotten(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """Clients that never sent a message and then go (with a close frame, or a reset)
    leave the client count, the registry and the listener's tasks."""
    server = await start_server()
    assert server._running is not None
    config = server._running.listener.config
    polite = [await connect(url_of(server)) for _ in range(3)]
    abrupt = [await connect(url_of(server)) for _ in range(3)]
    for ws in polite + abrupt:
        assert json.loads(await asyncio.wait_for(ws.recv(), 40 * UNIT))["type"] == "connected"
    assert server.status()["client_count"] == 6
    for ws in polite:
        await ws.close()
    for ws in abrupt:
        ws.transport.abort()
    await wait_until(
        lambda: (
            server.status()["client_count"] == 0
            and not config.registry.connections
            and not config.tasks
        )
    )
    assert server.status()["errors"] == 0


async def test_after_the_closing_handshake_the_server_ends_the_connection_itself(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """A client that sends its close frame and then keeps its socket open gets the close
    reply and the end of the stream, and the server forgets it at once: it does not wait
    for the client's own end (nor for the 60 s close timeout)."""
    server = await start_server(close_timeout=60.0)
    assert server._running is not None
    registry = server._running.registry
    reader, writer = await raw_websocket(server.port)
    mask = b"\x01\x02\x03\x04"
    code = (1000).to_bytes(2, "big")
    writer.write(bytes([0x88, 0x82]) + mask + bytes(b ^ mask[i] for i, b in enumerate(code)))
    seen = await asyncio.wait_for(reader.read(), 40 * UNIT)  # up to the end of the stream
    assert b"\x88\x02\x03\xe8" in seen  # the close reply, 1000
    await wait_until(lambda: not registry.connections, timeout=40 * UNIT)
    assert server.status()["client_count"] == 0
    writer.close()


async def test_a_quiet_client_unsubscribed_by_the_host_is_not_asked_to_authenticate(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Without a token, a client unsubscribed through the seed's handle_client_message
    before it said anything is answered when it speaks, and never closed for want of a
    token (whether to ask for one is decided at the upgrade, not at its first message)."""
    server = await start_server(auth_timeout=5 * UNIT)
    client = await open_client(url_of(server))
    [connection] = server._hub.sessions
    await server.handle_client_message(connection, '{"type": "unsubscribe"}')
    await client.recv_type("unsubscribed")
    await client.send_json({"type": "ping"})
    await client.recv_type("pong")
    # Past the auth timeout, it is still open and answered.
    await asyncio.sleep(10 * UNIT)
    await client.send_json({"type": "ping"})
    await client.recv_type("pong")
    assert client.ws.close_code is None
    assert server.status()["auth_failures"] == 0


async def test_client_handler_is_the_seeds_coroutine(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """client_handler(websocket) returns what the seed's ``async def`` did: a coroutine
    that welcomes, answers each message and returns when they end, leaving the hub."""
    from tests.fakes import FakeConnection

    server = await start_server()
    connection = FakeConnection(['{"type": "ping"}'])
    await asyncio.create_task(server.client_handler(connection))  # type: ignore[arg-type]
    assert [m["type"] for m in connection.sent] == ["pong"]
    assert connection not in server._hub.sessions


async def test_a_session_that_cannot_start_leaves_with_its_connection(
    ranked_db: SkillsDB,
    start_server: ServerFactory,
    open_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If a waiting session fails to start at its client's first message, that
    connection is dropped and its session leaves the hub; the server serves on."""
    from session_buddy_realtime.stream.session import ClientSession

    server = await start_server()
    failing = await open_client(url_of(server))

    def broken(session: ClientSession) -> Any:
        raise RuntimeError("cannot start")

    monkeypatch.setattr(ClientSession, "start", broken)
    await failing.send_json({"type": "ping"})
    await asyncio.wait_for(failing.ws.wait_closed(), 40 * UNIT)
    await wait_until(lambda: server.status()["client_count"] == 0)
    monkeypatch.undo()
    healthy = await open_client(url_of(server))
    await healthy.send_json({"type": "ping"})
    await healthy.recv_type("pong")


# Lifecycle


async def test_stop_is_prompt_and_closes_clients_with_1001(
    ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """With a 60 s interval and 20 clients, stop() returns at once and each client gets 1001."""
    server = RealTimeMetricsServer(
        host="127.0.0.1", port=0, db_path=ranked_db.path, update_interval=60.0
    )
    await server.start()
    clients = [await open_client(url_of(server)) for _ in range(20)]
    started = time.monotonic()
    await server.stop()
    elapsed = time.monotonic() - started
    assert elapsed < 10 * UNIT * 4  # far below the 60 s interval and the close timeout
    for client in clients:
        await client.ws.wait_closed()
        assert client.ws.close_code == 1001
    assert not server.running


async def test_stop_leaves_no_task_thread_or_socket(ranked_db: SkillsDB) -> None:
    """After stop(), no task of the server, no database thread and no listener remain."""
    before_threads = set(threading.enumerate())
    server = RealTimeMetricsServer(host="127.0.0.1", port=0, db_path=ranked_db.path)
    await server.start()
    port = server.port
    async with connect(url_of(server)) as ws:
        await ws.recv()
        await server.stop()
    await wait_until(lambda: set(threading.enumerate()) <= before_threads)
    assert asyncio.all_tasks() == {asyncio.current_task()}
    with socket.socket() as probe:  # nobody listens there any more
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()


async def test_port_can_be_reused_right_after_stop(
    ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """A new server binds the same port immediately after the old one stopped with clients."""
    first = RealTimeMetricsServer(host="127.0.0.1", port=0, db_path=ranked_db.path)
    await first.start()
    await open_client(url_of(first))
    await first.stop()
    second = RealTimeMetricsServer(
        host="127.0.0.1", port=first.port, db_path=ranked_db.path, update_interval=INTERVAL
    )
    async with second:
        client = await open_client(url_of(second))
        await client.recv_type("metrics_update")


async def test_start_and_stop_are_idempotent(ranked_db: SkillsDB) -> None:
    """Starting twice keeps one listener; stopping twice (or before start) is harmless."""
    server = RealTimeMetricsServer(host="127.0.0.1", port=0, db_path=ranked_db.path)
    await server.stop()
    await server.start()
    urls = server.urls
    await server.start()
    assert server.urls == urls
    await server.stop()
    await server.stop()
    assert not server.running
    assert server.urls == []


async def test_port_in_use_fails_cleanly_and_a_later_start_works(
    ranked_db: SkillsDB, free_port: int
) -> None:
    """A taken port raises PortInUseError naming it, leaves nothing running, and can be retried."""
    before_threads = set(threading.enumerate())
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", free_port))
    blocker.listen()
    server = RealTimeMetricsServer(host="127.0.0.1", port=free_port, db_path=ranked_db.path)
    try:
        with pytest.raises(PortInUseError, match=str(free_port)):
            await server.start()
        assert not server.running
        await wait_until(lambda: set(threading.enumerate()) <= before_threads)
    finally:
        blocker.close()
    async with server:
        assert server.running
        assert server.urls == [f"ws://127.0.0.1:{free_port}"]


async def test_missing_database_starts_waiting_and_is_not_created(
    tmp_path: Path, open_client: ClientFactory
) -> None:
    """A db_path that does not exist starts anyway, waiting (state and absolute path in the
    stream and in status), raises no DatabaseNotFoundError and creates nothing."""
    missing = tmp_path / "nope" / "skills.db"
    async with RealTimeMetricsServer(
        host="127.0.0.1", port=0, db_path=missing, update_interval=INTERVAL
    ) as server:
        assert server.running
        database = server.status()["database"]
        assert database["state"] == "waiting"
        assert f"waiting for the skills database at {missing}" in database["message"]
        client = await open_client(url_of(server))
        update = await client.recv_type("metrics_update")
        assert update["source"]["state"] == "waiting"
        assert update["source"]["stale"] is True
        assert str(missing) in update["source"]["message"]
        assert update["data"] == {"top_skills": [], "anomalies": []}
    assert not missing.exists()
    assert not missing.parent.exists()
    assert issubclass(DatabaseNotFoundError, ServerStartError), "still exported"


async def test_file_that_is_not_sqlite_fails_at_start(tmp_path: Path) -> None:
    """A file that is not a SQLite database is refused at start, naming the file."""
    bogus = tmp_path / "bogus.db"
    bogus.write_bytes(b"this is not a database" * 100)
    server = RealTimeMetricsServer(host="127.0.0.1", port=0, db_path=bogus)
    with pytest.raises(ServerStartError, match=r"bogus\.db"):
        await server.start()
    assert not server.running


async def test_database_without_tables_is_served_with_a_clear_state(
    tmp_path: Path, open_client: ClientFactory
) -> None:
    """An existing database without the skills tables streams state 'missing_tables'."""
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    async with RealTimeMetricsServer(
        host="127.0.0.1", port=0, db_path=path, update_interval=INTERVAL
    ) as server:
        client = await open_client(url_of(server))
        update = await client.recv_type("metrics_update")
        assert update["source"]["state"] == "missing_tables"
        assert update["source"]["stale"] is True
        assert "skill_invocation" in update["source"]["message"]
        assert server.status()["database"]["state"] == "missing_tables"


async def test_server_reads_the_given_connection_and_leaves_it_open(
    open_client: ClientFactory,
) -> None:
    """With db= an in-memory database (invisible to any other connection) is streamed,
    and the connection still works after stop()."""
    async with aiosqlite.connect(":memory:") as shared:
        await shared.executescript(SCHEMA_SQL)
        await shared.execute(
            "INSERT INTO skill_invocation (skill_name, invoked_at, completed, duration_seconds) "
            "VALUES ('only-in-memory', ?, 1, 2.0)",
            (iso(datetime.now(UTC)),),
        )
        await shared.commit()
        server = RealTimeMetricsServer(
            host="127.0.0.1", port=0, db=shared, update_interval=INTERVAL
        )
        async with server:
            client = await open_client(url_of(server))
            update = await client.recv_type("metrics_update")
            assert update["data"]["top_skills"][0]["skill_name"] == "only-in-memory"
            assert server.status()["database"]["shared_connection"] is True
        async with shared.execute("SELECT COUNT(*) FROM skill_invocation") as cursor:
            assert await cursor.fetchone() == (1,)


async def test_status_and_snapshot_describe_the_live_server(
    ranked_db: SkillsDB, start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """status() lists clients and counters; snapshot() returns what a subscriber gets."""
    server = await start_server()
    client = await open_client(url_of(server))
    await client.send_json({"type": "subscribe", "skill": "skill-03"})
    await client.recv_type("subscription_confirmed")
    await client.recv_type("metrics_update")
    status = server.status()
    assert status["running"] is True
    assert status["urls"] == [url_of(server)]
    [described] = status["clients"]
    assert described["subscription"] == "skill-03"
    assert described["messages_sent"] >= 3
    snapshot = await server.snapshot("skill-03")
    assert snapshot["skill"] == "skill-03"
    assert snapshot["data"]["top_skills"][0]["skill_name"] == "skill-03"
    with pytest.raises(Exception, match="skill"):
        await server.snapshot("")


async def test_snapshot_needs_a_running_server(ranked_db: SkillsDB) -> None:
    """snapshot() on a stopped server says to start it first."""
    server = RealTimeMetricsServer(host="127.0.0.1", port=0, db_path=ranked_db.path)
    with pytest.raises(RealtimeError, match="not running"):
        await server.snapshot()


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"port": 70000}, "port"),
        ({"port": -1}, "port"),
        ({"update_interval": 0}, "update_interval"),
        ({"update_interval": float("nan")}, "update_interval"),
        ({"max_message_size": 10}, "max_message_size"),
        ({"close_timeout": 0}, "close_timeout"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_setting(
    kwargs: dict[str, Any], setting: str
) -> None:
    """An impossible setting raises ValueError that names it."""
    with pytest.raises(ValueError, match=setting):
        RealTimeMetricsServer(**kwargs)


async def test_keepalive_closes_a_silent_peer_and_keeps_a_live_one(
    start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """One keepalive task pings every client: a peer that never answers is closed with 1011
    after ping_interval + ping_timeout, while a client that answers stays connected."""
    server = await start_server(update_interval=60.0, ping_interval=0.2, ping_timeout=0.2)
    live = await open_client(url_of(server))
    reader, writer = await raw_websocket(server.port)
    try:
        await wait_until(lambda: server.status()["client_count"] == 1, timeout=80 * UNIT)
        data = await asyncio.wait_for(reader.read(), 40 * UNIT)  # until the server hangs up
        close = data[data.rfind(b"\x88") :]
        assert int.from_bytes(close[2:4], "big") == 1011
        assert b"keepalive ping timeout" in close
        await live.send_json({"type": "ping"})
        await live.recv_type("pong")
        [described] = server.status()["clients"]
        assert described["messages_sent"] >= 2
    finally:
        writer.close()


async def test_the_welcome_leaves_in_the_same_write_as_the_handshake_response(
    ranked_db: SkillsDB, start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server writes its 101 response and the ``connected`` message with one
    transport write (one segment, one system call), and the client still reads them as
    the handshake and then the welcome."""
    writes: list[bytes] = []
    original = selector_events._SelectorSocketTransport.write

    def recording(self: Any, data: bytes) -> None:
        writes.append(bytes(data))
        original(self, data)

    monkeypatch.setattr(selector_events._SelectorSocketTransport, "write", recording)
    server = await start_server()
    async with connect(url_of(server)) as client:
        welcome = json.loads(await client.recv())
    assert welcome["type"] == "connected"
    first = next(data for data in writes if data.startswith(b"HTTP/1.1 101"))
    assert b'"type":"connected"' in first, "the welcome went out in a write of its own"


async def test_no_response_names_the_server_software(
    ranked_db: SkillsDB, start_server: ServerFactory
) -> None:
    """Neither the WebSocket's 101 response, a refusal, nor an HTTP route's answer carries
    a ``Server`` header."""
    server = await start_server()
    async with connect(url_of(server)) as client:
        assert client.response is not None
        assert "Server" not in client.response.headers
    refused = await http_request(
        server.port, "/", headers={"Upgrade": "websocket"}, host="evil.example"
    )
    assert refused.status == 403
    health = await http_request(server.port, "/healthz")
    assert health.status == 200
    assert "server" not in refused.headers
    assert "server" not in health.headers
