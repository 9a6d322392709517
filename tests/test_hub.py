"""The hub fed by a fake source, over real sockets: it serves whatever the source says."""

from __future__ import annotations

import logging

import pytest

from session_buddy_realtime.data.source import SourceState
from tests.conftest import INTERVAL, ClientFactory, ServerFactory, url_of, wait_until
from tests.fakes import FakeSource, anomaly, skill_row


async def test_each_subscription_gets_the_sources_state_for_it(
    start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """A client of all skills gets the source's top list and anomalies; a client of one
    skill (outside the top list) gets only that skill's row and anomalies."""
    source = FakeSource([skill_row(f"skill-{n:02d}", 100 - n) for n in range(12)])
    source.anomalies = [anomaly("skill-11", 4.0), anomaly("skill-00", 3.0)]
    server = await start_server(source=source)
    everyone = await open_client(url_of(server))
    one = await open_client(url_of(server))
    await one.send_json({"type": "subscribe", "skill": "skill-11"})
    await one.recv_type("subscription_confirmed")
    mine = await one.recv_type("metrics_update")
    assert mine["skill"] == "skill-11"
    assert mine["data"]["top_skills"] == [source.rows["skill-11"]]
    assert mine["data"]["anomalies"] == [source.anomalies[0]]
    update = await everyone.recv_type("metrics_update")
    top = [row["skill_name"] for row in update["data"]["top_skills"]]
    assert top == [f"skill-{n:02d}" for n in range(10)]
    assert update["data"]["anomalies"] == source.anomalies


async def test_the_hub_asks_only_for_subscribed_skills_within_the_read_deadline(
    start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """Each tick asks the source once, for exactly the skills clients subscribed to, and
    allows it 80 % of the interval."""
    source = FakeSource([skill_row("alpha", 5), skill_row("beta", 3)])
    server = await start_server(source=source)
    first = await open_client(url_of(server))
    await first.send_json({"type": "subscribe", "skill": "beta"})
    await first.recv_type("subscription_confirmed")
    await first.recv_type("metrics_update")
    second = await open_client(url_of(server))
    await second.recv_type("metrics_update")
    asked_from = len(source.asked)
    await first.recv_type("metrics_update")
    await first.recv_type("metrics_update")
    tick_reads = source.asked[asked_from:]
    assert tick_reads, "the ticks read the source"
    assert {skills for skills, _ in tick_reads} == {frozenset({"beta"})}
    assert [within for _, within in tick_reads] == [pytest.approx(0.8 * INTERVAL)] * len(tick_reads)
    assert len(tick_reads) <= server.status()["ticks"]


async def test_stale_state_from_the_source_reaches_clients_as_it_is(
    start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """The hub does not judge the state: a source that says busy, with its reason, is
    shown busy and stale to clients, and fresh again when the source recovers."""
    source = FakeSource([skill_row("alpha", 5)])
    server = await start_server(source=source)
    client = await open_client(url_of(server))
    await client.recv_type("metrics_update")
    source.state, source.message = SourceState.BUSY, "the feed is late"
    while (update := await client.recv_type("metrics_update"))["source"]["state"] != "busy":
        pass
    assert update["source"]["stale"] is True
    assert update["source"]["message"] == "the feed is late"
    assert update["data"]["top_skills"] == [source.rows["alpha"]]
    source.state, source.message = SourceState.OK, None
    while (update := await client.recv_type("metrics_update"))["source"]["state"] != "ok":
        pass
    assert update["source"]["stale"] is False


async def test_a_source_that_raises_costs_one_tick(
    start_server: ServerFactory, open_client: ClientFactory
) -> None:
    """A read that raises is counted as an error; the next tick delivers again."""
    source = FakeSource([skill_row("alpha", 5)])
    server = await start_server(source=source)
    client = await open_client(url_of(server))
    await client.recv_type("metrics_update")
    source.fail_next = RuntimeError("the feed broke")
    await wait_until(lambda: server.status()["errors"] == 1)
    assert "the feed broke" in server.status()["last_error"]
    update = await client.recv_type("metrics_update")
    assert update["data"]["top_skills"] == [source.rows["alpha"]]


async def test_the_server_opens_and_closes_its_source_with_each_run(
    start_server: ServerFactory,
) -> None:
    """start() opens the source and stop() closes it, once per run; status() shows the
    source's own description."""
    source = FakeSource()
    server = await start_server(source=source)
    assert (source.opened, source.closed) == (1, 0)
    assert server.status()["database"] == source.describe()
    await server.stop()
    assert (source.opened, source.closed) == (1, 1)
    await server.start()
    assert (source.opened, source.closed) == (2, 1)


async def test_a_group_that_cannot_be_encoded_does_not_starve_the_others(
    start_server: ServerFactory,
    open_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A skill whose state turns unencodable (a non-finite number) costs only its own
    subscribers: clients of all skills and of another skill keep getting every update,
    and the failure is logged once, not every tick, and once more when it ends."""
    caplog.set_level(logging.INFO, logger="session_buddy_realtime")
    rows = [skill_row(f"busy-{n}", 100 + n) for n in range(10)]
    source = FakeSource([*rows, skill_row("quiet", 2), skill_row("fragile", 1)])
    server = await start_server(source=source)
    everyone = await open_client(url_of(server))
    clients = {}
    for skill in ("quiet", "fragile"):
        clients[skill] = await open_client(url_of(server))
        await clients[skill].send_json({"type": "subscribe", "skill": skill})
        await clients[skill].recv_type("subscription_confirmed")
        await clients[skill].recv_type("metrics_update")
    source.rows["fragile"]["avg_duration_seconds"] = float("inf")
    await wait_until(lambda: server.status()["errors"] >= 1)
    errors_from, ticks_from = server.status()["errors"], server.status()["ticks"]
    for _ in range(3):
        assert len((await everyone.recv_type("metrics_update"))["data"]["top_skills"]) == 10
        assert (await clients["quiet"].recv_type("metrics_update"))["skill"] == "quiet"
    status = server.status()
    assert status["errors"] - errors_from == status["ticks"] - ticks_from, "one per tick"
    assert "skill 'fragile'" in status["last_error"]
    source.rows["fragile"]["avg_duration_seconds"] = 1.5
    recovered = await clients["fragile"].recv_type("metrics_update")
    assert recovered["data"]["top_skills"] == [source.rows["fragile"]]
    logged = [r.getMessage() for r in caplog.records if "fragile" in r.getMessage()]
    assert logged == [
        "broadcast to skill 'fragile' failed (skipped until it recovers)",
        "broadcast to skill 'fragile' works again",
    ]
