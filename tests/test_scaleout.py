"""Scale-out in one process: producers and edges on a real ``redis-server``, real clients.

Timings are shortened (``FAST``) so that leases, staleness and reconnection show within a
second or two; the process-level tests (``test_scaleout_processes.py``) use the defaults.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from session_buddy_realtime import RealTimeMetricsServer, ServerStartError
from session_buddy_realtime.scaleout import wire
from session_buddy_realtime.scaleout.link import Keys, RedisTimings
from tests.conftest import INTERVAL, UNIT, ClientFactory, SkillsDB, update_where, url_of, wait_until
from tests.http_support import http_request
from tests.redis_support import RedisProcess, running_redis

FAST = RedisTimings(
    lease_seconds=1.0,
    renew_every=0.2,
    watch_seconds=3.0,
    stale_after=3.0,
    reconnect_max=0.3,
    reply_timeout=2.0,
)
KEYS = Keys()

Start = Callable[..., Awaitable[RealTimeMetricsServer]]


@pytest.fixture
async def start(skills_db: SkillsDB, redis_server: RedisProcess) -> AsyncIterator[Start]:
    """Start producers (``edge=False``) and edges on ``redis_server``, stopped afterwards."""
    started: list[RealTimeMetricsServer] = []

    async def _start(*, edge: bool = False, **kwargs: Any) -> RealTimeMetricsServer:
        kwargs.setdefault("update_interval", INTERVAL)
        kwargs.setdefault("redis_url", redis_server.url)
        kwargs.setdefault("redis_timings", FAST)
        if not edge:
            kwargs.setdefault("db_path", skills_db.path)
        server = RealTimeMetricsServer(host="127.0.0.1", port=0, edge=edge, **kwargs)
        await server.start()
        started.append(server)
        return server

    yield _start
    for server in reversed(started):
        await server.stop()


def _payload(update: dict[str, Any]) -> tuple[Any, Any]:
    return update["data"], update["source"]


def _producer_and_edge(
    db: SkillsDB, url: str
) -> tuple[RealTimeMetricsServer, RealTimeMetricsServer]:
    """A producer of ``db`` and an edge on the Redis at ``url``, not started."""
    producer = RealTimeMetricsServer(
        "127.0.0.1", 0, db.path, INTERVAL, redis_url=url, redis_timings=FAST
    )
    edge = RealTimeMetricsServer(
        "127.0.0.1", 0, update_interval=INTERVAL, redis_url=url, edge=True, redis_timings=FAST
    )
    return producer, edge


async def _last_envelope(redis_server: RedisProcess) -> bytes:
    """The last state the producer published (once it has published one)."""
    redis = redis_server.cli()
    await wait_until(lambda: redis.get(KEYS.last) is not None)  # type: ignore[attr-defined]
    last: bytes = redis.get(KEYS.last)  # type: ignore[attr-defined]
    return last


async def test_edge_clients_get_the_producers_payload(
    start: Start, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """A client of an edge receives the producer's own clients' data and source, frame for
    frame, including after a write to the database."""
    producer = await start()
    edge = await start(edge=True)
    local, remote = await open_client(url_of(producer)), await open_client(url_of(edge))
    ranked_db.record("skill-05", count=40)

    def changed(update: dict[str, Any]) -> bool:
        top = update["data"]["top_skills"]
        return bool(top) and bool(top[0]["skill_name"] == "skill-05")

    fresh = await update_where(local, changed)
    seen = await update_where(remote, changed)
    # The producer publishes its newest state: the edge may skip one its own clients got
    # (a tick that came while a publication was under way), never pass on another.
    if seen["source"]["as_of"] != fresh["source"]["as_of"]:
        fresh = await update_where(local, lambda u: u["source"]["as_of"] == seen["source"]["as_of"])
    assert _payload(seen) == _payload(fresh)
    assert seen["source"]["state"] == "ok"


async def test_roles_are_told_in_connected_and_status(start: Start, open_client: Any) -> None:
    """``server_role`` says producer or edge in ``connected`` and in the status."""
    producer = await start()
    edge = await start(edge=True)
    for server, role in ((producer, "producer"), (edge, "edge")):
        client = await open_client(url_of(server))
        assert server.status()["server_role"] == role
        assert server.status()["redis"]["role"] == role
        await client.ws.close()
    plain = RealTimeMetricsServer(port=0)
    assert plain.status()["server_role"] == "standalone"
    assert plain.status()["redis"] is None


async def test_welcome_names_the_role(start: Start) -> None:
    """The ``connected`` frame of an edge carries ``server_role: edge``."""
    from websockets.asyncio.client import connect

    edge = await start(edge=True)
    async with connect(url_of(edge)) as ws:
        welcome = json.loads(await ws.recv())
    assert welcome["server_role"] == "edge"


async def test_subscription_beyond_the_top_ten_through_an_edge(
    start: Start, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """A skill outside the top 10 is served by an edge at once (known, with its row), and
    then follows the database: the producer publishes the rows edges watch."""
    producer = await start()
    edge = await start(edge=True)
    # An edge that has not heard from a producer yet says so ("known": null, unavailable)
    # and serves the row with the first state: here it follows one already.
    await wait_until(lambda: edge.status()["redis"]["epoch"] is not None)
    client = await open_client(url_of(edge))
    await client.send_json({"type": "subscribe", "skill": "skill-12"})
    confirmed = await client.recv_type("subscription_confirmed")
    assert confirmed["known"] is True
    first = await client.recv_type("metrics_update")
    expected = await producer.snapshot("skill-12")
    assert _payload(first) == _payload(expected)
    ranked_db.record("skill-12", completed=False, duration=None, count=3)
    later = await update_where(
        client,
        lambda u: (
            u["skill"] == "skill-12"
            and u["data"]["top_skills"][0]["total_invocations"]
            == first["data"]["top_skills"][0]["total_invocations"] + 3
        ),
    )
    assert later["source"]["state"] == "ok"
    await wait_until(lambda: producer.status()["redis"]["watched_skills"] == 1)


async def test_unknown_skill_is_unknown_on_an_edge_too(
    start: Start, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """An edge says ``known: false`` for a skill the database does not have, as the
    producer would, rather than guessing."""
    await start()
    edge = await start(edge=True)
    client = await open_client(url_of(edge))
    await client.send_json({"type": "subscribe", "skill": "no-such-skill"})
    confirmed = await client.recv_type("subscription_confirmed")
    assert confirmed["known"] is False


async def test_history_and_search_through_an_edge_equal_the_producers(
    start: Start, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """``history`` and ``skills`` replies of an edge carry the producer's buckets and names."""
    producer = await start()
    edge = await start(edge=True)
    replies = []
    for server in (producer, edge):
        client = await open_client(url_of(server))
        await client.send_json({"type": "history", "skill": "skill-03"})
        history = await client.recv_type("history")
        await client.send_json({"type": "skills", "query": "skill-1"})
        names = await client.recv_type("skills")
        replies.append((history, names))
    (local_history, local_names), (edge_history, edge_names) = replies
    assert edge_history["buckets"] == local_history["buckets"]
    assert edge_history["source"]["state"] == "ok"
    assert edge_names["skills"] == local_names["skills"] == ["skill-10", "skill-11", "skill-12"]


