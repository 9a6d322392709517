"""Measure what clients that stop reading cost the server in memory.

Run: ``python tests/benchmarks/stuck_memory.py [--clients 200] [--rcvbuf 0]``

The server runs in this process; a child process opens the clients: first as healthy idle
connections (the baseline cost of a connection), then as connections that never read,
with tiny receive buffers (``--rcvbuf 4096``, so that each one's backlog reaches the
server's user-space buffer soon) or the system's default, autotuned ones (``--rcvbuf 0``,
the worst case for the kernel's send buffers). Reported: RSS per idle connection, RSS
per stuck connection once every stuck client is being skipped, what the kernel holds in
the server's send buffers (``ss -tm``: ``wmem_queued`` of the server's sockets), and the
bound the design promises. The stuck clients are dropped after ``slow_client_timeout``;
the run also reports that, how long it took, and the RSS afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import re
import socket
import sqlite3
import subprocess
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
from session_buddy_realtime.stream.gate import SEND_BUFFER_BYTES


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _kernel_send_bytes(port: int) -> tuple[int, int] | None:
    """Sum and largest ``wmem_queued`` of the server's established sockets, via ``ss``."""
    try:
        output = subprocess.run(
            ["ss", "-tmnH", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    queued = [int(w) for w in re.findall(r"\bw(\d+)", output)]
    return sum(queued), max(queued, default=0)


async def _clients(
    url: str, port: int, count: int, stuck: bool, rcvbuf: int, control: Connection
) -> None:
    opened = []
    for _ in range(count):
        if stuck:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
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


def _child(url: str, port: int, count: int, stuck: bool, rcvbuf: int, control: Connection) -> None:
    asyncio.run(_clients(url, port, count, stuck, rcvbuf, control))


async def _poll(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


async def _phase(
    server: RealTimeMetricsServer, count: int, stuck: bool, rcvbuf: int
) -> dict[str, float]:
    await asyncio.sleep(0.5)
    before = _rss_bytes()
    parent, child_end = mp.Pipe()
    child = mp.get_context("spawn").Process(
        target=_child, args=(server.urls[0], server.port, count, stuck, rcvbuf, child_end)
    )
    child.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, parent.recv)
    connected = time.monotonic()
    result: dict[str, float] = {}
    if stuck:
        await _poll(lambda: all(c["congested"] for c in server.status()["clients"]), 1500)
        result["congested"] = sum(c["congested"] for c in server.status()["clients"])
        result["noticed_after"] = time.monotonic() - connected
        kernel = _kernel_send_bytes(server.port)
        result["kernel_total"], result["kernel_max"] = kernel if kernel else (-1, -1)
    else:
        await asyncio.sleep(1.0)
    result["per_client"] = (_rss_bytes() - before) / count
    if stuck:
        evicted = await _poll(lambda: server.status()["client_count"] == 0, 60)
        result["evicted"] = float(evicted)
        result["evicted_after"] = time.monotonic() - connected
        kernel = _kernel_send_bytes(server.port)
        result["kernel_after"] = kernel[0] if kernel else -1
        result["rss_after_eviction_per_client"] = (_rss_bytes() - before) / count
    parent.send("done")
    await loop.run_in_executor(None, child.join)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument(
        "--rcvbuf", type=int, default=4096, help="stuck clients' SO_RCVBUF; 0 for the default"
    )
    parser.add_argument("--interval", type=float, default=0.01)
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
            "127.0.0.1",
            0,
            db,
            update_interval=args.interval,
            slow_client_timeout=15.0,
            ping_interval=None,
        )
        async with server:
            frame = len(encode(await server.snapshot()))
            idle = await _phase(server, args.clients, stuck=False, rcvbuf=args.rcvbuf)
            stuck = await _phase(server, args.clients, stuck=True, rcvbuf=args.rcvbuf)
        cap = 64 * 1024 + frame
        kernel_cap = 2 * SEND_BUFFER_BYTES
        rcvbuf = "default" if args.rcvbuf == 0 else f"{args.rcvbuf} B"
        print(
            f"{args.clients} clients, {frame} B frames, {args.interval * 1000:g} ms interval, "
            f"stuck clients' receive buffer {rcvbuf}"
        )
        print(f"RSS per idle connection:           {idle['per_client'] / 1024:8.1f} KiB")
        print(
            f"RSS per stuck connection:          {stuck['per_client'] / 1024:8.1f} KiB "
            f"({int(stuck['congested'])} of {args.clients} being skipped)"
        )
        print(
            f"design cap of the send backlog:    {cap / 1024:8.1f} KiB "
            f"(max_buffered_bytes + one frame)"
        )
        if stuck["kernel_total"] >= 0:
            print(
                "kernel send memory per stuck one: "
                f"{stuck['kernel_total'] / args.clients / 1024:8.1f}"
                f" KiB (largest {stuck['kernel_max'] / 1024:.1f} KiB; cap 2 x SO_SNDBUF = "
                f"{kernel_cap / 1024:.0f} KiB)"
            )
        print(
            f"stuck clients all being skipped after {stuck['noticed_after']:.1f} s; "
            f"dropped after {stuck['evicted_after']:.1f} s"
        )
        print(
            f"stuck clients dropped by the server: {'yes' if stuck['evicted'] else 'NO'}; "
            f"RSS afterwards {stuck['rss_after_eviction_per_client'] / 1024:.1f} KiB per client "
            f"(the allocator keeps freed memory for reuse); kernel send memory left "
            f"{stuck['kernel_after'] / 1024:.0f} KiB"
        )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
