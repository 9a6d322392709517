"""Measure what one stuck client does to everybody else, and how long stop() takes.

Run: ``python tests/benchmarks/stall_and_stop.py [--clients 100] [--rounds 3]``

The server runs in this process; the client swarm runs in a child process, so that the
two do not share an event loop. Each round runs the same swarm twice, interleaved: once
with only healthy clients and once next to a client that never reads (a tiny receive
buffer; the round waits until its backlog has filled the kernel's buffers and the server
is skipping updates for it). Frames carry 50 anomalies (the cap) so that happens within
seconds. For the healthy clients it prints the gaps between consecutive updates and the
tick-to-receive latency, then the time ``stop()`` takes with everybody still connected.
Medians over rounds, and the ratio of the stalled run to the clean one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing as mp
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from session_buddy_realtime import RealTimeMetricsServer
from session_buddy_realtime.data.demo import prepare_demo_database
from session_buddy_realtime.protocol import encode

INTERVAL = 0.02
WINDOW = 4.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _swarm(url: str, clients: int, window: float) -> dict[str, Any]:
    arrivals: list[list[float]] = [[] for _ in range(clients)]
    latencies: list[float] = []

    async def healthy(index: int) -> None:
        async with connect(url, max_size=2**22) as ws:
            async for raw in ws:
                received = time.time()
                message = json.loads(raw)
                if message["type"] == "metrics_update":
                    arrivals[index].append(time.monotonic())
                    sent = datetime.fromisoformat(message["timestamp"].replace("Z", "+00:00"))
                    latencies.append(received - sent.timestamp())

    tasks = [asyncio.create_task(healthy(i)) for i in range(clients)]
    await asyncio.sleep(window)
    gaps = [b - a for series in arrivals for a, b in itertools.pairwise(series)]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "gap_p50_ms": _percentile(gaps, 0.5) * 1000,
        "gap_p99_ms": _percentile(gaps, 0.99) * 1000,
        "gap_max_ms": max(gaps) * 1000 if gaps else float("nan"),
        "latency_p50_ms": _percentile(latencies, 0.5) * 1000,
        "latency_p99_ms": _percentile(latencies, 0.99) * 1000,
        "updates": sum(len(series) for series in arrivals),
    }


def _swarm_process(url: str, clients: int, out: Connection) -> None:
    out.send(asyncio.run(_swarm(url, clients, WINDOW)))
    out.close()


def _add_anomalies(db: Path, count: int) -> None:
    now = datetime.now(UTC)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executemany(
            "INSERT INTO skill_anomalies (skill_name, detected_at, anomaly_type, baseline_value, "
            "observed_value, deviation_score) VALUES (?, ?, 'drop', 90.0, 40.0, ?)",
            [
                (f"skill-{i}", (now - timedelta(minutes=i % 50)).isoformat(), 2.0 + i / 10)
                for i in range(count)
            ],
        )
        conn.commit()


async def _round(db: Path, clients: int, stall: bool) -> dict[str, Any]:
    server = RealTimeMetricsServer(host="127.0.0.1", port=0, db_path=db, update_interval=INTERVAL)
    await server.start()
    stuck = None
    if stall:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        stuck = await connect(server.urls[0], sock=sock, max_queue=1)
        async with asyncio.timeout(60):
            while server.status()["updates_dropped"] == 0:  # noqa: ASYNC110 - bounded poll
                await asyncio.sleep(0.05)
    receiver, sender = mp.Pipe(duplex=False)
    child = mp.get_context("spawn").Process(
        target=_swarm_process, args=(server.urls[0], clients, sender)
    )
    child.start()
    loop = asyncio.get_running_loop()
    result: dict[str, Any] = await loop.run_in_executor(None, receiver.recv)
    result["dropped"] = server.status()["updates_dropped"]
    result["frame_bytes"] = len(encode(await server.snapshot()))
    started = time.perf_counter()
    await server.stop()
    result["stop_ms"] = (time.perf_counter() - started) * 1000
    if stuck is not None:
        stuck.transport.abort()
    await loop.run_in_executor(None, child.join)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "demo.db"
        await prepare_demo_database(db)
        _add_anomalies(db, 50)
        runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for stall in (False, True):
                runs[stall].append(await _round(db, args.clients, stall))
    print(
        f"{args.clients} healthy clients, interval {INTERVAL * 1000:.0f} ms, "
        f"{runs[False][0]['frame_bytes']} B frames, "
        f"{WINDOW:.0f} s windows, medians of {args.rounds} rounds"
    )
    keys = [
        "gap_p50_ms",
        "gap_p99_ms",
        "gap_max_ms",
        "latency_p50_ms",
        "latency_p99_ms",
        "stop_ms",
        "updates",
        "dropped",
    ]
    print(f"{'':16}" + "".join(f"{k:>16}" for k in keys))
    medians = {}
    for stall in (False, True):
        medians[stall] = {k: statistics.median(r[k] for r in runs[stall]) for k in keys}
        label = "one stuck client" if stall else "no stall"
        print(f"{label:16}" + "".join(f"{medians[stall][k]:>16.1f}" for k in keys))
    ratio = {
        k: medians[True][k] / medians[False][k] if medians[False][k] else float("nan")
        for k in keys[:6]
    }
    print(f"{'ratio':16}" + "".join(f"{ratio[k]:>16.2f}" for k in keys[:6]))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
