"""Review of Redis scale-out from the outside: defects found by following docs/scaling.md.

Each test does what a user (or an unlucky or hostile peer) did by hand: the real CLI as
subprocesses (``spawn``), a real ``redis-server`` per test, real WebSocket clients and,
where the CLI cannot shorten the 15 s watch expiry, the server in-process on the same
real Redis with short timings. Every test here failed on the code this review started from;
each passes once the product behaves as the documentation says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from session_buddy_realtime.scaleout.link import Keys, RedisTimings
from tests.conftest import Client, ClientFactory, SkillsDB, iso, url_of, wait_until
from tests.redis_support import REDIS_SERVER, RedisProcess, needs_redis, running_redis
from tests.test_cli import RUN, STARTUP, Process, Spawn, spawn
from tests.test_scaleout import FAST, Start, start
from tests.test_scaleout_processes import (
    STATES,
    envelopes,
    next_update,
    ok_with,
    start_edge,
    start_producer,
    sync_redis,
    until,
)

__all__ = ["spawn", "start"]  # fixtures of test_cli.py and test_scaleout.py, used as there

pytestmark = needs_redis

SETTLE = 8.0
"""Longest wait for something that should happen within a few intervals."""
NO_PRODUCER_YET = "waiting for the producer's first state"
SHORT_WATCH = RedisTimings(
    lease_seconds=FAST.lease_seconds,
    renew_every=FAST.renew_every,
    watch_seconds=1.0,
    stale_after=FAST.stale_after,
    reconnect_max=FAST.reconnect_max,
    reply_timeout=FAST.reply_timeout,
)
"""FAST, with announcements that expire after 1 s (15 s with the CLI)."""


# Helpers


async def subscribed(client: Client, skill: str | None) -> tuple[dict[str, Any], list[Any]]:
    """Subscribe ``client`` to ``skill``: its confirmation and every update up to and
    including the subscription's first one."""
    await client.send_json({"type": "subscribe", "skill": skill})
    updates: list[dict[str, Any]] = []
    confirmation: dict[str, Any] | None = None
    async with asyncio.timeout(SETTLE):
        while True:
            message = await client.recv(SETTLE)
            if message["type"] == "subscription_confirmed":
                confirmation = message
            elif message["type"] == "metrics_update":
                updates.append(message)
                if confirmation is not None and message["skill"] == skill:
                    return confirmation, updates


