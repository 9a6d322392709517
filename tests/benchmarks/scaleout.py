"""Scale-out benchmark: two Redis edges against one process, and the cost of the extra hop.

Run (the full report, about 5 minutes on 2 cores)::

    .venv/bin/python tests/benchmarks/scaleout.py

which is ``--sizes 1000,4000,10000 --rounds 2 --seconds 6 --latency-seconds 30
--latency-interval 0.2``; ``--sizes 1000 --rounds 1`` for a quick look, ``--smoke`` for
the test suite's check (N = 50, one round, short windows).

Everything runs on loopback, each part in its own process: a ``redis-server`` of its own
(``tests/redis_support.py``), a producer (``RealTimeMetricsServer(db_path=..., redis_url=...)``
on a demo database, no clients of its own), the servers measured, and the client swarm
of ``fanout.py`` (imported, not copied) in two processes of N/2 clients each.

**Capacity.** For each N and round, interleaved (the order alternates between rounds):

* ``one process``: a standalone server (no Redis) with the N clients;
* ``two edges``: two ``RealTimeMetricsServer(redis_url=..., edge=True)`` with N/2 each.

Each run measures ``--seconds`` after the clients have settled: every process's CPU (user +
system: the servers' and the producer's own ``getrusage``, as ``fanout.py`` reads it;
``redis-server``'s and the swarm's from ``/proc/PID/stat``), the servers' ticks and the
updates the swarm received, and the machine's whole CPU (``/proc/stat``), so that
interrupts and load from outside the benchmark show. The report gives updates delivered per
CPU-second of the servers (at a 1 s interval: clients held per CPU-second), the same with
the producer and Redis counted, and a linear projection of the clients each setup holds
when every server process has one full core; the ratio is two edges / one process.

**The extra hop.** For each round a fresh producer and one edge, at ``--latency-interval``,
while this process inserts a row into the database every 0.75-2.25 intervals. A probe
process holds one client of the producer, one of the edge and a plain subscriber of the
Redis state channel, and timestamps every ``metrics_update`` and every envelope; updates
are matched by their ``source.as_of``. Reported: edge client receive - producer client
receive for the same update (p50, p99), where that delay goes, and the floors: a Redis
pub/sub message on loopback (publisher and subscriber in one process) and the
tick-to-receive latency of a loopback WebSocket client.

The swarm shares the 2 cores with the servers (the report shows its CPU); nothing here
decides pass or fail: the numbers do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
# First on the path, even if already on it further down: another distribution's top-level
# ``tests`` package (Session-Buddy's environment has one) must not shadow this project's.
for _path in (str(HERE.parent), str(ROOT)):
    while _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)

import fanout  # noqa: E402  (the swarm, its process wrapper and helpers)

CLOCK_TICK = os.sysconf("SC_CLK_TCK")
SETTLE_TICKS = 2
CAPACITY_PREFIX = "bench-capacity"


# Process accounting, from /proc (the same clock for every process, ours or not).


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def _machine_busy() -> tuple[float, float]:
    """CPU seconds the whole machine (all cores) has spent since boot: in processes (user,
    nice, system, steal) and in interrupts (irq, softirq: loopback TCP delivery, mostly),
    which no process is charged for."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + steal) / CLOCK_TICK, (irq + softirq) / CLOCK_TICK


# The servers, each run as ``scaleout.py _server ROLE INTERVAL DB REDIS PREFIX MAXCONN``.


