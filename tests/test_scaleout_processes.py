"""Redis scale-out from the outside: the real CLI as subprocesses, a real ``redis-server``.

Producers (``serve --redis``) and edges (``edge --redis``) run as processes started like
a user would, a ``redis-server`` is killed and restarted under them, real WebSocket
clients follow the stream, the skills database is written through the test's own
connection, and the test itself plays the misbehaving peer on the state channel. Every
wait is a condition with a deadline; every process is killed at teardown.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from websockets.asyncio.client import connect

from tests.conftest import Client, ClientFactory, SkillsDB, wait_until
from tests.redis_support import RedisProcess, needs_redis, running_redis
from tests.test_cli import RUN, Server, Spawn, run_cli, spawn, started

__all__ = ["spawn"]  # the CLI-process fixture of test_cli.py, used here as it is there

pytestmark = needs_redis

INTERVAL = "0.2"
"""Update interval of every producer and edge here: the edges call a silent feed stale
after 3 intervals (0.6 s)."""
PREFIX = "session-buddy-realtime"
LEASE = f"{PREFIX}:lease"
STATES = f"{PREFIX}:states"
FAILOVER = 10.0
"""Time allowed for a second producer to take over the lease (lease 4 s + renewal 1 s)."""
SETTLE = 10.0
"""Time allowed for data written to the database to reach a client."""
PLANTED = "planted-garbage-skill"
LISTEN = ("--host", "127.0.0.1", "--port", "0", "--interval", INTERVAL)


# Processes


def start_producer(spawn: Spawn, db: Path, redis_url: str, *extra: str) -> Server:
    """``serve --db DB --redis URL`` on 127.0.0.1, a free port; wait for its URL line."""
    return started(spawn("serve", "--db", str(db), "--redis", redis_url, *LISTEN, *extra))


def start_edge(spawn: Spawn, redis_url: str, *extra: str) -> Server:
    """``edge --redis URL`` on 127.0.0.1, a free port; wait for its URL line."""
    return started(spawn("edge", "--redis", redis_url, *LISTEN, *extra))


def sync_redis(server: RedisProcess) -> redis.Redis:
    return cast(redis.Redis, server.cli())


def lease_holder(client: redis.Redis, key: str = LEASE) -> str | None:
    """The lease's value (the holder's identity), None when nobody holds it."""
    value = client.get(key)
    return None if value is None else bytes(value).decode()  # type: ignore[arg-type]


def lease_pid(value: str | None) -> int | None:
    """The process id in a lease value ``producer:<host>:<pid>:<hex>``, None if no lease."""
    if value is None:
        return None
    match = re.fullmatch(r"producer:[A-Za-z0-9.-]+:(\d+):[0-9a-f]{8}", value)
    assert match, f"lease value {value!r} is not a producer identity"
    return int(match[1])


def envelopes(
    client: redis.Redis, channel: str, done: Callable[[list[Any]], bool], timeout: float
) -> list[Any]:
    """Subscribe to ``channel`` and collect envelopes (JSON) until ``done``, bounded."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(channel)
    received: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while not done(received):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{len(received)} envelopes on {channel} in {timeout} s"
            message = pubsub.get_message(timeout=min(remaining, 0.5))
            if message is not None and message["type"] == "message":
                received.append(json.loads(message["data"]))
    finally:
        pubsub.close()
    return received


# Reading the stream


def names(update: dict[str, Any]) -> list[str]:
    return [row["skill_name"] for row in update["data"]["top_skills"]]


def state(update: dict[str, Any]) -> str:
    return str(update["source"]["state"])


def ok_with(skill: str) -> Callable[[dict[str, Any]], bool]:
    return lambda update: state(update) == "ok" and skill in names(update)


async def next_update(client: Client, timeout: float) -> dict[str, Any]:
    """The next frame, which must be a (schema-valid) ``metrics_update``: a client that
    sent nothing gets nothing else, and a second ``connected`` would mean a reconnect."""
    message = await client.recv(timeout)
    assert message["type"] == "metrics_update", message
    source = message["source"]
    assert source["stale"] is (source["state"] != "ok"), source
    return message