def exit_or_streaming(process: Process, timeout: float) -> bool:
    """Wait until ``process`` exits (True) or says it streams (False), bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            process.wait(RUN)
            return True
        if any("Streaming skill metrics" in line for line in process.stdout.lines):
            return False
        time.sleep(0.05)  # polling another process's output, under a deadline
    raise AssertionError(f"neither an exit nor a URL line in {timeout} s")


@contextlib.contextmanager
def redis_on_unix_socket() -> Iterator[Path]:
    """A ``redis-server`` listening only on a unix socket (``--port 0 --unixsocket``)."""
    folder = Path(tempfile.mkdtemp(prefix="rv-"))  # short: socket paths are limited
    sock = folder / "redis.sock"
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert server.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server made no socket in 10 s"
            time.sleep(0.02)  # waiting for another process's socket, under a deadline
        yield sock
    finally:
        server.terminate()
        server.wait(5)
        shutil.rmtree(folder, ignore_errors=True)


# 1. URLs the documentation accepts


def test_a_unix_socket_url_works_for_producer_and_edge(spawn: Spawn, skills_db: SkillsDB) -> None:
    """A documented ``unix:///path/redis.sock?db=0`` URL carries the stream from a producer to an
    edge."""
    skills_db.record("over-a-socket", count=3)
    with redis_on_unix_socket() as sock:
        url = f"unix://{sock}?db=0"
        start_producer(spawn, skills_db.path, url)
        edge = start_edge(spawn, url)

        async def follow() -> dict[str, Any]:
            async with connect(edge.url) as ws:
                client = Client(ws)
                await client.recv_type("connected")
                return await until(client, ok_with("over-a-socket"), SETTLE)

        update = asyncio.run(follow())
    assert update["source"]["state"] == "ok"


@pytest.mark.parametrize(
    "query",
    [
        "ssl_ca_certs=/etc/ssl/certs/ca-certificates.crt",
        "ssl_check_hostname=true",
        "protocol=9",
        "db=x",
    ],
)
def test_a_url_that_cannot_work_fails_at_start_naming_the_flag(
    spawn: Spawn, redis_server: RedisProcess, query: str
) -> None:
    """A URL whose documented options the client cannot use stops ``edge`` at start with one
    line naming ``--redis`` and no traceback."""
    url = f"redis://127.0.0.1:{redis_server.port}/0?{query}"
    process = spawn("edge", "--redis", url, "--host", "127.0.0.1", "--port", "0")

    exited = exit_or_streaming(process, STARTUP)

    assert exited, f"the edge started with an unusable URL: {process.stderr.text}"
    assert process.popen.returncode == 1
    assert "Traceback" not in process.stderr.text, process.stderr.text
    lines = [line for line in process.stderr.text.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: --redis"), lines[0]


# 2. What an edge's clients are told


async def test_clients_subscribing_together_to_one_skill_all_get_its_row(
    redis_server: RedisProcess, spawn: Spawn, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """Clients of an edge that subscribe at the same moment to one skill outside the top 10
    all get ``known: true`` and its row, as on a producer."""
    start_producer(spawn, ranked_db.path, redis_server.url)
    edge = start_edge(spawn, redis_server.url)
    watcher = await open_client(edge.url)
    await subscribed(watcher, None)
    await until(watcher, ok_with("skill-01"), SETTLE)
    clients = [await open_client(edge.url) for _ in range(5)]

    results = await asyncio.gather(*(subscribed(client, "skill-12") for client in clients))

    for confirmation, updates in results:
        first = updates[-1]
        assert confirmation["known"] is True, first["source"]
        assert first["source"]["state"] == "ok", first["source"]
        assert [row["skill_name"] for row in first["data"]["top_skills"]] == ["skill-12"]


async def test_the_first_clients_of_a_fresh_edge_get_the_producers_data(
    redis_server: RedisProcess, spawn: Spawn, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """The first clients of a new edge, whose producer has been publishing heartbeats, get
    ``ok`` data in every update, not "waiting for the producer's first state"."""
    start_producer(spawn, ranked_db.path, redis_server.url)
    edge = start_edge(spawn, redis_server.url)
    await asyncio.sleep(1.0)  # five of the producer's heartbeats reach the edge

    async def arrive() -> tuple[dict[str, Any], list[Any]]:
        return await subscribed(await open_client(edge.url), None)  # at once, as watch does

    results = await asyncio.gather(*(arrive() for _ in range(3)))

    seen = [update["source"] for _, updates in results for update in updates]
    assert all(source["state"] == "ok" for source in seen), seen


async def test_an_edge_passes_on_the_producers_database_state_from_the_first_update(
    redis_server: RedisProcess, spawn: Spawn, tmp_path: Path, open_client: ClientFactory
) -> None:
    """While the producer waits for its missing database, an edge's first client is told the
    producer's ``waiting`` state and message, not ``unavailable``."""
    missing = tmp_path / "later" / "skills.db"
    producer = start_producer(spawn, missing, redis_server.url)
    edge = start_edge(spawn, redis_server.url)
    await asyncio.sleep(1.0)
    on_producer = await open_client(producer.url)
    _, expected = await subscribed(on_producer, None)
    assert expected[-1]["source"]["state"] == "waiting"

    _, updates = await subscribed(await open_client(edge.url), None)

    assert [u["source"] for u in updates] == [expected[-1]["source"]] * len(updates)


