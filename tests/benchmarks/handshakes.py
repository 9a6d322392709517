"""The opening handshake alone: server CPU per handshake and ``stop()``, with no tick.

Run (a few minutes at 19,500 clients)::

    .venv/bin/python tests/benchmarks/handshakes.py --servers ours,node,floor --clients 19500

``fanout.py``'s servers and swarm, but the servers tick once an hour, so the connect
phase carries no tick and no keepalive: what is left is the handshake itself (accept, the
request, the checks, the session and its welcome). Each run starts a server, connects
the swarm (``--in-flight`` at a time), reads the server's CPU, then times ``stop()``
with every client still connected. Servers run in turn, round after round; the report
gives medians and each server against the first.

To compare two versions of this package, name a source tree for an ``ours`` run:
``--servers before=/path/to/old/tree,ours,node`` runs ``ours`` with that tree first on
``PYTHONPATH`` (a checkout's root, which holds ``session_buddy_realtime/``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

import fanout  # noqa: E402  (the servers, the swarm and their process wrapper)

AN_HOUR = 3600.0


def measure(
    kind: str, tree: str | None, db: Path, clients: int, in_flight: int
) -> dict[str, float]:
    """One run: CPU per handshake (µs) and ``stop()`` (ms) with every client connected."""
    environment = None
    if tree is not None:
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join([tree, environment.get("PYTHONPATH", "")])
    server = fanout.server_process(kind, db, AN_HOUR, env=environment)
    swarm = None
    try:
        port = server.read()["port"]
        time.sleep(0.5)
        idle = server.ask("stats")
        swarm = fanout.Process("_swarm", str(port), str(clients), "1", "0", str(in_flight))
        hello = swarm.read()
        joined = server.ask("stats")
        if hello["connected"] != clients:
            raise RuntimeError(f"{kind}: {hello['connected']} of {clients} clients connected")
        time.sleep(1.0)
        stop = server.ask("stop")
        return {
            "cpu_per_handshake_us": 1e6 * (joined["cpu"] - idle["cpu"]) / clients,
            "connect_ms": 1000 * hello["connect_s"],
            "stop_ms": stop["stop_ms"],
        }
    finally:
        server.close()
        if swarm is not None:
            swarm.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="ours,node,floor")
    parser.add_argument("--clients", type=int, default=19_500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=100)
    args = parser.parse_args()
    fanout._raise_file_limit()
    servers: list[tuple[str, str, str | None]] = []
    for entry in args.servers.split(","):
        name, _, tree = entry.partition("=")
        servers.append((name, "ours" if tree else name, tree or None))
    if any(kind == "node" for _, kind, _ in servers) and fanout.prepare_node_peer() is None:
        print(f"node peer skipped: {fanout._node_problem}")
        servers = [server for server in servers if server[1] != "node"]
    db = fanout._demo_db(Path(tempfile.mkdtemp(prefix="handshakes-")), anomalies=3)
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in servers}
    for round_number in range(args.rounds):
        for name, kind, tree in servers:
            result = measure(kind, tree, db, args.clients, args.in_flight)
            results[name].append(result)
            print(
                f"  round {round_number + 1} {name:<10} {result['cpu_per_handshake_us']:7.1f} µs "
                f"per handshake, connect {result['connect_ms']:6.0f} ms, "
                f"stop() {result['stop_ms']:6.0f} ms",
                flush=True,
            )
    print(
        f"\nhandshakes alone: {args.clients} clients, {args.in_flight} in flight, no tick, "
        f"medians of {args.rounds} rounds"
    )
    first = servers[0][0]
    medians = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    for name, median in medians.items():
        ratios = (
            ""
            if name == first
            else "  "
            + ", ".join(
                f"{key.split('_')[0]} {median[key] / medians[first][key]:.2f}x" for key in median
            )
        )
        print(
            f"  {name:<10} {median['cpu_per_handshake_us']:7.1f} µs per handshake, connect "
            f"{median['connect_ms']:6.0f} ms, stop() {median['stop_ms']:6.0f} ms{ratios}"
            + (f" (against {first})" if ratios else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