async def until(
    client: Client,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float,
    seen: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Read updates until one matches ``predicate``; fail after ``timeout``."""
    last: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = await next_update(client, timeout)
                if seen is not None:
                    seen.append(last)
                if predicate(last):
                    return last
    except TimeoutError:
        raise AssertionError(f"no matching update in {timeout} s; last: {last}") from None


async def follow(client: Client, log: list[tuple[float, dict[str, Any]]]) -> None:
    """Record every update of ``client`` with its arrival time (runs until cancelled)."""
    while True:
        log.append((time.monotonic(), await next_update(client, SETTLE)))


def has_latest(log: list[tuple[float, dict[str, Any]]], skill: str) -> bool:
    """True when the latest update in ``log`` is ``ok`` with ``skill``."""
    return bool(log) and ok_with(skill)(log[-1][1])


async def stop(reader: asyncio.Task[None]) -> None:
    """Cancel a ``follow`` task; if it had already failed, raise its failure."""
    if reader.done():
        reader.result()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)


def canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True)


# 1. Two producers, one lease, failover


async def test_second_producer_takes_the_lease_and_the_edge_client_keeps_streaming(
    redis_server: RedisProcess, spawn: Spawn, skills_db: SkillsDB, open_client: ClientFactory
) -> None:
    """Of two producers on one database exactly the lease holder publishes; after it is
    SIGKILLed the other takes the lease within 10 s and the same edge client, never
    reconnected, gets ``ok`` updates with a row written after the kill."""
    skills_db.record("before-failover", count=5)
    first = start_producer(spawn, skills_db.path, redis_server.url)
    second = start_producer(spawn, skills_db.path, redis_server.url)
    producers = {first.process.popen.pid: first, second.process.popen.pid: second}
    r = sync_redis(redis_server)

    await wait_until(lambda: lease_holder(r) is not None, timeout=FAILOVER)
    lease = lease_holder(r)
    holder_pid = lease_pid(lease)
    assert holder_pid in producers, f"lease {lease!r}, producers {sorted(producers)}"
    sample = await asyncio.to_thread(envelopes, r, STATES, lambda got: len(got) >= 5, SETTLE)
    assert {envelope["producer"] for envelope in sample} == {lease}, (
        "only the lease holder publishes"
    )

    edge = start_edge(spawn, redis_server.url)
    client = await open_client(edge.url)
    seen: list[dict[str, Any]] = []
    await client.send_json({"type": "subscribe", "skill": None})  # as watch and the README do
    async with asyncio.timeout(SETTLE):
        while (message := await client.recv(SETTLE))["type"] != "subscription_confirmed":
            assert message["type"] == "metrics_update", message
            seen.append(message)
    await until(client, ok_with("before-failover"), SETTLE, seen)

    holder = producers[holder_pid]
    (survivor_pid,) = set(producers) - {holder_pid}
    holder.process.popen.send_signal(signal.SIGKILL)
    holder.process.wait(RUN)
    killed_at = time.monotonic()
    await until(client, lambda _: lease_pid(lease_holder(r)) == survivor_pid, FAILOVER, seen)
    took_over_in = time.monotonic() - killed_at

    skills_db.record("after-failover", count=20)
    update = await until(client, ok_with("after-failover"), SETTLE, seen)

    assert took_over_in < FAILOVER
    assert names(update)[:2] == ["after-failover", "before-failover"]
    assert lease_pid(lease_holder(r)) == survivor_pid
    assert producers[survivor_pid].process.popen.poll() is None
    assert {state(u) for u in seen} <= {"ok", "unavailable"}, [u["source"] for u in seen]
    for each in seen:
        if state(each) == "ok":  # the database had this row before any producer started
            assert "before-failover" in names(each), each
            assert each["source"]["as_of"] is not None, each
    assert client.ws.close_code is None, "the edge client was never disconnected"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_stopped_producer_releases_the_lease_at_once(
    redis_server: RedisProcess, spawn: Spawn, skills_db: SkillsDB, signum: signal.Signals
) -> None:
    """A SIGINT/SIGTERM'd lease holder exits 0 with its lease already deleted, and the
    other producer holds it well before the 4 s the lease would have lasted."""
    first = start_producer(spawn, skills_db.path, redis_server.url)
    second = start_producer(spawn, skills_db.path, redis_server.url)
    producers = {first.process.popen.pid: first, second.process.popen.pid: second}
    r = sync_redis(redis_server)
    await wait_until(lambda: lease_pid(lease_holder(r)) in producers, timeout=FAILOVER)
    held = lease_holder(r)
    held_pid = lease_pid(held)
    assert held_pid is not None
    holder = producers[held_pid]
    (survivor_pid,) = set(producers) - {holder.process.popen.pid}

    holder.process.popen.send_signal(signum)
    signalled_at = time.monotonic()
    status = await asyncio.to_thread(holder.process.wait, RUN)
    after_exit = lease_holder(r)
    await wait_until(lambda: lease_pid(lease_holder(r)) == survivor_pid, timeout=FAILOVER)
    handed_over_in = time.monotonic() - signalled_at

    assert status == 0, holder.process.stderr.text
    assert holder.process.stdout.lines[-1] == "Stopped."
    assert after_exit != held, "the lease was released, not left to expire"
    assert handed_over_in < 3.0, f"took {handed_over_in:.1f} s: the lease was left to expire"


# 2. Redis SIGKILLed mid-stream and restarted


async def test_redis_killed_and_restarted_edge_client_survives_producer_client_unaffected(
    redis_server: RedisProcess, spawn: Spawn, skills_db: SkillsDB, open_client: ClientFactory
) -> None:
    """With Redis SIGKILLed and restarted on its port, an edge client stays connected,
    sees ``unavailable`` (with the last data), then ``ok`` with a row written after the
    restart, while a producer client gets ``ok`` updates at its pace all along."""
    skills_db.record("steady", count=5)
    producer = start_producer(spawn, skills_db.path, redis_server.url)
    edge = start_edge(spawn, redis_server.url)
    on_producer = await open_client(producer.url)
    on_edge = await open_client(edge.url)
    await until(on_producer, ok_with("steady"), SETTLE)
    await until(on_edge, ok_with("steady"), SETTLE)

    log: list[tuple[float, dict[str, Any]]] = []
    reader = asyncio.create_task(follow(on_producer, log))
    try:
        redis_server.kill()
        down_at = time.monotonic()
        seen: list[dict[str, Any]] = []
        outage = await until(
            on_edge,
            lambda u: state(u) == "unavailable" and "unreachable" in u["source"]["message"],
            SETTLE,
            seen,
        )
        assert "steady" in names(outage), "an outage shows the last data received"
        await wait_until(lambda: sum(t > down_at for t, _ in log) >= 3, timeout=SETTLE)

        redis_server.start()
        up_at = time.monotonic()
        skills_db.record("after-restart", count=10)
        back = await until(on_edge, ok_with("after-restart"), 3 * SETTLE, seen)
        await wait_until(lambda: has_latest(log, "after-restart"), timeout=SETTLE)
    finally:
        await stop(reader)

    assert names(back)[:2] == ["after-restart", "steady"]
    assert {state(u) for u in seen} <= {"ok", "unavailable"}
    assert on_edge.ws.close_code is None, "the edge client was never disconnected"
    assert on_producer.ws.close_code is None
    states = [state(update) for _, update in log]
    assert set(states) == {"ok"}, states
    assert sum(down_at < t < up_at for t, _ in log) >= 3, "the producer streamed during the outage"
    times = [t for t, _ in log]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert max(gaps) < 1.5, f"the producer client waited {max(gaps):.2f} s for an update"


# 3. An edge before any producer


async def test_edge_started_before_any_producer_says_so_then_streams_its_data(
    redis_server: RedisProcess, spawn: Spawn, skills_db: SkillsDB, open_client: ClientFactory
) -> None:
    """An edge with no producer yet sends ``unavailable`` ("no producer has published ...
    yet") and no data; once a producer starts, its next kind of update is ``ok`` with the
    database's rows."""
    skills_db.record("late-producer", count=4)
    edge = start_edge(spawn, redis_server.url)
    client = await open_client(edge.url)

    for _ in range(3):
        update = await next_update(client, SETTLE)
        source = update["source"]
        assert source["state"] == "unavailable", source
        assert re.search(r"no producer has published .* yet", source["message"]), source
        assert source["stale"] is True
        assert source["as_of"] is None
        assert update["data"] == {"top_skills": [], "anomalies": []}

    await asyncio.to_thread(start_producer, spawn, skills_db.path, redis_server.url)
    update = await until(client, lambda u: state(u) != "unavailable", SETTLE)

    assert state(update) == "ok", update["source"]
    assert names(update) == ["late-producer"]
    assert update["source"]["as_of"] is not None
    await until(client, ok_with("late-producer"), SETTLE)
    assert client.ws.close_code is None


# 4. Garbage on the state channel


def _forged(real: dict[str, Any], seq_ahead: int, **changes: Any) -> dict[str, Any]:
    """A copy of the real ``state`` envelope ``real``, far ahead in sequence, whose top
    skills start with the planted skill; ``changes`` replace or add top-level keys."""
    envelope: dict[str, Any] = json.loads(json.dumps(real))
    envelope["seq"] = real["seq"] + seq_ahead
    planted_row = {
        "skill_name": PLANTED,
        "total_invocations": 10_000,
        "completion_rate": 50.0,
        "avg_duration_seconds": 1.0,
        "completed_invocations": 5_000,
        "last_invoked": "2026-01-01T00:00:00.000000Z",
    }
    envelope["state"]["top_skills"] = [planted_row, *envelope["state"]["top_skills"]]
    envelope.update(changes)
    return envelope


async def test_garbage_on_the_state_channel_never_reaches_edge_clients(
    redis_server: RedisProcess, spawn: Spawn, skills_db: SkillsDB, open_client: ClientFactory
) -> None:
    """Non-JSON, wrongly shaped, NaN-carrying, extra-keyed and 5 MiB envelopes and a
    replayed old state published on the channel: the edge client gets only schema-valid
    ``metrics_update`` frames whose data is data the producer's own client had, never the
    planted skill, and never the replayed older data."""
    prefix = "garbage-test"
    states = f"{prefix}:states"
    skills_db.record("alpha", count=3)
    producer = start_producer(spawn, skills_db.path, redis_server.url, "--redis-prefix", prefix)
    edge = start_edge(spawn, redis_server.url, "--redis-prefix", prefix)
    r = sync_redis(redis_server)
    on_producer = await open_client(producer.url)
    on_edge = await open_client(edge.url)
    producer_log: list[tuple[float, dict[str, Any]]] = []
    reader = asyncio.create_task(follow(on_producer, producer_log))
    edge_seen: list[dict[str, Any]] = []

    async def both_have(skill: str) -> None:
        """Wait until the edge client, and the producer's client, have data with ``skill``."""
        await until(on_edge, ok_with(skill), SETTLE, edge_seen)
        await wait_until(lambda: has_latest(producer_log, skill), timeout=SETTLE)

    def has_beta(got: list[Any]) -> bool:
        return any(e["kind"] == "state" and "beta" in str(e["state"]) for e in got)

    try:
        await both_have("alpha")
        # Capture a real state (with "beta"), then move on to a newer one (with "gamma").
        capture = asyncio.create_task(asyncio.to_thread(envelopes, r, states, has_beta, SETTLE))
        await wait_until(lambda: r.pubsub_numsub(states)[0][1] >= 2, timeout=SETTLE)
        skills_db.record("beta", count=4)
        captured = await capture
        real = next(e for e in captured if e["kind"] == "state" and "beta" in str(e["state"]))
        await both_have("beta")
        skills_db.record("gamma", count=6)
        await both_have("gamma")
        gamma_from = next(i for i, u in enumerate(edge_seen) if ok_with("gamma")(u))

        raw_real = json.dumps(real).encode()
        padded = json.dumps(_forged(real, 10**6 + 5)).encode() + b" " * (5 * 1024 * 1024)
        nan_row = _forged(real, 10**6 + 3)
        nan_row["state"]["top_skills"][0]["completion_rate"] = float("nan")
        extra_in_row = _forged(real, 10**6 + 4)
        extra_in_row["state"]["top_skills"][0]["owner"] = "mallory"
        garbage: list[bytes] = [
            b"\xff\xfe\x00 " + PLANTED.encode() + b" {not json",
            json.dumps([PLANTED, 1, 2]).encode(),
            json.dumps({"v": 1, "kind": "state", "state": {"top_skills": [PLANTED]}}).encode(),
            json.dumps(_forged(real, 10**6 + 1, v=2)).encode(),
            json.dumps(_forged(real, 10**6 + 2, interval="fast")).encode(),
            json.dumps(nan_row).encode(),  # json.dumps writes NaN as the bare word NaN
            json.dumps(extra_in_row).encode(),
            json.dumps(_forged(real, 10**6 + 6, planted=True)).encode(),
            padded,
            raw_real,  # a duplicate of a state the edge had, older than its current one
        ]
        assert b"NaN" in garbage[5]
        assert len(padded) > 5 * 1024 * 1024
        for message in garbage:
            assert r.publish(states, message) >= 1, "the edge is subscribed"

        # Pub/sub keeps order: once "delta" (written after the garbage) arrives, the edge
        # has handled every garbage envelope.
        skills_db.record("delta", count=8)
        await both_have("delta")
        for _ in range(5):  # a few more ticks: nothing late slips through
            edge_seen.append(await next_update(on_edge, SETTLE))
    finally:
        await stop(reader)

    final = producer_log[-1][1]
    producer_data = {canonical(u["data"]) for _, u in producer_log}
    for update in edge_seen:
        assert PLANTED not in json.dumps(update), update
        if state(update) == "ok":
            assert canonical(update["data"]) in producer_data, f"not the producer's: {update}"
    for update in edge_seen[gamma_from:]:
        assert "gamma" in names(update), f"the replayed older state came back: {update}"
    assert edge_seen[-1]["data"] == final["data"]
    edge.process.stderr.wait_for("ignored an envelope from Redis", SETTLE)
    assert PLANTED not in edge.process.stdout.text
    assert on_edge.ws.close_code is None


# 5. The command line


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    return errors[0]


def test_edge_without_redis_names_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``edge`` with no ``--redis`` (nor the variable) exits non-zero with one line that
    names ``--redis``."""
    monkeypatch.delenv("SESSION_BUDDY_REALTIME_REDIS_URL", raising=False)

    result = run_cli("edge", "--port", "0", "--host", "127.0.0.1", cwd=tmp_path)

    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--redis" in _one_error_line(result.stderr)


@pytest.mark.parametrize("url", ["http://x", "http://admin:hunter2@x:6379/0"])
def test_serve_with_a_non_redis_url_names_the_option(tmp_path: Path, url: str) -> None:
    """``serve --redis http://...`` exits non-zero with one line naming ``--redis``, and
    shows no password of the URL."""
    db = SkillsDB(tmp_path / "skills.db")

    result = run_cli("serve", "--db", str(db.path), "--redis", url, "--port", "0", cwd=tmp_path)

    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--redis" in _one_error_line(result.stderr)
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize("role", ["serve", "edge"])
def test_wrong_redis_password_exits_1_saying_why_without_the_password(
    tmp_path: Path, role: str
) -> None:
    """A producer or an edge given a wrong password for a password-protected Redis exits 1
    with a line that says the credentials were refused, and prints neither password."""
    right, wrong = "right-Pa55word-7f3a", "wrong%40Pa55word-91c2"  # %40: "@", URL-encoded
    db = SkillsDB(tmp_path / "skills.db")
    with running_redis(tmp_path, password=right) as server:
        url = f"redis://:{wrong}@127.0.0.1:{server.port}/0"
        extra = ["--db", str(db.path)] if role == "serve" else []

        result = run_cli(
            role, "--redis", url, "--host", "127.0.0.1", "--port", "0", *extra, cwd=tmp_path
        )

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    line = _one_error_line(result.stderr)
    assert re.search(r"(?i)password|auth", line), line
    assert line.startswith("error: --redis "), "it names the flag that gave the URL"
    assert f"127.0.0.1:{server.port}" in line, "it says which Redis"
    assert wrong not in output
    assert "wrong@Pa55word" not in output
    assert right not in output
    assert "Streaming skill metrics" not in result.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_edge_stops_cleanly_on_sigint_and_sigterm(
    redis_server: RedisProcess, spawn: Spawn, signum: signal.Signals
) -> None:
    """SIGINT or SIGTERM to an edge closes its clients with 1001, prints "Stopped." and
    exits 0."""
    edge = start_edge(spawn, redis_server.url)
    async with connect(edge.url) as ws:
        client = Client(ws)
        assert (await client.recv())["type"] == "connected"
        await next_update(client, SETTLE)

        edge.process.popen.send_signal(signum)
        async with asyncio.timeout(SETTLE):
            async for _ in ws:  # ends on a clean close (1000/1001), raises on another
                pass
        assert ws.close_code == 1001

    status = await asyncio.to_thread(edge.process.wait, RUN)
    assert status == 0, edge.process.stderr.text
    assert edge.process.stdout.lines[-1] == "Stopped."
    assert "Traceback" not in edge.process.stderr.text