async def test_http_endpoints_of_an_edge(
    start: Start, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """An edge serves ``/healthz``, ``/api/snapshot`` (any skill) and ``/metrics`` from the
    producer's state, and the dashboard page."""
    producer = await start()
    edge = await start(edge=True)
    client = await open_client(url_of(edge))  # watched: the producer publishes
    # The edge has the producer's state once its client does (asked sooner, the snapshot
    # would rightly say there is no data yet).
    await update_where(client, lambda u: u["source"]["state"] == "ok")
    health = await http_request(edge.port, "/healthz")
    assert (health.status, health.json()) == (200, {"status": "ok"})
    snapshot = await http_request(edge.port, "/api/snapshot?skill=skill-11")
    expected = await producer.snapshot("skill-11")
    assert _payload(snapshot.json()) == _payload(expected)
    metrics = await http_request(edge.port, "/metrics")
    assert metrics.status == 200
    assert 'session_buddy_skill_invocations_total{skill="skill-01"} 29' in metrics.text()
    page = await http_request(edge.port, "/")
    assert page.status == 200
    assert b"<html" in page.body.lower()


async def test_one_of_two_producers_publishes_and_the_other_takes_over(
    start: Start, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """Two producers on one database: one holds the lease and publishes; when it stops,
    the other takes over and the edge's client keeps receiving fresh data."""
    first, second = await start(), await start()
    edge = await start(edge=True)
    client = await open_client(url_of(edge))
    await update_where(client, lambda u: u["source"]["state"] == "ok")
    leases = [p.status()["redis"]["lease"] for p in (first, second)]
    assert sorted(lease["held"] for lease in leases) == [False, True]
    holder, other = (first, second) if leases[0]["held"] else (second, first)
    assert other.status()["redis"]["lease"]["holder"] == holder.status()["redis"]["identity"]
    assert other.status()["redis"]["states_published"] == 0
    old_epoch = edge.status()["redis"]["epoch"]
    await holder.stop()
    await wait_until(lambda: other.status()["redis"]["lease"]["held"], timeout=100 * UNIT)
    ranked_db.record("skill-07", count=50)
    fresh = await update_where(
        client, lambda u: u["data"]["top_skills"][0]["skill_name"] == "skill-07"
    )
    assert fresh["source"]["state"] == "ok"
    assert edge.status()["redis"]["producer"] == other.status()["redis"]["identity"]
    assert edge.status()["redis"]["epoch"] > old_epoch


async def test_producer_reads_nothing_while_no_edge_watches(
    start: Start, ranked_db: SkillsDB, redis_server: RedisProcess
) -> None:
    """With no edge client anywhere, a producer publishes heartbeats but never queries the
    database."""
    producer = await start()
    await wait_until(lambda: producer.status()["redis"]["heartbeats_published"] >= 5)
    status = producer.status()
    assert status["database"]["queries"] == 0
    assert status["redis"]["states_published"] == 0


async def test_duplicates_stale_epochs_and_gaps_are_handled(
    start: Start, ranked_db: SkillsDB, redis_server: RedisProcess, open_client: ClientFactory
) -> None:
    """A replayed envelope is dropped as a duplicate, one from an older epoch as stale, and
    a gap is counted (the last state read again); none of them changes what clients get."""
    await start()
    edge = await start(edge=True)
    client = await open_client(url_of(edge))
    good = await update_where(client, lambda u: u["source"]["state"] == "ok")
    redis = redis_server.cli()
    last = await _last_envelope(redis_server)
    envelope = json.loads(last)
    redis.publish(KEYS.states, last)  # type: ignore[attr-defined]
    older = {**envelope, "epoch": envelope["epoch"] - 1, "seq": 10**6}
    older["state"] = {**envelope["state"], "top_skills": []}
    redis.publish(KEYS.states, json.dumps(older))  # type: ignore[attr-defined]
    ahead = {**envelope, "kind": "heartbeat", "seq": edge.status()["redis"]["seq"] + 5}
    del ahead["state"]
    redis.publish(KEYS.states, json.dumps(ahead))  # type: ignore[attr-defined]
    await wait_until(lambda: edge.status()["redis"]["stale"] >= 1)
    await wait_until(lambda: edge.status()["redis"]["gaps"] >= 1)
    assert edge.status()["redis"]["duplicates"] >= 1
    after = await client.recv_type("metrics_update")
    assert after["data"]["top_skills"] == good["data"]["top_skills"]


@pytest.mark.parametrize(
    "garbage",
    [
        b"not json at all",
        b'{"v": 1, "kind": "state"}',
        b'{"v": 2, "kind": "heartbeat"}',
        b"[1, 2, 3]",
        b"x" * (wire.MAX_WIRE_BYTES + 1),
    ],
    ids=["text", "missing-fields", "other-version", "list", "oversized"],
)
async def test_garbage_on_the_channel_is_counted_and_ignored(
    start: Start,
    ranked_db: SkillsDB,
    redis_server: RedisProcess,
    open_client: ClientFactory,
    garbage: bytes,
) -> None:
    """Whatever lands on the state channel that is not a valid envelope is counted, never
    forwarded, and the stream goes on."""
    await start()
    edge = await start(edge=True)
    client = await open_client(url_of(edge))
    await update_where(client, lambda u: u["source"]["state"] == "ok")
    redis_server.cli().publish(KEYS.states, garbage)  # type: ignore[attr-defined]
    await wait_until(lambda: edge.status()["redis"]["invalid"] >= 1)
    assert edge.status()["redis"]["last_invalid"]
    update = await client.recv_type("metrics_update")
    assert update["source"]["state"] == "ok"
    assert update["data"]["top_skills"][0]["skill_name"] == "skill-01"


async def test_a_state_with_a_planted_row_of_the_wrong_shape_is_refused(
    start: Start, ranked_db: SkillsDB, redis_server: RedisProcess, open_client: ClientFactory
) -> None:
    """A well-stamped state whose row has an extra key, or a NaN, never reaches a client."""
    await start()
    edge = await start(edge=True)
    client = await open_client(url_of(edge))
    await update_where(client, lambda u: u["source"]["state"] == "ok")
    redis = redis_server.cli()
    envelope = json.loads(await _last_envelope(redis_server))
    row = {**envelope["state"]["top_skills"][0], "skill_name": "planted", "extra": 1}
    planted = {**envelope, "seq": envelope["seq"] + 10**9}
    planted["state"] = {**envelope["state"], "top_skills": [row]}
    redis.publish(KEYS.states, json.dumps(planted))  # type: ignore[attr-defined]
    nan = json.dumps(planted).replace('"extra":1', '"extra":NaN')
    redis.publish(KEYS.states, nan)  # type: ignore[attr-defined]
    await wait_until(lambda: edge.status()["redis"]["invalid"] >= 2)
    for _ in range(5):
        update = await client.recv_type("metrics_update")
        assert "planted" not in json.dumps(update)


async def test_redis_killed_and_restarted_mid_stream(
    start: Start, ranked_db: SkillsDB, redis_server: RedisProcess, open_client: ClientFactory
) -> None:
    """Redis killed: the producer's clients go on with ``ok``, the edge's stay connected and
    read ``unavailable``; Redis back (empty): both resume by themselves, with fresh data."""
    producer = await start()
    edge = await start(edge=True)
    local, remote = await open_client(url_of(producer)), await open_client(url_of(edge))
    await update_where(remote, lambda u: u["source"]["state"] == "ok")
    redis_server.kill()
    down = await update_where(remote, lambda u: u["source"]["state"] == "unavailable")
    assert "unreachable" in down["source"]["message"]
    assert down["data"]["top_skills"], "the last data received is still shown"
    assert (await local.recv_type("metrics_update"))["source"]["state"] == "ok"
    assert edge.status()["redis"]["connected"] is False
    redis_server.start()
    ranked_db.record("skill-09", count=60)
    back = await update_where(
        remote, lambda u: u["data"]["top_skills"][0]["skill_name"] == "skill-09", 200 * UNIT
    )
    assert back["source"]["state"] == "ok"
    assert (await local.recv_type("metrics_update"))["source"]["state"] == "ok"
    assert producer.status()["redis"]["connected"] is True


async def test_an_edge_started_before_any_producer(
    start: Start, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """An edge with no producer yet tells its clients so; they get data once one starts."""
    edge = await start(edge=True)
    client = await open_client(url_of(edge))
    waiting = await client.recv_type("metrics_update")
    assert waiting["source"]["state"] == "unavailable"
    assert "no producer has published" in waiting["source"]["message"]
    await start()
    data = await update_where(client, lambda u: u["source"]["state"] == "ok")
    assert data["data"]["top_skills"][0]["skill_name"] == "skill-01"


async def test_a_silent_producer_makes_the_edge_stale_but_keeps_its_cadence(
    start: Start, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """When the producer stops, the edge's clients keep receiving updates, flagged
    ``unavailable`` with the last data, about once per interval and a half."""
    producer = await start()
    edge = await start(edge=True)
    client = await open_client(url_of(edge))
    await update_where(client, lambda u: u["source"]["state"] == "ok")
    await producer.stop()
    stale = await update_where(client, lambda u: u["source"]["state"] == "unavailable")
    assert "no producer has published" in stale["source"]["message"]
    loop = asyncio.get_running_loop()
    began = loop.time()
    for _ in range(5):
        await client.recv_type("metrics_update")
    assert loop.time() - began < 5 * 1.5 * INTERVAL + 20 * UNIT


async def test_a_flood_of_envelopes_cannot_speed_an_edge_up(
    start: Start, ranked_db: SkillsDB, redis_server: RedisProcess, open_client: ClientFactory
) -> None:
    """Envelopes arriving far faster than the interval still give at most one tick per half
    interval: whoever can publish on the channel cannot make an edge flood its clients."""
    await start()
    edge = await start(edge=True)
    client = await open_client(url_of(edge))
    await update_where(client, lambda u: u["source"]["state"] == "ok")
    redis = redis_server.cli()
    last = json.loads(await _last_envelope(redis_server))
    ticks_before = edge.status()["ticks"]
    loop = asyncio.get_running_loop()
    began = loop.time()
    for step in range(1, 301):
        beat = {k: v for k, v in last.items() if k != "state"}
        beat.update(kind="heartbeat", seq=last["seq"] + 10**7 + step)
        redis.publish(KEYS.states, json.dumps(beat))  # type: ignore[attr-defined]
        await asyncio.sleep(0)
    await asyncio.sleep(10 * UNIT)
    elapsed = loop.time() - began
    ticks = edge.status()["ticks"] - ticks_before
    assert ticks <= elapsed / (INTERVAL / 2) + 2


async def test_password_protected_redis(
    tmp_path: Path, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """An ACL user with only the documented rules works for producer and edge; a wrong
    password fails the start naming redis_url, without the password."""
    pytest.importorskip("redis")
    with running_redis(tmp_path, acl_user=("realtime", "s3cret-pass")) as redis_server:
        producer, edge = _producer_and_edge(ranked_db, redis_server.url)
        async with producer, edge:
            client = await open_client(url_of(edge))
            await client.send_json({"type": "subscribe", "skill": "skill-12"})
            update = await update_where(
                client, lambda u: u["skill"] == "skill-12" and u["source"]["state"] == "ok"
            )
            assert update["data"]["top_skills"][0]["total_invocations"] == 18
            await wait_until(lambda: producer.status()["redis"]["watched_skills"] == 1)
            await wait_until(lambda: producer.status()["redis"]["states_published"] >= 1)
            # The ACL user has only the rules docs/scaling.md lists: nothing was refused.
            for server in (producer, edge):
                assert server.status()["redis"]["reconnects"] == 0
                assert server.status()["redis"]["last_error"] is None
            assert "s3cret-pass" not in json.dumps(edge.status())
        wrong = redis_server.url.replace("s3cret-pass", "wrong-pass")
        for server in (
            RealTimeMetricsServer(port=0, db_path=ranked_db.path, redis_url=wrong),
            RealTimeMetricsServer(port=0, redis_url=wrong, edge=True),
        ):
            with pytest.raises(ServerStartError) as refused:
                await server.start()
            assert "redis_url" in str(refused.value)
            assert "wrong-pass" not in str(refused.value)
            assert not server.running


async def test_redis_over_tls(
    tmp_path: Path, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """``rediss://`` with the CA in the URL: the stream crosses Redis over TLS."""
    authority = trustme.CA()
    cert = authority.issue_cert("localhost", "127.0.0.1")
    files = (tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(files[0])
    cert.private_key_pem.write_to_path(files[1])
    authority.cert_pem.write_to_path(files[2])
    with running_redis(tmp_path, tls=files) as redis_server:
        assert redis_server.url.startswith("rediss://")
        producer, edge = _producer_and_edge(ranked_db, redis_server.url)
        async with producer, edge:
            client = await open_client(url_of(edge))
            update = await update_where(client, lambda u: u["source"]["state"] == "ok")
            assert update["data"]["top_skills"][0]["skill_name"] == "skill-01"


async def test_unreachable_redis_at_start_is_not_fatal(
    tmp_path: Path, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """With nothing on the Redis port, a producer serves its own clients and an edge says
    ``unavailable``; when Redis comes up there, both connect by themselves."""
    redis_server = RedisProcess(tmp_path)
    producer, edge = _producer_and_edge(ranked_db, redis_server.url)
    try:
        async with producer, edge:
            local, remote = await open_client(url_of(producer)), await open_client(url_of(edge))
            assert (await local.recv_type("metrics_update"))["source"]["state"] == "ok"
            down = await remote.recv_type("metrics_update")
            assert down["source"]["state"] == "unavailable"
            assert "unreachable" in down["source"]["message"]
            redis_server.start()
            await update_where(remote, lambda u: u["source"]["state"] == "ok", 200 * UNIT)
    finally:
        redis_server.stop()


async def test_two_streams_share_one_redis_by_prefix(
    start: Start, ranked_db: SkillsDB, tmp_path: Path, open_client: ClientFactory
) -> None:
    """Producers of two databases under two prefixes do not mix: each edge follows its own."""
    other = SkillsDB(tmp_path / "other.db")
    other.record("only-in-other", count=5)
    await start()
    await start(db_path=other.path, redis_prefix="other-db")
    edge = await start(edge=True)
    other_edge = await start(edge=True, redis_prefix="other-db")
    first = await update_where(
        await open_client(url_of(edge)), lambda u: u["source"]["state"] == "ok"
    )
    second = await update_where(
        await open_client(url_of(other_edge)), lambda u: u["source"]["state"] == "ok"
    )
    assert first["data"]["top_skills"][0]["skill_name"] == "skill-01"
    assert [row["skill_name"] for row in second["data"]["top_skills"]] == ["only-in-other"]


def test_bad_redis_settings_fail_at_construction() -> None:
    """A URL of another scheme, with no host, or an option not passed on, and a bad prefix,
    are refused when the server is built, naming the setting."""
    for url, says in (
        ("http://localhost", "redis_url must start with"),
        ("redis://", "names no host"),
        ("redis://localhost/0?retry=1", "options"),
    ):
        with pytest.raises(ValueError, match=says):
            RealTimeMetricsServer(port=0, redis_url=url)
    with pytest.raises(ValueError, match="redis_prefix"):
        RealTimeMetricsServer(port=0, redis_url="redis://localhost", redis_prefix="a b")
    with pytest.raises(ValueError, match="edge"):
        RealTimeMetricsServer(port=0, edge=True)


async def test_a_producer_reconnecting_within_its_lease_goes_on_numbering(
    start: Start, ranked_db: SkillsDB, redis_server: RedisProcess, open_client: ClientFactory
) -> None:
    """A producer whose Redis connections are killed keeps its lease if it is back in time:
    same epoch, the sequence goes on from where it was, and a write made meanwhile reaches
    the edge's client."""
    producer = await start()
    edge = await start(edge=True)
    client = await open_client(url_of(edge))
    await update_where(client, lambda u: u["source"]["state"] == "ok")
    before = edge.status()["redis"]
    redis = redis_server.cli()
    # Every connection but this one: the producer's and the edge's.
    killed = redis.execute_command("CLIENT", "KILL", "USER", "default", "SKIPME", "yes")  # type: ignore[attr-defined]
    assert killed >= 2
    ranked_db.record("skill-11", count=80)
    fresh = await update_where(
        client, lambda u: u["data"]["top_skills"][0]["skill_name"] == "skill-11", 200 * UNIT
    )
    assert fresh["source"]["state"] == "ok"
    status = edge.status()["redis"]
    assert status["epoch"] == before["epoch"]
    assert status["seq"] > before["seq"]  # a numbering started again would be dropped
    # The edge subscribes again, then reads the last state: a publication landing between
    # the two arrives twice and is dropped once as a duplicate. A restarted numbering would
    # have every publication dropped until it caught up.
    assert status["duplicates"] <= status["received"] - before["received"]
    assert producer.status()["redis"]["reconnects"] >= 1


async def test_edges_get_each_update_right_after_the_producers_clients(
    start: Start, ranked_db: SkillsDB, open_client: ClientFactory
) -> None:
    """A producer with clients of its own publishes right after its own ticks, so an edge's
    client gets a change one Redis hop after the producer's client, not up to an interval
    apart (the publisher used to keep a schedule of its own, at any phase of the hub's)."""
    producer = await start(update_interval=1.0)
    edge = await start(edge=True, update_interval=1.0)
    remote = await open_client(url_of(edge))
    await update_where(remote, lambda u: u["source"]["state"] == "ok", 100 * UNIT)
    # The producer's own ticks start with its first client: half an interval after its
    # publisher's schedule began, the worst phase for a publisher on a schedule of its own.
    await asyncio.sleep(0.5)
    local = await open_client(url_of(producer))
    await local.recv_type("metrics_update")
    loop = asyncio.get_running_loop()
    ranked_db.record("skill-06", count=45)

    async def arrival(client: Any) -> float:
        await update_where(
            client, lambda u: u["data"]["top_skills"][0]["skill_name"] == "skill-06", 100 * UNIT
        )
        return loop.time()

    at_producer, at_edge = await asyncio.gather(arrival(local), arrival(remote))
    assert abs(at_edge - at_producer) < 0.25, (at_producer, at_edge)