async def test_a_skill_subscription_on_an_edge_lists_each_anomaly_once(
    redis_server: RedisProcess, spawn: Spawn, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """The first update of an edge subscription to a skill outside the top 10 lists that
    skill's anomaly once, as the producer's does."""
    ranked_db.add_anomaly("skill-12", iso(datetime.now(UTC) - timedelta(minutes=2)))
    producer = start_producer(spawn, ranked_db.path, redis_server.url)
    edge = start_edge(spawn, redis_server.url)
    watcher = await open_client(edge.url)
    await subscribed(watcher, None)
    await until(watcher, lambda u: ok_with("skill-01")(u) and bool(u["data"]["anomalies"]), 8)

    _, on_producer = await subscribed(await open_client(producer.url), "skill-12")
    _, on_edge = await subscribed(await open_client(edge.url), "skill-12")

    assert len(on_producer[-1]["data"]["anomalies"]) == 1
    assert on_edge[-1]["data"]["anomalies"] == on_producer[-1]["data"]["anomalies"]


async def test_an_edge_after_an_idle_spell_does_not_call_old_data_ok(
    start: Start, ranked_db: SkillsDB, redis_server: RedisProcess, open_client: ClientFactory
) -> None:
    """After an idle spell with no edge clients and a database change, a new edge client never
    gets the old data labelled ``ok`` while the producer's new client gets the new data."""
    producer = await start(redis_timings=SHORT_WATCH)
    edge = await start(edge=True, redis_timings=SHORT_WATCH)
    first = await open_client(url_of(edge))
    await subscribed(first, None)
    await until(first, ok_with("skill-01"), SETTLE)
    await first.ws.close()
    redis = sync_redis(redis_server)
    try:

        def nobody_watches() -> bool:
            seconds, micros = redis.time()  # type: ignore[misc]
            return redis.zcount(Keys().watch, seconds * 1000 + micros // 1000, "+inf") == 0  # type: ignore[no-any-return]

        await wait_until(nobody_watches, timeout=SETTLE)
    finally:
        redis.close()
    await asyncio.sleep(0.3)
    ranked_db.record("skill-12", count=100)
    await asyncio.sleep(0.3)

    _, fresh = await subscribed(await open_client(url_of(producer)), None)
    _, on_edge = await subscribed(await open_client(url_of(edge)), None)

    assert fresh[-1]["data"]["top_skills"][0]["skill_name"] == "skill-12"
    for update in on_edge:
        if update["source"]["state"] == "ok":
            assert update["data"] == fresh[-1]["data"], update["data"]["top_skills"][0]


# 3. Peers on Redis, and the interval


async def test_one_forged_heartbeat_does_not_silence_the_edges_for_good(
    redis_server: RedisProcess, spawn: Spawn, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """One well-formed heartbeat with the live producer's identity and epoch and the largest
    sequence number does not keep the edges from the real producer's later data."""
    start_producer(spawn, ranked_db.path, redis_server.url)
    edge = start_edge(spawn, redis_server.url)
    client = await open_client(edge.url)
    await until(client, ok_with("skill-01"), SETTLE)
    r = sync_redis(redis_server)
    try:
        real = (await asyncio.to_thread(envelopes, r, STATES, lambda got: bool(got), SETTLE))[0]
        forged = {key: real[key] for key in ("v", "producer", "epoch", "interval")}
        forged |= {"kind": "heartbeat", "seq": 2**63 - 1, "sent_at": time.time()}
        assert r.publish(STATES, json.dumps(forged)) >= 1
    finally:
        r.close()

    ranked_db.record("after-forgery", count=60)
    await until(client, ok_with("after-forgery"), 5.0)


async def test_an_edge_with_a_shorter_interval_does_not_flap_to_unavailable(
    redis_server: RedisProcess, spawn: Spawn, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """An edge at 0.2 s following a producer at 1 s does not tell its clients every second that
    no producer has published."""
    start_producer(spawn, ranked_db.path, redis_server.url, "--interval", "1")
    edge = start_edge(spawn, redis_server.url)  # --interval 0.2
    client = await open_client(edge.url)
    await until(client, ok_with("skill-01"), SETTLE)

    seen: list[dict[str, Any]] = []
    ends = time.monotonic() + 3.0
    while time.monotonic() < ends:
        seen.append((await next_update(client, SETTLE))["source"])

    assert [s for s in seen if s["state"] != "ok"] == []


async def test_a_producer_refused_by_redis_acl_logs_once_not_ten_times_a_second(
    spawn: Spawn, skills_db: SkillsDB, tmp_path: Path
) -> None:
    """A producer whose Redis user (the documented ACL line) does not cover its
    ``--redis-prefix`` logs the refusal about once, not on every retry of a backoff that
    restarts at 0.1 s after each successful PING."""
    with running_redis(tmp_path, acl_user=("realtime", "CHANGE-ME")) as server:
        producer = start_producer(spawn, skills_db.path, server.url, "--redis-prefix", "other-db")
        await asyncio.sleep(3.0)
        logged = producer.process.stderr.lines[:]

    warnings = [line for line in logged if " WARNING " in line]
    assert "NoPermissionError" in "\n".join(warnings), logged
    assert len(warnings) <= 2, f"{len(warnings)} warnings in 3 s, e.g. {warnings[0]}"


# 4. Stopping, and what an edge keeps


async def test_sigterm_stops_an_edge_promptly_while_a_lookup_waits(
    redis_server: RedisProcess, spawn: Spawn
) -> None:
    """SIGTERM stops an edge within 2 s while its client waits for ``history`` and ``skills``
    answers that no producer gives."""
    edge = start_edge(spawn, redis_server.url, "--redis-prefix", "nobody-publishes")
    async with connect(edge.url) as ws:
        client = Client(ws)
        await client.recv_type("connected")
        await client.send_json({"type": "history", "skill": None})
        await client.send_json({"type": "skills", "query": "x"})
        await asyncio.sleep(0.3)

        began = time.monotonic()
        edge.process.popen.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(edge.process.wait, RUN)
        took = time.monotonic() - began

    assert status == 0, edge.process.stderr.text
    assert took < 2.0, f"the edge took {took:.1f} s to stop"


async def test_an_edge_forgets_skills_nobody_follows_any_more(
    start: Start, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """Once an edge stops announcing skills its clients no longer follow, it keeps no per-skill
    request time for them (``RedisSource._asked`` must not grow without bound)."""
    await start(redis_timings=SHORT_WATCH)
    edge = await start(edge=True, redis_timings=SHORT_WATCH)
    feed = edge._scale.feed
    assert feed is not None
    wanted = [f"gone-{n:02d}" for n in range(30)]
    for batch in range(3):
        client = await open_client(url_of(edge))
        for name in wanted[batch * 10 : batch * 10 + 10]:
            await subscribed(client, name)
        await client.ws.close()

    await wait_until(lambda: not set(wanted) & set(feed._watching.asked), timeout=SETTLE)

    assert sorted(set(wanted) & set(feed._asked)) == []
