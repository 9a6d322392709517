"""Measure what clients that stop reading cost the server in memory.

Run: ``python tests/benchmarks/stuck_memory.py [--clients 200]``

The server runs in this process; a child process opens the clients: first as healthy idle
connections (the baseline cost of a connection), then as connections that never read,
with tiny receive buffers, so that each one's backlog reaches the server's user-space
buffer. Reported: RSS per idle connection, RSS per stuck connection once every stuck
client is being skipped, and the cap the design promises (``max_buffered_bytes`` plus one
frame). The stuck clients are dropped after ``slow_client_timeout``; the run also
reports that and the RSS afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import socket
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path

from websockets.asyncio.client import connect

from session_buddy_realtime import RealTimeMetricsServer
from session_buddy_realtime.data.demo import prepare_demo_database
from session_buddy_realtime.protocol import encode


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def _clients(url: str, port: int, count: int, stuck: bool, control: Connection) -> None:
    opened = []
    for _ in range(count):
        if stuck:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            opened.append(await connect(url, sock=sock, max_queue=1))
        else:
            ws = await connect(url)
            opened.append(ws)
    control.send("connected")
    loop = asyncio.get_running_loop()
    if not stuck:
        # Idle but healthy: keep reading so nothing piles up.
        readers = [asyncio.create_task(_drain(ws)) for ws in opened]
        await loop.run_in_executor(None, control.recv)
        for task in readers:
            task.cancel()
    else:
        await loop.run_in_executor(None, control.recv)
    for ws in opened:
        ws.transport.abort()


async def _drain(ws: object) -> None:
    with contextlib.suppress(Exception):
        async for _ in ws:  # type: ignore[attr-defined]
            pass


def _child(url: str, port: int, count: int, stuck: bool, control: Connection) -> None:
    asyncio.run(_clients(url, port, count, stuck, control))


async def _poll(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


async def _phase(server: RealTimeMetricsServer, count: int, stuck: bool) -> dict[str, float]:
    await asyncio.sleep(0.5)
    before = _rss_bytes()
    parent, child_end = mp.Pipe()
    child = mp.get_context("spawn").Process(
        target=_child, args=(server.urls[0], server.port, count, stuck, child_end)
    )
    child.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, parent.recv)
    result: dict[str, float] = {}
    if stuck:
        await _poll(lambda: all(c["congested"] for c in server.status()["clients"]), 120)
        result["congested"] = sum(c["congested"] for c in server.status()["clients"])
    else:
        await asyncio.sleep(1.0)
    result["per_client"] = (_rss_bytes() - before) / count
    if stuck:
        evicted = await _poll(lambda: server.status()["client_count"] == 0, 60)
        result["evicted"] = float(evicted)
        result["rss_after_eviction_per_client"] = (_rss_bytes() - before) / count
    parent.send("done")
    await loop.run_in_executor(None, child.join)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "demo.db"
        await prepare_demo_database(db)
        now = datetime.now(UTC)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.executemany(
                "INSERT INTO skill_anomalies (skill_name, detected_at, anomaly_type, "
                "baseline_value, observed_value, deviation_score) VALUES (?, ?, 'drop', 90, 40, ?)",
                [(f"skill-{i}", (now - timedelta(minutes=i)).isoformat(), 3.0) for i in range(50)],
            )
            conn.commit()
        server = RealTimeMetricsServer(
            "127.0.0.1", 0, db, update_interval=0.01, slow_client_timeout=15.0, ping_interval=None
        )
        async with server:
            frame = len(encode(await server.snapshot()))
            idle = await _phase(server, args.clients, stuck=False)
            stuck = await _phase(server, args.clients, stuck=True)
        cap = 64 * 1024 + frame
        print(f"{args.clients} clients, {frame} B frames, 10 ms interval")
        print(f"RSS per idle connection:           {idle['per_client'] / 1024:8.1f} KiB")
        print(
            f"RSS per stuck connection:          {stuck['per_client'] / 1024:8.1f} KiB "
            f"({int(stuck['congested'])} of {args.clients} being skipped)"
        )
        print(
            f"design cap of the send backlog:    {cap / 1024:8.1f} KiB "
            f"(max_buffered_bytes + one frame)"
        )
        print(
            f"stuck clients dropped by the server: {'yes' if stuck['evicted'] else 'NO'}; "
            f"RSS afterwards {stuck['rss_after_eviction_per_client'] / 1024:.1f} KiB per client "
            f"(the allocator keeps freed memory for reuse)"
        )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