async def _server_main(
    role: str, interval: float, db: str, redis_url: str, prefix: str, max_connections: int
) -> None:
    fanout._raise_file_limit()
    from session_buddy_realtime import RealTimeMetricsServer

    options: dict[str, Any] = {
        "update_interval": interval,
        "max_connections": max_connections,
        "max_connections_per_ip": 100_000,
    }
    if role == "standalone":
        server = RealTimeMetricsServer("127.0.0.1", 0, Path(db), **options)
    elif role == "producer":
        server = RealTimeMetricsServer(
            "127.0.0.1", 0, Path(db), redis_url=redis_url, redis_prefix=prefix, **options
        )
    else:
        server = RealTimeMetricsServer(
            "127.0.0.1", 0, redis_url=redis_url, edge=True, redis_prefix=prefix, **options
        )
    await server.start()
    print(json.dumps({"port": server.port}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if command == "stats":
            # Not server.status(): it describes every client, which costs at 10k clients.
            scale = server._scale
            published = None if scale.publisher is None else dict(scale.publisher._counts)
            received = None if scale.feed is None else dict(scale.feed._received.counts)
            print(
                json.dumps(
                    {
                        "cpu": fanout._cpu_seconds(),
                        "ticks": server._stats.ticks,
                        "idle_ticks": server._stats.idle_ticks,
                        "clients": len(server._hub.sessions),
                        "published": published,
                        "received": received,
                        "last_error": server._stats.last_error,
                    }
                ),
                flush=True,
            )
        elif command == "stop" or not command:
            await server.stop()
            print(json.dumps({"stopped": True}), flush=True)
            return


class Child(fanout.Process):
    """A child running this script (``fanout.Process`` runs ``fanout.py`` by default)."""

    def __init__(self, *args: str) -> None:
        super().__init__(*args, script=HERE)


def _spawn_server(
    role: str, interval: float, *, db: Path | None, redis_url: str, prefix: str, clients: int
) -> Child:
    """Start a server child; its first line (``read()``) is its port."""
    return Child(
        "_server", role, str(interval), str(db or "-"), redis_url, prefix, str(clients + 64)
    )


# Capacity.


class Accounts:
    """CPU of a set of processes and of the machine between two readings."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.began = self._read()

    def _read(self) -> tuple[float, tuple[float, float], dict[str, float]]:
        return (
            time.monotonic(),
            _machine_busy(),
            {name: sum(_proc_cpu(pid) for pid in pids) for name, pids in self.pids.items()},
        )

    def finish(self) -> dict[str, float]:
        """CPU seconds per group, of the whole ``machine``, and the ``wall`` time."""
        wall0, busy0, cpu0 = self.began
        wall1, busy1, cpu1 = self._read()
        used = {name: cpu1[name] - cpu0[name] for name in cpu0}
        used["machine"] = busy1[0] - busy0[0]
        used["interrupts"] = busy1[1] - busy0[1]
        used["wall"] = wall1 - wall0
        return used


def measure_capacity(
    setup: str,
    clients: int,
    interval: float,
    window: float,
    *,
    db: Path,
    redis: Any,
    producer: Child,
) -> dict[str, Any]:
    """One run: the servers of ``setup``, N clients in two swarm processes, one window."""
    servers: list[Child] = []
    swarms: list[fanout.Process] = []
    halves = [clients // 2, clients - clients // 2]
    try:
        if setup == "one process":
            servers.append(
                _spawn_server(
                    "standalone", interval, db=db, redis_url="-", prefix="-", clients=clients
                )
            )
        else:
            servers.extend(
                _spawn_server(
                    "edge",
                    interval,
                    db=None,
                    redis_url=redis.url,
                    prefix=CAPACITY_PREFIX,
                    clients=half,
                )
                for half in halves
            )
        ports = [server.read()["port"] for server in servers]
        if len(ports) == 1:
            ports *= 2  # both swarm processes connect to the one server
        swarms = [
            fanout.Process("_swarm", str(port), str(half), str(window), "0")
            for port, half in zip(ports, halves, strict=True)
        ]
        connected = sum(swarm.read()["connected"] for swarm in swarms)
        time.sleep(SETTLE_TICKS * interval)
        accounts = Accounts({"redis": [redis.process.pid], "swarm": [s.popen.pid for s in swarms]})
        before = [s.ask("stats") for s in [*servers, producer]]
        for swarm in swarms:
            swarm.send("measure")
        results = [swarm.read() for swarm in swarms]
        after = [s.ask("stats") for s in [*servers, producer]]
        used = accounts.finish()
    finally:
        for swarm in swarms:
            with contextlib.suppress(Exception):
                swarm.send("quit")
        for child in [*servers, *swarms]:
            child.close()
    # The servers' and the producer's own CPU clock (getrusage, microseconds), rather than
    # /proc's 10 ms ticks; the swarm and redis-server from /proc.
    cpu = [a["cpu"] - b["cpu"] for a, b in zip(after, before, strict=True)]
    ticks = [a["ticks"] - b["ticks"] for a, b in zip(after, before, strict=True)]
    per_server, producer_cpu = cpu[:-1], cpu[-1]
    per_tick = [c / max(t, 1) for c, t in zip(per_server, ticks, strict=False)]
    servers_cpu = sum(per_server)
    publications = sum(after[-1]["published"].values()) - sum(before[-1]["published"].values())
    wall = used["wall"]
    others = max(0.0, used["machine"] - used["redis"] - used["swarm"] - servers_cpu - producer_cpu)
    updates = sum(r["updates"] for r in results)
    shares = halves if len(servers) == 2 else [clients]
    # Clients each server process would hold at one full core, extrapolated linearly.
    projected = sum(n * interval / c for n, c in zip(shares, per_tick, strict=True) if c > 0)
    edges = setup == "two edges"
    scaleout_cpu = producer_cpu + used["redis"] if edges else 0.0
    p50s = [r["latency_p50"] for r in results if r["latency_p50"] is not None]
    p99s = [r["latency_p99"] for r in results if r["latency_p99"] is not None]
    return {
        "setup": setup,
        "clients": clients,
        "connected": connected,
        "held": connected == clients
        and all(r["min_updates"] >= int(window / interval) - 1 for r in results),
        "servers_ms_per_tick": 1000 * sum(per_tick),
        "busiest_ms_per_tick": 1000 * max(per_tick),
        "producer_ms_per_pub": 1000 * producer_cpu / max(publications, 1) if edges else None,
        "redis_cpu_percent": 100 * used["redis"] / wall,
        "swarm_cpu_percent": 100 * used["swarm"] / wall,
        "others_cpu_percent": 100 * others / wall,
        "kernel_cpu_percent": 100 * used["interrupts"] / wall,
        "updates_per_cpu_s": updates / servers_cpu if servers_cpu else None,
        "updates_per_cpu_s_all": updates / (servers_cpu + scaleout_cpu) if servers_cpu else None,
        "projected_clients": projected or None,
        "latency_p50_ms": 1000 * max(p50s) if p50s else None,
        "latency_p99_ms": 1000 * max(p99s) if p99s else None,
        "errors": [a["last_error"] for a in after if a["last_error"]],
    }


# The extra hop: the probe, run as ``scaleout.py _probe PRODUCER EDGE REDIS PREFIX``.


def _parse_stamp(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def _redis_floor(url: str, samples: int) -> list[float]:
    """One-way PUBLISH -> subscriber latency on loopback, both ends in this process."""
    import redis.asyncio as aioredis

    publisher, subscriber = aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)
    pubsub = subscriber.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("bench:floor")
    delays: list[float] = []

    async def listen() -> None:
        while len(delays) < samples:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                delays.append(time.time() - float(message["data"]))

    listener = asyncio.create_task(listen())
    for _ in range(samples):
        await publisher.publish("bench:floor", repr(time.time()))
        await asyncio.sleep(0.005)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await listener
    listener.cancel()
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await publisher.aclose()
    await subscriber.aclose()
    return delays


async def _probe_main(producer_port: int, edge_port: int, url: str, prefix: str) -> None:
    import redis.asyncio as aioredis
    from websockets.asyncio.client import connect

    from session_buddy_realtime.scaleout import wire
    from session_buddy_realtime.scaleout.link import Keys

    floor = await _redis_floor(url, 200)
    first: dict[str, dict[str, list[float]]] = {"producer": {}, "edge": {}, "redis": {}}
    tick_to_receive: dict[str, list[float]] = {"producer": [], "edge": []}
    ready = {"producer": asyncio.Event(), "edge": asyncio.Event(), "redis": asyncio.Event()}

    async def follow(name: str, port: int) -> None:
        async with connect(f"ws://127.0.0.1:{port}/", compression=None, max_size=None) as ws:
            async for frame in ws:
                received = time.time()
                message = json.loads(frame)
                if message.get("type") != "metrics_update":
                    continue
                ready[name].set()
                sent = _parse_stamp(message["timestamp"])
                tick_to_receive[name].append(received - sent)
                as_of = message["source"]["as_of"]
                if as_of is not None and as_of not in first[name]:
                    first[name][as_of] = [received, sent]

    async def subscribe() -> None:
        client = aioredis.Redis.from_url(url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(Keys(prefix).states)
        ready["redis"].set()
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    continue
                received = time.time()
                published = wire.decode_published(message["data"])
                if published.snapshot is None or published.snapshot.as_of is None:
                    continue
                as_of = published.snapshot.as_of
                if as_of not in first["redis"]:
                    first["redis"][as_of] = [received, published.sent_at]
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await client.aclose()

    tasks = [
        asyncio.create_task(follow("producer", producer_port)),
        asyncio.create_task(follow("edge", edge_port)),
        asyncio.create_task(subscribe()),
    ]
    async with asyncio.timeout(30):
        for event in ready.values():
            await event.wait()
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "done"
    await asyncio.sleep(0.5)  # the last write's update on its way
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(
        json.dumps({"floor": floor, "first": first, "tick_to_receive": tick_to_receive}),
        flush=True,
    )


def measure_hop(
    interval: float, seconds: float, *, db: Path, redis: Any, prefix: str
) -> dict[str, Any]:
    """One round: a fresh producer and edge, the probe, and a writer (this process)."""
    children: list[Child] = []
    writes: list[float] = []
    try:
        producer = _spawn_server(
            "producer", interval, db=db, redis_url=redis.url, prefix=prefix, clients=10
        )
        children.append(producer)
        producer_port = producer.read()["port"]
        edge = _spawn_server(
            "edge", interval, db=None, redis_url=redis.url, prefix=prefix, clients=10
        )
        children.append(edge)
        edge_port = edge.read()["port"]
        probe = Child("_probe", str(producer_port), str(edge_port), redis.url, prefix)
        children.append(probe)
        probe.read()  # ready: both clients have had an update, the subscriber listens
        time.sleep(2 * interval)
        rng = random.Random()
        began = time.time()
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
            while time.time() - began < seconds:
                writes.append(time.time())
                conn.execute(
                    "INSERT INTO skill_invocation (skill_name, invoked_at, session_id, "
                    "workflow_path, completed, duration_seconds) VALUES (?, ?, ?, ?, 1, ?)",
                    (
                        rng.choice(("pytest-run", "ruff-check", "mypy-check")),
                        datetime.now(UTC).isoformat(),
                        "bench",
                        "bench/scaleout",
                        round(rng.uniform(0.5, 3.0), 3),
                    ),
                )
                time.sleep(rng.uniform(0.75, 2.25) * interval)
        time.sleep(3 * interval)
        probe.send("done")
        result = probe.read()
        edge_stats = edge.ask("stats")
    finally:
        for child in children:
            child.close()
    return _hop_rows(result, writes, began, edge_stats)


def _hop_rows(
    result: dict[str, Any], writes: list[float], began: float, edge_stats: dict[str, Any]
) -> dict[str, Any]:
    first = result["first"]
    producer, edge, raw = first["producer"], first["edge"], first["redis"]
    fresh = sorted(a for a in producer if _parse_stamp(a) >= began)
    both = [a for a in fresh if a in edge]
    rows: dict[str, list[float]] = {
        key: []
        for key in (
            "edge_minus_producer",
            "publish_minus_tick",
            "redis_transit",
            "edge_own",
            "hop",
            "write_to_producer",
            "write_to_edge",
        )
    }
    for as_of in both:
        p_received, p_tick = producer[as_of]
        e_received, _ = edge[as_of]
        rows["edge_minus_producer"].append(e_received - p_received)
        if as_of in raw:
            r_received, sent_at = raw[as_of]
            rows["publish_minus_tick"].append(sent_at - p_tick)
            rows["redis_transit"].append(r_received - sent_at)
            rows["edge_own"].append(e_received - r_received)
            rows["hop"].append(e_received - sent_at)
        read_at = _parse_stamp(as_of) + 0.001  # as_of is the read's time, to the millisecond
        written = [w for w in writes if w <= read_at]
        if written:
            rows["write_to_producer"].append(p_received - written[-1])
            rows["write_to_edge"].append(e_received - written[-1])
    return {
        **rows,
        "updates": len(fresh),
        "matched": len(both),
        "edge_only": len([a for a in edge if _parse_stamp(a) >= began and a not in producer]),
        "writes": len(writes),
        "floor_redis": result["floor"],
        "tick_to_receive_producer": result["tick_to_receive"]["producer"],
        "tick_to_receive_edge": result["tick_to_receive"]["edge"],
        "edge_received": edge_stats["received"],
    }


# The report.


def _q(values: list[float], q: float) -> float | None:
    return fanout._quantile(sorted(values), q)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.2f}"


def _fmt(value: float | None, digits: int = 1) -> str:
    return fanout._fmt(value, digits)


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    return fanout._median(rows, key)


CAPACITY_COLUMNS = (
    # (key, heading, width, digits)
    ("servers_ms_per_tick", "servers ms/tick", 16, 2),
    ("busiest_ms_per_tick", "busiest ms/tick", 16, 2),
    ("producer_ms_per_pub", "producer ms/pub", 16, 2),
    ("redis_cpu_percent", "redis %", 8, 1),
    ("swarm_cpu_percent", "swarm %", 8, 1),
    ("kernel_cpu_percent", "irq %", 7, 1),
    ("others_cpu_percent", "others %", 9, 1),
    ("updates_per_cpu_s", "updates/CPU-s", 14, 0),
    ("updates_per_cpu_s_all", "+prod", 8, 0),
    ("projected_clients", "projected", 10, 0),
    ("latency_p50_ms", "p50 ms", 8, 1),
    ("latency_p99_ms", "p99 ms", 8, 1),
)


def report_capacity(rows: list[dict[str, Any]], sizes: list[int], args: argparse.Namespace) -> None:
    print(
        f"\ncapacity: interval {args.interval} s, {args.seconds} s measured per run, medians of "
        f"{args.rounds} round(s), setups interleaved\n"
        "  one process = a standalone server with N clients; two edges = two edge servers with "
        "N/2 clients each, fed through redis-server by a producer that has no clients.\n"
        f"  All of it shares these {os.cpu_count()} cores, the client swarm too (two processes "
        "of N/2 clients): CPU % is of one core over the window: the swarm's, redis-server's, "
        "interrupts' (irq: loopback TCP delivery, charged to no process) and other processes' "
        "(outside the benchmark).\n"
        "  servers ms/tick = CPU per tick summed over the server processes; busiest = the "
        "busiest one; producer ms/pub = the producer's CPU per publication (it only publishes).\n"
        "  updates/CPU-s = updates the swarm received per CPU-second of the servers (at 1 s per "
        "tick: clients held per CPU-second); +prod counts the producer and redis-server too.\n"
        "  projected = clients held with one full core per server process, extrapolated "
        "linearly from CPU per tick at N; p50/p99 = swarm tick-to-receive (worse of its two "
        "processes); held = every client got every tick.\n"
    )
    print(
        f"{'N':>6}  {'setup':<12}"
        + "".join(f"{heading:>{width}}" for _, heading, width, _ in CAPACITY_COLUMNS)
        + f"{'held':>6}"
    )
    table: dict[tuple[str, int], dict[str, Any]] = {}
    for size in sizes:
        for setup in ("one process", "two edges"):
            group = [r for r in rows if r["setup"] == setup and r["clients"] == size]
            med: dict[str, Any] = {key: _median(group, key) for key, *_ in CAPACITY_COLUMNS}
            med["held"] = bool(group) and all(r["held"] for r in group)
            table[setup, size] = med
            print(
                f"{size:>6}  {setup:<12}"
                + "".join(
                    f"{_fmt(med[key], digits):>{width}}"
                    for key, _, width, digits in CAPACITY_COLUMNS
                )
                + f"{'yes' if med['held'] else 'NO':>6}"
            )
        one, two = table["one process", size], table["two edges", size]

        def ratio(key: str, base: str | None = None) -> str:
            value = fanout._ratio(two[key], one[base or key])  # noqa: B023
            return _fmt(value, 2) + "x"

        print(
            f"{size:>6}  two edges / one process: updates per CPU-second "
            f"{ratio('updates_per_cpu_s')} (servers), "
            f"{ratio('updates_per_cpu_s_all', 'updates_per_cpu_s')} (with producer and Redis); "
            f"projected clients {ratio('projected_clients')}; "
            f"busiest process's CPU per tick {ratio('busiest_ms_per_tick')}"
        )
    errors = sorted({e for r in rows for e in r["errors"]})
    if errors:
        print("  server errors: " + "; ".join(errors)[:500])


def report_hop(rounds: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def pooled(key: str) -> list[float]:
        return [x for r in rounds for x in r[key]]

    updates = sum(r["updates"] for r in rounds)
    matched = sum(r["matched"] for r in rounds)
    print(
        f"\nextra hop: producer + one edge (own processes), interval {args.latency_interval} s, "
        f"a row written every 0.75-2.25 intervals, {len(rounds)} round(s) x "
        f"{args.latency_seconds} s, each with a fresh producer and edge; probe clients only "
        f"(no swarm)\n"
        f"  {updates} updates seen by the producer's client, {matched} matched on the edge's "
        f"by source.as_of ({sum(r['edge_only'] for r in rounds)} only on the edge); "
        f"writes {sum(r['writes'] for r in rounds)}\n"
    )
    print(f"  {'':<66}{'p50 ms':>9}{'p99 ms':>9}{'min ms':>9}{'max ms':>9}")

    def line(label: str, values: list[float]) -> None:
        print(
            f"  {label:<66}{_ms(_q(values, 0.5)):>9}{_ms(_q(values, 0.99)):>9}"
            f"{_ms(min(values) if values else None):>9}{_ms(max(values) if values else None):>9}"
        )

    interval = args.latency_interval
    delta = pooled("edge_minus_producer")
    line("edge client receive - producer client receive, same update", delta)
    for index, r in enumerate(rounds, 1):
        phases = [x % interval for x in r["publish_minus_tick"]]
        phase = statistics.median(phases) if phases else None
        line(
            f"  round {index}: {r['matched']} updates, publisher {_ms(phase)} ms after the tick",
            r["edge_minus_producer"],
        )
    ahead = sum(1 for d in delta if d < 0)
    print(f"    the edge client got the update first for {ahead} of {len(delta)}")
    print(
        "    (with clients of its own the producer publishes right after each of its ticks the "
        "state that tick read, so the difference is the hop; a negative one means the edge "
        "client's read of the socket won the race against the producer client's)"
    )
    print("  where the edge's delay goes:")
    line(
        "  producer publication (sent_at) - producer tick (timestamp)", pooled("publish_minus_tick")
    )
    line("  Redis: publication -> a plain subscriber receives it", pooled("redis_transit"))
    line("  edge: plain subscriber receives -> edge client receives", pooled("edge_own"))
    line("  the hop itself: publication -> edge client receives", pooled("hop"))
    print("  floors:")
    line("  Redis pub/sub, one message, loopback, same process", pooled("floor_redis"))
    line(
        "  loopback WebSocket tick-to-receive, producer client (ms stamps)",
        pooled("tick_to_receive_producer"),
    )
    line("  loopback WebSocket tick-to-receive, edge client", pooled("tick_to_receive_edge"))
    print("  freshness (from the write an update reflects):")
    line("  write -> producer client", pooled("write_to_producer"))
    line("  write -> edge client", pooled("write_to_edge"))
    counts: dict[str, int] = {}
    for r in rounds:
        for key, value in (r["edge_received"] or {}).items():
            counts[key] = counts.get(key, 0) + value
    print("  edge feed counters: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,4000,10000", help="client counts N")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (capacity and hop)")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured per capacity run")
    parser.add_argument("--interval", type=float, default=1.0, help="capacity runs' interval")
    parser.add_argument("--latency-seconds", type=float, default=30.0, help="per hop round")
    parser.add_argument("--latency-interval", type=float, default=0.2)
    parser.add_argument("--smoke", action="store_true", help="N=50, one round, short windows")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.rounds, args.seconds, args.interval = "50", 1, 1.0, 0.2
        args.latency_seconds, args.latency_interval = 3.0, 0.1
    sizes = [int(s) for s in args.sizes.split(",")]
    fanout._raise_file_limit()
    from tests.redis_support import RedisProcess

    started = time.monotonic()
    command = [".venv/bin/python", "tests/benchmarks/scaleout.py", *sys.argv[1:]]
    print("command: " + shlex.join(command), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        db = fanout._demo_db(folder, anomalies=5)
        redis = RedisProcess(folder)
        redis.start()
        try:
            rows = run_capacity(args, sizes, db, redis, started)
            hops = []
            for round_index in range(args.rounds):
                hops.append(
                    measure_hop(
                        args.latency_interval,
                        args.latency_seconds,
                        db=db,
                        redis=redis,
                        prefix=f"bench-hop-{round_index}",
                    )
                )
                _progress(started, f"hop round {round_index + 1}: {hops[-1]['matched']} updates")
        finally:
            redis.stop()
    print(
        f"\nscale-out benchmark on {os.cpu_count()} cores, everything on loopback, "
        f"{time.monotonic() - started:.0f} s"
    )
    report_capacity(rows, sizes, args)
    report_hop(hops, args)
    return 0


def run_capacity(
    args: argparse.Namespace, sizes: list[int], db: Path, redis: Any, started: float
) -> list[dict[str, Any]]:
    """Every size and round, the two setups interleaved (their order alternating), with one
    producer publishing throughout."""
    producer = _spawn_server(
        "producer", args.interval, db=db, redis_url=redis.url, prefix=CAPACITY_PREFIX, clients=10
    )
    rows = []
    try:
        producer.read()
        for size in sizes:
            for round_index in range(args.rounds):
                setups = ["one process", "two edges"]
                for setup in setups if round_index % 2 == 0 else setups[::-1]:
                    row = measure_capacity(
                        setup,
                        size,
                        args.interval,
                        args.seconds,
                        db=db,
                        redis=redis,
                        producer=producer,
                    )
                    rows.append(row)
                    _progress(
                        started,
                        f"{setup:<11} N={size:<6} servers {row['servers_ms_per_tick']:.1f} "
                        f"ms/tick, swarm {row['swarm_cpu_percent']:.0f} %, "
                        f"others {row['others_cpu_percent']:.0f} %, held {row['held']}",
                    )
    finally:
        producer.close()
    return rows


def _progress(started: float, text: str) -> None:
    print(f"  {time.monotonic() - started:5.0f} s  measured {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        asyncio.run(
            _server_main(
                sys.argv[2],
                float(sys.argv[3]),
                sys.argv[4],
                sys.argv[5],
                sys.argv[6],
                int(sys.argv[7]),
            )
        )
    elif len(sys.argv) > 1 and sys.argv[1] == "_probe":
        asyncio.run(_probe_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]))
    else:
        sys.exit(main())
